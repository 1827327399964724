"""Text in, text out: ``Session.generate_text`` over ``Session.generate`` with the artifact's
shipped tokenizer. A prompt is text, or a conversation put through the checkpoint's chat
template; several prompts run as one left-padded batch."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from edgec.errors import UserError

__all__ = ["generate_text"]


def _encode(tok, prompt: Any, index: int | None) -> list[int]:
    where = "the prompt" if index is None else f"prompt {index}"
    if isinstance(prompt, str):
        ids = tok.encode(prompt)
    elif isinstance(prompt, Sequence) and prompt and all(isinstance(m, Mapping) for m in prompt):
        ids = tok.encode_chat(prompt)
    else:
        raise UserError(f"{where} must be text or a chat (a list of {{'role', 'content'}} "
                        f"dicts), not {type(prompt).__name__}")
    if not ids:
        raise UserError(f"{where} encodes to no tokens; give some text")
    return ids


def _is_batch(prompt: Any) -> bool:
    """A list of prompts (each text or a chat), not one chat (a list of message dicts)."""
    return (isinstance(prompt, Sequence) and not isinstance(prompt, str) and bool(prompt)
            and not any(isinstance(p, Mapping) for p in prompt))


def generate_text(session, prompt, max_new_tokens: int,
                  on_text: Callable[[str], None] | None, options: dict[str, Any]
                  ) -> str | list[str]:
    """The new text of each prompt (its EOS and what follows left out: a tokenizer need not
    call the EOS special, and a finished row of a batch is padded after it)."""
    from edgec.runtimes.generation import eos_ids
    from edgec.runtimes.tokenizer import TextStream

    tok = session.tokenizer
    batch = _is_batch(prompt)
    rows = ([_encode(tok, p, i) for i, p in enumerate(prompt)] if batch
            else [_encode(tok, prompt, None)])
    if on_text is not None and len(rows) > 1:
        raise UserError("on_text streams one prompt's text; give one prompt, or read the "
                        "returned texts")
    if "attention_mask" in options or "input_ids" in options:
        raise UserError("generate_text() makes the ids and mask from the prompts; for your "
                        "own ids call generate(input_ids, attention_mask)")
    width = max(len(r) for r in rows)
    info = session.decoder_info
    fill = info.pad_token_id if info.pad_token_id is not None else 0
    ids = np.array([[fill] * (width - len(r)) + r for r in rows], np.int64)
    mask = np.array([[0] * (width - len(r)) + [1] * len(r) for r in rows], np.int64)
    streamers = [s for s in (options.pop("streamer", None),
                             TextStream(tok, on_text) if on_text is not None else None) if s]
    out = session.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                           streamer=(lambda t: [s(t) for s in streamers]) if streamers else None,
                           **options)
    steps = session.last_generation["new_tokens"]
    eos = set(eos_ids(options.get("eos_token_id"), info.eos_token_ids))
    texts = []
    for row in out[:, out.shape[1] - steps:].tolist():
        end = next((i for i, t in enumerate(row) if t in eos), len(row))
        texts.append(tok.decode(row[:end]))
    return texts if batch else texts[0]
