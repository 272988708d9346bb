"""Shared by the parity scripts: loading a transformers model in fp32, comparing logits, time budgets, markdown.

torch is imported inside the functions that need it, so that the planning/reporting parts (check_peft.py --plan,
fixture_tables.py) run on a machine without it.
"""
import json
import os
import struct
import time

THRESHOLD = 1e-4


def dtype_kwargs(dtype):
    import transformers
    # transformers 5 renamed torch_dtype to dtype.
    return {"dtype": dtype} if int(transformers.__version__.split(".")[0]) >= 5 else {"torch_dtype": dtype}


def load_reference(model_dir, device):
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, **dtype_kwargs(torch.float32))
    return model.to(device).eval()


def fp32_exact():
    import torch
    # fp32 means fp32: no TF32 in matmuls (our libtorch side never enables it either).
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def relative_error(ours, reference):
    """max |ours - ref| / max |ref| over the whole (B, T, V) tensor (elementwise ratios blow up near zero logits),
    and max |ours - ref|. A shape mismatch is an error, not a broadcast."""
    if tuple(ours.shape) != tuple(reference.shape):
        raise ValueError(f"shape {tuple(ours.shape)} vs reference {tuple(reference.shape)}")
    ours, reference = ours.double().cpu(), reference.double().cpu()
    diff = (ours - reference).abs().max()
    return (diff / reference.abs().max()).item(), diff.item()


def load_logits(path):
    from safetensors.torch import load_file
    return load_file(path)["logits"]


def read_ids(model_dir):
    import torch
    with open(os.path.join(model_dir, "ids.json")) as f:
        return torch.tensor(json.load(f), dtype=torch.long)


def safetensors_header(path):
    """The JSON header of a .safetensors file ({name: {dtype, shape, data_offsets}}), read without safetensors/torch."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > 100_000_000:
            raise ValueError(f"{path}: header of {n} bytes is not a safetensors header")
        return json.loads(f.read(n))


def cell_text(text):
    """One markdown table cell: no pipes or line breaks, at most ~160 characters."""
    text = " ".join(str(text).split()).replace("|", "/")
    return text if len(text) <= 160 else text[:157] + "..."


def error_text(e):
    return cell_text(f"{type(e).__name__}: {e}")


def table(headers, rows):
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell_text(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


class Budget:
    """Seconds a part may take; once spent, the remaining checks are reported as not run (which fails the run)."""

    def __init__(self, seconds):
        self.seconds = seconds
        self.start = time.monotonic()

    def spent(self):
        return time.monotonic() - self.start > self.seconds

    def elapsed(self):
        return time.monotonic() - self.start


def arg(argv, name, default=None):
    return argv[argv.index(name) + 1] if name in argv and argv.index(name) + 1 < len(argv) else default


def device_arg(argv):
    if "--device" in argv:
        return arg(argv, "--device")
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def markdown_arg(argv):
    return arg(argv, "--markdown")


def model_order(names):
    """The plain Llama first: if a time budget runs out, every case has been checked on the main architecture."""
    return sorted(names, key=lambda n: (n != "llama", n))
