#!/usr/bin/env python3
"""Records how the reference renders the chat-template fixtures, for Worker.Tests' ChatTemplateParityTests.

For every <name>.jinja in FIXTURES (tests/Worker.Tests/Tokenizers/ChatTemplates) and every conversation of
conversations.json, renders the template with add_generation_prompt=False and the bos/eos tokens of templates.json,
the way transformers' apply_chat_template does: with transformers' own renderer when transformers is importable
(transformers.utils.chat_template_utils), else with jinja2 in the environment transformers sets up (sandboxed,
trim_blocks, lstrip_blocks, loopcontrols, raise_exception). A template that raises records the error.
date_string is passed as "26 Jul 2024" (the Llama 3.1/3.2 templates' own fallback) so the output does not depend on
the day the script runs; our renderer always uses the template's fixed date.

Writes FIXTURES/expected.json, or OUT/chat_templates.expected.json when OUT is given.
Usage: python3 tests/parity/chat_templates.py [FIXTURES] [OUT]
"""
import json
import os
import sys

here = os.path.dirname(os.path.abspath(__file__))
fixtures = sys.argv[1] if len(sys.argv) > 1 else os.path.join(here, "..", "Worker.Tests", "Tokenizers", "ChatTemplates")
out = sys.argv[2] if len(sys.argv) > 2 else None
templates = json.load(open(os.path.join(fixtures, "templates.json"), encoding="utf-8"))
conversations = json.load(open(os.path.join(fixtures, "conversations.json"), encoding="utf-8"))


def renderer():
    try:
        import transformers
        from transformers.utils import chat_template_utils as ctu
        compile_template = getattr(ctu, "_compile_jinja_template")

        def render(template, messages, bos, eos):
            return compile_template(template).render(messages=messages, add_generation_prompt=False, bos_token=bos,
                                                     eos_token=eos, date_string="26 Jul 2024")
        return f"transformers {transformers.__version__}", render
    except (ImportError, AttributeError) as e:
        print(f"transformers' renderer is not importable ({e}); using jinja2 in transformers' environment")
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.globals["raise_exception"] = raise_exception

    def render(template, messages, bos, eos):
        return env.from_string(template).render(messages=messages, add_generation_prompt=False, bos_token=bos,
                                                eos_token=eos, date_string="26 Jul 2024")
    return f"jinja2 {jinja2.__version__} (transformers' environment)", render


name_of_renderer, render = renderer()
result = {"renderer": name_of_renderer, "templates": {}}
for name, spec in sorted(templates.items()):
    template = open(os.path.join(fixtures, f"{name}.jinja"), encoding="utf-8").read()
    cases = []
    for messages in conversations:
        try:
            cases.append({"messages": messages, "rendered": render(template, messages, spec["bos_token"], spec["eos_token"])})
        except Exception as e:  # the template's raise_exception
            cases.append({"messages": messages, "error": str(e)})
    result["templates"][name] = cases
target = os.path.join(out, "chat_templates.expected.json") if out else os.path.join(fixtures, "expected.json")
with open(target, "w", encoding="utf-8") as f:
    json.dump(result, f, ensure_ascii=False, indent=1)
print(f"{len(templates)} templates x {len(conversations)} conversations rendered by {name_of_renderer} -> {target}")
