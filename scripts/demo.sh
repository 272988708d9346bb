#!/usr/bin/env bash
# The end-to-end demo on a fresh machine: installs what is missing, starts Postgres + API + one CPU worker,
# makes a tiny Llama-style model and a sample dataset, submits a Bone fine-tune through the REST API,
# follows its progress, and prints the final loss, the adapter's files and its registry entry.
source "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"
"$REPO_ROOT/scripts/up.sh"
source "$RUN_DIR/env"
worker="$REPO_ROOT/src/Worker/bin/Release/net10.0/FineTune.Worker.dll"
model="$REPO_ROOT/.data/models/tiny-llama"
data="$REPO_ROOT/.data/datasets/capitals.jsonl"
log "making the tiny model ($model) and the sample dataset ($data)"
dotnet "$worker" make-tiny-model "$model"
dotnet "$worker" make-sample-data "$data"
auth=(-H "Authorization: Bearer $FINETUNE_API_KEY")
body=$(cat <<JSON
{
  "model": "file://$model",
  "trainingData": "file://$data",
  "method": { "type": "bone", "r": 16, "targetModules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"] },
  "hyperparameters": { "epochs": 8, "batchSize": 8, "learningRate": 0.01, "maxSeqLength": 96, "seed": 7, "warmupSteps": 5, "scheduler": "cosine" },
  "adapterName": "capitals-demo",
  "pool": "cpu"
}
JSON
)
log "POST /v1/fine-tunes (Bone, r=16, all 7 linear modules)"
resp=$(curl -sS -w '\n%{http_code}' "${auth[@]}" -H 'Content-Type: application/json' -d "$body" "$FINETUNE_URL/v1/fine-tunes")
code=$(tail -1 <<<"$resp"); job=$(sed '$d' <<<"$resp")
[ "$code" = 202 ] || { echo "submit failed ($code): $job" >&2; exit 1; }
id=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])' <<<"$job")
log "job $id accepted; following it"
status=queued
for _ in $(seq 1 900); do
  job=$(curl -fsS "${auth[@]}" "$FINETUNE_URL/v1/fine-tunes/$id")
  read -r status line < <(python3 -c '
import json,sys; j=json.load(sys.stdin); p=j.get("progress") or {}
loss=j.get("lastLoss"); ls=f"{loss:.4f}" if isinstance(loss,(int,float)) else "-"
s=p.get("step",0); t=p.get("totalSteps",0)
print(j["status"], "step %s/%s loss %s" % (s, t, ls))' <<<"$job")
  printf '\r  %-10s %s   ' "$status" "$line"
  case "$status" in succeeded|failed|cancelled) break;; esac
  sleep 1
done
echo
if [ "$status" != succeeded ]; then
  echo "job ended $status: $job" >&2
  exit 1
fi
adapter=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["adapterId"])' <<<"$job")
log "metrics (every logged step)"
curl -fsS "${auth[@]}" "$FINETUNE_URL/v1/fine-tunes/$id/metrics" | python3 -c '
import json,sys
d=json.load(sys.stdin); rows=d["data"] if isinstance(d,dict) and "data" in d else d
print("  step    loss      lr         tokens/s")
for m in rows: print("  %4d  %8.4f  %.3e  %9.0f" % (m["step"], m["loss"], m["learningRate"], m["tokensPerSecond"]))
if rows: print("final loss: %.4f (first logged: %.4f)" % (rows[-1]["loss"], rows[0]["loss"]))'
log "registry entry GET /v1/adapters/$adapter"
curl -fsS "${auth[@]}" "$FINETUNE_URL/v1/adapters/$adapter" | python3 -m json.tool
curl -fsS "${auth[@]}" -o "$RUN_DIR/adapter.zip" "$FINETUNE_URL/v1/adapters/$adapter/download"
log "downloaded the adapter zip to $RUN_DIR/adapter.zip ($(stat -c %s "$RUN_DIR/adapter.zip") bytes). Stop everything with scripts/down.sh"
