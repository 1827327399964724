"""Text/video-prior motion generator (ViMoGen style): Wan blocks over one 276-d motion token per
frame, each sample routed either to text cross-attention or to cross-attention over a
reference-motion encoder.

Every sequence length is static (fixed by the config); only the batch is dynamic. Both branches
are computed for every sample and mixed by a 0/1 multiply, so the export is one static graph
(ViMoGen indexes the batch by the mask, which traces to data-dependent shapes).

Inputs: ``motion`` [B, T, 276] (DART-style features, one token per frame), ``timestep`` [B]
(float, in [0, 1000)), ``text`` [B, L, text_dim], ``ref_motion`` [B, T, 138] (the motion an HMR
model recovered from a generated video: 126 local rot6D + 12 root orientation/angular velocity),
``use_text`` [B] (float32 0/1; PyTorch also takes bool): 1 attends to the text, 0 to the
reference motion. Output: ``velocity`` [B, T, 276] (rectified-flow velocity ε − x0).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from edgec.models.motion_dit import (
    Attention,
    feed_forward,
    modulate,
    timestep_embedding,
    timestep_freqs,
    wan_init,
)
from edgec.models.registry import ModelSpec, register, timesteps

__all__ = ["MotionGen", "MotionGenConfig", "CONFIGS", "SPEC"]

MOTION_DIM = 276
REF_DIM = 138


@dataclasses.dataclass(frozen=True)
class MotionGenConfig:
    frames: int
    text_len: int
    text_dim: int
    dim: int
    heads: int
    depth: int
    ref_depth: int  # self-attention-only blocks of the reference-motion encoder
    ffn_dim: int
    batch: int = 1
    freq_dim: int = 256
    eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


CONFIGS: dict[str, MotionGenConfig] = {
    "tiny": MotionGenConfig(frames=60, text_len=16, text_dim=64, dim=128, heads=4, depth=2,
                            ref_depth=1, ffn_dim=512, batch=2),
    "small": MotionGenConfig(frames=200, text_len=64, text_dim=512, dim=512, heads=8, depth=8,
                             ref_depth=4, ffn_dim=2048),
    # the official code's dims (Wan2.1-T2V-1.3B: umT5 text, ref encoder of num_layers // 2)
    "base": MotionGenConfig(frames=200, text_len=512, text_dim=4096, dim=1536, heads=12,
                            depth=30, ref_depth=15, ffn_dim=8960),
}


def sinusoidal_positions(length: int, dim: int) -> torch.Tensor:
    """ViMoGen's absolute ``PositionalEncoding``: sin on even channels, cos on odd ones."""
    pos = torch.arange(length, dtype=torch.float64)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim, dtype=torch.float64)
    pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * div), torch.cos(pos * div)
    return pe.float()


class SelfAttentionBlock(nn.Module):
    """Wan block without cross-attention (the reference-motion encoder's blocks)."""

    def __init__(self, cfg: MotionGenConfig) -> None:
        super().__init__()
        d = cfg.dim
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=cfg.eps)
        self.self_attn = Attention(d, cfg.heads, cfg.eps)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=cfg.eps)
        self.ffn = feed_forward(d, cfg.ffn_dim)
        self.modulation = nn.Parameter(torch.zeros(1, 6, d))

    def forward(self, x: torch.Tensor, e0: torch.Tensor) -> torch.Tensor:
        e = (self.modulation + e0).chunk(6, dim=1)
        h = modulate(self.norm1(x), e[0], e[1])
        # no RoPE: ViMoGen builds the tables but its self-attention never applies them
        x = x + self.self_attn(h, h) * e[2]
        return x + self.ffn(modulate(self.norm2(x), e[3], e[4])) * e[5]


class RoutedBlock(SelfAttentionBlock):
    """Wan block whose cross-attention is per sample either to the text or to the reference."""

    def __init__(self, cfg: MotionGenConfig) -> None:
        super().__init__(cfg)
        self.norm3 = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.cross_attn = Attention(cfg.dim, cfg.heads, cfg.eps)
        self.norm4 = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.ref_motion_cross_attn = Attention(cfg.dim, cfg.heads, cfg.eps)

    def forward(self, x: torch.Tensor, e0: torch.Tensor, context: torch.Tensor,
                ref: torch.Tensor, use_text: torch.Tensor) -> torch.Tensor:
        e = (self.modulation + e0).chunk(6, dim=1)
        h = modulate(self.norm1(x), e[0], e[1])
        x = x + self.self_attn(h, h) * e[2]
        # hard routing as a mask multiply: with use_text 1 the reference term is 0·y, and
        # x + a + 0 is x + a exactly, so each sample gets exactly its own branch's result
        x = (x + use_text * self.cross_attn(self.norm3(x), context)
             + (1 - use_text) * self.ref_motion_cross_attn(self.norm4(x), ref))
        return x + self.ffn(modulate(self.norm2(x), e[3], e[4])) * e[5]


class MotionGen(nn.Module):
    """forward(motion [B,T,276], timestep [B], text [B,L,text_dim], ref_motion [B,T,138],
    use_text [B]) -> velocity [B,T,276]."""

    def __init__(self, cfg: MotionGenConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.motion_embedding = nn.Linear(MOTION_DIM, d)
        self.ref_motion_embedding = nn.Linear(REF_DIM, d)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, d),
                                            nn.GELU(approximate="tanh"), nn.Linear(d, d))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, d), nn.SiLU(),
                                            nn.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.ref_motion_encoder = nn.ModuleList(
            SelfAttentionBlock(cfg) for _ in range(cfg.ref_depth))
        self.blocks = nn.ModuleList(RoutedBlock(cfg) for _ in range(cfg.depth))
        self.norm_out = nn.LayerNorm(d, elementwise_affine=False, eps=cfg.eps)
        self.head_modulation = nn.Parameter(torch.zeros(1, 2, d))
        self.head = nn.Linear(d, MOTION_DIM)
        self.register_buffer("time_freqs", torch.empty(cfg.freq_dim // 2), persistent=False)
        # max_len = frames: the sequence length is static (ViMoGen's table has 5000 rows)
        self.register_buffer("pos_embedding", torch.empty(cfg.frames, d), persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """Fill the frequency and position tables (again after ``to_empty``); buffers, so
        PyTorch and the exported graph use the very same float32 values."""
        self.time_freqs.copy_(timestep_freqs(self.cfg.freq_dim))
        self.pos_embedding.copy_(sinusoidal_positions(self.cfg.frames, self.cfg.dim))

    def encode_reference(self, ref_motion: torch.Tensor, e0: torch.Tensor) -> torch.Tensor:
        """The reference-motion memory [B, T, D] that the routed blocks attend to."""
        ref = self.ref_motion_embedding(ref_motion) + self.pos_embedding[: ref_motion.shape[1]]
        for block in self.ref_motion_encoder:
            ref = block(ref, e0)
        return ref

    def forward(self, motion: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor,
                ref_motion: torch.Tensor, use_text: torch.Tensor) -> torch.Tensor:
        x = self.motion_embedding(motion) + self.pos_embedding[: motion.shape[1]]
        e = self.time_embedding(timestep_embedding(timestep, self.time_freqs))
        e0 = self.time_projection(e).reshape(-1, 6, self.cfg.dim)
        context = self.text_embedding(text)
        ref = self.encode_reference(ref_motion, e0)
        route = use_text.to(x.dtype)[:, None, None]
        for block in self.blocks:
            x = block(x, e0, context, ref, route)
        shift, scale = (self.head_modulation + e[:, None]).chunk(2, dim=1)
        return self.head(modulate(self.norm_out(x), shift, scale))


def build(config: str, options: frozenset[str]) -> nn.Module:
    with torch.device("meta"):
        model = MotionGen(CONFIGS[config])
    return wan_init(model.to_empty(device="cpu")).eval()


def example_inputs(config: str, options: frozenset[str], seed: int) -> tuple[torch.Tensor, ...]:
    """Random features; ``use_text`` alternates 1, 0 over the batch, starting at ``seed``'s
    parity, so a batch of two (and any calibration set of several seeds) takes both branches."""
    cfg = CONFIGS[config]
    g = torch.Generator().manual_seed(seed)
    motion = torch.randn(cfg.batch, cfg.frames, MOTION_DIM, generator=g)
    timestep = timesteps(cfg.batch, seed, 1000.0, 0.0, g)  # the flow sampler's σ·1000, 1 → 0
    text = torch.randn(cfg.batch, cfg.text_len, cfg.text_dim, generator=g)
    ref_motion = torch.randn(cfg.batch, cfg.frames, REF_DIM, generator=g)
    use_text = ((torch.arange(cfg.batch) + seed) % 2 == 0).float()
    return motion, timestep, text, ref_motion, use_text


def dynamic(config: str, options: frozenset[str]) -> dict[str, dict[int, str]]:
    return {name: {0: "batch"} for name in ("motion", "timestep", "text", "ref_motion",
                                            "use_text")}


def describe(config: str, options: frozenset[str]) -> dict[str, Any]:
    cfg = CONFIGS[config]
    info = dataclasses.asdict(cfg)
    info.update(motion_dim=MOTION_DIM, ref_dim=REF_DIM, head_dim=cfg.head_dim,
                seq_len=cfg.frames, ref_tokens=cfg.frames, text_tokens=0)
    return info


SPEC = register(
    ModelSpec(
        name="motion-gen",
        description="motion DiT routing each sample to text or reference-motion "
                    "cross-attention (Wan blocks)",
        configs=tuple(CONFIGS),
        input_names=("motion", "timestep", "text", "ref_motion", "use_text"),
        output_names=("velocity",),
        builder=build,
        inputs=example_inputs,
        dynamic=dynamic,
        describe=describe,
        paper="ViMoGen (arXiv 2510.26794)",
        sampling={"kind": "flow", "samples": {"motion": "velocity"}, "timestep": "timestep",
                  "timestep_scale": 1000.0, "conditions": ["text", "ref_motion"],
                  "guidance": 5.0, "steps": 50, "shift": 5.0},
    )
)
