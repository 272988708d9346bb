#!/usr/bin/env python3
"""Writes small but realistic tokenizer.json fixtures for the tokenizer parity test.

A byte-level BPE is trained here (pure Python, deterministic) on some English and multilingual text, and written in
three shapes that mirror real models: GPT-2 (ByteLevel with its regex, "a b" merges), Llama 3 (Split regex +
ByteLevel, ignore_merges, BOS template, ["a","b"] merges, many special tokens) and Qwen2 (NFC, digit-by-digit Split,
ByteLevel post-processor, chat special tokens). scripts/tokenizer_parity.py then records what the real `tokenizers`
library makes of them; Worker.Tests compares HfTokenizer with that.

`--sentencepiece` writes the SentencePiece fixtures instead (the byte-level ones read this machine's Python sources
as corpus, so rewriting them would invalidate their recorded ids): a character BPE trained here on a fixed
multilingual text, written as SentencePiece tokenizer.model files (protobuf written by hand: sp_llama2 as Llama 2's,
sp_bpe_options with remove_extra_whitespaces, a user-defined and an unused piece and no byte fallback, sp_unigram
with unigram scores) and as tokenizer.json in the two shapes transformers converts Llama 2 / Mistral to
(llama2_sp: Prepend+Replace normalizers, ByteFallback/Fuse/Strip decoders; mistral_metaspace: Metaspace
pre-tokenizer with prepend_scheme "first", [INST] added tokens).

Usage: python3 scripts/make_tokenizer_fixtures.py [--sentencepiece] [out_dir]   (default tests/Worker.Tests/Tokenizers/Parity)
"""
import collections
import glob
import json
import math
import os
import re
import struct
import sys

ARGS = [a for a in sys.argv[1:] if not a.startswith("--")]
SENTENCEPIECE = "--sentencepiece" in sys.argv[1:]
OUT = ARGS[0] if ARGS else "tests/Worker.Tests/Tokenizers/Parity"
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


# ---------------------------------------------------------------------------------------------------------------------
# SentencePiece fixtures

SPACE = "\u2581"
SP_TEXT = """Hello world! Don't stop: we're testing the tokenizer. It's 2024, and 123456 numbers appear.
The quick brown fox jumps over the lazy dog. A tokenizer splits the text into pieces, and pieces into ids.
Grüße aus München, café, naïve, résumé. Привет, как дела? Γειά σου κόσμε. 你好，世界！今天天气很好。
こんにちは世界。한국어 텍스트입니다. مرحبا بالعالم. Tiếng Việt có dấu: người, được, những. हिन्दी पाठ।
[INST] What is the capital of France? [/INST] The capital of France is Paris.
def f(x):    return x**2  # comment
"""


def sp_train(merges=450, min_char_count=4):
    """Character BPE over whitespace-split words that carry their ▁, as SentencePiece's BPE trainer sees them."""
    words = collections.Counter()
    for line in (SP_TEXT * 3).split("\n"):
        for w in line.split(" "):
            if w:
                words[SPACE + w] += 1
    chars = collections.Counter()
    for w, c in words.items():
        for ch in w:
            chars[ch] += c
    # Rare characters stay out of the alphabet: they are encoded by byte fallback (or as <unk>).
    alphabet = [ch for ch, c in sorted(chars.items(), key=lambda kv: (-kv[1], kv[0])) if c >= min_char_count]
    known = set(alphabet)
    seqs = {w: tuple(w) for w in words}
    pieces = []
    for _ in range(merges):
        pairs = collections.Counter()
        for w, c in words.items():
            s = seqs[w]
            for a, b in zip(s, s[1:]):
                if a in known and b in known:
                    pairs[(a, b)] += c
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        merged = a + b
        if merged not in known:
            pieces.append(merged)
            known.add(merged)
        for w, s in seqs.items():
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == (a, b):
                    out.append(merged)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[w] = tuple(out)
    return pieces, alphabet, words


NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def sp_pieces(merged, alphabet, byte_fallback=True, user_defined=(), unused=()):
    """Llama 2's layout: <unk> <s> </s>, the 256 byte pieces, merged pieces by score, then the characters."""
    out = [("<unk>", 0.0, UNKNOWN), ("<s>", 0.0, CONTROL), ("</s>", 0.0, CONTROL)]
    if byte_fallback:
        out += [(f"<0x{b:02X}>", 0.0, BYTE) for b in range(256)]
    out += [(u, 0.0, USER_DEFINED) for u in user_defined]
    for i, p in enumerate(merged):
        out.append((p, -float(i), UNUSED if p in unused else NORMAL))
    for i, ch in enumerate(alphabet):
        out.append((ch, -float(len(merged) + i), NORMAL))
    return out


def varint(n):
    n &= (1 << 64) - 1
    b = bytearray()
    while True:
        x = n & 0x7F
        n >>= 7
        b.append(x | (0x80 if n else 0))
        if not n:
            return bytes(b)


def field(number, wire, payload):
    key = varint(number << 3 | wire)
    if wire == 2:
        return key + varint(len(payload)) + payload
    return key + payload


def pb_str(number, s):
    return field(number, 2, s.encode("utf-8") if isinstance(s, str) else s)


def pb_int(number, v):
    return field(number, 0, varint(int(v)))


def pb_float(number, f):
    return field(number, 5, struct.pack("<f", f))


def write_sp_model(name, pieces, model_type, byte_fallback, add_dummy_prefix=True, remove_extra_whitespaces=False,
                   config=None):
    """sentencepiece_model.proto: ModelProto{pieces=1, trainer_spec=2, normalizer_spec=3}."""
    body = b"".join(pb_str(1, pb_str(1, p) + pb_float(2, score) + pb_int(3, t)) for p, score, t in pieces)
    trainer = (pb_int(3, model_type) + pb_int(4, len(pieces)) + pb_int(35, byte_fallback) + pb_int(40, 0) + pb_int(41, 1)
               + pb_int(42, 2) + pb_int(43, -1))
    normalizer = pb_str(1, "identity") + pb_int(3, add_dummy_prefix) + pb_int(4, remove_extra_whitespaces) + pb_int(5, 1)
    body += pb_str(2, trainer) + pb_str(3, normalizer)
    d = os.path.join(OUT, name)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "tokenizer.model"), "wb") as f:
        f.write(body)
    with open(os.path.join(d, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config or {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
                             "add_eos_token": False}, f, ensure_ascii=False, indent=1)


def hf_merges(pieces):
    """transformers' SentencePieceExtractor: every split of a piece into two vocab pieces, by the piece's score."""
    vocab = {p: i for i, (p, _, _) in enumerate(pieces)}
    merges = []
    for p, score, _ in pieces:
        local = [(p[:i], p[i:], score) for i in range(1, len(p)) if p[:i] in vocab and p[i:] in vocab]
        merges.extend(sorted(local, key=lambda x: (vocab[x[0]], vocab[x[1]])))
    merges.sort(key=lambda m: m[2], reverse=True)
    return vocab, [[a, b] for a, b, _ in merges]


def sp_bpe_json(pieces, normalizer, pre_tokenizer, decoder, extra_added=()):
    vocab, merges = hf_merges(pieces)
    added = [added_token(0, "<unk>"), added_token(1, "<s>"), added_token(2, "</s>")]
    for i, content in enumerate(extra_added):
        vocab[content] = len(pieces) + i
        added.append(added_token(len(pieces) + i, content))
    bos = {"SpecialToken": {"id": "<s>", "type_id": 0}}
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": {"type": "TemplateProcessing",
                           "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
                           "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "<s>", "type_id": 1}},
                                    {"Sequence": {"id": "B", "type_id": 1}}],
                           "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
        "decoder": decoder,
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }


def added_token(id_, content):
    return {"id": id_, "content": content, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
            "special": True}


def main_sentencepiece():
    merged, alphabet, words = sp_train()
    llama2 = sp_pieces(merged, alphabet)
    write_sp_model("sp_llama2", llama2, model_type=2, byte_fallback=True)

    options = sp_pieces(merged, alphabet, byte_fallback=False, user_defined=["<sep>"], unused=set(merged[3:6]))
    write_sp_model("sp_bpe_options", options, model_type=2, byte_fallback=False, remove_extra_whitespaces=True)

    # Unigram scores: log relative frequency of each piece as a substring of the training words.
    total = sum(len(w) * c for w, c in words.items())
    def logp(p):
        n = sum(w.count(p) * c for w, c in words.items())
        return math.log(max(n, 0.5) / total)
    unigram = [(p, logp(p) if t == NORMAL else score, t) for p, score, t in llama2]
    write_sp_model("sp_unigram", unigram, model_type=1, byte_fallback=True)

    legacy_normalizer = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": SPACE},
                                                             {"type": "Replace", "pattern": {"String": " "}, "content": SPACE}]}
    legacy_decoder = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": SPACE}, "content": " "}, {"type": "ByteFallback"}, {"type": "Fuse"},
        {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False}
    write("llama2_sp", sp_bpe_json(llama2, legacy_normalizer, None, legacy_decoder), config)

    metaspace = {"type": "Metaspace", "replacement": SPACE, "prepend_scheme": "first", "split": False}
    decoder = {"type": "Sequence", "decoders": [dict(metaspace), {"type": "ByteFallback"}, {"type": "Fuse"}]}
    write("mistral_metaspace", sp_bpe_json(llama2, None, metaspace, decoder, extra_added=["[INST]", "[/INST]"]), config)
    print(f"SentencePiece fixtures: {len(merged)} merged pieces, {len(alphabet)} characters -> {OUT}")


if __name__ == "__main__":
    main_sentencepiece() if SENTENCEPIECE else main()
