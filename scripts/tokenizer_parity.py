#!/usr/bin/env python3
"""Records what the real Hugging Face `tokenizers` library makes of the parity fixtures.

For each folder under FIXTURES with a tokenizer.json, encodes every text of FIXTURES/texts.json with and without
special tokens and decodes the ids (with and without skipping special tokens), and writes FIXTURES/<name>/expected.json
(or OUT/<name>.expected.json when OUT is given, for machines whose files come back flat). Worker.Tests'
TokenizerParityTests compares HfTokenizer against these files.

Usage: python3 scripts/tokenizer_parity.py [FIXTURES] [OUT]
"""
import json
import os
import sys

import tokenizers

fixtures = sys.argv[1] if len(sys.argv) > 1 else "tests/Worker.Tests/Tokenizers/Parity"
out = sys.argv[2] if len(sys.argv) > 2 else None
texts = json.load(open(os.path.join(fixtures, "texts.json"), encoding="utf-8"))
for name in sorted(os.listdir(fixtures)):
    path = os.path.join(fixtures, name, "tokenizer.json")
    if not os.path.isfile(path):
        continue
    tok = tokenizers.Tokenizer.from_file(path)
    cases = []
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False).ids
        special = tok.encode(text, add_special_tokens=True).ids
        cases.append({"text": text, "ids": ids, "ids_special": special,
                      "decoded": tok.decode(special, skip_special_tokens=False),
                      "decoded_skip": tok.decode(special, skip_special_tokens=True)})
    result = {"tokenizers_version": tokenizers.__version__, "vocab_size": tok.get_vocab_size(with_added_tokens=True),
              "cases": cases}
    target = os.path.join(out, f"{name}.expected.json") if out else os.path.join(fixtures, name, "expected.json")
    with open(target, "w", encoding="utf-8") as f:
        json.dump(result, f, ensure_ascii=False, indent=1)
    print(f"{name}: {len(cases)} cases -> {target}")
