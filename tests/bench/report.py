#!/usr/bin/env python3
"""Merges the benchmark JSON files of one run into a markdown report (and one JSON file), and splices a report into
a section of docs/benchmarks.md. Plain Python (no torch), so it runs on either machine.

  report.py build --ours train-ours.json --peft train-peft.json --micro-ours micro-ours.json --micro-torch micro-torch.json \
                  [--peft-rerun train-peft-rerun.json] [--tests tests.summary] [--status status.tsv] [--title ...] \
                  --md benchmarks.md --json results.json
  report.py splice docs/benchmarks.md gpu run1/benchmarks.md [run2/benchmarks.md]   # replaces the text between
                                                   # <!-- gpu:begin --> and <!-- gpu:end --> with the reports, in order
"""
import argparse
import json
import math
import os
import sys


def load(path):
    if not path or not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        return {"error": f"{path}: {e}"}


def num(x):
    return x if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def fmt(x, spec="{:,.0f}"):
    x = num(x)
    return "-" if x is None else spec.format(x)


def pct(x):
    x = num(x)
    return "-" if x is None else f"{100 * x:.1f}%"


def ratio(a, b, spec="{:.2f}x"):
    a, b = num(a), num(b)
    return "-" if a is None or not b else spec.format(a / b)


def loss_agreement(a, b):
    """Max over the common steps of |ours - peft| / |peft|, and the number of steps compared."""
    d = loss_differences(a, b)
    return (max(x for _, x in d), len(d)) if d else (None, 0)


def loss_differences(a, b):
    """(step, |ours - peft| / |peft|) for each step both sides logged."""
    if not a or not b:
        return []
    return [(i, abs(x - y) / abs(y)) for i, (x, y) in enumerate(zip(a, b))
            if num(x) is not None and num(y) is not None and y != 0]


def agreement_cell(a, b):
    """The table's loss-agreement cell: the worst step (where an early loss spike amplifies rounding, the max alone
    misleads) and the median step."""
    d = loss_differences(a, b)
    if not d:
        return "-"
    step, worst = max(d, key=lambda t: t[1])
    median = sorted(x for _, x in d)[len(d) // 2]
    if len(d) < 20:
        return f"{pct(worst)} over {len(d)} steps"
    return f"max {worst * 100:.2f}% (step {step}), median {median * 100:.3f}%, over {len(d)} steps"


def rows_by_config(doc):
    train = (doc or {}).get("train") or {}
    return {r.get("config"): r for r in train.get("results", [])}, train


def build(args):
    ours, peft = load(args.ours), load(args.peft)
    # PEFT run a second time on the same inputs: its own run-to-run difference, the noise floor of the loss check.
    peft_rerun = load(args.peft_rerun)
    rerun_rows, _ = rows_by_config(peft_rerun)
    micro_ours = load(args.micro_ours)
    micro_ours = (micro_ours or {}).get("micro", micro_ours)
    micro_torch = load(args.micro_torch)
    tests = open(args.tests).read().strip() if args.tests and os.path.exists(args.tests) else None
    status = open(args.status).read().strip() if args.status and os.path.exists(args.status) else None
    o_rows, o_train = rows_by_config(ours)
    p_rows, p_train = rows_by_config(peft)
    device = (peft or {}).get("device") or (micro_torch or {}).get("device") or (ours or {}).get("device") or "?"
    versions = (peft or {}).get("versions") or {}
    date = (peft or {}).get("date_utc") or (ours or {}).get("date_utc") or "?"

    out = [f"## {args.title}", ""]
    if not versions and micro_torch and micro_torch.get("torch"):
        versions = {"PyTorch (micro-benchmarks)": micro_torch["torch"]}
    out.append(f"- date (UTC): {date}; device: {device}; libtorch (ours): {(ours or {}).get('libtorch', '?')}; "
               + ", ".join(f"{k} {v}" for k, v in versions.items()))
    if ours and ours.get("command"):
        out.append(f"- ours: `{ours['command']}`")
    if peft and peft.get("command"):
        out.append(f"- PEFT: `{peft['command']}`")
    if tests:
        out.append(f"- worker tests on cuda: {tests}")
    out.append("")

    if micro_ours or micro_torch:
        mo, mt = micro_ours or {}, micro_torch or {}
        out += ["### Binding micro-benchmarks (same machine, same run)", "",
                "| metric | ours | PyTorch | ours / PyTorch |", "|---|---:|---:|---:|"]
        for key, label, spec in [("matmul_bf16_tflops", f"bf16 matmul {mo.get('matmul_bf16_n', mt.get('matmul_bf16_n', ''))}³ TFLOP/s", "{:.1f}"),
                                 ("matmul_fp32_cuda_tflops", "fp32 matmul 4096³ on CUDA TFLOP/s", "{:.1f}"),
                                 ("matmul_fp32_cpu_gflops", f"fp32 matmul {mo.get('matmul_fp32_cpu_n', '')}³ on the CPU GFLOP/s", "{:.1f}")]:
            if key in mo or key in mt:
                out.append(f"| {label} | {fmt(mo.get(key), spec)} | {fmt(mt.get(key), spec)} | {ratio(mo.get(key), mt.get(key))} |")
        for side in ("cpu", "cuda"):
            a, b = mo.get(f"op_overhead_{side}_us") or {}, mt.get(f"op_overhead_{side}_us") or {}
            for op in sorted(set(a) | set(b)):
                out.append(f"| µs per small op on {side}: {op} | {fmt(a.get(op), '{:.2f}')} | {fmt(b.get(op), '{:.2f}')} | {ratio(a.get(op), b.get(op))} |")
        out += ["", "Per-op cost: a 4-element tensor; ours includes creating and freeing the C# handle (target < 2 µs on the CPU), "
                "PyTorch's is a call from Python.", ""]

    if o_rows or p_rows:
        t = o_train or p_train
        out += ["### Training throughput: ours vs PyTorch + PEFT" if p_rows else "### Training throughput (ours)", "",
                f"Model {os.path.basename(str(t.get('model', '?')))} ({fmt(t.get('base_matmul_params'))} matmul parameters), {str(t.get('dtype', 'BFloat16')).lower()} base, "
                f"batch {t.get('batch')} x {t.get('seq')} tokens, {t.get('warmup')} warm-up + {t.get('steps')} timed steps, "
                f"AdamW (fused on CUDA) lr {t.get('lr')}, clip 1.0, all 7 linears. MFU = (4·N + 6·N_trainable) · tokens/s over "
                f"{fmt(t.get('peak_tflops'), '{:.3g}')} TFLOP/s ({t.get('peak_kind', 'the measured bf16 matmul peak')})."
                + (" Loss agreement: max relative difference of the per-step losses (same tokens, same initial adapter values "
                   "where our init was loaded)." if p_rows else ""), ""]
        check_o, check_p = o_train.get("data_check"), p_train.get("data_check")
        if check_o and check_p and check_o != check_p:
            out += [f"**Token streams differ** (ours {check_o}, PEFT {check_p}): the loss columns do not compare.", ""]
        if not p_rows:
            out += ["| config | tokens/s | step ms | peak GB | MFU | trainable | first loss | last loss | notes |",
                    "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
            for cfg, o in o_rows.items():
                losses = o.get("losses") or []
                out.append(f"| {cfg} | {fmt(o.get('tokens_per_s'))} | {fmt(o.get('step_ms'), '{:.1f}')} | {fmt(o.get('peak_mem_gb'), '{:.1f}')} "
                           f"| {pct(o.get('mfu'))} | {fmt(o.get('trainable_params'))} | {fmt(losses[0] if losses else None, '{:.4f}')} "
                           f"| {fmt(losses[-1] if losses else None, '{:.4f}')} | {o.get('status')}{': ' + o['note'] if o.get('note') else ''} |")
            out.append("")
        rerun_col = " PEFT vs its rerun |" if rerun_rows else ""
        rows_table = ["| config | ours tok/s | PEFT tok/s | ours/PEFT | ours peak GB | PEFT peak GB | ours MFU | PEFT MFU | loss agreement |"
                      + rerun_col + " trainable (ours / PEFT) | notes |",
                      "|---|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if rerun_rows else "") + "---:|---|"]
        out += rows_table if p_rows else []
        for cfg in (list(o_rows) + [c for c in p_rows if c not in o_rows]) if p_rows else []:
            o, p = o_rows.get(cfg, {}), p_rows.get(cfg, {})
            agree_cell = agreement_cell(o.get("losses"), p.get("losses"))
            notes = "; ".join(x for x in [
                f"ours {o.get('status')}: {o.get('note')}" if o.get("status") not in (None, "ok") or o.get("note") else "",
                f"PEFT {p.get('status')}: {p.get('note')}" if p.get("status") not in (None, "ok") or p.get("note") else ""] if x)
            out.append(f"| {cfg} | {fmt(o.get('tokens_per_s'))} | {fmt(p.get('tokens_per_s'))} | {ratio(o.get('tokens_per_s'), p.get('tokens_per_s'))} "
                       f"| {fmt(o.get('peak_mem_gb'), '{:.1f}')} | {fmt(p.get('peak_mem_gb'), '{:.1f}')} | {pct(o.get('mfu'))} | {pct(p.get('mfu'))} "
                       f"| {agree_cell} |" + (f" {agreement_cell((rerun_rows.get(cfg) or {}).get('losses'), p.get('losses'))} |" if rerun_rows else "")
                       + f" {fmt(o.get('trainable_params'))} / {fmt(p.get('trainable_params'))} | {notes} |")
        if p_rows:
            out.append("")
            out += targets(o_rows, p_rows, rerun_rows)

    if args.traces and os.path.isdir(args.traces):
        out += profiles(args.traces)

    if status:
        out += ["### Suite steps", "", "| step | status | seconds |", "|---|---|---:|"]
        for line in status.splitlines():
            parts = line.split("\t")
            if len(parts) >= 3:
                out.append(f"| {parts[0]} | {parts[1]} | {parts[2]} |")
        out.append("")

    md = "\n".join(out) + "\n"
    if args.md:
        with open(args.md, "w") as f:
            f.write(md)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(ours=ours, peft=peft, peft_rerun=peft_rerun, micro_ours=micro_ours, micro_torch=micro_torch, tests=tests, status=status), f, indent=1)
    print(md)


def kernel_times(path):
    """GPU kernel time per kernel name (µs) of a Chrome trace (Kineto's and torch.profiler's format)."""
    try:
        with open(path) as f:
            events = json.load(f).get("traceEvents", [])
    except (OSError, ValueError):
        return None
    per = {}
    for e in events:
        if e.get("ph") == "X" and str(e.get("cat", "")).lower() in ("kernel", "gpu_memcpy", "gpu_memset"):
            name = str(e.get("name", "?"))
            total, count = per.get(name, (0.0, 0))
            per[name] = (total + float(e.get("dur", 0)), count + 1)
    return per


def launchers(path, kinds=("elementwise/other", "softmax/loss", "reduction", "copy"), top=16):
    """Which CPU ops launched the non-GEMM kernels of a Kineto trace: kernel time per (kernel, op chain, input shapes),
    the chain being the launching op and up to two ops around it on its thread (what a kernel-name table cannot say:
    a direct_copy may be a cast, a .contiguous() or an autograd accumulation)."""
    try:
        with open(path) as f:
            events = json.load(f).get("traceEvents", [])
    except (OSError, ValueError):
        return []
    ops = [e for e in events if e.get("ph") == "X" and str(e.get("cat", "")) == "cpu_op"]
    by_ext, parent = {}, {}
    threads = {}
    for i, e in enumerate(ops):
        ext = (e.get("args") or {}).get("External id")
        if ext is not None:
            by_ext[ext] = i
        threads.setdefault((e.get("pid"), e.get("tid")), []).append(i)
    for idx in threads.values():
        idx.sort(key=lambda i: (float(ops[i].get("ts", 0)), -float(ops[i].get("dur", 0))))
        stack = []
        for i in idx:
            ts = float(ops[i].get("ts", 0))
            while stack and float(ops[stack[-1]].get("ts", 0)) + float(ops[stack[-1]].get("dur", 0)) < ts:
                stack.pop()
            parent[i] = stack[-1] if stack else None
            stack.append(i)
    per = {}
    for e in events:
        if e.get("ph") != "X" or str(e.get("cat", "")).lower() != "kernel":
            continue
        name = str(e.get("name", "?"))
        if kind_of(name) not in kinds:
            continue
        i = by_ext.get((e.get("args") or {}).get("External id"))
        chain, dims = [], ""
        if i is not None:
            dims = str((ops[i].get("args") or {}).get("Input Dims", ""))[:60]
            j = i
            while j is not None and len(chain) < 3:
                chain.append(str(ops[j].get("name", "?"))[:40])
                j = parent.get(j)
        key = (name[:60], " < ".join(chain) or "?", dims)
        t, n = per.get(key, (0.0, 0))
        per[key] = (t + float(e.get("dur", 0)), n + 1)
    out = []
    for (name, chain, dims), (us, n) in sorted(per.items(), key=lambda kv: -kv[1][0])[:top]:
        out.append(f"- {us / 1000:.2f} ms, {n}x `{name}` from `{chain}` {dims}")
    return out


def gpu_idle(path):
    """Where the GPU sits idle in a profiled step: (span, busy, idle waiting for a launch, idle between queued kernels),
    in µs. A gap before a kernel counts as waiting for the CPU when the kernel started within 20 µs of its launch call
    (the queue was empty); otherwise the kernel was queued and the gap is the GPU's own kernel-to-kernel latency, which
    only fewer kernels (fusion) or a CUDA graph shortens. Also the CPU's lead at the end of the step: how long before the
    GPU finished the step's work the CPU had launched all of it (what a following step's launches would overlap)."""
    try:
        with open(path) as f:
            events = json.load(f).get("traceEvents", [])
    except (OSError, ValueError):
        return None
    kernels = sorted((e for e in events if e.get("ph") == "X" and str(e.get("cat", "")).lower() in ("kernel", "gpu_memcpy", "gpu_memset")),
                     key=lambda e: float(e.get("ts", 0)))
    launch = {(e.get("args") or {}).get("correlation"): float(e.get("ts", 0)) for e in events
              if e.get("ph") == "X" and str(e.get("cat", "")).lower() == "cuda_runtime" and (e.get("args") or {}).get("correlation") is not None}
    if not kernels:
        return None
    start = end = float(kernels[0]["ts"])
    busy = starved = queued = 0.0
    last_launch = 0.0
    for e in kernels:
        s, d = float(e.get("ts", 0)), float(e.get("dur", 0))
        issued = launch.get((e.get("args") or {}).get("correlation"))
        if issued is not None:
            last_launch = max(last_launch, issued)
        if s > end:
            if issued is not None and s - issued < 20:
                starved += s - end
            else:
                queued += s - end
        busy += max(0.0, s + d - max(s, end))
        end = max(end, s + d)
    return dict(span=end - start, busy=busy, starved=starved, queued=queued, lead=end - last_launch if last_launch else None)


def kind_of(name):
    n = name.lower()
    if any(k in n for k in ("gemm", "xmma", "cutlass", "nvjet", "matmul", "gemv", "splitk")):
        return "matmul"
    if any(k in n for k in ("flash", "fmha", "attention", "sdpa", "cudnn")):
        return "attention"
    if any(k in n for k in ("adam", "multi_tensor", "foreach")):
        return "optimizer"
    if any(k in n for k in ("softmax", "logsumexp", "nll", "cross_entropy")):
        return "softmax/loss"
    if any(k in n for k in ("reduce", "sum", "norm")):
        return "reduction"
    if "memcpy" in n or "memset" in n:
        return "copy"
    return "elementwise/other"


def profiles(folder):
    """Where one step's GPU time goes, ours vs PEFT, per configuration that was profiled."""
    lines = []
    labels = sorted({f.rsplit("-", 1)[0] for f in os.listdir(folder) if f.endswith(".trace.json")})
    for label in labels:
        sides = {side: kernel_times(os.path.join(folder, f"{label}-{side}.trace.json")) for side in ("ours", "peft")}
        if not any(sides.values()):
            continue
        lines += [f"### Profile of one step: {label}", "", "| kernel kind | ours ms | ours kernels | PEFT ms | PEFT kernels |", "|---|---:|---:|---:|---:|"]
        kinds = {}
        for side, per in sides.items():
            for name, (us, n) in (per or {}).items():
                k = kinds.setdefault(kind_of(name), {}).setdefault(side, [0.0, 0])
                k[0] += us
                k[1] += n
        total = {s: sum(v[0] for v in (sides[s] or {}).values()) for s in sides}
        count = {s: sum(v[1] for v in (sides[s] or {}).values()) for s in sides}
        for kind, v in sorted(kinds.items(), key=lambda kv: -max(x[0] for x in kv[1].values())):
            o, p = v.get("ours", [0, 0]), v.get("peft", [0, 0])
            lines.append(f"| {kind} | {o[0] / 1000:.1f} | {o[1]} | {p[0] / 1000:.1f} | {p[1]} |")
        lines.append(f"| **all kernels** | {total['ours'] / 1000:.1f} | {count['ours']} | {total['peft'] / 1000:.1f} | {count['peft']} |")
        idle = {side: gpu_idle(os.path.join(folder, f"{label}-{side}.trace.json")) for side in ("ours", "peft")}
        if any(idle.values()):
            def cell(side, key):
                v = (idle.get(side) or {}).get(key)
                return "-" if v is None else f"{v / 1000:.1f}"
            lines += [f"| GPU busy / step span (ms) | {cell('ours', 'busy')} / {cell('ours', 'span')} | | {cell('peft', 'busy')} / {cell('peft', 'span')} | |",
                      f"| idle, waiting for the CPU to launch | {cell('ours', 'starved')} | | {cell('peft', 'starved')} | |",
                      f"| idle between queued kernels | {cell('ours', 'queued')} | | {cell('peft', 'queued')} | |",
                      f"| CPU's lead at the step's end | {cell('ours', 'lead')} | | {cell('peft', 'lead')} | |"]
        lines += ["", "Top kernels (ours):", ""]
        for name, (us, n) in sorted((sides["ours"] or {}).items(), key=lambda kv: -kv[1][0])[:12]:
            lines.append(f"- {us / 1000:.1f} ms, {n}x `{name[:110]}`")
        launched = launchers(os.path.join(folder, f"{label}-ours.trace.json"))
        if launched:
            lines += ["", "Where the non-GEMM kernels come from (ours: kernel, launching op < its callers, input shapes):", ""] + launched
        lines += ["", "Top kernels (PEFT):", ""]
        for name, (us, n) in sorted((sides["peft"] or {}).items(), key=lambda kv: -kv[1][0])[:12]:
            lines.append(f"- {us / 1000:.1f} ms, {n}x `{name[:110]}`")
        lines.append("")
    return lines


def targets(o, p, rerun=None):
    """Issue 7's targets, checked on this run's numbers."""
    def tps(rows, c):
        return num((rows.get(c) or {}).get("tokens_per_s"))

    def mem(rows, c):
        return num((rows.get(c) or {}).get("peak_mem_gb"))

    lines = ["### Issue 7's targets on this run", "", "| target | measured | met |", "|---|---|---|"]

    def add(label, value, ok):
        lines.append(f"| {label} | {value} | {'-' if ok is None else ('yes' if ok else 'no')} |")

    def cmp(a, b, threshold, ge=True):
        if a is None or b is None or not b:
            return "-", None
        r = a / b
        return f"{r:.2f}x", (r >= threshold if ge else r <= threshold)

    v, ok = cmp(tps(o, "lora"), tps(p, "lora"), 1.5)
    add("LoRA tokens/s >= 1.5x PEFT (first milestone 1.1x), both fp32 adapters and fp32 adapter math", v, ok)
    # The same fp32 adapter tensors and optimizer state with the adapter matmuls in bf16: ours adapterDtype mixed,
    # against PEFT's default (what a PEFT user gets) and against PEFT under torch.autocast (HF Trainer's bf16=True).
    for c, label in (("lora+mixed", "LoRA, fp32 adapters with bf16 math (mixed)"), ("lora+bf16", "LoRA, bf16 adapters")):
        if c in o:
            v, ok = cmp(tps(o, c), tps(p, "lora"), 1.5)
            add(f"{label}, vs PEFT's default fp32 LoRA: tokens/s >= 1.5x", v, ok)
            v, ok = cmp(tps(o, c), tps(p, c), 1.5)
            add(f"{label}, vs PEFT {'under torch.autocast' if c.endswith('mixed') else 'with bf16 adapters'}: tokens/s >= 1.5x", v, ok)
    v, ok = cmp(mem(o, "lora"), mem(p, "lora"), 0.8, ge=False)
    add("LoRA peak memory <= 0.8x PEFT", v, ok)
    for m in ("bone", "bat"):
        v, ok = cmp(tps(o, m), tps(o, "lora"), 1.0)
        add(f"{m} tokens/s >= 1.0x our LoRA", v, ok)
        v, ok = cmp(mem(o, m), mem(o, "lora"), 1.05, ge=False)
        add(f"{m} peak memory <= 1.05x our LoRA", v, ok)
    for m in ("dora", "vblora"):
        v, ok = cmp(tps(o, m), tps(p, m), 1.3)
        add(f"{m} tokens/s >= 1.3x PEFT", v, ok)
        if f"{m}+mixed" in o:
            v, ok = cmp(tps(o, f"{m}+mixed"), tps(p, m), 1.3)
            add(f"{m} mixed tokens/s >= 1.3x PEFT's default", v, ok)
            v, ok = cmp(tps(o, f"{m}+mixed"), tps(p, f"{m}+mixed"), 1.3)
            add(f"{m} mixed tokens/s >= 1.3x PEFT under torch.autocast", v, ok)
    for c in ("lora", "lora+mixed", "lora+bf16"):
        if c in o:
            mfu = num((o.get(c) or {}).get("mfu"))
            add(f"MFU >= 45%: {c}", pct(mfu), None if mfu is None else mfu >= 0.45)
    worst = None
    for c in o:
        a, _ = loss_agreement((o.get(c) or {}).get("losses"), (p.get(c) or {}).get("losses"))
        if a is not None and "init: ours" in str((p.get(c) or {}).get("note", "")):
            worst = a if worst is None else max(worst, a)
    add("same loss curve as PEFT within 2% (rows that started from our init)", pct(worst), None if worst is None else worst <= 0.02)
    own = [loss_agreement((rerun.get(c) or {}).get("losses"), (p.get(c) or {}).get("losses"))[0] for c in (rerun or {})]
    own = [x for x in own if x is not None]
    if own:
        add("for scale: PEFT's own run-to-run difference (same inputs, run twice)", pct(max(own)), None)
    return lines + [""]


def splice(doc, section, paths):
    with open(doc) as f:
        text = f.read()
    parts = []
    for path in paths:
        with open(path) as f:
            parts.append(f.read().strip())
    body = "\n\n".join(parts)
    begin, end = f"<!-- {section}:begin -->", f"<!-- {section}:end -->"
    if begin not in text or end not in text:
        sys.exit(f"{doc} has no {begin} ... {end} markers")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    with open(doc, "w") as f:
        f.write(f"{head}{begin}\n{body}\n{end}{tail}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    for k in ("ours", "peft", "peft-rerun", "micro-ours", "micro-torch", "tests", "status", "md", "json", "traces"):
        b.add_argument(f"--{k}")
    b.add_argument("--title", default="GPU")
    s = sub.add_parser("splice")
    s.add_argument("doc")
    s.add_argument("section")
    s.add_argument("paths", nargs="+", help="one or more reports (e.g. of two suite runs), in order")
    args = ap.parse_args()
    if args.cmd == "build":
        build(args)
    else:
        splice(args.doc, args.section, args.paths)


if __name__ == "__main__":
    main()
