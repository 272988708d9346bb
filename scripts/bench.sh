#!/usr/bin/env bash
# The CPU-sized benchmark, here: builds the shim and the worker, runs `FineTune.Worker bench all` on the CPU (binding
# micro-benchmarks + the training step on the small preset for LoRA and Bone), prints the tables and writes the CPU
# section of docs/benchmarks.md (date, machine, command). The GPU section comes from scripts/gpu/suite.sh on a GPU host:
#   python3 tests/bench/report.py splice docs/benchmarks.md gpu <its benchmarks.md>
# Extra arguments go to the bench command (e.g. --configs lora,bone,lora+gc --steps 10). --no-doc leaves the doc alone.
source "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"
doc=1
args=()
for a in "$@"; do
  if [ "$a" = "--no-doc" ]; then doc=0; else args+=("$a"); fi
done
log "building the native shim and the worker"
build_native
dotnet build src/Worker/Worker.csproj -c Release -nologo -v q -clp:ErrorsOnly
out="$RUN_DIR/bench"; mkdir -p "$out"
cmd=(dotnet src/Worker/bin/Release/net10.0/FineTune.Worker.dll bench all --device cpu --warmup 2 --steps 5 "${args[@]}")
log "running: ${cmd[*]}"
"${cmd[@]}" --json "$out/cpu.json" --md "$out/cpu-ours.md"
# PyTorch's own numbers on the same CPU, when a python3 with torch is at hand (e.g. Debian's python3-torch).
rm -f "$out/cpu-torch.json"
for py in python3 /usr/bin/python3; do
  if "$py" -c 'import torch' 2>/dev/null; then
    log "PyTorch's micro-benchmarks with $py"
    "$py" tests/bench/torch_micro.py --json "$out/cpu-torch.json" >/dev/null
    break
  fi
done
python3 tests/bench/report.py build --title "CPU ($(date -u +%Y-%m-%d))" --ours "$out/cpu.json" --micro-ours "$out/cpu.json" \
  --micro-torch "$out/cpu-torch.json" --md "$out/cpu.md" >/dev/null
if [ "$doc" = 1 ]; then
  {
    echo "- machine: $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB;" \
         "load average when run: $(cut -d' ' -f1-3 /proc/loadavg) (a shared development machine: CPU numbers are indicative only)"
    echo "- command: \`scripts/bench.sh${*:+ $*}\` (runs \`${cmd[*]:1}\`), OMP_NUM_THREADS=$OMP_NUM_THREADS"
    echo
    sed '1,2d' "$out/cpu.md"
  } > "$out/cpu-section.md"
  { echo "## CPU ($(date -u +%Y-%m-%d))"; echo; cat "$out/cpu-section.md"; } > "$out/cpu-doc.md"
  python3 tests/bench/report.py splice docs/benchmarks.md cpu "$out/cpu-doc.md"
  log "docs/benchmarks.md: CPU section updated"
fi
