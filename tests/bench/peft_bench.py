#!/usr/bin/env python3
"""PyTorch + PEFT side of the training benchmark: the same model, tokens, steps and optimizer as
`FineTune.Worker bench train`, with the methods through PEFT. Prints (and writes with --json) the same JSON shape.

  python3 tests/bench/peft_bench.py --write-model DIR [--preset 1b] [--seed 1234]   # the shared model folder
  python3 tests/bench/peft_bench.py --model DIR --configs lora,lora+gc,bone --init-dir INIT --json out.json

Settings as issue 7 states them: bf16 base weights, adapters fp32 (PEFT's default autocast_adapter_dtype; "+bf16"
keeps them bf16; "+mixed" keeps them fp32 under torch.autocast(bf16)), sdpa attention, fused AdamW (constant lr, betas 0.9/0.999, eps 1e-8, no weight decay), global-norm
clipping at 1.0, every linear of every layer. "+gc": HF gradient checkpointing (non-reentrant).
With --init-dir (written by our bench), each configuration starts from our initial adapter tensors and our
per-tensor learning rates, so the two loss curves can be compared step by step.
"""
import argparse
import json
import math
import os
import platform
import sys
import time

MASK = (1 << 64) - 1
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PRESETS = {
    # Llama-3.2-1B's shapes (tied embeddings), as BenchModels.Preset in src/Worker/Tools/BenchCommand.cs.
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8),
    "small": dict(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2),
    "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1),
}


# ---------------------------------------------------------------- data (same generator as BenchData in C#)
def tokens(seed, count, vocab):
    s, k, out = seed & MASK, min(vocab, 1024), [0] * count
    for i in range(count):
        s = (s + 0x9E3779B97F4A7C15) & MASK
        z = s
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
        z ^= z >> 31
        r = (z >> 11) * (1.0 / 9007199254740992.0)
        out[i] = (int(k * (r * r * r)) * 7919 + 13) % vocab
    return out


def data_check(ids):
    h = 1469598103934665603
    for t in ids[: 1 << 20]:
        h = ((h ^ (t & 0xFFFFFFFF)) * 1099511628211) & MASK
    return f"{len(ids)}:{h:016x}"


assert tokens(1234, 8, 128256) == [81550, 19432, 63365, 101408, 106859, 103596, 84177, 95041], "generator differs from C#"


# ---------------------------------------------------------------- model folder
def model_config(preset):
    c = dict(PRESETS[preset])
    c.update(architectures=["LlamaForCausalLM"], model_type="llama", tie_word_embeddings=True, rms_norm_eps=1e-5,
             rope_theta=10000.0, max_position_embeddings=4096, torch_dtype="bfloat16", hidden_act="silu",
             attention_bias=False, mlp_bias=False)
    return c


def write_model(folder, preset, seed):
    import torch
    from safetensors.torch import save_file
    c = model_config(preset)
    os.makedirs(folder, exist_ok=True)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=dev).manual_seed(seed)
    h, L = c["hidden_size"], c["num_hidden_layers"]
    kv = c["num_key_value_heads"] * (h // c["num_attention_heads"])
    shapes = {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h),
              "gate_proj": (c["intermediate_size"], h), "up_proj": (c["intermediate_size"], h), "down_proj": (h, c["intermediate_size"])}
    def normal(*shape):
        return (torch.randn(shape, generator=g, device=dev, dtype=torch.float32) * 0.02).to(torch.bfloat16).cpu()
    w = {"model.embed_tokens.weight": normal(c["vocab_size"], h), "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}
    for l in range(L):
        for m, s in shapes.items():
            part = "mlp" if m in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            w[f"model.layers.{l}.{part}.{m}.weight"] = normal(*s)
        w[f"model.layers.{l}.input_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
        w[f"model.layers.{l}.post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16)
    save_file(w, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(c, f, indent=2)
    print(f"model written to {folder}: {sum(t.numel() for t in w.values())} parameters", file=sys.stderr)


def load_base(folder):
    """LlamaForCausalLM with our config and weights, bf16 on the GPU, sdpa attention."""
    import torch
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM
    with open(os.path.join(folder, "config.json")) as f:
        c = json.load(f)
    kw = {k: v for k, v in c.items() if k not in ("architectures", "model_type", "torch_dtype")}
    try:
        config = LlamaConfig(**kw, attn_implementation="sdpa")
    except TypeError:
        config = LlamaConfig(**kw)
    try:
        config._attn_implementation = "sdpa"
    except Exception:  # noqa: BLE001 - a version without the setter already took it from the constructor
        pass
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    state = load_file(os.path.join(folder, "model.safetensors"), device="cuda")
    missing, unexpected = model.load_state_dict(state, strict=False)
    bad = [k for k in missing if k != "lm_head.weight"]
    if bad or unexpected:
        raise RuntimeError(f"weights do not match the model: missing {bad[:5]}, unexpected {list(unexpected)[:5]}")
    if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        model.lm_head.weight = model.model.embed_tokens.weight   # tied embeddings, as in our model
    del state
    # Rotary frequencies must be the default θ = 10000 that our side uses.
    inv = getattr(getattr(model.model, "rotary_emb", None), "inv_freq", None)
    rope_ok = None
    if inv is not None:
        d = c["hidden_size"] // c["num_attention_heads"]
        ref = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32, device=inv.device) / d))
        rope_ok = bool(torch.allclose(inv.float(), ref, rtol=1e-5))
    return model, c, rope_ok


# ---------------------------------------------------------------- methods
def parse_config(label):
    name, _, explicit = label.partition("=")
    parts = name.split("+")
    return dict(label=label, type=json.loads(explicit)["type"] if explicit else parts[0],
                options=json.loads(explicit) if explicit else None,
                bf16="bf16" in parts[1:], gc="gc" in parts[1:], mixed="mixed" in parts[1:])


def peft_config(cfg, init_info):
    """The PEFT config of a row, with our options (from bench_init.json when present) or the benchmark's presets."""
    import peft
    t = cfg["type"]
    opts = (init_info or {}).get("method") or cfg["options"] or {}
    targets = opts.get("targetModules") or MODULES
    if t in ("lora", "dora"):
        r = opts.get("r", 32)
        return peft.LoraConfig(r=r, lora_alpha=opts.get("alpha", 2 * r), lora_dropout=opts.get("dropout", 0.0), target_modules=targets,
                               use_dora=(t == "dora"), use_rslora=opts.get("rslora", False), bias="none", task_type="CAUSAL_LM")
    if t in ("bone", "bat"):
        r = opts.get("r", 64)
        init = "bat" if t == "bat" else True
        if hasattr(peft, "MissConfig"):   # PEFT >= 0.17 calls Bone "MiSS"
            return peft.MissConfig(r=r, target_modules=targets, init_weights=init, task_type="CAUSAL_LM")
        return peft.BoneConfig(r=r, target_modules=targets, init_weights=init, task_type="CAUSAL_LM")
    if t == "vblora":
        return peft.VBLoRAConfig(r=opts.get("r", 4), num_vectors=opts.get("numVectors", opts.get("h", 2048)),
                                 vector_length=opts.get("vectorLength", opts.get("b", 256)), topk=opts.get("topk", opts.get("k", 2)),
                                 target_modules=targets, task_type="CAUSAL_LM")
    raise ValueError(f"no PEFT equivalent for method '{t}'")


def ours_name(peft_name):
    return peft_name.replace(".default", "")


def load_init(model, init_dir):
    """Our initial adapter tensors into the PEFT model; returns (loaded, total, note)."""
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    path = os.path.join(init_dir, "adapter_model.safetensors")
    if not os.path.exists(path):
        return 0, 0, "no init file: PEFT's own init"
    sd = load_file(path, device="cuda")
    trainable = {ours_name(n): p for n, p in model.named_parameters() if p.requires_grad}
    # Check shapes first: a mismatch would raise inside PEFT.
    for k, v in sd.items():
        p = trainable.get(k) if k in trainable else trainable.get(k + ".weight")
        if p is not None and tuple(p.shape) != tuple(v.shape):
            return 0, len(sd), f"shape of {k} differs ({tuple(v.shape)} vs PEFT {tuple(p.shape)}): PEFT's own init"
    before = {n: p.detach().clone() for n, p in trainable.items()}
    try:
        res = set_peft_model_state_dict(model, sd)
    except Exception as e:  # noqa: BLE001 - reported in the row
        return 0, len(sd), f"init not loaded ({type(e).__name__}: {str(e)[:160]}): PEFT's own init"
    unexpected = list(getattr(res, "unexpected_keys", []) or [])
    with torch.no_grad():
        changed = sum(1 for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[ours_name(n)].to(p.dtype)))
    note = f"init: ours ({len(sd) - len(unexpected)}/{len(trainable)} tensors)"
    if unexpected:
        note += f", {len(unexpected)} names unknown to PEFT e.g. {unexpected[0]}"
    return len(sd) - len(unexpected), len(trainable), note + ("" if changed or not sd else ", values unchanged (zero init)")


def param_groups(model, init_info, lr):
    lrs = (init_info or {}).get("param_groups") or {}
    groups = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        k = ours_name(n)
        g = lrs.get(k) or lrs.get(k[: -len(".weight")] if k.endswith(".weight") else k) or {"lr": lr, "weight_decay": 0.0}
        groups.setdefault((g["lr"], g.get("weight_decay", 0.0)), []).append(p)
    return [{"params": ps, "lr": a, "weight_decay": wd} for (a, wd), ps in groups.items()]


# ---------------------------------------------------------------- training
def matmul_params(c):
    h, i, L, v = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    kv = c["num_key_value_heads"] * (h // c["num_attention_heads"])
    return L * (2 * h * h + 2 * kv * h + 3 * h * i) + v * h


def run_config(folder, cfg, args, ids_all, peak_flops, deadline):
    import torch
    import peft
    row = dict(config=cfg["label"], status="ok", note="", adapter_dtype="bf16" if cfg["bf16"] else "mixed" if cfg["mixed"] else "fp32",
               gradient_checkpointing=cfg["gc"])
    init_dir = os.path.join(args.init_dir, cfg["label"].replace("+", "_").replace("=", "_")) if args.init_dir else None
    init_info = None
    if init_dir and os.path.exists(os.path.join(init_dir, "bench_init.json")):
        with open(os.path.join(init_dir, "bench_init.json")) as f:
            init_info = json.load(f)
    t0 = time.time()
    model, c, rope_ok = load_base(folder)
    row["rope_default_theta"] = rope_ok
    row["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
    if cfg["gc"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    pc = peft_config(cfg, init_info)
    model = peft.get_peft_model(model, pc, autocast_adapter_dtype=not cfg["bf16"])
    model.train()
    notes = []
    if init_dir:
        notes.append(load_init(model, init_dir)[2])
    params = [p for p in model.parameters() if p.requires_grad]
    row["trainable_params"] = sum(p.numel() for p in params)
    row["adapter_dtypes"] = sorted({str(p.dtype).replace("torch.", "") for p in params})
    opt = torch.optim.AdamW(param_groups(model, init_info, args.lr), lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=True)
    B, T = args.batch, args.seq
    ids = torch.tensor(ids_all, dtype=torch.long).view(-1, B, T)
    losses, timed = [], 0
    start = None

    # "+mixed": fp32 adapters under torch.autocast(bf16), what HF Trainer's bf16=True does: PEFT's counterpart of our
    # adapterDtype mixed (fp32 tensors and optimizer state, bf16 matmuls).
    def forward(x):
        if cfg["mixed"]:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return model(input_ids=x, labels=x).loss
        return model(input_ids=x, labels=x).loss

    def step(s):
        x = ids[s].pin_memory().to("cuda", non_blocking=True)
        loss = forward(x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    for s in range(args.warmup + args.steps):
        if s == args.warmup:
            torch.cuda.synchronize()
            start = time.time()
        losses.append(step(s))
        if s >= args.warmup:
            timed += 1
        if deadline and time.time() > deadline and s + 1 < args.warmup + args.steps:
            break
    torch.cuda.synchronize()
    seconds = time.time() - start if start is not None else float("nan")
    if cfg["label"] in args.profile.split(",") and args.profile_dir and not (deadline and time.time() > deadline):
        from torch.profiler import ProfilerActivity, profile
        os.makedirs(args.profile_dir, exist_ok=True)
        path = os.path.join(args.profile_dir, cfg["label"].replace("+", "_").replace("=", "_") + "-peft.trace.json")
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step(0)
            torch.cuda.synchronize()
        prof.export_chrome_trace(path)
        row["profile_trace"] = path
    tps = timed * B * T / seconds if timed and seconds > 0 else float("nan")
    fpt = 4.0 * matmul_params(c) + 6.0 * row["trainable_params"]
    row.update(
        status="ok" if timed == args.steps else "partial",
        timed_steps=timed,
        step_ms=round(seconds * 1000 / timed, 1) if timed else None,
        tokens_per_s=round(tps, 1) if math.isfinite(tps) else None,
        peak_mem_gb=round(torch.cuda.max_memory_allocated() / 1e9, 2),
        flops_per_token=fpt,
        mfu=round(fpt * tps / peak_flops, 4) if math.isfinite(tps) else None,
        wall_seconds=round(time.time() - t0, 1),
        losses=[round(float(l), 5) for l in losses],
        peft_type=str(pc.peft_type),
    )
    if timed != args.steps:
        notes.append(f"{timed} of {args.steps} timed steps (time budget)")
    row["note"] = "; ".join(n for n in notes if n)
    del model, opt, params
    torch.cuda.empty_cache()
    return row


def bf16_peak(n=8192):
    import torch
    g = torch.Generator(device="cuda").manual_seed(7)
    pairs = [(torch.randn(n, n, generator=g, device="cuda").bfloat16(), torch.randn(n, n, generator=g, device="cuda").bfloat16()) for _ in range(3)]
    for i in range(3):
        torch.matmul(*pairs[i % 3])
    torch.cuda.synchronize()
    t = time.time()
    for i in range(10):
        torch.matmul(*pairs[i % 3])
    torch.cuda.synchronize()
    return 2.0 * n ** 3 * 10 / (time.time() - t)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write-model")
    ap.add_argument("--preset", default="1b", choices=sorted(PRESETS))
    ap.add_argument("--model")
    ap.add_argument("--configs", default="lora,lora+mixed,lora+bf16,lora+mixed+gc,dora,dora+mixed,bone,bone+mixed,bat,vblora,vblora+mixed")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--init-dir")
    ap.add_argument("--peak-tflops", type=float)
    ap.add_argument("--deadline", type=float, help="seconds from now after which no new configuration starts")
    ap.add_argument("--profile", default="", help="configurations to run one extra step of under torch.profiler")
    ap.add_argument("--profile-dir")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.write_model:
        write_model(args.write_model, args.preset, args.seed)
        if not args.model:
            return 0
    import torch
    import transformers
    import peft
    folder = args.model or args.write_model
    deadline = time.time() + args.deadline if args.deadline else None
    peak = args.peak_tflops * 1e12 if args.peak_tflops else bf16_peak()
    with open(os.path.join(folder, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    ids_all = tokens(args.seed, (args.warmup + args.steps) * args.batch * args.seq, vocab)
    rows = []
    for label in [s.strip() for s in args.configs.split(",") if s.strip()]:
        cfg = parse_config(label)
        if deadline and time.time() > deadline:
            rows.append(dict(config=label, status="skipped", note="the time budget was spent"))
            continue
        try:
            rows.append(run_config(folder, cfg, args, ids_all, peak, deadline))
        except Exception as e:  # noqa: BLE001 - one row fails, the others run
            rows.append(dict(config=label, status="failed", note=f"{type(e).__name__}: {str(e)[:300]}"))
            torch.cuda.empty_cache()
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "losses"}), file=sys.stderr, flush=True)
    result = dict(
        kind="finetune-bench", impl="peft", date_utc=time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        machine=f"{platform.node()}, {os.cpu_count()} cores", device=torch.cuda.get_device_name(0),
        versions=dict(torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__, python=platform.python_version()),
        command="python3 tests/bench/peft_bench.py " + " ".join(sys.argv[1:]),
        train=dict(model=folder, batch=args.batch, seq=args.seq, warmup=args.warmup, steps=args.steps, lr=args.lr, seed=args.seed,
                   data_check=data_check(ids_all), peak_tflops=round(peak / 1e12, 3),
                   base_matmul_params=matmul_params(model_config_from(folder)), results=rows),
    )
    text = json.dumps(result, indent=2)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    print(text)
    return 0


def model_config_from(folder):
    with open(os.path.join(folder, "config.json")) as f:
        return json.load(f)


if __name__ == "__main__":
    sys.exit(main())
