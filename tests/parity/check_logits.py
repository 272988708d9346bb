#!/usr/bin/env python3
"""transformers' fp32 logits vs ours (the worker's `parity` subcommand output) for every model of make_models.py.

Usage: python3 tests/parity/check_logits.py MODELS OURS [--device cuda|cpu] [--markdown FILE]
Exit status 1 when any model's max relative error (max |ours − ref| / max |ref|) exceeds 1e-4 or its files are missing.
"""
import os
import sys

import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import THRESHOLD, device_arg, fp32_exact, load_logits, load_reference, markdown_arg, read_ids, relative_error, table  # noqa: E402


def main():
    models, ours = sys.argv[1], sys.argv[2]
    device = device_arg(sys.argv)
    fp32_exact()
    rows, failed = [], False
    for name in sorted(os.listdir(models)):
        d = os.path.join(models, name)
        mine = os.path.join(ours, name, "base.logits.safetensors")
        if not os.path.isfile(mine):
            rows.append((name, "-", "-", "-", "-", "FAIL: no output of ours"))
            failed = True
            continue
        model = load_reference(d, device)
        ids = read_ids(d)
        with torch.no_grad():
            reference = model(ids.to(device)).logits.float()
        logits = load_logits(mine)
        if tuple(logits.shape) != tuple(reference.shape):
            rows.append((name, model.config.architectures[0], tuple(reference.shape), "-", "-", f"FAIL: our shape {tuple(logits.shape)}"))
            failed = True
            continue
        rel, absolute = relative_error(logits, reference)
        ok = rel <= THRESHOLD
        failed |= not ok
        rows.append((name, model.config.architectures[0], "×".join(map(str, reference.shape)), f"{absolute:.2e}", f"{rel:.2e}",
                     "ok" if ok else "FAIL"))
        print(f"{name}: max relative error {rel:.3e} ({'ok' if ok else 'FAIL'})")
    text = (f"### Logits: transformers {transformers.__version__} vs ours (fp32, {device}, threshold {THRESHOLD:g})\n\n"
            + table(["model", "architecture", "logits", "max abs diff", "max rel error", "result"], rows))
    if markdown_arg(sys.argv):
        with open(markdown_arg(sys.argv), "w") as f:
            f.write(text)
    print(text)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
