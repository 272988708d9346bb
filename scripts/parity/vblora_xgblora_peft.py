#!/usr/bin/env python3
"""PEFT parity for VB-LoRA (native VBLORA artifact, full and top-k form, and its lora/ export) and XGBLoRA (lora/ export).

Needs torch, transformers and peft. The fixtures come from our test suite (CPU is enough):
    FINETUNE_PARITY_DIR=$PWD/parity-fixtures dotnet test tests/Worker.Tests -c Release --filter Parity_fixtures_for_peft
then:
    python3 scripts/parity/vblora_xgblora_peft.py parity-fixtures
Loads each adapter onto the base with PEFT, runs the fixture's input ids, compares the logits with ours.
Exit status 1 if any case is above the tolerance (1e-4).
"""
import json
import sys

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM


def main(root: str) -> int:
    manifest = json.load(open(f"{root}/cases.json"))
    ids = torch.tensor(manifest["input_ids"], dtype=torch.long)
    tol = manifest["tolerance"]
    import peft, transformers
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")
    print(f"{'case':<22} {'peft_type':<9} {'max |dlogits|':>14}  result")
    failed = 0
    for case in manifest["cases"]:
        base = AutoModelForCausalLM.from_pretrained(f"{root}/{case['base']}").float()
        model = PeftModel.from_pretrained(base, f"{root}/{case['adapter']}").eval()
        assert model.peft_config["default"].peft_type.value == case["peft_type"], model.peft_config
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        ours = load_file(f"{root}/{case['logits']}")["logits"]
        diff = (logits - ours).abs().max().item()
        ok = diff <= tol
        failed += not ok
        print(f"{case['name']:<22} {case['peft_type']:<9} {diff:>14.2e}  {'ok' if ok else 'FAIL'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "parity-fixtures"))
