"""A checkpoint's chat template: an instruction-tuned decoder's conversation as the prompt text it
was trained on (``<|im_start|>user …``), rendered as transformers' ``apply_chat_template`` renders
it (a sandboxed Jinja environment with ``trim_blocks``/``lstrip_blocks``, loop controls, the
``tojson`` filter and the ``raise_exception``/``strftime_now`` globals; the tokenizer config's
special tokens as variables), so the ids match the checkpoint's own.

The template is the checkpoint's ``chat_template.jinja`` (transformers ≥ 4.47 writes it), else
its ``chat_template.json`` (a processor's: a VLM's template, whose messages' ``content`` is a
list of ``{"type": "image"}`` / ``{"type": "text", "text": ...}`` parts), else the
``chat_template`` entry of ``tokenizer_config.json`` (a string, or named templates: ``default``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from edgec.errors import UserError

__all__ = ["chat_template", "check_messages", "render"]

TEMPLATE_FILE = "chat_template.jinja"
PROCESSOR_FILE = "chat_template.json"


def chat_template(folder: Path, config: Mapping[str, Any]) -> str | None:
    """The template shipped in ``folder`` (the artifact's tokenizer folder), or None."""
    if (folder / TEMPLATE_FILE).is_file():
        return (folder / TEMPLATE_FILE).read_text(encoding="utf-8")
    entry = config.get("chat_template")
    if (folder / PROCESSOR_FILE).is_file():
        try:
            entry = json.loads((folder / PROCESSOR_FILE).read_text(encoding="utf-8")
                               ).get("chat_template") or entry
        except (ValueError, AttributeError):
            raise UserError(f"{folder / PROCESSOR_FILE} is not a JSON object with a "
                            "'chat_template' string; fix or delete it") from None
    if isinstance(entry, list):  # [{"name": ..., "template": ...}], as tokenizers saved several
        named = {t.get("name"): t.get("template") for t in entry if isinstance(t, dict)}
        entry = named.get("default")
    return entry if isinstance(entry, str) and entry.strip() else None


def check_messages(messages: Any) -> list[dict[str, Any]]:
    """A conversation: a non-empty list of ``{"role": str, "content": ...}`` dicts."""
    if (isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages
            or not all(isinstance(m, Mapping) and isinstance(m.get("role"), str)
                       and "content" in m for m in messages)):
        raise UserError("a chat is a list of messages, each a dict with 'role' ('system', "
                        "'user', 'assistant') and 'content', e.g. [{'role': 'user', 'content': "
                        "'Hi'}]")
    return [dict(m) for m in messages]


def render(template: str, messages: Sequence[Mapping[str, Any]], special: Mapping[str, Any],
           add_generation_prompt: bool = True) -> str:
    """The conversation as prompt text; ``special``: the tokenizer config (its ``*_token``
    entries become the template's ``bos_token``, ``eos_token``, … as strings)."""
    try:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise UserError("a chat template needs the jinja2 package: pip install 'edgec[hf]'"
                        ) from None

    def raise_exception(message: str):
        raise UserError(f"the checkpoint's chat template refused the conversation: {message}")

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                          separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception,
                       strftime_now=lambda fmt: datetime.now().strftime(fmt))
    tokens = {k: v.get("content") if isinstance(v, Mapping) else v
              for k, v in special.items() if k.endswith("_token")}
    try:
        return env.from_string(template).render(
            messages=check_messages(messages), add_generation_prompt=add_generation_prompt,
            **{k: v for k, v in tokens.items() if isinstance(v, str)})
    except TemplateError as e:
        raise UserError(f"the checkpoint's chat template does not render: {e}") from None
