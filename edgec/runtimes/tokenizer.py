"""A checkpoint's tokenizer, shipped inside a generation artifact so it generates from text.

Only the fast-tokenizer file (``tokenizer.json``, read by the ``tokenizers`` package) and the
small JSON/template files beside it are copied; nothing executable is. A checkpoint that ships
only a sentencepiece model (``spiece.model``: T5 as CogVideoX's pipelines ship it;
``tokenizer.model``: early LLaMA) gets its ``tokenizer.json`` made by transformers' converter
(the ``hf`` extra, with sentencepiece), which is what ``AutoTokenizer`` would load.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from edgec.artifact import contained_path
from edgec.errors import UserError
from edgec.runtimes.chat import chat_template, render

__all__ = ["TOKENIZER_DIR", "ship_tokenizer", "ship_model_config", "Tokenizer", "TextStream"]

TOKENIZER_DIR = "tokenizer"
FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
         "generation_config.json", "chat_template.jinja", "chat_template.json")
SENTENCEPIECE = ("spiece.model", "tokenizer.model")

log = logging.getLogger(__name__)


def ship_tokenizer(checkpoint: str | Path | None, stage: Path) -> str | None:
    """Copy the checkpoint's tokenizer files into ``stage/tokenizer``; None if it has none."""
    if checkpoint is None:
        return None
    src = Path(checkpoint)
    if not _has_tokenizer(src):
        src = src / TOKENIZER_DIR  # an edgec artifact's, or a diffusers pipeline's folder
        if not _has_tokenizer(src):
            return None
    dest = stage / TOKENIZER_DIR
    dest.mkdir()
    if not (src / "tokenizer.json").is_file() and not _convert_sentencepiece(src, dest):
        shutil.rmtree(dest)
        return None
    for name in FILES:
        if (src / name).is_file() and not (dest / name).exists():
            shutil.copyfile(src / name, dest / name)
    return TOKENIZER_DIR


def _has_tokenizer(src: Path) -> bool:
    return any((src / name).is_file() for name in ("tokenizer.json", *SENTENCEPIECE))


def _convert_sentencepiece(src: Path, dest: Path) -> bool:
    """``dest/tokenizer.json`` from ``src``'s sentencepiece model, as transformers converts it
    (local files, no remote code), and the tokenizer_config.json it writes beside it (with the
    special tokens the class defaults to, T5's pad among them); False, with a warning, where it
    cannot."""
    model = next(name for name in SENTENCEPIECE if (src / name).is_file())
    try:
        import sentencepiece  # noqa: F401  (transformers' converter reads the model with it)
        from transformers import AutoTokenizer
    except ImportError:
        log.warning("%s has only a sentencepiece model (%s); the artifact ships no tokenizer "
                    "(converting it needs: pip install 'edgec[hf]')", src, model)
        return False
    try:
        tok = AutoTokenizer.from_pretrained(str(src), local_files_only=True,
                                            trust_remote_code=False)
        with tempfile.TemporaryDirectory() as tmp:
            tok.save_pretrained(tmp)
            if not (Path(tmp) / "tokenizer.json").is_file():
                raise ValueError(f"{type(tok).__name__} wrote no tokenizer.json")
            for name in ("tokenizer.json", "tokenizer_config.json"):
                if (Path(tmp) / name).is_file():
                    shutil.copyfile(Path(tmp) / name, dest / name)
    except Exception as e:  # noqa: BLE001  (a tokenizer transformers cannot read: ship none)
        log.warning("%s: could not convert %s to tokenizer.json (%s); the artifact ships no "
                    "tokenizer", src, model, str(e).splitlines()[0] if str(e) else type(e).__name__)
        return False
    return True


def ship_model_config(checkpoint: str | Path | None, stage: Path) -> list[str]:
    """Copy a Hugging Face checkpoint's ``config.json`` and ``generation_config.json`` to the
    artifact's root, beside ``model.onnx``: the directory then loads as it is in optimum's
    ``ORTModelForCausalLM`` (checked: greedy tokens identical to transformers')."""
    if checkpoint is None:
        return []
    copied = []
    for name in ("config.json", "generation_config.json"):
        if (Path(checkpoint) / name).is_file():
            shutil.copyfile(Path(checkpoint) / name, stage / name)
            copied.append(name)
    return copied


class Tokenizer:
    """``encode(text) -> ids`` and ``decode(ids) -> text`` over an artifact's tokenizer."""

    def __init__(self, root: Path, manifest: dict[str, Any]):
        entry = (manifest.get("generation") or {}).get("tokenizer") or manifest.get("tokenizer")
        path = contained_path(root, entry, "tokenizer") / "tokenizer.json" if entry else None
        if path is None or not path.is_file():
            raise UserError(f"{root}: the artifact has no tokenizer (its source had no "
                            "tokenizer.json); give token ids with --prompt-ids 1,2,3")
        try:
            from tokenizers import Tokenizer as _Fast
        except ImportError:
            raise UserError("decoding text needs the tokenizers package: pip install "
                            "'edgec[hf]' (or give token ids with --prompt-ids)") from None

        self._tok = _Fast.from_file(str(path))
        config = path.parent / "tokenizer_config.json"
        self.config = json.loads(config.read_text()) if config.is_file() else {}
        self.chat_template = chat_template(path.parent, self.config)

    def encode(self, text: str) -> list[int]:
        # special tokens (BOS) as the checkpoint's post-processor adds them
        return list(self._tok.encode(text, add_special_tokens=True).ids)

    def encode_padded(self, texts: list[str], length: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, attention mask), [len(texts), length] int64: each text with its special tokens,
        truncated to ``length`` (the end-of-text token kept) and right-padded, as a
        transformers tokenizer called with padding="max_length", truncation=True does."""
        token = self.config.get("pad_token")
        token = token.get("content") if isinstance(token, dict) else token
        pad = self._tok.token_to_id(token) if isinstance(token, str) else None
        if pad is None:
            raise UserError("the artifact's tokenizer names no pad token (tokenizer_config.json "
                            "pad_token); it cannot pad prompts to the text length")
        self._tok.enable_truncation(max_length=length)
        self._tok.enable_padding(length=length, pad_id=pad, pad_token=token)
        try:
            rows = self._tok.encode_batch(list(texts), add_special_tokens=True)
        finally:
            self._tok.no_truncation()
            self._tok.no_padding()
        return (np.array([r.ids for r in rows], np.int64),
                np.array([r.attention_mask for r in rows], np.int64))

    def encode_chat(self, messages, add_generation_prompt: bool = True) -> list[int]:
        """A conversation's ids through the checkpoint's chat template, as transformers'
        ``apply_chat_template(messages, add_generation_prompt=True)`` gives them (the template
        writes the special tokens itself: none are added)."""
        if self.chat_template is None:
            raise UserError("the artifact's tokenizer has no chat template (its checkpoint "
                            "shipped no chat_template.jinja or tokenizer_config.json "
                            "chat_template); give the prompt as plain text (without --chat)")
        text = render(self.chat_template, messages, self.config, add_generation_prompt)
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


class TextStream:
    """A generation's streamer (``streamer(tokens)``, row 0) that calls ``write(piece)`` with the
    text each new token completes: a byte-level tokenizer's token can end inside a multi-byte
    character, whose partial bytes decode to U+FFFD until the rest arrives."""

    def __init__(self, tokenizer, write):
        self._tok, self._write = tokenizer, write
        self._ids: list[int] = []
        self._written = 0  # characters of the decoded text written so far

    def __call__(self, tokens) -> None:
        self._ids.append(int(np.asarray(tokens).reshape(-1)[0]))
        text = self._tok.decode(self._ids)
        if not text.endswith("\ufffd"):
            self._write(text[self._written:])
            self._written = len(text)

    def rest(self, new_ids) -> str:
        """What ``new_ids`` (the row's new tokens) decode to beyond what was written."""
        return self._tok.decode(new_ids)[self._written:]
