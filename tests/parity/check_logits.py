#!/usr/bin/env python3
"""transformers' fp32 logits vs ours (the worker's `parity` subcommand output) for every model of make_models.py.

Usage: python3 tests/parity/check_logits.py MODELS OURS [--device cuda|cpu] [--markdown FILE] [--budget SECONDS]
Exit status 1 when any model's max relative error (max |ours − ref| / max |ref|) exceeds 1e-4, its files are missing,
a load fails, or the time budget (default 60 s) ran out before every model was checked. Each model is one row of the
table whatever happens to it; an exception is that row's FAIL, with its reason.
"""
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (THRESHOLD, Budget, arg, device_arg, error_text, fp32_exact, load_logits, load_reference,  # noqa: E402
                    markdown_arg, model_order, read_ids, relative_error, table)


def main():
    import torch
    import transformers
    models, ours = sys.argv[1], sys.argv[2]
    device = device_arg(sys.argv)
    budget = Budget(float(arg(sys.argv, "--budget", "60")))
    fp32_exact()
    names = model_order(d for d in os.listdir(models) if os.path.isdir(os.path.join(models, d)))
    rows, failed = [], not names    # no models at all is a failure too (make_models.py's log says why)
    for name in names:
        d = os.path.join(models, name)
        mine = os.path.join(ours, name, "base.logits.safetensors")
        if budget.spent():
            rows.append((name, "-", "-", "-", "-", f"FAIL: not run, the {budget.seconds:g} s budget was spent"))
            failed = True
            continue
        if not os.path.isfile(mine):
            rows.append((name, "-", "-", "-", "-", "FAIL: no output of ours (see the worker's log)"))
            failed = True
            continue
        try:
            model = load_reference(d, device)
            with torch.no_grad():
                reference = model(read_ids(d).to(device)).logits.float()
            rel, absolute = relative_error(load_logits(mine), reference)
            ok = rel <= THRESHOLD
            failed |= not ok
            rows.append((name, model.config.architectures[0], "×".join(map(str, reference.shape)), f"{absolute:.2e}",
                         f"{rel:.2e}", "ok" if ok else "FAIL"))
            print(f"{name}: max relative error {rel:.3e} ({'ok' if ok else 'FAIL'})")
        except Exception as e:  # a load or shape error is this model's result, not the end of the run
            traceback.print_exc()
            rows.append((name, "-", "-", "-", "-", f"FAIL: {error_text(e)}"))
            failed = True
    text = (f"### Model logits: transformers {transformers.__version__} vs ours (fp32, {device}, threshold {THRESHOLD:g})\n\n"
            + table(["model", "architecture", "logits", "max abs diff", "max abs diff / max abs ref", "result"], rows)
            + f"\n{len(rows)} models in {budget.elapsed():.0f} s.\n")
    if markdown_arg(sys.argv):
        with open(markdown_arg(sys.argv), "w") as f:
            f.write(text)
    print(text)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
