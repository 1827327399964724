"""Chat templates (``edgec/runtimes/chat.py``): which template an artifact's tokenizer folder
gives, and rendering as transformers' ``apply_chat_template`` does (its Jinja settings, filters
and globals); a template's refusal, a bad conversation and an escaping template are UserErrors."""

from __future__ import annotations

import json

import pytest

from edgec.errors import UserError
from edgec.runtimes.chat import chat_template, render

USER = [{"role": "user", "content": "Grüße"}]


def test_the_file_wins_then_the_config_then_its_default_named_template(tmp_path):
    assert chat_template(tmp_path, {}) is None
    assert chat_template(tmp_path, {"chat_template": "  "}) is None
    assert chat_template(tmp_path, {"chat_template": "A"}) == "A"
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    assert chat_template(tmp_path, {"chat_template": named}) == "D"
    assert chat_template(tmp_path, {"chat_template": named[:1]}) is None
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "P"}))
    assert chat_template(tmp_path, {"chat_template": "A"}) == "P"  # a processor's (a VLM's)
    (tmp_path / "chat_template.jinja").write_text("F")
    assert chat_template(tmp_path, {"chat_template": "A"}) == "F"
    (tmp_path / "chat_template.jinja").unlink()
    (tmp_path / "chat_template.json").write_text("[1]")
    with pytest.raises(UserError, match="chat_template.json is not a JSON object"):
        chat_template(tmp_path, {})


def test_a_vlm_template_reads_content_parts():
    """LLaVA-style: each message's content a list of image and text parts (jinja's selectattr)."""
    template = ("{% for m in messages %}{{ m['role'].upper() }}: "
                "{% for p in m['content'] | selectattr('type', 'equalto', 'image') %}<image>\n"
                "{% endfor %}{% for p in m['content'] | selectattr('type', 'equalto', 'text') %}"
                "{{ p['text'] }}{% endfor %} {% endfor %}"
                "{% if add_generation_prompt %}ASSISTANT:{% endif %}")
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}]
    assert render(template, chat, {}) == "USER: <image>\nWhat? ASSISTANT:"


def test_render_as_transformers_does():
    """Against transformers' own renderer: trim_blocks/lstrip_blocks (a block tag's line leaves no
    newline or indent), loop controls, ``tojson`` (non-ASCII kept), the special tokens."""
    from transformers.utils.chat_template_utils import render_jinja_template

    template = ("{% for m in messages %}\n  {% if loop.index > 2 %}{% break %}{% endif %}\n"
                "  {{ bos_token }}{{ m['role'] }}: {{ m | tojson }}\n{% endfor %}"
                "{% if add_generation_prompt %}{{ eos_token }}>{% endif %}")
    special = {"bos_token": {"content": "<s>", "special": True}, "eos_token": "</s>",
               "model_max_length": 8}
    three = USER + [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]
    for messages, prompt in ((three, True), (USER, False)):
        ours = render(template, messages, special, add_generation_prompt=prompt)
        rendered, _ = render_jinja_template([messages], chat_template=template, bos_token="<s>",
                                            eos_token="</s>", add_generation_prompt=prompt)
        assert ours == rendered[0]
    assert "Grüße" in ours and ours.count("<s>") == 1


def test_refusals_are_user_errors():
    with pytest.raises(UserError, match="refused the conversation: only user and assistant"):
        render("{{ raise_exception('only user and assistant') }}", USER, {})
    with pytest.raises(UserError, match="does not render"):  # the sandbox holds
        render("{{ ''.__class__.__mro__[1].__subclasses__() }}", USER, {})
    with pytest.raises(UserError, match="does not render"):
        render("{% for %}", USER, {})
    for bad in ("hi", [], [{"content": "hi"}], [{"role": "user"}], ["hi"]):
        with pytest.raises(UserError, match="a chat is a list of messages"):
            render("{{ messages }}", bad, {})


def test_a_tokenizer_without_a_template_says_so(tmp_path):
    from tokenizers import Tokenizer as Fast
    from tokenizers import models

    from edgec.runtimes.tokenizer import Tokenizer

    (tmp_path / "tokenizer").mkdir()
    Fast(models.WordLevel({"<unk>": 0, "hi": 1}, unk_token="<unk>")).save(
        str(tmp_path / "tokenizer" / "tokenizer.json"))
    tok = Tokenizer(tmp_path, {"tokenizer": "tokenizer"})
    assert tok.chat_template is None
    with pytest.raises(UserError, match="has no chat template .*without --chat"):
        tok.encode_chat(USER)
