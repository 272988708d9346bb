#!/usr/bin/env bash
# Starts Postgres, the API and one CPU worker in the background. Writes .run/env with FINETUNE_URL and FINETUNE_API_KEY.
source "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"
"$REPO_ROOT/scripts/build.sh"
pg_start
mkdir -p "$RUN_DIR" "$REPO_ROOT/.data/models" "$REPO_ROOT/.data/datasets" "$REPO_ROOT/.data/artifacts"
port="${FINETUNE_PORT:-5080}"
if [ ! -f "$RUN_DIR/env" ]; then
  key="ft_$(head -c 48 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c 32)"
  printf 'FINETUNE_URL=http://127.0.0.1:%s\nFINETUNE_API_KEY=%s\n' "$port" "$key" > "$RUN_DIR/env"
fi
source "$RUN_DIR/env"
db="Host=127.0.0.1;Port=$PG_PORT;Username=postgres;Database=finetune"
psql "host=127.0.0.1 port=$PG_PORT user=postgres dbname=postgres" -tAc "select 1 from pg_database where datname='finetune'" | grep -q 1 \
  || psql "host=127.0.0.1 port=$PG_PORT user=postgres dbname=postgres" -qc "create database finetune"
export ConnectionStrings__Postgres="$db" Storage__Root="$REPO_ROOT/.data" Bootstrap__ApiKey="$FINETUNE_API_KEY"
bin="$REPO_ROOT/src"
stop_pid() { [ -f "$1" ] && kill "$(cat "$1")" 2>/dev/null || true; rm -f "$1"; }
stop_pid "$RUN_DIR/api.pid"; stop_pid "$RUN_DIR/worker.pid"
log "starting the API on $FINETUNE_URL"
(cd "$bin/Api/bin/Release/net10.0" && exec setsid dotnet FineTune.Api.dll --urls "$FINETUNE_URL" > "$RUN_DIR/api.log" 2>&1) &
echo $! > "$RUN_DIR/api.pid"
log "starting a CPU worker"
(cd "$bin/Worker/bin/Release/net10.0" && exec setsid dotnet FineTune.Worker.dll > "$RUN_DIR/worker.log" 2>&1) &
echo $! > "$RUN_DIR/worker.pid"
for _ in $(seq 1 60); do
  curl -fsS "$FINETUNE_URL/health/ready" >/dev/null 2>&1 && break
  sleep 1
done
curl -fsS "$FINETUNE_URL/health/ready" >/dev/null || { echo "API did not become ready; see $RUN_DIR/api.log" >&2; tail -20 "$RUN_DIR/api.log" >&2; exit 1; }
log "up: $FINETUNE_URL (API key in $RUN_DIR/env; logs in $RUN_DIR/api.log, $RUN_DIR/worker.log)"
