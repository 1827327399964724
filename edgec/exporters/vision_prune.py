"""Vision-token pruning in a VLM's prefill graph (training-free Dynamic-LLaVA / FastV).

The prefill graph runs the first ``layer`` decoder layers over the whole prompt, scores the
image tokens there, keeps the best ``ceil(keep · image tokens)`` of them (every text token and
padding position stays) in their original order with their original positions (their RoPE is
unchanged), and runs the remaining layers on the kept tokens only. Scores:

- ``attention`` (FastV's code): the attention the prompt's last token pays each key in layer
  ``layer - 1``, averaged over heads; its query is projected once more for that one row, the
  keys are the layer's own.
- ``norm``: the L2 norm of each token's hidden state entering layer ``layer``.

The kept count is fixed by ``keep``, so every shape after the cut is static given the prompt's:
TopK over the image scores picks the tokens to drop, a sort of the positions with the dropped
ones moved to the end keeps the rest in order, and a constant-length slice takes them.

Every layer's cache holds the kept tokens only (the first layers' presents are gathered too),
so one attention mask serves every layer at decode time; the graph returns that mask as
``attention_mask_kept``. Dynamic-LLaVA keeps the first layers' full caches instead: that needs a
mask per layer group in the decoder, which no runtime's cache layout here has.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from edgec.errors import UserError

__all__ = ["VisionPruning", "VlmPrefill", "ScoredDecoder", "prefill_flops", "KEPT_MASK",
           "SCORES_OUTPUT"]

KEPT_MASK = "attention_mask_kept"
SCORES_OUTPUT = "attention_scores"
SCORES = ("attention", "norm")


@dataclasses.dataclass(frozen=True)
class VisionPruning:
    """``keep``, ``layer``, ``score``: the prefill's image tokens (above). ``text_keep`` < 1:
    decode-time sparsification of the generated tokens (``runtimes.vision.TextBudget``): beyond
    the ``recent`` newest, at most ceil(text_keep · their number) stay in the cache, those that
    received the most attention (mean over the queries that saw them, in layer ``layer - 1``,
    which the decoder then outputs as ``attention_scores``)."""

    keep: float = 0.25
    layer: int = 2
    score: str = "attention"
    text_keep: float = 1.0
    recent: int = 16

    def __post_init__(self):
        if not 0 < self.text_keep <= 1 or self.recent < 1:
            raise UserError(f"--prune-vision-tokens text_keep must be in (0, 1] and recent ≥ 1, "
                            f"not {self.text_keep} and {self.recent}")
        if not 0 < self.keep <= 1:
            raise UserError(f"--prune-vision-tokens keep must be in (0, 1], not {self.keep}")
        if self.layer < 1:
            raise UserError(f"--prune-vision-tokens layer must be ≥ 1 (the layers before the "
                            f"cut score the tokens), not {self.layer}")
        if self.score not in SCORES:
            raise UserError(f"--prune-vision-tokens score must be one of {', '.join(SCORES)}, "
                            f"not {self.score!r}")

    @classmethod
    def parse(cls, raw: Any) -> VisionPruning | None:
        """From ``"keep=0.25,layer=2,score=attention"``, a dict of the same, True (defaults) or
        a VisionPruning."""
        if raw is None or raw is False:
            return None
        if isinstance(raw, VisionPruning):
            return raw
        if raw is True or raw in ("", "default"):
            return cls()
        items = dict(raw) if isinstance(raw, dict) else {}
        if not isinstance(raw, dict):
            for part in str(raw).split(","):
                key, sep, value = part.partition("=")
                if not sep:
                    raise UserError(f"--prune-vision-tokens takes key=value pairs, e.g. "
                                    f"keep=0.25,layer=2,score=attention; got {part!r}")
                items[key.strip()] = value.strip()
        unknown = sorted(set(items) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise UserError(f"unknown --prune-vision-tokens option {unknown[0]!r}; known: keep, "
                            "layer, score, text_keep, recent")
        try:
            return cls(keep=float(items.get("keep", cls.keep)),
                       layer=int(items.get("layer", cls.layer)),
                       score=str(items.get("score", cls.score)),
                       text_keep=float(items.get("text_keep", cls.text_keep)),
                       recent=int(items.get("recent", cls.recent)))
        except ValueError as e:
            raise UserError(f"--prune-vision-tokens: {e}; e.g. keep=0.25,layer=2") from None

    def kept(self, image_tokens: int) -> int:
        return max(1, math.ceil(self.keep * image_tokens - 1e-9))

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _gather(t: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """``t`` at ``index`` [B, K] along ``dim`` (every other dim whole)."""
    shape = [1] * t.dim()
    shape[0], shape[dim] = index.shape
    full = list(t.shape)
    full[dim] = index.shape[1]
    return torch.gather(t, dim, index.reshape(shape).expand(full))


class VlmPrefill(nn.Module):
    """``forward(input_ids, image_features, attention_mask, position_ids)`` → ``(logits of the
    last position, attention_mask_kept, present.0.key, present.0.value, ...)``: the merged
    prompt through the language model, with ``pruning`` (None: every token kept)."""

    def __init__(self, vlm: nn.Module, pruning: VisionPruning | None) -> None:
        super().__init__()
        self.vlm = vlm  # parameter names: "vlm." + the source's own
        self.pruning = pruning
        lm = vlm.language
        if pruning is not None and pruning.layer >= lm.cfg.layers:
            raise UserError(f"--prune-vision-tokens layer={pruning.layer}: the language model "
                            f"has {lm.cfg.layers} layers; prune after one of "
                            f"1..{lm.cfg.layers - 1}")

    def forward(self, input_ids, image_features, attention_mask, position_ids):
        vlm, pruning = self.vlm, self.pruning
        lm = vlm.language
        cfg = lm.cfg
        from edgec.models.llama import causal_bias

        x = vlm.merge(input_ids, image_features)
        cos, sin = lm.rope(position_ids)
        s = input_ids.shape[1]
        bias = causal_bias(attention_mask, 0, s)
        empty = torch.zeros(input_ids.shape[0], cfg.kv_heads, 0, cfg.head_dim)
        cut = pruning.layer if pruning is not None else cfg.layers
        mask, presents, scores = attention_mask, [], None
        for i, layer in enumerate(lm.layers):
            if i == cut:
                kept = self._kept(input_ids, scores)
                x = _gather(x, kept, 1)
                cos, sin = _gather(cos, kept, 2), _gather(sin, kept, 2)
                mask = _gather(attention_mask, kept, 1)
                bias = causal_bias(mask, 0, kept.shape[1])
                presents = [(_gather(k, kept, 2), _gather(v, kept, 2)) for k, v in presents]
            h = x
            x, k, v = layer.forward_cached(x, cos, sin, bias, empty, empty)
            presents.append((k, v))
            if pruning is not None and i == cut - 1:
                scores = (self._last_row_attention(layer, h, k, cos, sin, bias)
                          if pruning.score == "attention" else x.norm(dim=-1))
        logits = lm.lm_head(lm.norm(x[:, -1:]))
        return (logits, mask, *[t for kv in presents for t in kv])

    @staticmethod
    def _last_row_attention(layer, h, k, cos, sin, bias) -> torch.Tensor:
        """[B, S]: the last query's attention over the layer's keys, mean over heads."""
        from edgec.models.llama import _rotate_half

        attn = layer.self_attn
        b = h.shape[0]
        q = attn.q_proj(layer.input_layernorm(h[:, -1:]))
        q = q.reshape(b, 1, attn.heads, attn.head_dim).transpose(1, 2)  # [B, H, 1, d]
        q = q * cos[:, :, -1:] + _rotate_half(q) * sin[:, :, -1:]
        rep = attn.heads // attn.kv_heads
        q = q.reshape(b, attn.kv_heads, rep, attn.head_dim)  # heads grouped by their K/V head
        logits = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(attn.head_dim)  # [B, G, r, S]
        probs = torch.softmax(logits + bias[:, :, -1:, :], dim=-1)
        return probs.mean(dim=(1, 2))

    def _kept(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """[B, S - dropped] positions kept, ascending: the image tokens with the lowest scores
        are dropped (never a text token, padding, or the last position)."""
        vlm, pruning = self.vlm, self.pruning
        drop = vlm.image_tokens - pruning.kept(vlm.image_tokens)
        s = input_ids.shape[1]
        positions = torch.arange(s)[None].expand_as(input_ids)
        if drop == 0:  # keep=1.0: the same gather path with every position kept
            return positions
        candidate = (input_ids == vlm.image_token_id) & (positions < s - 1)
        lowest = torch.where(candidate, -scores, torch.finfo(torch.float32).min)
        dropped = torch.topk(lowest, drop, dim=1).indices
        moved = positions.scatter(1, dropped, dropped + s)  # to the end, in their own order
        return torch.sort(moved, dim=1).values[:, :-drop]


class ScoredDecoder(nn.Module):
    """The language model's KV-cache decoder with one more output, ``attention_scores``
    [B, P+S]: the last query's attention over the cache and itself in layer ``layer`` (mean
    over heads), for decode-time sparsification. Inputs and the other outputs as
    ``exporters.decoder``'s."""

    def __init__(self, language: nn.Module, layer: int) -> None:
        super().__init__()
        self.model = language  # parameter names: "model." + the language model's, as decoders
        self.layer = layer

    def forward(self, input_ids, attention_mask, position_ids, past_key_values):
        from edgec.models.llama import causal_bias

        lm = self.model
        pairs = [(past_key_values[2 * i], past_key_values[2 * i + 1])
                 for i in range(lm.cfg.layers)]
        x = lm.embed_tokens(input_ids)
        cos, sin = lm.rope(position_ids)
        bias = causal_bias(attention_mask, pairs[0][0].shape[2], x.shape[1])
        presents, scores = [], None
        for i, (layer, (past_k, past_v)) in enumerate(zip(lm.layers, pairs)):
            h = x
            x, k, v = layer.forward_cached(x, cos, sin, bias, past_k, past_v)
            presents += [k, v]
            if i == self.layer:
                scores = VlmPrefill._last_row_attention(layer, h, k, cos, sin, bias)
        return (lm.lm_head(lm.norm(x)), scores, *presents)


def prefill_flops(cfg, tokens: int, kept: int | None = None, layer: int | None = None) -> int:
    """Multiply-accumulates ×2 of the language model's prefill over ``tokens`` tokens (the
    projections, MLP, LM head of the last row, and causal attention), with the layers from
    ``layer`` on running ``kept`` tokens."""
    d, hd = cfg.dim, cfg.head_dim
    proj = 2 * d * (cfg.heads * hd + 2 * cfg.kv_heads * hd) + 2 * cfg.heads * hd * d
    mlp = 2 * 3 * d * cfg.ffn

    def per_layer(n: int) -> int:
        return n * (proj + mlp) + 2 * 2 * cfg.heads * hd * n * (n + 1) // 2

    cut = cfg.layers if layer is None or kept is None else layer
    total = cut * per_layer(tokens) + (cfg.layers - cut) * per_layer(kept or tokens)
    return int(total + 2 * d * cfg.vocab)
