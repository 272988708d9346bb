"""Shared by the parity scripts: loading a transformers model in fp32, comparing logits, the markdown table."""
import json
import os

import torch

THRESHOLD = 1e-4


def dtype_kwargs(dtype):
    import transformers
    # transformers 5 renamed torch_dtype to dtype.
    return {"dtype": dtype} if int(transformers.__version__.split(".")[0]) >= 5 else {"torch_dtype": dtype}


def load_reference(model_dir, device):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, **dtype_kwargs(torch.float32))
    return model.to(device).eval()


def fp32_exact():
    # fp32 means fp32: no TF32 in matmuls (our libtorch side never enables it either).
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def relative_error(ours, reference):
    """max |ours - ref| / max |ref| over the whole (B, T, V) tensor: elementwise ratios blow up near zero logits."""
    ours, reference = ours.double().cpu(), reference.double().cpu()
    return ((ours - reference).abs().max() / reference.abs().max()).item(), (ours - reference).abs().max().item()


def load_logits(path):
    from safetensors.torch import load_file
    return load_file(path)["logits"]


def read_ids(model_dir):
    with open(os.path.join(model_dir, "ids.json")) as f:
        return torch.tensor(json.load(f), dtype=torch.long)


def table(headers, rows):
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def device_arg(argv):
    if "--device" in argv:
        return argv[argv.index("--device") + 1]
    return "cuda" if torch.cuda.is_available() else "cpu"


def markdown_arg(argv):
    return argv[argv.index("--markdown") + 1] if "--markdown" in argv else None
