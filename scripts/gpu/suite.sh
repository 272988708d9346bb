#!/usr/bin/env bash
# The whole GPU suite in ONE command on a CUDA host with PyTorch + PEFT and no .NET SDK (after scripts/gpu/pack.sh here):
#   bash scripts/gpu/suite.sh --out "$OUT" --deadline 540
# builds the shim against torch's libtorch, runs the worker tests on cuda, gpu_check.py, the micro-benchmarks (ours and
# PyTorch's in the same run) and the training benchmark (ours, then PyTorch + PEFT on the same model, tokens and
# initial adapter values), and writes into --out: benchmarks.md (the report), results.json (every raw number),
# suite.log (this script's log) and logs.tar.gz (each step's log and JSON). At most 4 files.
# Every step runs under `timeout`; a step that no longer fits in the deadline (seconds from start) is skipped and
# reported, so the command ends in time and never hangs.
#
# Options: --parts build,tests,check,micro,train (default all) --configs A,B,... (training rows, default
#   lora,lora+mixed,lora+bf16,lora+mixed+gc,dora,dora+mixed,bone,bone+mixed,bat,vblora,vblora+mixed) --lr X (AdamW, constant; default 1e-3) --warmup N --steps N --seq N --batch N --preset 1b|small
#   --peft-rerun (PEFT trains every row a second time on the same inputs: its own run-to-run loss difference, the
#   scale against which the loss check's 2 % reads)
#   --tests "ARGS" (xunit v3 runner arguments, e.g. "-class FineTune.Worker.Tests.Training.PerformanceTests")
#   --profile A,B (rows that get one extra step under the kernel profilers, ours and PyTorch's; default lora+mixed; "" for none)
#   --pack DIR (what pack.sh wrote, default .device)  --device cuda:N (default cuda:0; "cpu" only to try the script)
set -uo pipefail
REPO_ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$REPO_ROOT"

out="" deadline=540 parts="build,tests,check,micro,train" configs="lora,lora+mixed,lora+bf16,lora+mixed+gc,dora,dora+mixed,bone,bone+mixed,bat,vblora,vblora+mixed"
peft_rerun=0 lr=1e-3 warmup=3 steps=10 seq=2048 batch=4 preset=1b tests_args="" pack="$REPO_ROOT/.device" profile="lora+mixed" device="cuda:0"
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --deadline) deadline="$2"; shift 2 ;;
    --parts) parts="$2"; shift 2 ;;
    --configs) configs="$2"; shift 2 ;;
    --warmup) warmup="$2"; shift 2 ;;
    --lr) lr="$2"; shift 2 ;;
    --steps) steps="$2"; shift 2 ;;
    --seq) seq="$2"; shift 2 ;;
    --batch) batch="$2"; shift 2 ;;
    --preset) preset="$2"; shift 2 ;;
    --tests) tests_args="$2"; shift 2 ;;
    --peft-rerun) peft_rerun=1; shift ;;
    --profile) profile="$2"; shift 2 ;;
    --device) device="$2"; shift 2 ;;
    --pack) pack="$(realpath -m "$2")"; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
[ -n "$out" ] || { echo "usage: suite.sh --out DIR [--deadline SECONDS] [...]" >&2; exit 2; }
mkdir -p "$out"
work="${FINETUNE_GPU_WORK:-/tmp/finetune-gpu}"
logs="$work/suite"
rm -rf "$logs"; mkdir -p "$logs"
export FINETUNE_GPU_PACK="$pack" FINETUNE_GPU_WORK="$work" PYTHONUNBUFFERED=1
# Multi-GPU kinds: NVLink multicast stays off (see the device notes).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
start=$(date +%s)
status="$logs/status.tsv"; : > "$status"
log() { printf '[%4ds] %s\n' "$(( $(date +%s) - start ))" "$*" | tee -a "$logs/suite.log" >&2; }
left() { echo $(( deadline - ($(date +%s) - start) )); }
want() { [[ ",$parts," == *",$1,"* ]]; }

# step NAME MIN_SECONDS MAX_SECONDS CMD...: runs CMD with its output in $logs/NAME.log, under a timeout of
# min(MAX, time left - 20 s); skipped when less than MIN seconds are left.
step() {
  local name="$1" min="$2" max="$3"; shift 3
  local budget=$(( $(left) - 20 ))
  if [ "$budget" -lt "$min" ]; then
    log "SKIP $name (only ${budget}s left, needs ${min}s)"; printf '%s\tskipped (time)\t0\n' "$name" >> "$status"; return 0
  fi
  [ "$budget" -gt "$max" ] && budget="$max"
  log "RUN  $name (timeout ${budget}s): $*"
  local t0=$(date +%s) rc
  timeout --kill-after=10 "$budget" "$@" > "$logs/$name.log" 2>&1; rc=$?
  local secs=$(( $(date +%s) - t0 ))
  if [ $rc -eq 0 ]; then log "OK   $name (${secs}s)"; printf '%s\tok\t%s\n' "$name" "$secs" >> "$status"
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then log "TIME $name (${secs}s)"; printf '%s\ttimed out\t%s\n' "$name" "$secs" >> "$status"
  else log "FAIL $name (rc $rc, ${secs}s); last lines:"; tail -n 15 "$logs/$name.log" | tee -a "$logs/suite.log" >&2
       printf '%s\tfailed (rc %s)\t%s\n' "$name" "$rc" "$secs" >> "$status"; fi
  return $rc
}

finish() {
  log "writing the report"
  local tests_summary="$logs/tests.summary"
  if [ -f "$logs/tests.log" ]; then
    grep -E "Total: [0-9]+" "$logs/tests.log" | tail -n 1 | sed 's/^ *//' > "$tests_summary" || true
    grep -E "^\s*\[FAIL\]" "$logs/tests.log" | head -n 20 >> "$tests_summary" || true
  fi
  python3 tests/bench/report.py build --title "GPU ($(date -u +%Y-%m-%d))" \
    --ours "$logs/train-ours.json" --peft "$logs/train-peft.json" --peft-rerun "$logs/train-peft-rerun.json" \
    --micro-ours "$logs/micro-ours.json" --micro-torch "$logs/micro-torch.json" \
    --tests "$tests_summary" --status "$status" --traces "$logs/traces" --md "$out/benchmarks.md" --json "$out/results.json" > "$logs/report.log" 2>&1 \
    || { log "report failed:"; tail -n 20 "$logs/report.log" | tee -a "$logs/suite.log" >&2; }
  cp "$logs/suite.log" "$out/suite.log"
  tar -czf "$out/logs.tar.gz" -C "$logs" . 2>/dev/null || true
  log "done in $(( $(date +%s) - start ))s; files: $(ls "$out" | tr '\n' ' ')"
  [ -f "$out/benchmarks.md" ] && cat "$out/benchmarks.md"
}
trap finish EXIT

log "suite: parts=$parts configs=$configs warmup=$warmup steps=$steps batch=$batch seq=$seq deadline=${deadline}s"
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1 || true
  python3 -c 'import torch,transformers,peft,safetensors;print("torch",torch.__version__,"cuda",torch.version.cuda,"transformers",transformers.__version__,"peft",peft.__version__,"safetensors",safetensors.__version__)' 2>&1
  nproc; free -g | head -2; } > "$logs/host.log"
cat "$logs/host.log" | tee -a "$logs/suite.log" >&2
[ -f "$pack/dotnet-runtime.tar.xz" ] || { log "no packed runtime in $pack: run scripts/gpu/pack.sh there first (and carry it)"; exit 1; }

# scripts/gpu/run.sh sets DOTNET_ROOT, LD_LIBRARY_PATH (torch's lib) and FINETUNE_TORCH_NATIVE, then runs the command.
run=(bash scripts/gpu/run.sh)
dll="$pack/worker/FineTune.Worker.dll"
shim="$work/native/libfinetune_torch.so"

# 1. shim build (about a minute) and the runtime; everything else needs it.
step build 30 300 bash scripts/gpu/run.sh true || { log "the shim did not build: stopping"; exit 1; }
# The optional kernel profiler (a separate library: if it does not build, the benchmark runs without profiles),
# built in the background while the tests run.
profiler_pid=""
if want train && [ -n "$profile" ]; then
  timeout 180 cmake --build "$work/cmake" --target finetune_torch_profiler -j "$(nproc)" > "$logs/profiler-build.log" 2>&1 &
  profiler_pid=$!
fi

# 2. the worker's tests on cuda (xunit v3 runner of the packed test assembly).
if want tests; then
  # shellcheck disable=SC2086
  step tests 60 240 env FINETUNE_TEST_DEVICE=cuda "${run[@]}" dotnet "$pack/worker-tests/FineTune.Worker.Tests.dll" -noColor -noLogo $tests_args
fi

# 3. the shim's 2.x/CUDA-only paths against PyTorch itself.
want check && step gpu_check 20 120 python3 src/Worker/Torch/native/gpu_check.py "$shim"

# 4. micro-benchmarks: ours and PyTorch's, same GPU, same run.
if want micro; then
  step micro-ours 20 120 "${run[@]}" dotnet "$dll" bench micro --device "$device" --json "$logs/micro-ours.json"
  step micro-torch 20 120 python3 tests/bench/torch_micro.py --json "$logs/micro-torch.json"
fi

# 5. training: the shared model folder, ours (writes the initial adapters), then PyTorch + PEFT on the same inputs.
if want train; then
  if [ -n "$profiler_pid" ]; then
    if wait "$profiler_pid" && [ -f "$work/native/libfinetune_torch_profiler.so" ]; then
      export FINETUNE_TORCH_PROFILER="$work/native/libfinetune_torch_profiler.so"; log "kernel profiler built"
      printf 'profiler-build\tok\t-\n' >> "$status"
    else
      log "kernel profiler did not build (profiles skipped):"; tail -n 5 "$logs/profiler-build.log" | tee -a "$logs/suite.log" >&2
      printf 'profiler-build\tfailed\t-\n' >> "$status"
    fi
  fi
  peak=$(python3 -c "import json;print(json.load(open('$logs/micro-torch.json'))['matmul_bf16_tflops'])" 2>/dev/null || true)
  peak_args=(); [ -n "$peak" ] && peak_args=(--peak-tflops "$peak")
  common=(--configs "$configs" --warmup "$warmup" --steps "$steps" --batch "$batch" --seq "$seq" --seed 1234 --lr "$lr"
          --profile "$profile" --profile-dir "$logs/traces")
  model="$work/model-$preset"
  if [ ! -f "$model/model.safetensors" ]; then
    step write-model 20 180 python3 tests/bench/peft_bench.py --write-model "$model" --preset "$preset" --seed 1234
  fi
  rm -rf "$work/init"
  if [ -f "$model/model.safetensors" ]; then
    # Ours gets about half of what is left (a third with --peft-rerun), PEFT the rest (a row that no longer fits is
    # skipped, not cut).
    half=$(( ($(left) - 40) / (2 + peft_rerun) ))
    step train-ours 60 "$half" "${run[@]}" dotnet "$dll" bench train --device "$device" --model "$model" "${common[@]}" "${peak_args[@]}" \
      --init-dir "$work/init" --deadline $(( half - 40 )) --json "$logs/train-ours.json"
    rest=$(( ($(left) - 40) / (1 + peft_rerun) ))
    step train-peft 60 "$rest" python3 tests/bench/peft_bench.py --model "$model" "${common[@]}" "${peak_args[@]}" \
      --init-dir "$work/init" --deadline $(( rest - 60 )) --json "$logs/train-peft.json"
    if [ "$peft_rerun" = 1 ]; then
      rest=$(( $(left) - 40 ))
      # No profile the second time: the rerun is only for its losses.
      step train-peft-rerun 60 "$rest" python3 tests/bench/peft_bench.py --model "$model" "${common[@]}" --profile "" "${peak_args[@]}" \
        --init-dir "$work/init" --deadline $(( rest - 60 )) --json "$logs/train-peft-rerun.json"
    fi
  else
    # Without the shared folder PEFT cannot run on the same weights; ours still measures on the in-memory preset.
    log "no model folder: ours on the in-memory preset, PEFT skipped"
    step train-ours 60 $(( $(left) - 40 )) "${run[@]}" dotnet "$dll" bench train --device "$device" --preset "$preset" "${common[@]}" \
      "${peak_args[@]}" --deadline $(( $(left) - 100 )) --json "$logs/train-ours.json"
  fi
fi
exit 0
