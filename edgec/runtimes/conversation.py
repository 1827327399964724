"""A multi-turn chat with a generation artifact (``Session.chat()``, ``edgec generate --chat``
without ``--prompt``): the messages so far, put through the checkpoint's chat template each turn,
the oldest turns dropped when the conversation and the answer would pass the model's context."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from edgec.errors import UserError

__all__ = ["Conversation", "PromptCache"]


class PromptCache:
    """The KV cache a conversation's last turn left, for the next turn to resume: the ids whose
    keys and values it holds (the prompt and the answer, less the last token, never fed back)
    and a stamp of what made it (the session's generation count, since another ``generate`` on
    the session resets a cache OpenVINO holds; the adapter). Only a batch of one on a cache
    that can be cut back (arrays, OpenVINO's state) is kept; the turn then prefills only the
    ids after the longest prefix the cache shares with its prompt."""

    def __init__(self):
        self.cache, self.tokens, self.stamp = None, None, None

    def resume(self, ids: np.ndarray, stamp, capacity: int, limit: int | None
               ) -> tuple[Any, int]:
        """(the cache cut back to the prefix it shares with ``ids`` [1, S], that prefix's
        length), or (None, 0) where it cannot serve (another stamp); one allocated for fewer
        than ``capacity`` tokens (OpenVINO's paged blocks) grows first. At least one token is
        prefilled."""
        cache, self.cache = self.cache, None  # used once: a failed turn leaves none behind
        if cache is None or stamp != self.stamp or ids.shape[0] != 1:
            return None, 0
        if getattr(cache, "capacity", capacity) < capacity:
            cache.grow(self.capacity(capacity, limit))
        held = self.tokens[:ids.shape[1] - 1]
        differs = np.flatnonzero(held != ids[0, :len(held)])
        shared = int(differs[0]) if differs.size else len(held)
        if shared == 0:
            return None, 0
        cache.truncate(shared)
        return cache, shared

    @staticmethod
    def capacity(needed: int, limit: int | None) -> int:
        """Tokens to allocate a conversation's cache for (where a cache is allocated up front):
        twice this turn's, so that later turns fit it, within the model's context."""
        return min(2 * needed, limit) if limit else 2 * needed

    def keep(self, cache, sequences: np.ndarray, stamp) -> None:
        if sequences.shape[0] == 1 and callable(getattr(cache, "truncate", None)):
            self.cache, self.tokens, self.stamp = cache, sequences[0, :-1].copy(), stamp


class Conversation:
    """``say(text) -> answer``; ``messages`` holds the turns kept, ``dropped`` how many turns
    (a user message and its answer) were let go to fit the context."""

    def __init__(self, session, system: str | None = None, max_new_tokens: int = 256,
                 **options: Any):
        self.session, self.max_new_tokens, self.options = session, max_new_tokens, options
        self.system = [{"role": "system", "content": system}] if system else []
        self.reuse = True  # False: every turn prefills the whole conversation
        if session.tokenizer.chat_template is None:  # refused before the first question
            session.tokenizer.encode_chat([{"role": "user", "content": ""}])
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict[str, str]] = list(self.system)
        self.dropped = 0
        self._cache = PromptCache()

    def say(self, text: str, on_text: Callable[[str], None] | None = None) -> str:
        """The model's answer to ``text`` after the turns so far (streamed to ``on_text``); a
        turn that fails leaves the conversation as it was."""
        if not isinstance(text, str) or not text.strip():
            raise UserError("say something: a chat turn is non-empty text")
        kept, dropped = self._fitted([*self.messages, {"role": "user", "content": text}])
        answer = self.session.generate_text(
            kept, self.max_new_tokens, on_text=on_text, **self.options,
            **({"_prompt_cache": self._cache} if self.reuse else {}))
        self.messages = [*kept, {"role": "assistant", "content": answer}]
        self.dropped += dropped
        return answer

    def _fitted(self, messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], int]:
        """``messages`` without the oldest turns the context cannot hold beside the answer; a
        question that alone does not fit is refused by ``generate`` (check_context), in words."""
        info = self.session.decoder_info
        limit = info.context or info.max_positions
        first, dropped = len(self.system), 0
        while (limit and len(messages) > first + 1 and limit < len(
                self.session.tokenizer.encode_chat(messages)) + self.max_new_tokens - 1):
            messages = messages[:first] + messages[first + 2:]  # a question and its answer
            dropped += 1
        return messages, dropped
