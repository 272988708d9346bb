#!/usr/bin/env python3
"""Records what the reference libraries make of the tokenizer parity fixtures.

For each folder under FIXTURES: with a tokenizer.json, the Hugging Face `tokenizers` library; with only a
tokenizer.model, the `sentencepiece` library. Every text of FIXTURES/texts.json is encoded with and without special
tokens and the ids decoded (with and without skipping special tokens); the result goes to FIXTURES/<name>/expected.json
(or OUT/<name>.expected.json when OUT is given, for machines whose files come back flat). Worker.Tests'
TokenizerParityTests compares our tokenizers against these files. A library that cannot be imported is reported and
its fixtures are skipped (their tests then skip with a reason).

SentencePiece has no notion of special tokens in text; our tokenizer.model loader takes control and unknown pieces
written in the text (<s>, </s>, <unk>) as those tokens and encodes the text between them with sentencepiece, as
transformers' Llama tokenizer does. The expected ids here are made the same way, with sentencepiece doing the
encoding: "ids" = segments between such pieces encoded by sp.encode; "ids_special" = [bos] + ids (add_bos_token);
"decoded_skip" = sp.decode(ids_special); "decoded" = each run between special pieces sp.decode'd, the pieces as text.

Usage: python3 scripts/tokenizer_parity.py [FIXTURES] [OUT]
"""
import json
import os
import sys

fixtures = sys.argv[1] if len(sys.argv) > 1 else "tests/Worker.Tests/Tokenizers/Parity"
out = sys.argv[2] if len(sys.argv) > 2 else None
texts = json.load(open(os.path.join(fixtures, "texts.json"), encoding="utf-8"))

try:
    import tokenizers
except ImportError as e:
    tokenizers = None
    print(f"tokenizers is not importable ({e}): tokenizer.json fixtures skipped")
try:
    import sentencepiece as spm
except ImportError as e:
    spm = None
    print(f"sentencepiece is not importable ({e}): tokenizer.model fixtures skipped")


def save(name, result):
    target = os.path.join(out, f"{name}.expected.json") if out else os.path.join(fixtures, name, "expected.json")
    with open(target, "w", encoding="utf-8") as f:
        json.dump(result, f, ensure_ascii=False, indent=1)
    print(f"{name}: {len(result['cases'])} cases -> {target}")


def hf_cases(path):
    tok = tokenizers.Tokenizer.from_file(path)
    cases = []
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False).ids
        special = tok.encode(text, add_special_tokens=True).ids
        cases.append({"text": text, "ids": ids, "ids_special": special,
                      "decoded": tok.decode(special, skip_special_tokens=False),
                      "decoded_skip": tok.decode(special, skip_special_tokens=True)})
    return {"tokenizers_version": tokenizers.__version__, "vocab_size": tok.get_vocab_size(with_added_tokens=True),
            "cases": cases}


def sp_cases(path):
    sp = spm.SentencePieceProcessor(model_file=path)
    specials = sorted({sp.id_to_piece(i) for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_unknown(i)},
                      key=len, reverse=True)

    def encode(text):
        ids, start, i = [], 0, 0
        while i < len(text):
            match = next((s for s in specials if text.startswith(s, i)), None)
            if match is None:
                i += 1
                continue
            if i > start:
                ids += sp.encode(text[start:i])
            ids.append(sp.piece_to_id(match))
            i += len(match)
            start = i
        if start < len(text):
            ids += sp.encode(text[start:])
        return ids

    def decode_runs(ids):
        text, run = "", []
        for i in ids:
            if sp.is_control(i) or sp.is_unknown(i):
                text += sp.decode(run) + sp.id_to_piece(i)
                run = []
            else:
                run.append(i)
        return text + sp.decode(run)

    cases = []
    for text in texts:
        ids = encode(text)
        special = ([sp.bos_id()] if sp.bos_id() >= 0 else []) + ids
        cases.append({"text": text, "ids": ids, "ids_special": special, "decoded": decode_runs(special),
                      "decoded_skip": sp.decode(special)})
    return {"sentencepiece_version": spm.__version__, "vocab_size": sp.get_piece_size(), "cases": cases}


for name in sorted(os.listdir(fixtures)):
    folder = os.path.join(fixtures, name)
    if os.path.isfile(os.path.join(folder, "tokenizer.json")):
        if tokenizers is not None:
            save(name, hf_cases(os.path.join(folder, "tokenizer.json")))
    elif os.path.isfile(os.path.join(folder, "tokenizer.model")):
        if spm is not None:
            save(name, sp_cases(os.path.join(folder, "tokenizer.model")))
