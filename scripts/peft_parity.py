#!/usr/bin/env python3
"""PEFT parity: do PEFT and transformers load our artifacts and compute our logits?

Input: a folder written by `FineTune.Worker parity-cases <dir>` (see src/Worker/Training/ParityCases.cs): a tiny model,
our logits for it (base.safetensors), and per case an adapter folder as a finished job writes it, with our logits of the
adapted model (expected.safetensors). For every case this loads, on the CPU in fp32:
  native  the adapter folder with PeftModel.from_pretrained (PiSSA/OLoRA: PEFT recomputes the residual from
          init_lora_weights, as it does for its own saved adapters),
  lora/   the plain-LoRA export with PeftModel.from_pretrained on the original base (exact forms must match;
          SVD forms report their error),
  merged/ the merged model with AutoModelForCausalLM.from_pretrained,
and compares the logits with ours (max |diff|, tolerance 1e-4). Exit status 1 if any required check fails.

    python3 scripts/peft_parity.py <dir> [--markdown docs/parity.md]
"""
import argparse
import json
import os
import sys

import torch
from safetensors.torch import load_file

TOL = 1e-4


def main():
    p = argparse.ArgumentParser()
    p.add_argument("dir")
    p.add_argument("--markdown", help="also write the result table to this file")
    a = p.parse_args()

    import peft
    import transformers
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    root = a.dir
    manifest = json.load(open(os.path.join(root, "manifest.json")))
    model_dir = os.path.join(root, manifest["model"])

    def base():
        return AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32, attn_implementation="eager").eval()

    def logits(model, ids):
        with torch.no_grad():
            return model(input_ids=ids).logits.float()

    rows, failed = [], False

    def record(case, form, ours, theirs, required, note=""):
        nonlocal failed
        diff = (ours - theirs).abs().max().item()
        ok = diff < TOL
        if required and not ok:
            failed = True
        rows.append((case, form, f"{diff:.2e}", "ok" if ok else ("FAIL" if required else "approx"), note))

    ref = load_file(os.path.join(root, manifest["base"]))
    ids = ref["ids"].long()
    record("base", "transformers", ref["logits"], logits(base(), ids), True)

    for case in manifest["cases"]:
        name = case["name"]
        d = os.path.join(root, name)
        expected = load_file(os.path.join(d, "expected.safetensors"))["logits"]
        try:
            native = PeftModel.from_pretrained(base(), d).eval()
            record(name, "native", expected, logits(native, ids), True)
        except Exception as e:  # a load failure is a parity failure, reported with its reason
            failed = True
            rows.append((name, "native", "-", "FAIL", f"{type(e).__name__}: {e}"[:160]))
        exact = bool(case.get("lora_export_exact"))
        note = "" if exact else f"SVD, max rel. error {case.get('lora_export_max_relative_error')}"
        try:
            export = PeftModel.from_pretrained(base(), os.path.join(d, "lora")).eval()
            record(name, "lora/", expected, logits(export, ids), exact, note)
        except Exception as e:
            failed = True
            rows.append((name, "lora/", "-", "FAIL", f"{type(e).__name__}: {e}"[:160]))
        merged_dir = os.path.join(d, "merged")
        if os.path.isdir(merged_dir):
            merged = AutoModelForCausalLM.from_pretrained(merged_dir, torch_dtype=torch.float32, attn_implementation="eager").eval()
            record(name, "merged/", expected, logits(merged, ids), True)

    versions = f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}"
    table = ["| case | form | max abs diff | result | note |", "|---|---|---|---|---|"]
    table += [f"| {c} | {f} | {d} | {r} | {n} |" for c, f, d, r, n in rows]
    print(versions)
    print("\n".join(table))
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(f"# PEFT parity\n\n{versions}; tolerance {TOL} on fp32 logits of the tiny model "
                    f"(`FineTune.Worker parity-cases`, `scripts/peft_parity.py`).\n\n" + "\n".join(table) + "\n")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
