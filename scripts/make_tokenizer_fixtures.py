#!/usr/bin/env python3
"""Writes small but realistic tokenizer.json fixtures for the tokenizer parity test.

A byte-level BPE is trained here (pure Python, deterministic) on some English and multilingual text, and written in
three shapes that mirror real models: GPT-2 (ByteLevel with its regex, "a b" merges), Llama 3 (Split regex +
ByteLevel, ignore_merges, BOS template, ["a","b"] merges, many special tokens) and Qwen2 (NFC, digit-by-digit Split,
ByteLevel post-processor, chat special tokens). scripts/tokenizer_parity.py then records what the real `tokenizers`
library makes of them; Worker.Tests compares HfTokenizer with that.

Usage: python3 scripts/make_tokenizer_fixtures.py [out_dir]   (default tests/Worker.Tests/Tokenizers/Parity)
"""
import collections
import glob
import json
import os
import re
import sys

OUT = sys.argv[1] if len(sys.argv) > 1 else "tests/Worker.Tests/Tokenizers/Parity"
MERGES = 700

LLAMA3 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2 = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


def byte_table():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def corpus():
    text = []
    for path in sorted(glob.glob("/usr/lib/python3*/[a-m]*.py"))[:40]:
        with open(path, encoding="utf-8", errors="ignore") as f:
            text.append(f.read())
    text.append("""Hello world! Don't stop: we're testing the tokenizer. It's 2024, and 123456 numbers appear.
    Grüße aus München, café, naïve, résumé. Привет, как дела? Γειά σου κόσμε. 你好，世界！今天天气很好。
    こんにちは世界。한국어 텍스트입니다. مرحبا بالعالم. emoji 😀😀 👍🏽 — “quotes” and ‘single’ … ellipsis.
    Tiếng Việt có dấu: người, được, những. हिन्दी पाठ। ภาษาไทย""" * 20)
    return "\n".join(text)


def train():
    import regex  # the same \p{..} classes as the tokenizers' regex engine
    table = byte_table()
    words = collections.Counter(regex.findall(LLAMA3, corpus()))
    # Each word as a tuple of byte-level symbols.
    seqs = {w: tuple(table[b] for b in w.encode("utf-8")) for w in words}
    merges = []
    vocab = {table[b]: b for b in range(256)}
    for _ in range(MERGES):
        pairs = collections.Counter()
        for w, count in words.items():
            s = seqs[w]
            for a, b in zip(s, s[1:]):
                pairs[(a, b)] += count
        if not pairs:
            break
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]
        merges.append(best)
        merged = best[0] + best[1]
        if merged not in vocab:
            vocab[merged] = len(vocab)
        for w, s in seqs.items():
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[w] = tuple(out)
    return vocab, merges


def added(id_, content, special=True, **kw):
    return {"id": id_, "content": content, "single_word": kw.get("single_word", False), "lstrip": kw.get("lstrip", False),
            "rstrip": kw.get("rstrip", False), "normalized": kw.get("normalized", not special), "special": special}


def bpe(vocab, merges, as_arrays, ignore_merges):
    return {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": ignore_merges,
            "vocab": vocab, "merges": [list(m) if as_arrays else f"{m[0]} {m[1]}" for m in merges]}


def byte_level(prefix=False, regex=True):
    return {"type": "ByteLevel", "add_prefix_space": prefix, "trim_offsets": True, "use_regex": regex}


def split(pattern):
    return {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}


def write(name, tok, config):
    d = os.path.join(OUT, name)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tok, f, ensure_ascii=False, indent=1)
    with open(os.path.join(d, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, ensure_ascii=False, indent=1)


def main():
    vocab, merges = train()
    n = len(vocab)

    gpt2_added = [added(n, "<|endoftext|>")]
    write("gpt2", {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": gpt2_added, "normalizer": None,
        "pre_tokenizer": byte_level(prefix=False), "post_processor": byte_level(), "decoder": byte_level(),
        "model": bpe(vocab, merges, as_arrays=False, ignore_merges=False),
    }, {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"})

    llama_added = [added(n, "<|begin_of_text|>"), added(n + 1, "<|end_of_text|>"),
                   added(n + 2, "<|start_header_id|>"), added(n + 3, "<|end_header_id|>"), added(n + 4, "<|eot_id|>")]
    llama_added += [added(n + 5 + i, f"<|reserved_special_token_{i}|>") for i in range(12)]
    bos = "<|begin_of_text|>"
    write("llama3", {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": llama_added, "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [split(LLAMA3), byte_level(regex=False)]},
        "post_processor": {"type": "Sequence", "processors": [
            {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
            {"type": "TemplateProcessing",
             "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
             "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                      {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
             "special_tokens": {bos: {"id": bos, "ids": [n], "tokens": [bos]}}}]},
        "decoder": byte_level(prefix=True),
        "model": bpe(vocab, merges, as_arrays=True, ignore_merges=True),
    }, {"bos_token": bos, "eos_token": "<|eot_id|>", "clean_up_tokenization_spaces": True})

    qwen_added = [added(n, "<|endoftext|>"), added(n + 1, "<|im_start|>"), added(n + 2, "<|im_end|>"),
                  added(n + 3, "<tool_call>", special=False, normalized=False),
                  added(n + 4, "</tool_call>", special=False, normalized=False)]
    write("qwen2", {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": qwen_added, "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [split(QWEN2), byte_level(regex=False)]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "decoder": byte_level(),
        "model": bpe(vocab, merges, as_arrays=False, ignore_merges=False),
    }, {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})

    # ByteLevel with a prefix space and lstrip/rstrip/single_word added tokens (RoBERTa-like options).
    write("prefix_space", {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [added(n, "<mask>", lstrip=True), added(n + 1, "[END]", rstrip=True),
                         added(n + 2, "word", special=False, single_word=True, normalized=False)],
        "normalizer": None, "pre_tokenizer": byte_level(prefix=True), "post_processor": None,
        "decoder": byte_level(), "model": bpe(vocab, merges, as_arrays=False, ignore_merges=False),
    }, {})
    print(f"vocab {len(vocab)}, merges {len(merges)} -> {OUT}")


if __name__ == "__main__":
    main()
