#!/usr/bin/env python3
"""The tokenizer and chat-template tables of the parity report, from the worker tests' xUnit XML results.

run.sh records the reference ids (scripts/tokenizer_parity.py) and renders (chat_templates.py), puts them into the
packed worker tests and runs TokenizerParityTests and ChatTemplateParityTests with `-xml`; this turns that file into
one row per fixture and per template. Standard library only.

Usage: python3 tests/parity/fixture_tables.py RESULTS.xml TOKENIZERS_DIR [--recorded DIR] [--markdown FILE]
TOKENIZERS_DIR is the tests' Tokenizers folder (Parity/<fixture>/, ChatTemplates/); --recorded the folder of
*.expected.json this run recorded (to tell them from committed ones). Exit status 1 on a failed test or a fixture
without a result; a skipped test (its reference library is not installed: sentencepiece) is reported, not failed.
"""
import json
import os
import re
import sys
import xml.etree.ElementTree as ET

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import arg, table  # noqa: E402

ARGUMENT = re.compile(r'\(name: \\?"([^"\\]+)\\?"\)')


def results(xml_path):
    """{(test class short name, method, argument): (result, message)} from xUnit's v2/v3 XML."""
    out = {}
    for test in ET.parse(xml_path).getroot().iter("test"):
        m = ARGUMENT.search(test.get("name", ""))
        key = (test.get("type", "").rsplit(".", 1)[-1], test.get("method", ""), m.group(1) if m else "")
        message = ""
        if test.find("reason") is not None:
            message = test.find("reason").text or ""
        elif test.find("failure/message") is not None:
            message = test.find("failure/message").text or ""
        out[key] = (test.get("result", "?"), message.strip().splitlines()[0] if message.strip() else "")
    return out


def status(result):
    if result is None:
        return "FAIL: no result (the test did not run)", True
    kind, message = result
    if kind == "Pass":
        return "ok", False
    if kind == "Skip":
        return f"skipped: {message}", False
    return f"FAIL: {message}", True


def reference_of(expected_path):
    if not os.path.isfile(expected_path):
        return "-", 0
    with open(expected_path, encoding="utf-8") as f:
        e = json.load(f)
    for key in ("tokenizers_version", "sentencepiece_version"):
        if key in e:
            return f"{key.split('_')[0]} {e[key]}", len(e.get("cases", []))
    return e.get("renderer", "?"), sum(len(v) for v in e.get("templates", {}).values())


def main():
    xml_path, root = sys.argv[1], sys.argv[2]
    recorded_dir = arg(sys.argv, "--recorded")
    recorded = set()
    if recorded_dir and os.path.isdir(recorded_dir):
        recorded = {f[: -len(".expected.json")] for f in os.listdir(recorded_dir) if f.endswith(".expected.json")}
    try:
        res = results(xml_path)
    except (OSError, ET.ParseError) as e:
        res = {}
        print(f"no test results ({type(e).__name__}: {e})", file=sys.stderr)
    failed = False

    rows = []
    parity = os.path.join(root, "Parity")
    for name in sorted(d for d in os.listdir(parity) if os.path.isdir(os.path.join(parity, d))):
        folder = os.path.join(parity, name)
        kind = "tokenizer.json" if os.path.isfile(os.path.join(folder, "tokenizer.json")) else "tokenizer.model"
        reference, cases = reference_of(os.path.join(folder, "expected.json"))
        text, bad = status(res.get(("TokenizerParityTests", "Matches_the_tokenizers_library", name)))
        round_trip = res.get(("TokenizerParityTests", "Fixture_loads_and_round_trips", name))
        failed |= bad
        if round_trip is not None:
            rt_text, rt_bad = status(round_trip)
            failed |= rt_bad
        else:
            rt_text = "-"
        rows.append((name, kind, reference, "this run" if name in recorded else "committed" if cases else "-",
                     cases or "-", text, rt_text))
    text = ("### Tokenizers: ours vs the reference libraries (ids with/without special tokens, both decodes)\n\n"
            + table(["fixture", "file", "reference", "expected.json", "texts", "result", "round trip"], rows))

    rows = []
    templates_dir = os.path.join(root, "ChatTemplates")
    with open(os.path.join(templates_dir, "templates.json"), encoding="utf-8") as f:
        templates = sorted(json.load(f))
    expected = os.path.join(templates_dir, "expected.json")
    renderer, _ = reference_of(expected)
    conversations = {}
    if os.path.isfile(expected):
        with open(expected, encoding="utf-8") as f:
            conversations = json.load(f).get("templates", {})
    for name in templates:
        cases = conversations.get(name, [])
        errors = sum("error" in c for c in cases)
        text_, bad = status(res.get(("ChatTemplateParityTests", "Renders_as_the_reference_template", name)))
        failed |= bad
        rows.append((name, renderer, len(cases) or "-", errors, text_))
    text += ("\n### Chat templates: ours vs the reference renderer (rendered strings, rejected conversations)\n\n"
             + table(["template", "reference", "conversations", "rejected by the template", "result"], rows)
             + f"\nexpected.json: {'recorded this run' if 'chat_templates' in recorded else 'committed'}.\n")
    if arg(sys.argv, "--markdown"):
        with open(arg(sys.argv, "--markdown"), "w", encoding="utf-8") as f:
            f.write(text)
    print(text)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
