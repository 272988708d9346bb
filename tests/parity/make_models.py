#!/usr/bin/env python3
"""Writes small random Hugging Face checkpoints with transformers, for check_logits.py and check_peft.py.

Each folder is what save_pretrained writes (config.json + safetensors), plus ids.json: two rows of random token ids.
Models: Llama (GQA, untied), Llama with tied embeddings, Llama with llama3 and with linear rope scaling, a Llama
stored in bf16 and sharded (model-0000N-of-0000M.safetensors + index), Qwen2 (q/k/v biases), Mistral (head_dim ≠
hidden/heads, sliding_window longer than the ids). Weights are transformers' init, then norms set to 1 + N(0, 0.1²)
and biases to N(0, 0.02²) so that neither is a no-op.

Usage: python3 tests/parity/make_models.py OUT_DIR
"""
import inspect
import json
import os
import sys

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

OUT = sys.argv[1]
COMMON = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)


def rope(config_cls, kind, **params):
    """transformers 5 takes rope_parameters (rope_theta inside); 4.x rope_scaling + rope_theta."""
    if "rope_parameters" in inspect.signature(config_cls.__init__).parameters:
        return {"rope_parameters": {"rope_type": kind, "rope_theta": 10000.0, **params}}
    return {"rope_scaling": {"rope_type": kind, **params}, "rope_theta": 10000.0}


MODELS = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}, {}),
    "llama_tied": (LlamaConfig, LlamaForCausalLM, {"tie_word_embeddings": True}, {}),
    "llama_rope_llama3": (LlamaConfig, LlamaForCausalLM, rope(LlamaConfig, "llama3", factor=8.0, low_freq_factor=1.0,
                                                              high_freq_factor=4.0, original_max_position_embeddings=32), {}),
    "llama_rope_linear": (LlamaConfig, LlamaForCausalLM, rope(LlamaConfig, "linear", factor=4.0), {}),
    "llama_bf16_sharded": (LlamaConfig, LlamaForCausalLM, {}, {"dtype": torch.bfloat16, "max_shard_size": "100KB"}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {"head_dim": 32, "sliding_window": 4096}, {}),
}


def main():
    os.makedirs(OUT, exist_ok=True)
    for seed, (name, (config_cls, model_cls, extra, save)) in enumerate(sorted(MODELS.items())):
        torch.manual_seed(1000 + seed)
        config = config_cls(**{**COMMON, **extra})
        model = model_cls(config).eval()
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "norm" in pname:
                    p.copy_(1 + 0.1 * torch.randn_like(p))
                elif pname.endswith(".bias"):
                    p.copy_(0.02 * torch.randn_like(p))
        d = os.path.join(OUT, name)
        if "dtype" in save:
            model = model.to(save["dtype"])
        model.save_pretrained(d, **({"max_shard_size": save["max_shard_size"]} if "max_shard_size" in save else {}))
        ids = torch.randint(0, COMMON["vocab_size"], (2, 48), generator=torch.Generator().manual_seed(seed))
        with open(os.path.join(d, "ids.json"), "w") as f:
            json.dump(ids.tolist(), f)
        files = sorted(f for f in os.listdir(d) if f.endswith(".safetensors") or f.endswith(".index.json"))
        print(f"{name}: {config.architectures or model_cls.__name__}, {', '.join(files)}")
    print(f"transformers {transformers.__version__}, torch {torch.__version__} -> {OUT}")


if __name__ == "__main__":
    main()
