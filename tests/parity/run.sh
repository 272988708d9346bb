#!/usr/bin/env bash
# Parity with the reference stack, on a GPU host with PyTorch, transformers, tokenizers and PEFT (sentencepiece
# optional), given the pack of scripts/gpu/pack.sh (.NET runtime + worker + worker tests):
#   tests/parity/run.sh PACK REPORT.md
# 1. make_models.py writes random Llama / Qwen2 / Mistral checkpoints with transformers;
# 2. the worker's `parity` subcommand writes our logits and, per registered method, an adapter and its logits;
# 3. check_logits.py (transformers) and check_peft.py (PEFT, native and lora/ forms) compare at 1e-4;
# 4. scripts/tokenizer_parity.py and chat_templates.py record the reference ids and renders, which are put into the
#    packed worker tests and checked there (TokenizerParityTests, ChatTemplateParityTests).
# Writes REPORT.md (for docs/parity.md) and, beside it, parity-fixtures.tar.gz with the recorded expected.json files
# (extract into tests/Worker.Tests/Tokenizers to commit them). Exits non-zero on any mismatch.
# PARITY_DEVICE=cpu|cuda (default: cuda when torch sees one) runs both sides there; PARITY_WORK is the scratch folder.
set -uo pipefail
PACK="$(realpath "${1:?usage: tests/parity/run.sh PACK REPORT.md}")"
REPORT="$(realpath -m "${2:?usage: tests/parity/run.sh PACK REPORT.md}")"
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
WORK="${PARITY_WORK:-/tmp/finetune-parity}"
rm -rf "$WORK"; mkdir -p "$WORK/ours" "$WORK/recorded/Parity" "$WORK/recorded/ChatTemplates" "$(dirname "$REPORT")"
DEVICE="${PARITY_DEVICE:-$(python3 -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')}"
export PYTHONUNBUFFERED=1 FINETUNE_GPU_PACK="$PACK"
fail=0
note() { echo "== $*" >&2; }

note "random checkpoints"
python3 tests/parity/make_models.py "$WORK/models" || { echo "make_models.py failed" >&2; exit 1; }

note "our logits and adapters ($DEVICE)"
for m in "$WORK"/models/*/; do
  name="$(basename "$m")"
  if ! scripts/gpu/run.sh dotnet "$PACK/worker/FineTune.Worker.dll" parity --model "$m" --ids "$m/ids.json" \
       --out "$WORK/ours/$name" --device "$DEVICE" > "$WORK/ours-$name.log" 2>&1; then
    echo "the parity subcommand failed on $name:" >&2; tail -20 "$WORK/ours-$name.log" >&2; fail=1
  fi
done

note "logits vs transformers"
python3 tests/parity/check_logits.py "$WORK/models" "$WORK/ours" --device "$DEVICE" --markdown "$WORK/logits.md" || fail=1
note "adapters vs PEFT"
python3 tests/parity/check_peft.py "$WORK/models" "$WORK/ours" --device "$DEVICE" --markdown "$WORK/peft.md" || fail=1

note "tokenizers and chat templates"
python3 scripts/tokenizer_parity.py tests/Worker.Tests/Tokenizers/Parity "$WORK/recorded" > "$WORK/tokenizers.log" 2>&1 || fail=1
python3 tests/parity/chat_templates.py tests/Worker.Tests/Tokenizers/ChatTemplates "$WORK/recorded" >> "$WORK/tokenizers.log" 2>&1 || fail=1
cat "$WORK/tokenizers.log" >&2
for f in "$WORK"/recorded/*.expected.json; do
  n="$(basename "$f" .expected.json)"
  if [ "$n" = chat_templates ]; then dest=ChatTemplates; else dest="Parity/$n"; mkdir -p "$WORK/recorded/$dest"; fi
  cp "$f" "$WORK/recorded/$dest/expected.json"
  cp "$f" "$PACK/worker-tests/Tokenizers/$dest/expected.json"
done
tar -C "$WORK/recorded" -czf "$(dirname "$REPORT")/parity-fixtures.tar.gz" Parity ChatTemplates
scripts/gpu/run.sh dotnet "$PACK/worker-tests/FineTune.Worker.Tests.dll" \
  -class FineTune.Worker.Tests.Tokenizers.TokenizerParityTests \
  -class FineTune.Worker.Tests.Tokenizers.ChatTemplateParityTests > "$WORK/tokenizer-tests.log" 2>&1 || fail=1
tail -40 "$WORK/tokenizer-tests.log" >&2

{
  echo "## Parity run $(date -u +%Y-%m-%dT%H:%MZ) on $(python3 -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU")')"
  echo
  python3 -c 'import torch, transformers, tokenizers, peft; print(f"torch {torch.__version__}, transformers {transformers.__version__}, tokenizers {tokenizers.__version__}, peft {peft.__version__}", end="")'
  python3 -c 'import sentencepiece; print(f", sentencepiece {sentencepiece.__version__}")' 2>/dev/null || echo ", sentencepiece not installed"
  echo
  cat "$WORK/logits.md" 2>/dev/null || echo "(no logits table: see the log)"
  echo
  cat "$WORK/peft.md" 2>/dev/null || echo "(no adapter table: see the log)"
  echo
  echo "### Tokenizer ids and chat templates (worker tests against the recorded references)"
  echo
  echo '```'
  grep -E "^\s*(Total|Failed|Skipped)|\[FAIL\]|=== TEST EXECUTION SUMMARY ===" -A2 "$WORK/tokenizer-tests.log" | head -40
  echo '```'
  echo
  echo "Result: $([ $fail = 0 ] && echo 'all within tolerance' || echo 'MISMATCHES (see above)')"
} > "$REPORT"
cat "$REPORT"
exit $fail
