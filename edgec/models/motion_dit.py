"""Dual-branch video + motion DiT (EchoMotion style): Wan blocks whose video and motion tokens share
one joint self-attention, with MVS-RoPE placing motion tokens on a diagonal beyond the video grid.

Every sequence length is static (fixed by the config); only the batch is dynamic. The Wan building
blocks here (``RMSNorm``, ``Attention``, ``feed_forward``, ``timestep_embedding``) are shared with
``motion_gen``.

Inputs: ``video`` [B, C, T, H, W] (latent), ``motion`` [B, F, 235] with F = 4(T−1)+1 motion
frames, ``timestep`` [B] (float, in [0, 1000)), ``text`` [B, L, text_dim]. Outputs: ``video_out``
(like ``video``) and ``motion_out`` (like ``motion``), the flow velocity of each modality.

Per-frame motion parameters (``MOTION_LAYOUT``, 235 values, in this order): SMPL shape β (10),
body pose θ as 6D rotations (24×6), global orientation γ (6D), root position v (3), joint
positions n (24×3). They become 51 tokens per frame, in the same order: 1 shape token (10-d),
25 rotation tokens (24 joints then γ, 6-d each), 25 position tokens (v then 24 joints, 3-d each),
each group through its own MLP. The sequence is [video tokens; motion tokens], frame by frame.

MVS-RoPE: video token (t, h, w) gets Wan's 3D RoPE; motion token i of motion frame f gets
R(f/4, H+i, W+i), H × W the video token grid. Angles are position × inverse frequency on float
positions (a table indexed by integer position cannot hold f/4).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgec.models.registry import ModelSpec, register, timesteps

__all__ = ["MotionDiT", "MotionDiTConfig", "CONFIGS", "SPEC", "MOTION_LAYOUT", "RMSNorm",
           "Attention", "apply_rope", "feed_forward", "modulate", "rope_tables",
           "timestep_embedding", "timestep_freqs", "wan_init"]

# (name, values per frame) in the order of the ``motion`` input's last axis
MOTION_LAYOUT: tuple[tuple[str, int], ...] = (
    ("shape", 10), ("pose", 24 * 6), ("global_orient", 6), ("root", 3), ("joints", 24 * 3))
MOTION_DIM = sum(n for _, n in MOTION_LAYOUT)  # 235
# token groups: (name, tokens per frame, values per token), consecutive slices of MOTION_LAYOUT
MOTION_GROUPS: tuple[tuple[str, int, int], ...] = (
    ("shape", 1, 10), ("rotation", 25, 6), ("position", 25, 3))
TOKENS_PER_FRAME = sum(n for _, n, _ in MOTION_GROUPS)  # 51


@dataclasses.dataclass(frozen=True)
class MotionDiTConfig:
    channels: int
    frames: int  # latent frames
    height: int  # latent height
    width: int
    text_len: int
    text_dim: int
    dim: int
    heads: int
    depth: int  # dual-modality blocks
    ffn_dim: int
    batch: int = 1
    patch: tuple[int, int, int] = (1, 2, 2)
    freq_dim: int = 256
    rope_theta: float = 10000.0
    temporal_ratio: int = 4  # motion frames per latent frame (the VAE's temporal stride)
    motion_time_scale: float = 0.25  # MVS-RoPE t/4 (the paper's appendix eq. 14 reads t: 1.0)
    eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def grid(self) -> tuple[int, int, int]:
        pt, ph, pw = self.patch
        return self.frames // pt, self.height // ph, self.width // pw

    @property
    def motion_frames(self) -> int:
        return self.temporal_ratio * (self.frames - 1) + 1

    @property
    def rope_dims(self) -> tuple[int, int, int]:
        """Wan's split of head_dim over (t, h, w): d − 4⌊d/6⌋, 2⌊d/6⌋, 2⌊d/6⌋."""
        d = self.head_dim
        return d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6)


CONFIGS: dict[str, MotionDiTConfig] = {
    # 2 latent frames (5 motion frames): 2×2×2 = 8 video + 5×51 = 255 motion tokens; batch 2,
    # as torch.export pins a dim whose example size is 1 (the batch would not stay dynamic)
    "tiny": MotionDiTConfig(channels=4, frames=2, height=4, width=4, text_len=16, text_dim=64,
                            dim=128, heads=4, depth=2, ffn_dim=512, batch=2),
    # 33 video frames: 9×15×26 = 3510 video + 33×51 = 1683 motion tokens
    "small": MotionDiTConfig(channels=16, frames=9, height=30, width=52, text_len=64,
                             text_dim=512, dim=512, heads=8, depth=4, ffn_dim=2048),
    # Wan2.1-T2V-1.3B dims, 81 frames at 480×832: 21×30×52 = 32760 video + 81×51 = 4131 motion
    "base": MotionDiTConfig(channels=16, frames=21, height=60, width=104, text_len=512,
                            text_dim=4096, dim=1536, heads=12, depth=30, ffn_dim=8960),
}


# --- Wan building blocks -------------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, N, D] → [B, heads, N, D/heads]."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    """[B, heads, N, hd] → [B, N, heads·hd]."""
    return x.transpose(1, 2).flatten(2)


def rope_tables(angles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(cos, signed sin, pair swap) for ``apply_rope`` from angles [N, head_dim/2]: cos and sin
    repeated per pair, sin negated on even channels, the permutation 1, 0, 3, 2, ..."""
    cos, sin = angles.cos(), angles.sin()
    swap = torch.arange(2 * angles.shape[-1]).reshape(-1, 2).flip(-1).flatten()
    return (torch.stack((cos, cos), dim=-1).flatten(-2),
            torch.stack((-sin, sin), dim=-1).flatten(-2), swap)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               swap: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (2i, 2i+1) of the last axis by their angle (Wan's complex view):
    (x₁cos − x₂sin, x₁sin + x₂cos), as x·cos + x[swap]·(∓sin), four ops in the graph."""
    return x * cos + torch.index_select(x, -1, swap) * sin


class Attention(nn.Module):
    """Wan attention: q/k/v/o projections, RMSNorm on q and k over the full dim (qk-norm)."""

    def __init__(self, dim: int, heads: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-head q, k, v [B, heads, N, hd] of ``x`` (self-attention; RoPE not applied)."""
        return (_heads(self.norm_q(self.q(x)), self.heads),
                _heads(self.norm_k(self.k(x)), self.heads), _heads(self.v(x), self.heads))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Cross-attention of ``x`` to ``context`` (Wan's T2V cross-attention; no RoPE)."""
        q = _heads(self.norm_q(self.q(x)), self.heads)
        k = _heads(self.norm_k(self.k(context)), self.heads)
        v = _heads(self.v(context), self.heads)
        return self.o(_merge(F.scaled_dot_product_attention(q, k, v)))


def feed_forward(dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"),
                         nn.Linear(hidden, dim))


def timestep_freqs(freq_dim: int) -> torch.Tensor:
    """Wan's sinusoid frequencies 10000^(−i/half), computed in float64 and rounded once."""
    half = freq_dim // 2
    return torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half).float()


def timestep_embedding(t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Wan's ``sinusoidal_embedding_1d``: [cos(t·f), sin(t·f)] of a float timestep [B]."""
    args = t[:, None].float() * freqs[None]
    return torch.cat((torch.cos(args), torch.sin(args)), dim=-1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


# --- the dual-modality model ---------------------------------------------------------------------

class Branch(nn.Module):
    """One modality's weights in a dual block: QKV/O, text cross-attention, FFN, AdaLN table."""

    def __init__(self, cfg: MotionDiTConfig) -> None:
        super().__init__()
        d = cfg.dim
        self.self_attn = Attention(d, cfg.heads, cfg.eps)
        self.norm3 = nn.LayerNorm(d, eps=cfg.eps)  # Wan's cross_attn_norm: affine
        self.cross_attn = Attention(d, cfg.heads, cfg.eps)
        self.ffn = feed_forward(d, cfg.ffn_dim)
        self.modulation = nn.Parameter(torch.zeros(1, 6, d))


class DualBlock(nn.Module):
    """Wan block with two weight sets and one joint self-attention over [video; motion]."""

    def __init__(self, cfg: MotionDiTConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, elementwise_affine=False, eps=cfg.eps)
        self.norm2 = nn.LayerNorm(cfg.dim, elementwise_affine=False, eps=cfg.eps)
        self.video = Branch(cfg)
        self.motion = Branch(cfg)

    def forward(self, xs: list[torch.Tensor], e0: torch.Tensor, context: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> list[torch.Tensor]:
        branches = (self.video, self.motion)
        mods = [(br.modulation + e0).chunk(6, dim=1) for br in branches]  # 6 × [B, 1, D]
        qkv = [br.self_attn.qkv(modulate(self.norm1(x), e[0], e[1]))
               for br, x, e in zip(branches, xs, mods)]
        q, k, v = (torch.cat(parts, dim=2) for parts in zip(*qkv))
        attn = _merge(F.scaled_dot_product_attention(apply_rope(q, *rope), apply_rope(k, *rope), v))
        n_video = xs[0].shape[1]
        outs = []
        for br, x, e, y in zip(branches, xs, mods, (attn[:, :n_video], attn[:, n_video:])):
            x = x + br.self_attn.o(y) * e[2]
            x = x + br.cross_attn(br.norm3(x), context)
            x = x + br.ffn(modulate(self.norm2(x), e[3], e[4])) * e[5]
            outs.append(x)
        return outs


def _mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.GELU(approximate="tanh"),
                         nn.Linear(d_hidden, d_out))


class MotionDiT(nn.Module):
    """forward(video [B,C,T,H,W], motion [B,F,235], timestep [B], text [B,L,text_dim])
    -> (video_out [B,C,T,H,W], motion_out [B,F,235])."""

    def __init__(self, cfg: MotionDiTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.channels, d, kernel_size=cfg.patch, stride=cfg.patch)
        self.motion_embedding = nn.ModuleDict(
            {name: _mlp(k, d, d) for name, _, k in MOTION_GROUPS})
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, d),
                                            nn.GELU(approximate="tanh"), nn.Linear(d, d))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, d), nn.SiLU(),
                                            nn.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.blocks = nn.ModuleList(DualBlock(cfg) for _ in range(cfg.depth))
        self.norm_out = nn.LayerNorm(d, elementwise_affine=False, eps=cfg.eps)
        self.video_modulation = nn.Parameter(torch.zeros(1, 2, d))
        self.video_head = nn.Linear(d, math.prod(cfg.patch) * cfg.channels)
        self.motion_modulation = nn.Parameter(torch.zeros(1, 2, d))
        self.motion_head = nn.ModuleDict({name: _mlp(d, d, k) for name, _, k in MOTION_GROUPS})
        self.register_buffer("time_freqs", torch.empty(cfg.freq_dim // 2), persistent=False)
        self.register_buffer("rope_freqs", torch.empty(cfg.head_dim // 2), persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """Fill the frequency tables (again after ``to_empty``).

        Buffers, not recomputed in ``forward``, so PyTorch and the exported graph multiply by the
        very same float32 values (a 1-ulp difference times a timestep near 1000 costs ~1e-5).
        """
        self.time_freqs.copy_(timestep_freqs(self.cfg.freq_dim))
        inv = [1.0 / self.cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
               for d in self.cfg.rope_dims]
        self.rope_freqs.copy_(torch.cat(inv))

    def positions(self, grid: tuple[int, int, int], motion_frames: int) -> torch.Tensor:
        """MVS-RoPE positions [video + motion tokens, 3] (t, h, w) as float32: the video grid,
        then motion token i of frame f at (f·motion_time_scale, H+i, W+i)."""
        nt, nh, nw = grid
        t, h, w = torch.meshgrid(torch.arange(nt), torch.arange(nh), torch.arange(nw),
                                 indexing="ij")
        video = torch.stack((t, h, w), dim=-1).reshape(-1, 3).float()
        f = torch.arange(motion_frames, dtype=torch.float32)[:, None].expand(-1, TOKENS_PER_FRAME)
        i = torch.arange(TOKENS_PER_FRAME, dtype=torch.float32)[None].expand(motion_frames, -1)
        motion = torch.stack((f * self.cfg.motion_time_scale, nh + i, nw + i), dim=-1)
        return torch.cat((video, motion.reshape(-1, 3)))

    def rope_angles(self, positions: torch.Tensor) -> torch.Tensor:
        """[N, head_dim/2] angles: each axis's positions times its inverse frequencies."""
        angles, start = [], 0
        for axis, d in enumerate(self.cfg.rope_dims):
            inv, start = self.rope_freqs[start : start + d // 2], start + d // 2
            angles.append(positions[:, axis : axis + 1] * inv[None])
        return torch.cat(angles, dim=-1)

    def _embed_motion(self, motion: torch.Tensor) -> torch.Tensor:
        tokens, start = [], 0
        for name, n, k in MOTION_GROUPS:
            part = motion[:, :, start : start + n * k].unflatten(-1, (n, k))
            tokens.append(self.motion_embedding[name](part))
            start += n * k
        return torch.cat(tokens, dim=2).flatten(1, 2)  # [B, F·51, D], frame by frame

    def _unembed_motion(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        x = x.unflatten(1, (frames, TOKENS_PER_FRAME))
        out, start = [], 0
        for name, n, _ in MOTION_GROUPS:
            out.append(self.motion_head[name](x[:, :, start : start + n]).flatten(2))
            start += n
        return torch.cat(out, dim=-1)

    def forward(self, video: torch.Tensor, motion: torch.Tensor, timestep: torch.Tensor,
                text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pt, ph, pw = self.cfg.patch
        frames = motion.shape[1]
        xv = self.patch_embedding(video)  # [B, D, T', H', W']
        grid = (xv.shape[2], xv.shape[3], xv.shape[4])
        xv = xv.flatten(2).transpose(1, 2)
        xm = self._embed_motion(motion)
        e = self.time_embedding(timestep_embedding(timestep, self.time_freqs))
        e0 = self.time_projection(e).reshape(-1, 6, self.cfg.dim)
        context = self.text_embedding(text)
        rope = rope_tables(self.rope_angles(self.positions(grid, frames)))
        xs = [xv, xm]
        for block in self.blocks:
            xs = block(xs, e0, context, rope)
        outs = []
        for table, x in zip((self.video_modulation, self.motion_modulation), xs):
            shift, scale = (table + e[:, None]).chunk(2, dim=1)
            outs.append(modulate(self.norm_out(x), shift, scale))
        xv = self.video_head(outs[0]).unflatten(1, grid).unflatten(-1, (pt, ph, pw, -1))
        xv = xv.permute(0, 7, 1, 4, 2, 5, 3, 6)  # [B, C, T', pt, H', ph, W', pw]
        xv = xv.flatten(6, 7).flatten(4, 5).flatten(2, 3)
        return xv, self._unembed_motion(outs[1], frames)


def wan_init(model: nn.Module, seed: int = 0) -> nn.Module:
    """Deterministic init: weights N(0, 1/fan_in), small biases, norm weights 1 + N(0, 0.1²),
    AdaLN (time projection gain 2, tables N(0, 1/D) as Wan's) non-zero.

    Wan zero-initializes its output head (``head.head.weight``); here nothing is zero, or the
    model would output a constant and no block would be visible at the output.
    The AdaLN gates (std ≈ 0.5) let each block move the residual stream by a large fraction.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if hasattr(model, "reset_buffers"):
            model.reset_buffers()
        for name, p in model.named_parameters():
            if name.endswith("modulation"):
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[-1]), generator=g)
            elif p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.normal_(1.0, 0.1, generator=g)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.02, generator=g)
            else:
                gain = 2.0 if "time_projection" in name else 1.0
                p.normal_(0.0, gain / math.sqrt(p[0].numel()), generator=g)
    return model


def build(config: str, options: frozenset[str]) -> nn.Module:
    with torch.device("meta"):
        model = MotionDiT(CONFIGS[config])
    return wan_init(model.to_empty(device="cpu")).eval()


def example_inputs(config: str, options: frozenset[str], seed: int) -> tuple[torch.Tensor, ...]:
    cfg = CONFIGS[config]
    g = torch.Generator().manual_seed(seed)
    video = torch.randn(cfg.batch, cfg.channels, cfg.frames, cfg.height, cfg.width, generator=g)
    motion = torch.randn(cfg.batch, cfg.motion_frames, MOTION_DIM, generator=g)
    timestep = timesteps(cfg.batch, seed, 1000.0, 0.0, g)  # the flow sampler's σ·1000, 1 → 0
    text = torch.randn(cfg.batch, cfg.text_len, cfg.text_dim, generator=g)
    return video, motion, timestep, text


def dynamic(config: str, options: frozenset[str]) -> dict[str, dict[int, str]]:
    return {name: {0: "batch"} for name in ("video", "motion", "timestep", "text")}


def describe(config: str, options: frozenset[str]) -> dict[str, Any]:
    cfg = CONFIGS[config]
    info = dataclasses.asdict(cfg)
    video_tokens = math.prod(cfg.grid)
    motion_tokens = cfg.motion_frames * TOKENS_PER_FRAME
    info.update(
        grid=cfg.grid, text_tokens=0, video_tokens=video_tokens, motion_tokens=motion_tokens,
        seq_len=video_tokens + motion_tokens, motion_frames=cfg.motion_frames,
        motion_dim=MOTION_DIM, motion_tokens_per_frame=TOKENS_PER_FRAME, head_dim=cfg.head_dim,
        rope_dims=cfg.rope_dims,
    )
    return info


SPEC = register(
    ModelSpec(
        name="motion-dit",
        description="dual-branch video+motion DiT (Wan blocks, joint video/motion attention, "
                    "MVS-RoPE)",
        configs=tuple(CONFIGS),
        input_names=("video", "motion", "timestep", "text"),
        output_names=("video_out", "motion_out"),
        builder=build,
        inputs=example_inputs,
        dynamic=dynamic,
        describe=describe,
        paper="EchoMotion (arXiv 2512.18814)",
        sampling={"kind": "flow", "samples": {"video": "video_out", "motion": "motion_out"},
                  "timestep": "timestep", "timestep_scale": 1000.0, "conditions": ["text"],
                  "guidance": 6.0, "steps": 50, "shift": 8.0},
    )
)
