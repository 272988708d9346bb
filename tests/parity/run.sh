#!/usr/bin/env bash
# Parity with the reference stack, in ONE command on a GPU host with PyTorch, transformers, tokenizers and PEFT
# (sentencepiece optional), given the pack of scripts/gpu/pack.sh (.NET runtime + worker + worker tests):
#   bash tests/parity/run.sh PACK REPORT.md          e.g. bash tests/parity/run.sh .device $OUT/parity.md
# 1. the native shim is built against the host's torch (scripts/gpu/run.sh); meanwhile make_models.py writes random
#    Llama / Qwen2 / Mistral checkpoints with transformers, and scripts/tokenizer_parity.py and chat_templates.py
#    record the reference ids and renders;
# 2. the worker's `parity` subcommand writes our logits and, per adapter case (src/Worker/Tools/ParityCommand.cs),
#    the folders a job publishes (native, lora/, merged/) with our logits for each;
# 3. check_logits.py (transformers) and check_peft.py (PEFT and transformers, every case in every form) compare;
# 4. the recorded references go into the packed worker tests, TokenizerParityTests and ChatTemplateParityTests run
#    against them, and fixture_tables.py turns their results into the last two tables.
# Writes REPORT.md (for docs/parity.md) and, beside it, parity-fixtures.tar.gz (the recorded expected.json files:
# extract into tests/Worker.Tests/Tokenizers to commit them), parity-results.json (every number of the adapter table)
# and parity-logs.tar.gz (each step's log). Exits non-zero on any mismatch, failed or unfinished step.
# Every step runs under `timeout` within PARITY_DEADLINE seconds (default 540) from the start; a step that no longer
# fits is reported as not run. PARITY_DEVICE=cpu|cuda (default: cuda when torch sees one) runs both sides there;
# PARITY_WORK is the scratch folder (default /tmp/finetune-parity).
set -uo pipefail
usage="usage: bash tests/parity/run.sh PACK REPORT.md"
PACK="$(realpath "${1:?$usage}")"
REPORT="$(realpath -m "${2:?$usage}")"
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
OUTDIR="$(dirname "$REPORT")"
WORK="${PARITY_WORK:-/tmp/finetune-parity}"
DEADLINE="${PARITY_DEADLINE:-540}"
rm -rf "$WORK"; mkdir -p "$WORK/logs" "$WORK/ours" "$WORK/recorded/Parity" "$WORK/recorded/ChatTemplates" "$OUTDIR"
export PYTHONUNBUFFERED=1 FINETUNE_GPU_PACK="$PACK"
STATUS="$WORK/logs/steps.tsv"; : > "$STATUS"
start=$(date +%s)
log() { printf '[%4ds] %s\n' "$(( $(date +%s) - start ))" "$*" | tee -a "$WORK/logs/run.log" >&2; }
left() { echo $(( DEADLINE - ($(date +%s) - start) )); }

# step NAME MIN MAX CMD...: CMD with its output in logs/NAME.log under a timeout of min(MAX, time left - 15 s);
# not run when less than MIN seconds are left. Its outcome goes to steps.tsv (the report's first table).
step() {
  local name="$1" min="$2" max="$3"; shift 3
  local budget=$(( $(left) - 15 ))
  if [ "$budget" -lt "$min" ]; then
    log "SKIP $name (${budget}s left, needs ${min}s)"; printf '%s\tnot run (deadline)\t0\n' "$name" >> "$STATUS"; return 1
  fi
  [ "$budget" -gt "$max" ] && budget="$max"
  log "RUN  $name (timeout ${budget}s)"
  local t0 rc secs
  t0=$(date +%s)
  timeout --kill-after=10 "$budget" "$@" > "$WORK/logs/$name.log" 2>&1; rc=$?
  secs=$(( $(date +%s) - t0 ))
  if [ $rc -eq 0 ]; then log "OK   $name (${secs}s)"; printf '%s\tok\t%s\n' "$name" "$secs" >> "$STATUS"
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then log "TIME $name (${secs}s)"; printf '%s\ttimed out\t%s\n' "$name" "$secs" >> "$STATUS"
  else
    log "FAIL $name (rc $rc, ${secs}s); last lines:"; tail -n 12 "$WORK/logs/$name.log" | tee -a "$WORK/logs/run.log" >&2
    printf '%s\tFAIL (rc %s)\t%s\n' "$name" "$rc" "$secs" >> "$STATUS"
  fi
  return $rc
}

versions="$(python3 - <<'PY' 2>&1 | tail -1
import importlib
found = []
for name in ("torch", "transformers", "tokenizers", "peft", "safetensors", "sentencepiece"):
    try:
        found.append(f"{name} {importlib.import_module(name).__version__}")
    except Exception as e:  # sentencepiece may be missing: its fixtures keep their committed references
        found.append(f"{name} not importable ({type(e).__name__})")
print(", ".join(found))
PY
)"
DEVICE="${PARITY_DEVICE:-$(python3 -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")' 2>/dev/null || echo cpu)}"
gpu="$(python3 -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU")' 2>/dev/null || echo "unknown device")"
log "parity on $gpu ($DEVICE): $versions"

# 1. Independent of one another: the shim (the worker needs it), the checkpoints, the reference recordings.
step models 20 120 python3 tests/parity/make_models.py "$WORK/models" &
models_pid=$!
( step tokenizers-record 10 90 python3 scripts/tokenizer_parity.py tests/Worker.Tests/Tokenizers/Parity "$WORK/recorded"
  step templates-record 10 60 python3 tests/parity/chat_templates.py tests/Worker.Tests/Tokenizers/ChatTemplates "$WORK/recorded" ) &
record_pid=$!
step build 30 300 bash scripts/gpu/run.sh true
built=$?
wait "$models_pid"; wait "$record_pid"

# 2. Ours: every model in one process (one CUDA start).
if [ $built -eq 0 ] && [ -d "$WORK/models" ]; then
  step ours 30 240 bash scripts/gpu/run.sh dotnet "$PACK/worker/FineTune.Worker.dll" parity --models "$WORK/models" \
    --out "$WORK/ours" --device "$DEVICE"
else
  printf 'ours\tnot run (no shim or no models)\t0\n' >> "$STATUS"
fi

# 3. The references. check_peft gets what is left of the deadline, less the tokenizer steps' share.
if [ -d "$WORK/models" ]; then
  step logits 20 120 python3 tests/parity/check_logits.py "$WORK/models" "$WORK/ours" --device "$DEVICE" \
    --markdown "$WORK/logits.md" --budget 60
  peft_budget=$(( $(left) - 120 )); [ $peft_budget -gt 180 ] && peft_budget=180; [ $peft_budget -lt 20 ] && peft_budget=20
  step adapters 30 $(( peft_budget + 45 )) python3 tests/parity/check_peft.py "$WORK/models" "$WORK/ours" --device "$DEVICE" \
    --markdown "$WORK/peft.md" --json "$OUTDIR/parity-results.json" --budget "$peft_budget"
fi

# 4. Recorded references into the packed tests (and the tarball to commit), then the tests against them.
for f in "$WORK"/recorded/*.expected.json; do
  [ -e "$f" ] || continue
  n="$(basename "$f" .expected.json)"
  if [ "$n" = chat_templates ]; then dest=ChatTemplates; else dest="Parity/$n"; mkdir -p "$WORK/recorded/$dest"; fi
  cp "$f" "$WORK/recorded/$dest/expected.json"
  cp "$f" "$PACK/worker-tests/Tokenizers/$dest/expected.json"
done
tar -C "$WORK/recorded" -czf "$OUTDIR/parity-fixtures.tar.gz" Parity ChatTemplates
if [ $built -eq 0 ]; then
  step fixtures 20 120 bash scripts/gpu/run.sh dotnet "$PACK/worker-tests/FineTune.Worker.Tests.dll" -noColor -noLogo \
    -class FineTune.Worker.Tests.Tokenizers.TokenizerParityTests \
    -class FineTune.Worker.Tests.Tokenizers.ChatTemplateParityTests -xml "$WORK/fixtures.xml"
fi
python3 tests/parity/fixture_tables.py "$WORK/fixtures.xml" "$PACK/worker-tests/Tokenizers" --recorded "$WORK/recorded" \
  --markdown "$WORK/fixtures.md" > "$WORK/logs/fixture-tables.log" 2>&1 \
  || printf 'fixture-tables\tFAIL (see the tables)\t0\n' >> "$STATUS"

fail=0
grep -qv -P '\tok\t' "$STATUS" && fail=1
{
  echo "## Parity run $(date -u +%Y-%m-%dT%H:%MZ) on $gpu"
  echo
  echo "$versions. Both sides in fp32 on $DEVICE, no TF32; $(( $(date +%s) - start )) s in all."
  echo
  echo "| step | result | seconds |"
  echo "|---|---|---|"
  sed 's/\t/ | /g; s/^/| /; s/$/ |/' "$STATUS"
  echo
  cat "$WORK/logits.md" 2>/dev/null || echo "(no logits table: see parity-logs.tar.gz, logits.log)"
  echo
  cat "$WORK/peft.md" 2>/dev/null || echo "(no adapter table: see parity-logs.tar.gz, adapters.log)"
  echo
  cat "$WORK/fixtures.md" 2>/dev/null || echo "(no tokenizer tables: see parity-logs.tar.gz, fixtures.log)"
  echo
  echo "Result: $([ $fail = 0 ] && echo 'all within tolerance' || echo 'MISMATCHES or unfinished steps (see above)')"
} > "$REPORT"
for m in "$WORK"/ours/*/manifest.json; do [ -e "$m" ] && cp "$m" "$WORK/logs/manifest-$(basename "$(dirname "$m")").json"; done
tar -czf "$OUTDIR/parity-logs.tar.gz" -C "$WORK/logs" . 2>/dev/null || true
cat "$REPORT"
exit $fail
