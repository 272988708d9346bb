#!/usr/bin/env python3
"""Every adapter case of the worker's `parity` subcommand, in every form a job publishes, against the reference stack.

For every model under OURS and every case of its manifest.json (src/Worker/Tools/ParityCommand.cs: LoRA with each
init and rsLoRA, DoRA, Bone default/mini, Bat col/row, SBoRA fa/fb, VB-LoRA full and top-k, XGBLoRA), on the same
base checkpoint loaded by transformers in fp32:
  native   PeftModel.from_pretrained(base, adapters/<case>) vs our logits with the adapter. A peft_type PEFT does
           not have (our own formats: BAT = Bat row, SBORA, XGBLORA) is "n/a": those are served through lora/ and
           merged/. PiSSA/OLoRA folders keep init_lora_weights "pissa"/"olora" and A, B trained against the residual:
           PEFT re-runs the init on the original base (W -> W - s*B0*A0), then loads A and B (docs/parity.md).
  lora/    PEFT on adapters/<case>/lora vs ours with the same export (must agree to 1e-4), and vs our adapter:
           exact exports must agree to 1e-4 too ("ok"); DoRA's and Bat's are rank-r SVD truncations of a full-rank
           delta: their logits error is reported as "approx", after checking that the per-module
           ||dW - B*A||_F / ||dW||_F, with dW from PEFT's merge (our merged/ for our own formats), equals what
           metadata.json records (lora_export.relative_error).
  merged/  transformers on adapters/<case>/merged vs ours on the same folder (1e-4) and vs our adapter: 1e-4 when
           stored in fp32 ("ok"); a bf16 base gives a bf16 merged/, reported "approx" (rounding, bounded by 5e-2).
Every check is in its own try/except: an exception is that cell's FAIL with its reason, never the end of the run.
A time budget (default 150 s) bounds the part; checks left when it is spent are "not run" (a failure).
Value shown: max |ours - ref| / max |ref| over all logits.

Usage: python3 tests/parity/check_peft.py MODELS OURS [--device cuda|cpu] [--markdown FILE] [--json FILE]
                                          [--budget SECONDS] [--plan]
--plan needs neither torch nor PEFT: it checks that every file the comparison reads exists with the right shapes and
prints the table of what would be compared (a dry run of the worker's output on any machine).
"""
import copy
import json
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (THRESHOLD, Budget, arg, device_arg, error_text, markdown_arg, model_order,  # noqa: E402
                    safetensors_header, table)

FORMS = ("native", "lora/", "merged/")
BF16_MERGED_BOUND = 5e-2
ERROR_TOLERANCE = 1e-4
# The peft_types our native forms use that PEFT has; for --plan only (a real run asks PEFT's PeftType).
PLAN_PEFT_TYPES = {"LORA", "MISS", "VBLORA"}
PREFIX = "base_model.model."


class Cell:
    """One (model, case, form) result: status ok | approx | FAIL | not run | n/a | planned, the value, a note."""

    def __init__(self, status, value=None, note=""):
        self.status, self.value, self.note = status, value, note

    @property
    def failed(self):
        return self.status in ("FAIL", "not run")

    def text(self):
        value = f" {self.value:.2e}" if isinstance(self.value, float) else ""
        return f"{self.status}{value}" + (f" ({self.note})" if self.note else "")

    def as_json(self):
        return {"status": self.status, "value": self.value, "note": self.note}


def forms_of(entry, peft_types):
    """Which forms a case has and how each is judged: {form: None (n/a reason in the second dict) | kind}."""
    kinds, reasons = {}, {}
    if entry.get("peft_type") in peft_types:
        kinds["native"] = "peft"
    else:
        reasons["native"] = f"our format {entry.get('peft_type')}: lora/ and merged/ only"
    if entry.get("lora_logits"):
        kinds["lora/"] = "exact" if (entry.get("export") or {}).get("exact") else "svd"
    else:
        reasons["lora/"] = "no lora/ export"
    if entry.get("merged_logits"):
        dtypes = (entry.get("merged") or {}).get("dtypes") or []
        kinds["merged/"] = "fp32" if dtypes == ["F32"] else "stored " + "/".join(dtypes)
    else:
        reasons["merged/"] = "no merged/ written"
    return kinds, reasons


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------------- plan (no torch)

def plan_case(ours_dir, manifest, entry):
    """--plan: every file the real run reads exists with the shapes it needs; returns {form: Cell}."""
    kinds, reasons = forms_of(entry, PLAN_PEFT_TYPES)
    adapter = os.path.join(ours_dir, entry["adapter_dir"])
    rows, cols = manifest["ids_shape"]
    base_vocab = safetensors_header(os.path.join(ours_dir, manifest["base_logits"]))["logits"]["shape"][2]

    def logits_ok(name):
        shape = safetensors_header(os.path.join(ours_dir, name))["logits"]["shape"]
        if shape != [rows, cols, base_vocab]:
            raise ValueError(f"{name}: logits shape {shape}, expected {[rows, cols, base_vocab]}")

    cells = {}
    for form in FORMS:
        if form not in kinds:
            cells[form] = Cell("n/a", note=reasons[form])
            continue
        try:
            logits_ok(entry["logits"])
            if form == "native":
                for f in ("adapter_config.json", "adapter_model.safetensors"):
                    if not os.path.isfile(os.path.join(adapter, f)):
                        raise FileNotFoundError(os.path.join(entry["adapter_dir"], f))
                note = "PEFT " + read_json(os.path.join(adapter, "adapter_config.json"))["peft_type"]
            elif form == "lora/":
                logits_ok(entry["lora_logits"])
                header = safetensors_header(os.path.join(adapter, "lora", "adapter_model.safetensors"))
                metadata = read_json(os.path.join(adapter, "metadata.json"))
                if metadata.get("lora_export") != entry.get("export"):
                    raise ValueError("metadata.json's lora_export differs from the manifest's export")
                note = kinds[form]
                if kinds[form] == "svd":
                    recorded = metadata["lora_export"]["relative_error"]
                    for path in recorded:
                        for part in ("lora_A", "lora_B"):
                            if f"{PREFIX}{path}.{part}.weight" not in header:
                                raise KeyError(f"lora/ lacks {path}.{part}")
                    note += f", {len(recorded)} recorded errors"
            else:
                logits_ok(entry["merged_logits"])
                header = safetensors_header(os.path.join(adapter, "merged", "model.safetensors"))
                if not os.path.isfile(os.path.join(adapter, "merged", "config.json")):
                    raise FileNotFoundError("merged/config.json")
                note = f"{kinds[form]}, {len(header) - ('__metadata__' in header)} tensors"
            cells[form] = Cell("planned", note=note)
        except Exception as e:
            cells[form] = Cell("FAIL", note=error_text(e))
    return cells


# ---------------------------------------------------------------------------------------------- real run (torch/PEFT)

class Reference:
    """transformers + PEFT on one device, fp32; the base of each model loaded once and copied per check."""

    def __init__(self, device):
        import peft
        import torch
        import transformers
        from common import fp32_exact
        fp32_exact()
        transformers.logging.set_verbosity_error()
        self.torch, self.peft, self.device = torch, peft, device
        self.peft_types = {t.value for t in peft.PeftType}
        self._bases = {}

    def base(self, model_dir):
        from common import load_reference
        if model_dir not in self._bases:
            model = load_reference(model_dir, self.device)
            self._bases[model_dir] = (model, {k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
        model, _ = self._bases[model_dir]
        try:
            return copy.deepcopy(model)
        except Exception:  # a model that cannot be deep-copied is loaded again
            return load_reference(model_dir, self.device)

    def base_weights(self, model_dir):
        self.base(model_dir)
        return self._bases[model_dir][1]

    def logits(self, model, ids):
        with self.torch.no_grad():
            return model(ids.to(self.device)).logits.float().cpu()

    def peft_model(self, model_dir, adapter_dir):
        return self.peft.PeftModel.from_pretrained(self.base(model_dir), adapter_dir).to(self.device).eval()

    def hf_model(self, folder):
        from common import load_reference
        return load_reference(folder, self.device)

    def forget(self):
        self._bases.clear()
        if self.torch.cuda.is_available():
            self.torch.cuda.empty_cache()


def lora_scale(lora_dir):
    config = read_json(os.path.join(lora_dir, "adapter_config.json"))
    r, alpha = config["r"], config["lora_alpha"]
    return alpha / (r ** 0.5) if config.get("use_rslora") else alpha / r


def recomputed_errors(delta_of, lora_dir, paths):
    """||dW - s*B*A||_F / ||dW||_F per module, in fp64, for the export in lora_dir."""
    from safetensors.torch import load_file
    lora = load_file(os.path.join(lora_dir, "adapter_model.safetensors"))
    s = lora_scale(lora_dir)
    errors = {}
    for path in paths:
        d = delta_of(path).double()
        a = lora[f"{PREFIX}{path}.lora_A.weight"].double()
        b = lora[f"{PREFIX}{path}.lora_B.weight"].double()
        errors[path] = ((d - s * (b @ a)).norm() / d.norm()).item()
    return errors


def check_case(ref, model_dir, ours_dir, entry, ids):
    from common import load_logits, relative_error
    kinds, reasons = forms_of(entry, ref.peft_types)
    adapter = os.path.join(ours_dir, entry["adapter_dir"])
    ours = load_logits(os.path.join(ours_dir, entry["logits"]))
    cells = {f: Cell("n/a", note=reasons[f]) for f in FORMS if f not in kinds}
    delta_source = None    # (name, function path -> dW) for the SVD error check

    if "native" in kinds:
        try:
            model = ref.peft_model(model_dir, adapter)
            rel, _ = relative_error(ours, ref.logits(model, ids))
            note = "top-k form" if (entry.get("options") or {}).get("saveOnlyTopkWeights") else ""
            cells["native"] = Cell("ok" if rel <= THRESHOLD else "FAIL", rel, note)
            if kinds.get("lora/") == "svd":
                merged = model.merge_and_unload().state_dict()
                base = ref.base_weights(model_dir)
                delta_source = ("PEFT's merge", lambda p: merged[f"{p}.weight"].cpu().double() - base[f"{p}.weight"].double())
            del model
        except Exception as e:
            traceback.print_exc()
            cells["native"] = Cell("FAIL", note=error_text(e))
    if delta_source is None and kinds.get("lora/") == "svd" and kinds.get("merged/") == "fp32":
        from safetensors.torch import load_file
        merged = load_file(os.path.join(adapter, "merged", "model.safetensors"))
        base = ref.base_weights(model_dir)
        delta_source = ("our merged/", lambda p: merged[f"{p}.weight"].double() - base[f"{p}.weight"].double())

    if "lora/" in kinds:
        try:
            lora_dir = os.path.join(adapter, "lora")
            reference = ref.logits(ref.peft_model(model_dir, lora_dir), ids)
            same, _ = relative_error(load_logits(os.path.join(ours_dir, entry["lora_logits"])), reference)
            vs_adapter, _ = relative_error(ours, reference)
            if same > THRESHOLD:
                cells["lora/"] = Cell("FAIL", same, "PEFT and ours disagree on the same lora/ folder")
            elif kinds["lora/"] == "exact":
                note = "rank-2r form against the original W" if str(entry["options"].get("init")) in ("pissa", "olora") else ""
                cells["lora/"] = Cell("ok" if vs_adapter <= THRESHOLD else "FAIL", vs_adapter,
                                      note if vs_adapter <= THRESHOLD else "an exact export must reproduce the adapter")
            else:
                recorded = read_json(os.path.join(adapter, "metadata.json"))["lora_export"]["relative_error"]
                if delta_source is None:
                    cells["lora/"] = Cell("approx", vs_adapter, "SVD export; recorded dW error not re-derived (no fp32 dW at hand)")
                else:
                    mine = recomputed_errors(delta_source[1], lora_dir, recorded)
                    worst = max(abs(mine[p] - recorded[p]) for p in recorded)
                    summary = (f"SVD rank {entry['export']['r']}; dW error max {max(mine.values()):.3g} from {delta_source[0]}, "
                               f"recorded {max(recorded.values()):.3g}")
                    if worst <= ERROR_TOLERANCE:
                        cells["lora/"] = Cell("approx", vs_adapter, summary)
                    else:
                        cells["lora/"] = Cell("FAIL", vs_adapter, f"{summary}: off by {worst:.2e}")
        except Exception as e:
            traceback.print_exc()
            cells["lora/"] = Cell("FAIL", note=error_text(e))

    if "merged/" in kinds:
        try:
            reference = ref.logits(ref.hf_model(os.path.join(adapter, "merged")), ids)
            same, _ = relative_error(load_logits(os.path.join(ours_dir, entry["merged_logits"])), reference)
            vs_adapter, _ = relative_error(ours, reference)
            if same > THRESHOLD:
                cells["merged/"] = Cell("FAIL", same, "transformers and ours disagree on the same merged/ folder")
            elif kinds["merged/"] == "fp32":
                cells["merged/"] = Cell("ok" if vs_adapter <= THRESHOLD else "FAIL", vs_adapter)
            else:
                ok = vs_adapter <= BF16_MERGED_BOUND
                cells["merged/"] = Cell("approx" if ok else "FAIL", vs_adapter, f"{kinds['merged/']}: rounding")
        except Exception as e:
            traceback.print_exc()
            cells["merged/"] = Cell("FAIL", note=error_text(e))
    return cells


# --------------------------------------------------------------------------------------------------------- report

def worst(cells):
    """The summary of one case's form over the models: the worst status, the largest value."""
    order = ["not run", "FAIL", "approx", "ok", "planned", "n/a"]
    status = min((c.status for c in cells), key=order.index)
    values = [c.value for c in cells if isinstance(c.value, float)]
    bad = sum(c.failed for c in cells)
    note = ""
    if status in ("FAIL", "not run"):
        note = f"{bad} of {len(cells)} models"
    elif status == "n/a":
        note = cells[0].note
    elif status == "approx":
        note = next(c.note for c in cells if c.status == "approx")
    return Cell(status, max(values) if values else None, note)


def render(results, header, notes):
    """results: [(model, case name, method type, peft_type, {form: Cell})]."""
    by_case = {}
    for model, name, kind, peft_type, cells in results:
        by_case.setdefault(name, (kind, peft_type, []))[2].append((model, cells))
    summary = []
    for name, (kind, peft_type, per_model) in by_case.items():
        summary.append([name, peft_type, str(len(per_model))] + [worst([cells[f] for _, cells in per_model]).text() for f in FORMS])
    text = header + "\n\n" + table(["case", "peft_type", "models"] + list(FORMS), summary)
    text += ("\nEach cell: the worst result over the models and the largest max |ours − ref| / max |ref|. ok: within "
             f"{THRESHOLD:g}; approx: a documented approximation, checked as described below; n/a: the form does not "
             "exist for this case.\n")
    details = [[model, name] + [cells[f].text() for f in FORMS] for model, name, _, _, cells in results]
    text += "\n<details><summary>Per model</summary>\n\n" + table(["model", "case"] + list(FORMS), details) + "\n</details>\n"
    failures = [f"- {model} / {name} / {form}: {cells[form].text()}"
                for model, name, _, _, cells in results for form in FORMS if cells[form].status == "FAIL"]
    not_run = sum(cells[form].status == "not run" for *_, cells in results for form in FORMS)
    if not_run:
        failures.append(f"- {not_run} checks not run: the time budget was spent (see the per-model table)")
    if notes:
        text += "\n" + "".join(f"- {' '.join(str(n).split())}\n" for n in notes)
    if failures:
        text += "\nFailures:\n\n" + "\n".join(failures) + "\n"
    return text, bool(failures)


def main():
    models, ours_root = sys.argv[1], sys.argv[2]
    plan = "--plan" in sys.argv
    ref = None
    if not plan:
        import peft
        import torch
        device = device_arg(sys.argv)
        ref = Reference(device)
        header = f"### Adapters: PEFT {peft.__version__} vs ours (fp32, {device}, torch {torch.__version__})"
    else:
        header = "### Adapters: plan (no torch; files and shapes checked, nothing compared)"
    budget = Budget(float(arg(sys.argv, "--budget", "150")))   # from here: imports and CUDA start are not counted
    results, notes, extra_failure = [], [], False
    names = model_order(d for d in os.listdir(models) if os.path.isdir(os.path.join(models, d)))
    if not names:
        notes.append(f"FAIL: no model folders under {models} (make_models.py failed? see its log)")
        extra_failure = True
    for name in names:
        model_dir, ours_dir = os.path.join(models, name), os.path.join(ours_root, name)
        manifest_path = os.path.join(ours_dir, "manifest.json")
        if not os.path.isfile(manifest_path):
            notes.append(f"FAIL {name}: no manifest.json of ours (the worker's parity command failed on it; see its log)")
            extra_failure = True
            continue
        manifest = read_json(manifest_path)
        for f in manifest.get("failed", []):
            notes.append(f"FAIL {name} / {f['name']}: the worker failed: {f['error']}")
            extra_failure = True
        for s in manifest.get("skipped", []):
            notes.append(f"{name} / {s['name']}: skipped by the worker: {s['reason']}")
        ids = None
        for entry in manifest["cases"]:
            row = (name, entry["name"], entry["type"], entry.get("peft_type", "?"))
            if budget.spent():
                results.append(row + ({f: Cell("not run", note=f"{budget.seconds:g} s budget spent") for f in FORMS},))
                continue
            try:
                if plan:
                    cells = plan_case(ours_dir, manifest, entry)
                else:
                    if ids is None:
                        from common import read_ids
                        ids = read_ids(model_dir)
                    cells = check_case(ref, model_dir, ours_dir, entry, ids)
            except Exception as e:  # whatever broke outside a form's own try: the whole case fails, the run goes on
                traceback.print_exc()
                cells = {f: Cell("FAIL", note=error_text(e)) for f in FORMS}
            results.append(row + (cells,))
            print(f"{name} / {entry['name']}: " + "; ".join(f"{f} {cells[f].text()}" for f in FORMS), flush=True)
        if ref is not None:
            ref.forget()
    ours_formats = sorted({(r[1], r[3]) for r in results if r[4]["native"].status == "n/a"})
    if ours_formats:
        notes.append("Our own formats (PEFT has no such peft_type), checked through lora/ and merged/ only: "
                     + ", ".join(f"{n} ({t})" for n, t in ours_formats) + ".")
    notes.append("approx on lora/: DoRA's and Bat's exports are rank-r truncated SVDs of a full-rank ΔW; the value is the "
                 "export's logits error against the adapter, and the per-module ‖ΔW − BA‖_F/‖ΔW‖_F recomputed here "
                 f"equals metadata.json's lora_export.relative_error (to {ERROR_TOLERANCE:g}).")
    notes.append("LoRA+ changes only the optimizer's learning rates (B's group), not the adapter: no case.")
    notes.append(f"{len(results)} case × model rows in {budget.elapsed():.0f} s (budget {budget.seconds:g} s).")
    text, failed = render(results, header, notes)
    if markdown_arg(sys.argv):
        with open(markdown_arg(sys.argv), "w", encoding="utf-8") as f:
            f.write(text)
    if arg(sys.argv, "--json"):
        with open(arg(sys.argv, "--json"), "w", encoding="utf-8") as f:
            json.dump([{"model": m, "case": n, "type": k, "peft_type": p, "forms": {f: c[f].as_json() for f in FORMS}}
                       for m, n, k, p, c in results], f, indent=1)
    print(text)
    sys.exit(1 if failed or extra_failure else 0)


if __name__ == "__main__":
    main()
