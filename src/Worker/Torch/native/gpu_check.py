"""Checks the shim against a CUDA libtorch 2.x through its C ABI (ctypes), comparing with PyTorch itself.

Run on a GPU machine with PyTorch installed:  python3 gpu_check.py path/to/libfinetune_torch.so
The .NET test suite covers the CPU build; this covers the 2.x/CUDA-only code paths (fused AdamW, sdpa, memory stats).
"""
import ctypes as C
import math
import sys

import torch

lib = C.CDLL(sys.argv[1])
P, I, L, D = C.c_void_p, C.c_int, C.c_int64, C.c_double
def sig(name, res, *args):
    f = getattr(lib, name); f.restype = res; f.argtypes = list(args); return f

last_error = sig("ft_last_error", C.c_char_p)
version = sig("ft_version", C.c_char_p)
has_cuda_build = sig("ft_has_cuda_build", I)
cuda_ok = sig("ft_cuda_is_available", I)
cuda_count = sig("ft_cuda_device_count", I)
cuda_sync = sig("ft_cuda_synchronize", I, I)
mem_stat = sig("ft_cuda_memory_stat", L, I, I)
reset_peak = sig("ft_cuda_reset_peak", I, I)
from_data = sig("ft_from_data", P, P, L, C.POINTER(L), I, I, I, I)
copy_to = sig("ft_copy_to", I, P, P, L)
free = sig("ft_free", None, P)
to = sig("ft_to", P, P, I, I, I, I)
sdpa = sig("ft_sdpa", P, P, P, P, P, I, D)
adamw = sig("ft_adamw_step", I, C.POINTER(P), C.POINTER(P), C.POINTER(P), I, D, D, D, D, D, L)
factory = sig("ft_factory", P, I, C.POINTER(L), I, D, I, I, I)
backward = sig("ft_backward", I, P, P, I)
unary = sig("ft_unary", P, P, I)
binary = sig("ft_binary", P, P, P, I, D)
set_rg = sig("ft_set_requires_grad", I, P, I)
seed = sig("ft_manual_seed", I, L)
manual = sig("ft_random", P, I, C.POINTER(L), I, P, I, I, I)

DT = {torch.float32: 6, torch.bfloat16: 15, torch.float16: 5, torch.int64: 4, torch.float64: 7}
RT = {v: k for k, v in DT.items()}
failures = []
def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what); (None if cond else failures.append(what))

def put(t: torch.Tensor, cuda=True):
    c = t.detach().cpu().contiguous()
    shape = (L * c.dim())(*c.shape)
    h = from_data(c.data_ptr(), c.numel() * c.element_size(), shape, c.dim(), DT[c.dtype], 1 if cuda else 0, 0)
    assert h, last_error()
    return h

def get(h, like: torch.Tensor):
    out = torch.empty(like.shape, dtype=like.dtype)
    assert copy_to(h, out.data_ptr(), out.numel() * out.element_size()) == 0, last_error()
    return out

print("libtorch", version().decode(), "torch", torch.__version__)
check(has_cuda_build() == 1, "shim compiled with FT_WITH_CUDA")
check(cuda_ok() == 1 and cuda_count() == torch.cuda.device_count(), f"cuda available, {cuda_count()} device(s)")

# sdpa (2.x kernel) vs the composed math, causal and with a bool mask, fp32 and bf16
torch.manual_seed(0)
for dtype, tol in [(torch.float32, 2e-5), (torch.bfloat16, 2e-2)]:
    q, k, v = (torch.randn(2, 4, 16, 32, dtype=dtype) for _ in range(3))
    ref = torch.softmax((q.float() @ k.float().transpose(-2, -1)) / math.sqrt(32) + torch.full((16, 16), float("-inf")).triu(1), -1) @ v.float()
    hq, hk, hv = put(q), put(k), put(v)
    h = sdpa(hq, hk, hv, None, 1, 0.0)
    check(h is not None and torch.allclose(get(h, q).float(), ref, atol=tol, rtol=tol), f"sdpa causal {dtype}")
    keep = torch.rand(16, 16) > 0.3
    keep[:, 0] = True
    hm = put(keep.to(torch.int64))
    hmb = to(hm, 11, -1, 0, 0)
    ref2 = torch.softmax((q.float() @ k.float().transpose(-2, -1)) / math.sqrt(32) + torch.zeros(16, 16).masked_fill(~keep, float("-inf")), -1) @ v.float()
    h2 = sdpa(hq, hk, hv, hmb, 0, 0.0)
    check(h2 is not None and torch.allclose(get(h2, q).float(), ref2, atol=tol, rtol=tol), f"sdpa bool mask {dtype}")

# fused AdamW (CUDA, 2.x) vs torch.optim.AdamW, two steps, fp32 and bf16 params
for dtype, tol in [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)]:
    p0 = [torch.randn(5, 7, dtype=dtype), torch.randn(3, dtype=dtype)]
    grads = [[torch.randn_like(p) for p in p0] for _ in range(2)]
    ref = [p.clone().cuda().requires_grad_() for p in p0]
    opt = torch.optim.AdamW(ref, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, foreach=False)
    hp = [put(p) for p in p0]
    for h in hp: set_rg(h, 1)
    hm = [factory(0, (L * p.dim())(*p.shape), p.dim(), 0.0, DT[dtype], 1, 0) for p in p0]
    hv = [factory(0, (L * p.dim())(*p.shape), p.dim(), 0.0, DT[dtype], 1, 0) for p in p0]
    for step in range(2):
        for r, g in zip(ref, grads[step]): r.grad = g.cuda()
        opt.step()
        for h, g in zip(hp, grads[step]):
            hg = put(g)
            prod = binary(h, hg, 2, 1.0)            # mul: grad of sum(p*g) is g
            s = unary(prod, 16)                     # sum
            assert backward(s, None, 0) == 0, last_error()
            for x in (hg, prod, s): free(x)
        arr = lambda hs: (P * len(hs))(*hs)
        assert adamw(arr(hp), arr(hm), arr(hv), len(hp), 1e-2, 0.9, 0.99, 1e-8, 0.1, step + 1) == 0, last_error()
        zero = sig("ft_zero_grad", I, C.POINTER(P), I)
        zero(arr(hp), len(hp))
    ok = all(torch.allclose(get(h, r.detach().cpu()).float(), r.detach().cpu().float(), atol=tol, rtol=tol) for h, r in zip(hp, ref))
    check(ok, f"fused AdamW matches torch.optim.AdamW ({dtype})")

# memory statistics come from the same caching allocator PyTorch reports
cuda_sync(-1)
torch.cuda.synchronize()
check(mem_stat(0, 0) == torch.cuda.memory_allocated(0), f"memory allocated {mem_stat(0, 0)} == torch {torch.cuda.memory_allocated(0)}")
reset_peak(0)
big = factory(0, (L * 1)(64 << 20), 1, 0.0, 6, 1, 0)
peak = mem_stat(0, 1)
free(big)
check(peak >= (256 << 20) and mem_stat(0, 0) < peak, f"peak {peak} after a 256 MiB tensor, current {mem_stat(0, 0)}")

# CUDA OOM is an error message, not a crash
huge = factory(0, (L * 1)(1 << 45), 1, 0.0, 6, 1, 0)
msg = last_error().decode()
check(not huge and "out of memory" in msg.lower() and "Exception raised from" not in msg, f"OOM surfaces as error: {msg[:120]!r}")
check(seed(3) == 0, "manual_seed with CUDA generators")

# ---- gpu-perf additions: GQA inside sdpa, fused linear + cross-entropy, async uploads, per-device seeding (bf16 paths)
sdpa_gqa = sig("ft_sdpa_gqa", P, P, P, P, P, I, D)
lce = sig("ft_linear_cross_entropy", P, P, P, P, L, L)
from_async = sig("ft_from_data_async", P, P, L, C.POINTER(L), I, I, I, I)
seed_dev = sig("ft_manual_seed_device", I, L, I, I)
grad_of = sig("ft_grad", I, P, C.POINTER(P))

def put_dt(t: torch.Tensor, dtype):
    return to(put(t), DT[dtype], -1, 0, 0)

q = torch.randn(2, 8, 256, 64, device="cuda", dtype=torch.bfloat16)
k = torch.randn(2, 2, 256, 64, device="cuda", dtype=torch.bfloat16)
v = torch.randn(2, 2, 256, 64, device="cuda", dtype=torch.bfloat16)
ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
hq, hk, hv = (put_dt(t, torch.bfloat16) for t in (q, k, v))
ho = sdpa_gqa(hq, hk, hv, None, 1, 0.0)
check(bool(ho) and torch.allclose(get(ho, ref.cpu()).float(), ref.cpu().float(), atol=2e-2, rtol=2e-2), "sdpa with GQA (bf16) matches torch enable_gqa")

hid = (torch.randn(1000, 64, device="cuda") * 0.5).bfloat16().requires_grad_()
wt = (torch.randn(5000, 64, device="cuda") * 0.1).bfloat16()
tg = torch.randint(0, 5000, (1000,), device="cuda")
tg[::7] = -100
ref_loss = torch.nn.functional.cross_entropy((hid @ wt.t()).float(), tg, ignore_index=-100, reduction="sum")
ref_loss.backward()
hh = put_dt(hid.detach(), torch.bfloat16)
assert set_rg(hh, 1) == 0, last_error()
hw, ht = put_dt(wt, torch.bfloat16), put(tg)
hl = lce(hh, hw, ht, -100, 128)
ok = bool(hl)
if ok:
    assert backward(hl, None, 0) == 0, last_error()
    g = P()
    assert grad_of(hh, C.byref(g)) == 1, last_error()
    loss_ours = get(hl, ref_loss.detach().cpu()).item()
    grad_ours = get(g, hid.grad.cpu()).float()
    ok = abs(loss_ours - ref_loss.item()) <= 1e-3 * abs(ref_loss.item()) and \
        (grad_ours - hid.grad.cpu().float()).norm() <= 2e-2 * hid.grad.cpu().float().norm()
check(ok, "fused linear + cross-entropy (bf16, chunked) matches cross_entropy of fp32 logits, loss and grad")

rms = sig("ft_rms_norm", P, P, P, D)
xr = torch.randn(4, 64, 2048, device="cuda", dtype=torch.bfloat16)
wr = (1 + 0.1 * torch.randn(2048, device="cuda")).bfloat16()
ref_r = wr * (xr.float() * torch.rsqrt(xr.float().pow(2).mean(-1, keepdim=True) + 1e-5)).bfloat16()   # HF's LlamaRMSNorm
hr = rms(put(xr), put(wr), 1e-5)
check(bool(hr) and torch.allclose(get(hr, ref_r.cpu()).float(), ref_r.cpu().float(), atol=2e-2, rtol=2e-2), "rms_norm (bf16) matches HF's LlamaRMSNorm to bf16 rounding")

data = torch.arange(12, dtype=torch.int64)
shape = (L * 2)(3, 4)
ha = from_async(data.data_ptr(), 96, shape, 2, DT[torch.int64], 1, 0)
check(bool(ha) and torch.equal(get(ha, data.view(3, 4)), data.view(3, 4)), "async pinned upload round-trips")
torch.manual_seed(99); a = torch.randn(4, device="cuda")
check(seed_dev(99, 1, 0) == 0, "manual_seed_device on cuda:0")
b = torch.randn(4, device="cuda")
check(torch.equal(a, b), "seeding cuda:0 alone gives torch.manual_seed's stream on it")

print("FAILURES:", failures if failures else "none")
sys.exit(1 if failures else 0)
