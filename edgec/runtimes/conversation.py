"""A multi-turn chat with a generation artifact (``Session.chat()``, ``edgec generate --chat``
without ``--prompt``): the messages so far, put through the checkpoint's chat template each turn,
the oldest turns dropped when the conversation and the answer would pass the model's context."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from edgec.errors import UserError

__all__ = ["Conversation"]


class Conversation:
    """``say(text) -> answer``; ``messages`` holds the turns kept, ``dropped`` how many turns
    (a user message and its answer) were let go to fit the context."""

    def __init__(self, session, system: str | None = None, max_new_tokens: int = 256,
                 **options: Any):
        self.session, self.max_new_tokens, self.options = session, max_new_tokens, options
        self.system = [{"role": "system", "content": system}] if system else []
        if session.tokenizer.chat_template is None:  # refused before the first question
            session.tokenizer.encode_chat([{"role": "user", "content": ""}])
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict[str, str]] = list(self.system)
        self.dropped = 0

    def say(self, text: str, on_text: Callable[[str], None] | None = None) -> str:
        """The model's answer to ``text`` after the turns so far (streamed to ``on_text``); a
        turn that fails leaves the conversation as it was."""
        if not isinstance(text, str) or not text.strip():
            raise UserError("say something: a chat turn is non-empty text")
        kept, dropped = self._fitted([*self.messages, {"role": "user", "content": text}])
        answer = self.session.generate_text(kept, self.max_new_tokens, on_text=on_text,
                                            **self.options)
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
