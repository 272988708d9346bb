#!/usr/bin/env python3
"""PyTorch's numbers for the micro-benchmarks of `FineTune.Worker bench micro`, measured the same way on the same
machine: bf16 matmul TFLOP/s on CUDA (3 input pairs in rotation, random data, 3 warm-ups, median of 3 rounds of 20),
fp32 matmul on the CPU and on CUDA, and the per-op cost of small ops from Python (for scale: our binding's per-op
cost is compared with this)."""
import argparse
import json
import statistics
import time

import torch


def matmul_rate(device, n, dtype, iters):
    g = torch.Generator(device=device).manual_seed(7)
    pairs = [(torch.randn(n, n, generator=g, device=device).to(dtype), torch.randn(n, n, generator=g, device=device).to(dtype)) for _ in range(3)]
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for i in range(3):
        torch.matmul(*pairs[i % 3])
    sync()
    rates = []
    for _ in range(3):
        t = time.perf_counter()
        for i in range(iters):
            torch.matmul(*pairs[i % 3])
        sync()
        rates.append(2.0 * n ** 3 * iters / (time.perf_counter() - t))
    return statistics.median(rates)


def op_overhead(device, ops):
    a = torch.ones(4, device=device)
    b = torch.ones(4, device=device)
    m = torch.ones(4, 4, device=device)
    cases = {"alias": lambda: a.detach(), "add": lambda: a + b, "mul_scalar": lambda: a * 2.0, "view": lambda: m.view(16),
             "matmul_4x4": lambda: m @ m, "sum": lambda: a.sum()}
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    out = {}
    for name, op in cases.items():
        rounds = []
        for r in range(6):
            t = time.perf_counter()
            for _ in range(ops):
                op()
            sync()
            if r:
                rounds.append((time.perf_counter() - t) * 1e6 / ops)
        out[name] = round(statistics.median(rounds), 3)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--cpu-size", type=int, default=1024)
    ap.add_argument("--json")
    args = ap.parse_args()
    r = {"impl": "torch", "torch": torch.__version__, "cpu_threads": torch.get_num_threads(),
         "op_overhead_cpu_us": op_overhead("cpu", 20000),
         "matmul_fp32_cpu_gflops": round(matmul_rate("cpu", args.cpu_size, torch.float32, 5) / 1e9, 2), "matmul_fp32_cpu_n": args.cpu_size}
    if torch.cuda.is_available():
        r.update(device=torch.cuda.get_device_name(0),
                 matmul_bf16_tflops=round(matmul_rate("cuda", args.size, torch.bfloat16, 20) / 1e12, 1), matmul_bf16_n=args.size,
                 matmul_fp32_cuda_tflops=round(matmul_rate("cuda", 4096, torch.float32, 10) / 1e12, 1),
                 op_overhead_cuda_us=op_overhead("cuda", 20000))
    text = json.dumps(r, indent=2)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    print(text)


if __name__ == "__main__":
    main()
