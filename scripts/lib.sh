# Shared helpers for the project's scripts: install what is missing, run a local Postgres cluster,
# build the native libtorch shim. Sourced, not run.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUN_DIR="$REPO_ROOT/.run"
PG_PORT="${FINETUNE_PG_PORT:-55432}"
PG_DATA="$RUN_DIR/pgdata"
export FINETUNE_PG="${FINETUNE_PG:-Host=127.0.0.1;Port=$PG_PORT;Username=postgres;Database=postgres}"
# libtorch 1.13 on CPU runs one thread unless told; use the machine's cores.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
export DOTNET_CLI_TELEMETRY_OPTOUT=1 DOTNET_NOLOGO=1 DOTNET_SKIP_FIRST_TIME_EXPERIENCE=1

log() { printf '\033[1;34m==>\033[0m %s\n' "$*" >&2; }

ensure_packages() {
  local missing=()
  command -v cmake >/dev/null || missing+=(cmake)
  command -v g++ >/dev/null || missing+=(g++)
  [ -f /usr/lib/x86_64-linux-gnu/cmake/Torch/TorchConfig.cmake ] || [ -n "${Torch_DIR:-}" ] || missing+=(libtorch-dev)
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]} (apt)"
    local sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

pg_bin() { ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1; }

pg_start() {
  mkdir -p "$RUN_DIR"
  local bin; bin="$(pg_bin)"
  local as=(); [ "$(id -u)" = 0 ] && as=(runuser -u postgres --)
  if [ ! -f "$PG_DATA/PG_VERSION" ]; then
    log "creating a Postgres cluster in $PG_DATA"
    mkdir -p "$PG_DATA"; [ "$(id -u)" = 0 ] && chown -R postgres:postgres "$PG_DATA"
    chmod 700 "$PG_DATA"
    touch "$RUN_DIR/pg.log"; [ "$(id -u)" = 0 ] && chown postgres:postgres "$RUN_DIR/pg.log"
    "${as[@]}" "$bin/initdb" -D "$PG_DATA" -U postgres --auth=trust -E UTF8 >/dev/null
    cat >> "$PG_DATA/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '/tmp'
max_connections = 300
fsync = off
synchronous_commit = off
full_page_writes = off
CONF
  fi
  if ! "${as[@]}" "$bin/pg_ctl" -D "$PG_DATA" status >/dev/null 2>&1; then
    log "starting Postgres on 127.0.0.1:$PG_PORT"
    "${as[@]}" "$bin/pg_ctl" -D "$PG_DATA" -l "$RUN_DIR/pg.log" -w start >/dev/null
  fi
}

pg_stop() {
  local bin; bin="$(pg_bin)"
  local as=(); [ "$(id -u)" = 0 ] && as=(runuser -u postgres --)
  [ -f "$PG_DATA/PG_VERSION" ] && "${as[@]}" "$bin/pg_ctl" -D "$PG_DATA" -m fast stop >/dev/null 2>&1 || true
}

build_native() {
  local out="$REPO_ROOT/build/native"
  mkdir -p "$out"
  local args=(-S "$REPO_ROOT/src/Worker/Torch/native" -B "$out/cmake" -DCMAKE_BUILD_TYPE=Release -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$out")
  [ -n "${Torch_DIR:-}" ] && args+=(-DTorch_DIR="$Torch_DIR")
  cmake "${args[@]}" >/dev/null
  cmake --build "$out/cmake" -j "$(nproc)" >&2
  export FINETUNE_TORCH_NATIVE="$out/libfinetune_torch.so"
}
