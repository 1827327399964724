"""Token ids of real text for a language checkpoint's generated calibration samples.

Without ``--calib``, a checkpoint that ships a tokenizer (``tokenizer.json``, beside its weights
or in ``tokenizer/``) calibrates, holds its floor and rounds GPTQ on windows of
``passages.txt``: about 18 KB of English written for edgec (narrative, news, instructions,
dialogue, technical prose, arithmetic, a letter, an order summary), tokenized by the
checkpoint's own tokenizer. Random token ids were the default before; a trained model's
activations on them are not its real ones (SmolLM2-135M w8a16 on openvino-cpu: the held-out
floor read cosine 0.880 on random ids, 0.9987 on text, for the same weights).

Windows are consecutive and disjoint (sample i is the i-th), so the floor's held-out samples,
which follow the calibration ones, are text calibration never saw, as long as the text lasts
(~3,900 SmolLM2 tokens: 240 windows of 16); past its end the windows wrap, shifted. Each
window carries the special tokens the tokenizer adds to a text (BERT's [CLS] ... [SEP], a
LLaMA's BOS), as a prompt has them.
"""

from __future__ import annotations

import functools
import logging
from importlib import resources
from pathlib import Path

import numpy as np

__all__ = ["ORIGIN", "TextWindows", "checkpoint_text", "calibrates_on_text"]

ORIGIN = "edgec's English passages, tokenized by the checkpoint's tokenizer"
# a tokenizer leaving more of the passages unknown than this is not one for English text
MAX_UNKNOWN = 0.05

log = logging.getLogger(__name__)


def passages() -> str:
    return resources.files("edgec.calibration").joinpath("passages.txt").read_text("utf-8")


class TextWindows:
    """Windows of the passages' token ids (``take``); ``pad``: the tokenizer's pad id (None
    where it names none). ``tokenizer`` (a ``tokenizers.Tokenizer``) loses its truncation and
    padding."""

    def __init__(self, tokenizer, pad: int | None = None):
        # the file's own truncation or padding (all-MiniLM-L6-v2's: 128) cut the passages
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self.stream = np.array(tokenizer.encode(passages(), add_special_tokens=False).ids,
                               np.int64)
        self.stream.flags.writeable = False  # shared: one TextWindows per tokenizer file
        self.prefix, self.suffix = _specials(tokenizer)
        self.pad = pad

    def unknown_share(self, tokenizer) -> float:
        """The share of the passages' tokens that are the tokenizer's unknown token."""
        token = getattr(tokenizer.model, "unk_token", None)
        unk = tokenizer.token_to_id(token) if isinstance(token, str) else None
        return float(np.mean(self.stream == unk)) if unk is not None else 0.0

    def max_id(self) -> int:
        return int(max(self.stream.max(), *self.prefix, *self.suffix, self.pad or 0))

    def take(self, first: int, count: int, length: int) -> np.ndarray:
        """[count, length] int64: windows ``first`` .. ``first + count - 1``, each its special
        tokens around ``length`` less their number of the text's tokens."""
        body = length - len(self.prefix) - len(self.suffix)
        if body < 1:  # a sequence of 2 for BERT's [CLS] [SEP]: the special tokens, cut
            specials = np.concatenate([self.prefix, self.suffix])[:length]
            return np.tile(specials, (count, 1)).astype(np.int64)
        per_pass = max(1, len(self.stream) // body)
        rows = []
        for i in range(first, first + count):
            turn, k = divmod(i, per_pass)
            start = k * body + turn * (body * 5 // 8 + 1)  # later passes straddle the first's
            text = np.take(self.stream, np.arange(start, start + body), mode="wrap")
            rows.append(np.concatenate([self.prefix, text, self.suffix]))
        return np.stack(rows).astype(np.int64)

    def padded(self, row: np.ndarray, keep: int) -> np.ndarray:
        """``row`` (a window) cut to its first ``keep`` tokens, its closing special tokens kept,
        and right-padded with the pad id (0 where the tokenizer names none) to its length, as a
        tokenizer pads a shorter text."""
        out = np.full_like(row, self.pad or 0)
        body = row[:max(len(self.prefix), keep - len(self.suffix))]
        cut = np.concatenate([body, self.suffix])[:len(row)]
        out[:len(cut)] = cut
        return out


def _specials(tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """The ids the tokenizer puts before and after a text of its own (from encoding one word
    with and without them)."""
    bare = tokenizer.encode("text", add_special_tokens=False).ids
    full = tokenizer.encode("text", add_special_tokens=True).ids
    for at in range(len(full) - len(bare) + 1):
        if full[at:at + len(bare)] == bare:
            return (np.array(full[:at], np.int64), np.array(full[at + len(bare):], np.int64))
    return np.zeros(0, np.int64), np.zeros(0, np.int64)


def checkpoint_text(src, vocab: int | None) -> TextWindows | None:
    """The passages for ``src``'s checkpoint (a Hugging Face directory, or the directory of a
    decoder .onnx): None where it ships no tokenizer.json, the ``tokenizers`` package is
    missing, or the tokenizer's ids do not fit the model's ``vocab`` (random ids then, as
    before)."""
    where = src.info.get("path")
    if where is None or src.kind not in ("hf", "onnx"):
        return None
    root = Path(where) if src.kind == "hf" else Path(where).parent
    path = next((p for p in (root / "tokenizer.json", root / "tokenizer" / "tokenizer.json")
                 if p.is_file()), None)
    if path is None:
        return None
    stat = path.stat()
    return _checked(str(path), (stat.st_mtime_ns, stat.st_size), vocab, root)


@functools.lru_cache(maxsize=16)
def _checked(path: str, stamp: tuple[int, int], vocab: int | None,
             root: Path) -> TextWindows | None:
    """checkpoint_text's work, once per tokenizer file (and version of it) and vocabulary: a
    compile asks ~5 times (ranges, held-out, GPTQ, the floor's source, each static-decoder
    sample set), and a fallback warns once, not at each."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        log.warning("%s: calibrating on random token ids: reading its tokenizer.json needs the "
                    "tokenizers package (pip install 'edgec[hf]')", root)
        return None
    try:
        tok = Tokenizer.from_file(path)
    except Exception as e:  # noqa: BLE001  (a tokenizer file this tokenizers cannot read)
        log.warning("%s: calibrating on random token ids: its tokenizer.json does not load "
                    "(%s)", root, e)
        return None
    windows = TextWindows(tok, _pad_id(tok, Path(path).parent))
    unknown = windows.unknown_share(tok)
    if unknown > MAX_UNKNOWN:  # a word-level tokenizer of a few words: windows of <unk>
        log.warning("%s: calibrating on random token ids: its tokenizer knows too few of the "
                    "passages' words (%.0f%% of their tokens are unknown)", root, 100 * unknown)
        return None
    if vocab is not None and windows.max_id() >= vocab:
        log.warning("%s: calibrating on random token ids: its tokenizer gives id %d, past the "
                    "model's %d-token vocabulary", root, windows.max_id(), vocab)
        return None
    return windows


def calibrates_on_text(src) -> bool:
    """Whether ``src``'s generated samples are the checkpoint's text (``calibration.samples``
    takes them for a checkpoint or decoder .onnx with a tokenizer, not for a VLM's graphs)."""
    gen = src.info.get("generation") or {}
    if src.info.get("vlm_graph") or gen.get("vision"):
        return False
    vocab = gen.get("vocab") or src.info.get("vocab_size")
    return checkpoint_text(src, int(vocab) if vocab else None) is not None


def _pad_id(tok, root: Path) -> int | None:
    import json

    config = root / "tokenizer_config.json"
    try:
        token = json.loads(config.read_text()).get("pad_token") if config.is_file() else None
    except (OSError, ValueError):
        token = None
    token = token.get("content") if isinstance(token, dict) else token
    if isinstance(token, str) and tok.token_to_id(token) is not None:
        return tok.token_to_id(token)
    padding = tok.padding
    return padding["pad_id"] if padding else None
