#!/usr/bin/env python3
"""PEFT loads our adapters (native form and lora/) onto the same base checkpoint; its logits vs ours.

For every model under OURS and every method of its manifest.json (written by the worker's `parity` subcommand):
  native: PeftModel.from_pretrained(base, adapters/<type>) vs <type>.logits (ours with the adapter);
  lora/:  PeftModel.from_pretrained(base, adapters/<type>/lora) vs <type>.lora.logits (ours with the export loaded
          as a LoRA), and the export vs the native adapter (exact exports must match it too; SVD-truncated ones
          report their error).
A native form whose peft_type PEFT does not have (our own formats: SBoRA, XGBLoRA) is reported as such, not failed;
any other load error is a failure. Threshold: max |ours − PEFT| / max |PEFT| <= 1e-4.

Usage: python3 tests/parity/check_peft.py MODELS OURS [--device cuda|cpu] [--markdown FILE]
"""
import json
import os
import sys
import traceback

import peft
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import THRESHOLD, device_arg, fp32_exact, load_logits, load_reference, markdown_arg, read_ids, relative_error, table  # noqa: E402


def peft_logits(model_dir, adapter_dir, ids, device):
    base = load_reference(model_dir, device)
    model = peft.PeftModel.from_pretrained(base, adapter_dir).to(device).eval()
    with torch.no_grad():
        return model(ids.to(device)).logits.float()


def main():
    models, ours = sys.argv[1], sys.argv[2]
    device = device_arg(sys.argv)
    fp32_exact()
    rows, failed, not_loadable = [], False, []
    known_types = {t.value for t in peft.PeftType}
    for name in sorted(os.listdir(ours)):
        manifest_path = os.path.join(ours, name, "manifest.json")
        if not os.path.isfile(manifest_path):
            continue
        manifest = json.load(open(manifest_path))
        model_dir = os.path.join(models, name)
        ids = read_ids(model_dir)
        for m in manifest["methods"]:
            adapter = os.path.join(ours, name, m["adapter_dir"])
            peft_type = json.load(open(os.path.join(adapter, "adapter_config.json")))["peft_type"]
            native = load_logits(os.path.join(ours, name, m["logits"]))
            if peft_type not in known_types:
                not_loadable.append(f"{m['type']} ({peft_type}): PEFT {peft.__version__} has no such type (our own format, or a "
                                    "type newer than this PEFT); checked through lora/")
                rows.append((name, m["type"], "native", peft_type, "-", f"not a type of PEFT {peft.__version__}"))
            else:
                try:
                    rel, _ = relative_error(native, peft_logits(model_dir, adapter, ids, device))
                    ok = rel <= THRESHOLD
                    rows.append((name, m["type"], "native", peft_type, f"{rel:.2e}", "ok" if ok else "FAIL"))
                    failed |= not ok
                except Exception as e:  # a load or shape error is a result, shown in the table
                    traceback.print_exc()
                    not_loadable.append(f"{m['type']} ({peft_type}) on {name}: {type(e).__name__}: {e}")
                    rows.append((name, m["type"], "native", peft_type, "-", f"FAIL: {type(e).__name__}"))
                    failed = True
            if m.get("lora_logits"):
                lora_dir = os.path.join(adapter, "lora")
                export = m.get("export") or {}
                try:
                    reference = peft_logits(model_dir, lora_dir, ids, device)
                    rel, _ = relative_error(load_logits(os.path.join(ours, name, m["lora_logits"])), reference)
                    vs_native, _ = relative_error(native, reference)
                    ok = rel <= THRESHOLD and (vs_native <= THRESHOLD or not export.get("exact", False))
                    kind = "exact" if export.get("exact") else f"SVD, ‖ΔW‖ error {export.get('max_relative_error', float('nan')):.1e}"
                    rows.append((name, m["type"], f"lora/ ({kind}; vs native {vs_native:.1e})", "LORA", f"{rel:.2e}",
                                 "ok" if ok else "FAIL"))
                    failed |= not ok
                except Exception as e:
                    traceback.print_exc()
                    not_loadable.append(f"{m['type']} lora/ on {name}: {type(e).__name__}: {e}")
                    rows.append((name, m["type"], "lora/", "LORA", "-", f"FAIL: {type(e).__name__}"))
                    failed = True
        for s in manifest.get("skipped", []):
            rows.append((name, s["type"], "-", "-", "-", f"skipped by the worker: {s['reason']}"))
    text = (f"### Adapters: PEFT {peft.__version__} vs ours (fp32, {device}, threshold {THRESHOLD:g})\n\n"
            + table(["model", "method", "form", "peft_type", "max rel error", "result"], rows))
    if not_loadable:
        text += "\nNot loaded by PEFT:\n\n" + "".join(f"- {line}\n" for line in not_loadable)
    if markdown_arg(sys.argv):
        with open(markdown_arg(sys.argv), "w") as f:
            f.write(text)
    print(text)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
