"""Generation over static-shape decoder graphs (NPUs): the KV buffer lives here, not in the graph.

The artifact holds two graphs over one set of weights: a prefill graph that takes ``tokens``
(e.g. 64) new tokens and a decode graph that takes one, each over a buffer of ``context -
tokens`` past slots, returning only the new tokens' keys and values. This cache owns a
[1, kv_heads, context, head_dim] buffer per K/V, fills slots left to right and marks which are
valid in the attention mask; a prompt is run in chunks of ``tokens``, the last right-padded
with masked slots, so every shape stays the one the NPU compiled. The padding's slots are not
kept: the cache continues right after the prompt's last token (decode overwrites them), so a
sequence needs prompt + new tokens - 1 slots, not the prompt rounded up to whole chunks.
"""

from __future__ import annotations

import numpy as np

from edgec.errors import UserError

__all__ = ["StaticBufferCache"]


class StaticBufferCache:
    """``step(ids, mask, positions) -> logits`` (the protocol ``generation.generate`` drives)
    over a prefill session (``chunk`` tokens) and a decode session (one token)."""

    def __init__(self, prefill, decode, info, chunk: int, batch: int = 1):
        if batch != 1:
            raise UserError("a static-shape decoder generates one sequence at a time; pass one "
                            "prompt (batch 1)")
        self.prefill, self.decode, self.info, self.chunk = prefill, decode, info, chunk
        self.context = info.context
        shape = (1, info.kv_heads, self.context, info.head_dim)
        self.buffers = {name: np.zeros(shape, np.float32) for name in info.past_names}
        self.valid = np.zeros((1, self.context), np.int64)
        self.filled = 0

    def _run(self, session, ids, valid, positions) -> np.ndarray:
        tokens = ids.shape[1]
        if self.filled + tokens > self.context:
            raise UserError(f"the sequence needs more than the static context of {self.context} "
                            "tokens this artifact was compiled for (prompt + max_new_tokens - 1 "
                            "slots); recompile with a larger --context, or shorten the prompt / "
                            "max_new_tokens")
        slots = self.context - tokens
        feeds = {"input_ids": ids, "position_ids": positions,
                 "attention_mask": np.concatenate([self.valid[:, :slots], valid], axis=1),
                 **{n: np.ascontiguousarray(b[:, :, :slots]) for n, b in self.buffers.items()}}
        out = session._run(feeds)
        end = self.filled + tokens
        for past, present in zip(self.info.past_names, self.info.present_names):
            self.buffers[past][:, :, self.filled:end] = out[present]
        self.valid[:, self.filled:end] = valid
        self.filled = end
        return out["logits"]

    def load_prompt(self, presents: list[np.ndarray], mask: np.ndarray) -> None:
        """Start from a prompt's keys/values computed elsewhere (a VLM's prefill graph): they
        fill the first slots, ``mask`` [1, n] says which are valid."""
        n = presents[0].shape[2]
        if n >= self.context:
            raise UserError(f"the prompt's {n} cached tokens do not fit the static context of "
                            f"{self.context} tokens; recompile with a larger --context")
        for name, arr in zip(self.info.past_names, presents):
            self.buffers[name][:, :, :n] = arr
        self.valid[:, :n] = mask
        self.filled = n

    def step(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        n = ids.shape[1]
        if n == 1 and self.filled:
            return self._run(self.decode, ids, mask[:, -1:], positions)
        # right-pad the prompt to whole chunks of masked slots: the padding follows the last
        # token (causal attention keeps it out of the real tokens' outputs), and its slots are
        # handed back below, so the prompt holds n slots, not n rounded up to whole chunks
        pad = (-n) % self.chunk
        ids = np.pad(ids, ((0, 0), (0, pad)))
        valid = np.pad(mask[:, -n:], ((0, 0), (0, pad)))
        positions = np.pad(positions, ((0, 0), (0, pad)), mode="edge")
        if self.filled + ids.shape[1] > self.context:
            raise UserError(f"the prompt ({n} tokens) does not fit the static context of "
                            f"{self.context} tokens this artifact was compiled for (its prefill "
                            f"runs whole chunks of {self.chunk} tokens: "
                            f"{self.filled + ids.shape[1]} slots); recompile with a larger "
                            "--context or shorten the prompt")
        logits = None
        for start in range(0, ids.shape[1], self.chunk):
            cut = slice(start, start + self.chunk)
            logits = self._run(self.prefill, ids[:, cut], valid[:, cut], positions[:, cut])
        self.filled -= pad  # decode overwrites the padding's slots (masked until then)
        return logits[:, :logits.shape[1] - pad]
