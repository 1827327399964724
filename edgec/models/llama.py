"""LLaMA-style decoder-only language model (RMSNorm, RoPE, grouped-query causal attention, SwiGLU).

Parameter names follow Hugging Face LLaMA without its ``model.`` prefix
(``layers.0.self_attn.q_proj.weight``), so PEFT adapters map onto them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgec.models.registry import ModelSpec, register

__all__ = ["Llama", "LlamaConfig", "CONFIGS", "SPEC", "OUTLIER_SCALE", "causal_bias"]

OUTLIER_SCALE = 100.0  # magnitude of the planted residual-stream outlier channels
N_OUTLIERS = 4


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab: int
    dim: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    seq: int
    batch: int = 1
    rope_theta: float = 10000.0
    eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


CONFIGS: dict[str, LlamaConfig] = {
    "tiny": LlamaConfig(vocab=256, dim=64, layers=2, heads=4, kv_heads=2, ffn=172, seq=16, batch=2),
    "small": LlamaConfig(vocab=4096, dim=512, layers=4, heads=8, kv_heads=2, ffn=1376, seq=128),
    "base": LlamaConfig(vocab=32000, dim=2048, layers=16, heads=32, kv_heads=8, ffn=5632, seq=512),
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.heads, cfg.kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.heads * cfg.head_dim, cfg.dim, bias=False)

    def _qkv(self, x, cos, sin):
        """Q [B, heads, S, d] and K, V [B, kv_heads, S, d], RoPE applied to Q and K."""
        b, s, _ = x.shape
        q = self.q_proj(x).reshape(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).reshape(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).reshape(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin, v

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self._qkv(x, cos, sin)
        rep = self.heads // self.kv_heads  # grouped-query attention: repeat each K/V head
        shape = (b, self.kv_heads, rep, s, self.head_dim)
        k = k[:, :, None].expand(shape).reshape(b, self.heads, s, self.head_dim)
        v = v[:, :, None].expand(shape).reshape(b, self.heads, s, self.head_dim)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.heads * self.head_dim))

    def forward_cached(self, x, cos, sin, bias, past_k, past_v):
        """One step with a KV cache: ``past_*`` [B, kv_heads, P, head_dim] (P may be 0), ``bias``
        an additive [B, 1, S, P+S] mask. Returns the output and the present K/V (P+S long)."""
        b, s, _ = x.shape
        q, k, v = self._qkv(x, cos, sin)
        k = torch.cat((past_k, k), dim=2)
        v = torch.cat((past_v, v), dim=2)
        # grouped-query attention without materializing the repeated K/V (exported as one ONNX
        # Attention with kv heads < q heads at opset 23)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                             enable_gqa=self.heads != self.kv_heads)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.heads * self.head_dim)), k, v


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn, bias=False)
        self.down_proj = nn.Linear(cfg.ffn, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_cached(self, x, cos, sin, bias, past_k, past_v):
        h, k, v = self.self_attn.forward_cached(self.input_layernorm(x), cos, sin, bias, past_k,
                                                past_v)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), k, v


class Llama(nn.Module):
    """forward(input_ids [B, S] int64) -> logits [B, S, vocab]."""

    def __init__(self, cfg: LlamaConfig, tied: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab, cfg.dim)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.dim, cfg.eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab, bias=False)
        if tied:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", torch.empty(cfg.head_dim // 2), persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """Fill the RoPE frequencies (again after ``to_empty``); a buffer, so that PyTorch and the
        exported graph use bit-identical values."""
        hd = self.cfg.head_dim
        exponents = torch.arange(0, hd, 2, dtype=torch.float64) / hd
        self.inv_freq.copy_(1.0 / self.cfg.rope_theta**exponents)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], dtype=torch.float32)
        angles = positions[:, None] * self.inv_freq[None]
        angles = torch.cat((angles, angles), dim=-1)  # [S, head_dim], rotate-half layout
        cos, sin = angles.cos(), angles.sin()
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.norm(x))

    def forward_cached(self, input_ids, attention_mask, position_ids, past_key_values):
        """The decoder with a KV cache (prefill: P = 0; decode: S = 1), in Hugging Face's terms:
        ``attention_mask`` [B, P+S] (0 = padding), ``position_ids`` [B, S], ``past_key_values``
        ((key, value) per layer, [B, kv_heads, P, head_dim]). Returns logits [B, S, vocab] and
        the present (key, value) per layer, [B, kv_heads, P+S, head_dim]."""
        return self.forward_embeds_cached(self.embed_tokens(input_ids), attention_mask,
                                          position_ids, past_key_values)

    def forward_embeds_cached(self, x, attention_mask, position_ids, past_key_values):
        """``forward_cached`` from input embeddings ``x`` [B, S, dim] (a VLM's merged image and
        text embeddings)."""
        cos, sin = self.rope(position_ids)
        bias = causal_bias(attention_mask, past_key_values[0][0].shape[2], x.shape[1])
        presents = []
        for layer, (past_k, past_v) in zip(self.layers, past_key_values):
            x, k, v = layer.forward_cached(x, cos, sin, bias, past_k, past_v)
            presents.append((k, v))
        return self.lm_head(self.norm(x)), presents

    def rope(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, 1, S, head_dim] (rotate-half layout) at ``position_ids`` [B, S]."""
        angles = position_ids[..., None].to(torch.float32) * self.inv_freq
        angles = torch.cat((angles, angles), dim=-1)[:, None]
        return angles.cos(), angles.sin()


def causal_bias(attention_mask: torch.Tensor, past: int, s: int) -> torch.Tensor:
    """The additive [B, 1, S, P+S] mask of S queries after P cached keys: causal by index and
    0 where ``attention_mask`` [B, P+S] marks padding. Finite, as Hugging Face does: a padding
    query's row stays finite (uniform) instead of NaN."""
    key_pos = torch.arange(past + s)  # the mask's length: P + S
    query_pos = torch.arange(s) + past
    allowed = (key_pos[None, :] <= query_pos[:, None])[None, None] & (
        attention_mask[:, None, None, :] > 0)
    return torch.zeros(allowed.shape, dtype=torch.float32).masked_fill(
        ~allowed, torch.finfo(torch.float32).min)


def outlier_channels(cfg: LlamaConfig) -> list[int]:
    """The fixed residual-stream channels that ``+outliers`` makes large."""
    g = torch.Generator().manual_seed(1234)
    return sorted(torch.randperm(cfg.dim, generator=g)[:N_OUTLIERS].tolist())


def _init(model: Llama, tied: bool, outliers: bool, seed: int = 0) -> Llama:
    """Weights N(0, 1/fan_in) (o_proj/down_proj further × 1/sqrt(2·layers)), embeddings N(0, 1),
    norms 1 (the final norm 1/sqrt(dim) when tied, so logits stay O(1))."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    model.reset_buffers()
    res_gain = 1.0 / math.sqrt(2 * cfg.layers)  # residual-branch scaling: stream stays O(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "norm.weight":
                p.fill_(1.0)
            elif name == "embed_tokens.weight":
                p.normal_(0.0, 1.0, generator=g)
            else:
                gain = res_gain if name.endswith(("o_proj.weight", "down_proj.weight")) else 1.0
                p.normal_(0.0, gain / math.sqrt(p.shape[1]), generator=g)
        if tied:
            model.norm.weight.fill_(1.0 / math.sqrt(cfg.dim))
        if outliers:
            _plant_outliers(model, tied, g)
    return model


def _plant_outliers(model: Llama, tied: bool, g: torch.Generator) -> None:
    """Plant massive activations: a few residual channels held near ±OUTLIER_SCALE on every token.

    As in trained LLMs the channels are nearly constant across tokens (embedding columns
    ``±s·(1 + 0.1·z)``; the layers do not write to them), so each token's RMS is about the same.
    RMSNorm weights are raised by r (that RMS growth) so ordinary channels keep their magnitude
    and the outliers reach q/k/v and gate/up about s× an ordinary channel's std (≈30-50× its max
    over tokens). Those projections' input columns are divided by s (a SmoothQuant-style
    migration), so the model still computes something close to the plain one, but per-tensor
    int8 activation quantization loses the ordinary channels.
    """
    cfg, s = model.cfg, OUTLIER_SCALE
    idx = torch.tensor(outlier_channels(cfg))
    sign = torch.where(torch.rand(len(idx), generator=g) < 0.5, -1.0, 1.0)
    jitter = 1.0 + 0.1 * torch.randn(cfg.vocab, len(idx), generator=g)
    model.embed_tokens.weight[:, idx] = s * sign * jitter  # also lm_head's columns when tied
    r = math.sqrt(1.0 + len(idx) * s * s / cfg.dim)
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        attn.o_proj.weight[idx] = 0.0
        mlp.down_proj.weight[idx] = 0.0
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.weight *= r
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
            proj.weight[:, idx] /= s
    model.norm.weight *= r
    model.norm.weight[idx] /= s * s if tied else s


def build(config: str, options: frozenset[str]) -> nn.Module:
    return build_language(CONFIGS[config], "tied" in options, "outliers" in options)


def build_language(cfg: LlamaConfig, tied: bool = False, outliers: bool = False) -> Llama:
    """A ``Llama`` of ``cfg`` with the deterministic reference weights."""
    with torch.device("meta"):
        model = Llama(cfg, tied=tied)
    model = model.to_empty(device="cpu")
    if tied:  # to_empty breaks the sharing
        model.lm_head.weight = model.embed_tokens.weight
    return _init(model, tied, outliers).eval()


def example_inputs(config: str, options: frozenset[str], seed: int) -> tuple[torch.Tensor, ...]:
    cfg = CONFIGS[config]
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq), generator=g, dtype=torch.int64),)


def dynamic(config: str, options: frozenset[str]) -> dict[str, dict[int, str]]:
    return {"input_ids": {0: "batch", 1: "seq"}}


def describe(config: str, options: frozenset[str]) -> dict[str, Any]:
    cfg = CONFIGS[config]
    info = dataclasses.asdict(cfg)
    info.update(head_dim=cfg.head_dim, tied="tied" in options, outliers="outliers" in options)
    if "outliers" in options:
        info.update(outlier_channels=outlier_channels(cfg), outlier_scale=OUTLIER_SCALE)
    return info


SPEC = register(
    ModelSpec(
        name="llama",
        description="LLaMA-style decoder (RMSNorm, RoPE, GQA causal attention, SwiGLU)",
        paper="LLaMA (Touvron et al. 2023)",
        configs=tuple(CONFIGS),
        options={
            "outliers": f"plant {N_OUTLIERS} massive residual channels (~{OUTLIER_SCALE:g}x std)",
            "tied": "tie lm_head to embed_tokens",
        },
        input_names=("input_ids",),
        output_names=("logits",),
        builder=build,
        inputs=example_inputs,
        dynamic=dynamic,
        describe=describe,
    )
)
