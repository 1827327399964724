"""ReactDance-style reactive dance generation: an EDGE-like x0 denoiser over residual-FSQ latents
with Blockwise Local Context (block-diagonal attention, positions restarted per block), and the
conv decoder that turns its latents into poses.

Architecture facts: ../shared/research/model_families.md §3 (ReactDance, arXiv 2505.05589; EDGE's
``DanceDecoder``, Stanford-TML/EDGE ``model/model.py``). Tags: [C] code, [P] paper, [I] inferred.

Denoiser ``reactive-dance``: ``forward(latent [B,N,3S], timestep [B], leader [B,N,leader_dim],
music [B,4N,54]) -> x0 [B,N,3S]``.

* Latent [P+C]: three streams (up, down, tr), each S = groups × levels × width values per token,
  stream-major, the residual levels concatenated inside a stream: ``[up: level 0 (groups×width) |
  level 1 | …][down: …][tr: …]``. N = blocks × 60 tokens (one token = 4 frames at 30 fps).
* Blockwise Local Context [P+C]: every block of 60 tokens is denoised independently in the same
  pass: self-attention, the leader encoder's attention and the cross-attention to the leader all
  use one BLOCK-DIAGONAL BOOLEAN mask (a block sees only itself, bidirectionally, as the official
  ``attn_mask_type=interval``), and the sinusoidal positional encoding restarts at 0 in every
  block (phase reset). Cross-attention is block-diagonal too [I]: a block was trained as one
  240-frame window, so its leader context is the same window.
* Conditioning [P/C, EDGE]: leader pose tokens (at the latent rate) → Linear + block PE → 2-layer
  pre-LN encoder (EDGE's ``cond_encoder``; that it encodes the leader is [I]) → LayerNorm →
  cross-attention memory. Music features (54-d per frame) → 4 frames stacked per token → Linear →
  mean-pooled per 60-token block → EDGE's ``non_attn_cond_projection`` → added to the timestep
  embedding → per-block DenseFiLM on all three sublayers (self-attn, cross-attn, FFN). EDGE's two
  extra "time tokens" in the memory are left out [I].
* Pre-LN FiLM decoder layers, GELU FFN; the sequence length is static (the masks and position
  tables are buffers, compile-time constants in the exported graph); only batch is dynamic.

Decoder ``reactive-dance-decoder``: ``forward(latent [B,N,3S]) -> poses [B,4N,pose_dim]``: per
stream the residual levels are summed [C], then a small T2M-GPT-style 1D-conv decoder (ResBlocks,
two nearest ×2 upsamplings) produces that stream's per-frame features [I: widths], concatenated
as ``[up | down | tr]``. Its convs run over the whole sequence, which is what smooths the seams
between blocks [P].
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgec.models.registry import ModelSpec, register, timesteps

__all__ = ["ReactDanceConfig", "ReactiveDance", "ReactDanceDecoder", "CONFIGS", "SPEC",
           "DECODER_SPEC", "block_diagonal_mask", "block_positions"]


@dataclasses.dataclass(frozen=True)
class ReactDanceConfig:
    groups: int  # FSQ groups per stream [C: 8]
    levels: int  # residual FSQ levels R [C/P: 2]
    width: int  # values per group and level after project_out [U]
    blocks: int  # BLC blocks of ``block_tokens`` latent tokens
    dim: int
    heads: int
    depth: int
    ff: int
    dec_width: int  # conv decoder channels [I]
    stream_dims: tuple[int, int, int] = (36, 36, 3)  # up, down, tr features per frame [I]
    leader_dim: int = 72  # leader local pose per latent token (24 joints × 3) [I]
    music_dim: int = 54  # DD100 / Duolando music features per frame [C]
    block_tokens: int = 60  # 240 frames [P]
    downsample: int = 4  # frames per latent token [P]
    cond_depth: int = 2  # leader encoder layers (EDGE) [C]
    batch: int = 1

    @property
    def stream_latent(self) -> int:
        """S: values per stream and token (levels concatenated)."""
        return self.groups * self.levels * self.width

    @property
    def latent_dim(self) -> int:
        return 3 * self.stream_latent

    @property
    def seq_len(self) -> int:
        return self.blocks * self.block_tokens

    @property
    def frames(self) -> int:
        return self.seq_len * self.downsample

    @property
    def pose_dim(self) -> int:
        return sum(self.stream_dims)

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


CONFIGS: dict[str, ReactDanceConfig] = {
    # the note's suggested test size: 3 × 64 latents per token, 2 blocks × 60 tokens
    # (one leader-encoder layer instead of EDGE's two: a smaller graph to export in tests)
    "tiny": ReactDanceConfig(groups=8, levels=2, width=4, blocks=2, dim=128, heads=4, depth=2,
                             ff=256, dec_width=64, cond_depth=1, batch=2),
    # EDGE's dims (512 / ff 1024 / 8 layers / 8 heads), 768-d latents, 9 blocks = 2160 frames
    # (about DD100's average test sequence, 2066 frames)
    "small": ReactDanceConfig(groups=8, levels=2, width=16, blocks=9, dim=512, heads=8, depth=8,
                              ff=1024, dec_width=512),
    # [I] a scaled-up denoiser over a 4320-frame sequence (describe only; never built in tests)
    "base": ReactDanceConfig(groups=8, levels=2, width=16, blocks=18, dim=768, heads=12,
                             depth=12, ff=1536, dec_width=512),
}


def block_positions(cfg: ReactDanceConfig) -> torch.Tensor:
    """Position of each token inside its block: 0..59, 0..59, … (int64 [N])."""
    return torch.arange(cfg.seq_len) % cfg.block_tokens


def block_diagonal_mask(cfg: ReactDanceConfig) -> torch.Tensor:
    """bool [N, N], True where query i may attend to key j (same 60-token block)."""
    block = torch.arange(cfg.seq_len) // cfg.block_tokens
    return block[:, None] == block[None, :]


def _sinusoidal_table(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """The standard (Vaswani) positional encoding of ``positions`` [N]: sin on even, cos on odd."""
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64) * (-math.log(10000.0) / dim))
    ang = positions.to(torch.float64)[:, None] * div[None]
    table = torch.zeros(len(positions), dim, dtype=torch.float64)
    table[:, 0::2], table[:, 1::2] = ang.sin(), ang.cos()
    return table.float()


def _mish(x: torch.Tensor) -> torch.Tensor:
    # = nn.Mish (EDGE's activation), written out as it was before qnn-legalize learned to
    # rewrite the ONNX Mish op (the HTP has no kernel for it); the same function everywhere.
    return x * torch.tanh(F.softplus(x))


class Attention(nn.Module):
    """Multi-head attention with separate q/k/v projections and a mask (``[B,H,N,d]`` SDPA)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        m = memory.shape[1]
        q = self.q(x).reshape(b, n, self.heads, d // self.heads).transpose(1, 2)
        k = self.k(memory).reshape(b, m, self.heads, d // self.heads).transpose(1, 2)
        v = self.v(memory).reshape(b, m, self.heads, d // self.heads).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(o.transpose(1, 2).reshape(b, n, d))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class EncoderLayer(nn.Module):
    """EDGE's pre-LN ``TransformerEncoderLayer`` (block-diagonal self-attention, GELU FFN)."""

    def __init__(self, cfg: ReactDanceConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim)
        self.attn = Attention(cfg.dim, cfg.heads)
        self.norm2 = nn.LayerNorm(cfg.dim)
        self.ffn = FeedForward(cfg.dim, cfg.ff)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, mask)
        return x + self.ffn(self.norm2(x))


def _film(h: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """(1 + scale_b)·h + shift_b for every token of block b; h [B,N,D], scale/shift [B,nb,D]."""
    blocks = scale.shape[1]
    hb = h.unflatten(1, (blocks, -1))  # [B, nb, 60, D]
    return (hb * (1 + scale[:, :, None]) + shift[:, :, None]).flatten(1, 2)


class FiLMDecoderLayer(nn.Module):
    """EDGE's ``FiLMTransformerDecoderLayer`` (pre-LN): self-attn, cross-attn, FFN, each FiLMed.

    EDGE's three DenseFiLMs (Mish → Linear(D, 2D) each, on the same conditioning) are one
    Linear(D, 6D) here, fed Mish(c) computed once: the same function with fewer graph nodes.
    """

    def __init__(self, cfg: ReactDanceConfig) -> None:
        super().__init__()
        d = cfg.dim
        self.norm1 = nn.LayerNorm(d)
        self.self_attn = Attention(d, cfg.heads)
        self.norm2 = nn.LayerNorm(d)
        self.cross_attn = Attention(d, cfg.heads)
        self.norm3 = nn.LayerNorm(d)
        self.ffn = FeedForward(d, cfg.ff)
        self.film = nn.Linear(d, 6 * d)  # (scale, shift) for each of the 3 sublayers

    def forward(self, x: torch.Tensor, memory: torch.Tensor, c_act: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        """``c_act``: Mish of the per-block conditioning, [B, blocks, D]."""
        s1, b1, s2, b2, s3, b3 = self.film(c_act).chunk(6, dim=-1)
        h = self.norm1(x)
        x = x + _film(self.self_attn(h, h, mask), s1, b1)
        x = x + _film(self.cross_attn(self.norm2(x), memory, mask), s2, b2)
        return x + _film(self.ffn(self.norm3(x)), s3, b3)


class ReactiveDance(nn.Module):
    """forward(latent [B,N,3S], timestep [B], leader [B,N,leader_dim], music [B,4N,music_dim])
    -> x0 [B,N,3S]."""

    def __init__(self, cfg: ReactDanceConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.input_projection = nn.Linear(cfg.latent_dim, d)
        self.leader_projection = nn.Linear(cfg.leader_dim, d)
        self.cond_encoder = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.cond_depth))
        self.norm_cond = nn.LayerNorm(d)
        self.music_projection = nn.Linear(cfg.downsample * cfg.music_dim, d)
        self.non_attn_cond_projection = nn.Sequential(
            nn.LayerNorm(d), nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.time_fc1 = nn.Linear(d, 4 * d)
        self.to_time_cond = nn.Linear(4 * d, d)
        self.layers = nn.ModuleList(FiLMDecoderLayer(cfg) for _ in range(cfg.depth))
        self.final_layer = nn.Linear(d, cfg.latent_dim)
        self.register_buffer("time_freqs", torch.empty(d // 2), persistent=False)
        self.register_buffer("pos_embed", torch.empty(cfg.seq_len, d), persistent=False)
        self.register_buffer("block_mask", torch.empty(cfg.seq_len, cfg.seq_len, dtype=torch.bool),
                             persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """Fill the tables (again after ``to_empty``); buffers, so PyTorch and the exported graph
        use the same float32 values and the masks are graph constants."""
        half = self.cfg.dim // 2  # EDGE's SinusoidalPosEmb: exp(-i·ln(1e4)/(half-1))
        self.time_freqs.copy_(torch.exp(torch.arange(half, dtype=torch.float64)
                                        * (-math.log(10000.0) / (half - 1))))
        self.pos_embed.copy_(_sinusoidal_table(block_positions(self.cfg), self.cfg.dim))
        self.block_mask.copy_(block_diagonal_mask(self.cfg))

    def forward(self, latent: torch.Tensor, timestep: torch.Tensor, leader: torch.Tensor,
                music: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        mask = self.block_mask
        # The table is expanded over the batch explicitly (the exporter folds it to a full-size
        # constant). Written before qnn-legalize tiled such batch broadcasts itself: the HTP at
        # 16 bits miscomputes an Add broadcast over the batch that feeds a LayerNormalization.
        pos = self.pos_embed.expand(latent.shape[0], -1, -1)
        x = self.input_projection(latent) + pos
        memory = self.leader_projection(leader) + pos
        for layer in self.cond_encoder:
            memory = layer(memory, mask)
        memory = self.norm_cond(memory)

        args = timestep[:, None].float() * self.time_freqs[None]
        t_hidden = _mish(self.time_fc1(torch.cat((args.sin(), args.cos()), dim=-1)))
        t = self.to_time_cond(t_hidden)  # [B, D]
        tokens = music.unflatten(1, (cfg.seq_len, cfg.downsample)).flatten(2)  # 4 frames/token
        pooled = self.music_projection(tokens).unflatten(1, (cfg.blocks, -1)).mean(2)
        c = t[:, None] + self.non_attn_cond_projection(pooled)  # [B, blocks, D]

        c_act = _mish(c)
        for layer in self.layers:
            x = layer(x, memory, c_act, mask)
        return self.final_layer(x)


class ResBlock1D(nn.Module):
    """T2M-GPT's ``ResConv1DBlock``: x + Conv1x1(ReLU(Conv3,dilated(ReLU(x))))."""

    def __init__(self, width: int, dilation: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(width, width, 3, padding=dilation, dilation=dilation)
        self.conv2 = nn.Conv1d(width, width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class StreamDecoder(nn.Module):
    """One stream's conv decoder: [B, groups·width, N] → [B, features, 4N]."""

    def __init__(self, cfg: ReactDanceConfig, out_dim: int) -> None:
        super().__init__()
        w = cfg.dec_width
        self.conv_in = nn.Conv1d(cfg.groups * cfg.width, w, 3, padding=1)
        self.res = nn.ModuleList(ResBlock1D(w, dilation) for dilation in (3, 1))
        self.up_convs = nn.ModuleList(nn.Conv1d(w, w, 3, padding=1) for _ in range(2))
        self.conv_mid = nn.Conv1d(w, w, 3, padding=1)
        self.conv_out = nn.Conv1d(w, out_dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv_in(x))
        for res, conv in zip(self.res, self.up_convs):  # 2 × (×2 upsampling) = 4× frames
            h = conv(F.interpolate(res(h), scale_factor=2.0, mode="nearest"))
        return self.conv_out(F.relu(self.conv_mid(h)))


class ReactDanceDecoder(nn.Module):
    """forward(latent [B,N,3S]) -> poses [B,4N,pose_dim]: sum the residual levels per stream,
    decode each stream (``[up | down | tr]`` features per frame)."""

    def __init__(self, cfg: ReactDanceConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.streams = nn.ModuleList(StreamDecoder(cfg, d) for d in cfg.stream_dims)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        # [B, N, 3, levels, groups·width] → levels summed → [B, 3, groups·width, N]
        z = latent.unflatten(2, (3, cfg.levels, cfg.groups * cfg.width)).sum(3)
        z = z.permute(0, 2, 3, 1)
        poses = torch.cat([dec(z[:, s]) for s, dec in enumerate(self.streams)], dim=1)
        return poses.transpose(1, 2)


def _init(model: nn.Module, seed: int) -> nn.Module:
    """Deterministic init: weights N(0, 1/fan_in) (FiLM: half that), biases N(0, 0.02²),
    LayerNorm (1, 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if hasattr(model, "reset_buffers"):
            model.reset_buffers()
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.02, generator=g)
            else:
                gain = 0.5 if ".film" in name else 1.0  # FiLM scale/shift std ≈ 0.5
                p.normal_(0.0, gain / math.sqrt(p[0].numel()), generator=g)
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.fill_(1.0)
                m.bias.zero_()
    return model


# Weight seeds differ from the example/calibration input seeds (0, 1000+): drawn from the same
# stream, input_projection's first row would equal the first example token (a 17σ activation).
WEIGHT_SEED, DECODER_SEED = 5589, 5590


def build(config: str, options: frozenset[str]) -> nn.Module:
    with torch.device("meta"):
        model = ReactiveDance(CONFIGS[config])
    return _init(model.to_empty(device="cpu"), WEIGHT_SEED).eval()


def build_decoder(config: str, options: frozenset[str]) -> nn.Module:
    with torch.device("meta"):
        model = ReactDanceDecoder(CONFIGS[config])
    return _init(model.to_empty(device="cpu"), DECODER_SEED).eval()


def example_inputs(config: str, options: frozenset[str], seed: int) -> tuple[torch.Tensor, ...]:
    cfg = CONFIGS[config]
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(cfg.batch, cfg.seq_len, cfg.latent_dim, generator=g)
    timestep = timesteps(cfg.batch, seed, 999.0, 0.0, g)  # DDIM's train steps, 999 → 0
    leader = torch.randn(cfg.batch, cfg.seq_len, cfg.leader_dim, generator=g)
    music = torch.randn(cfg.batch, cfg.frames, cfg.music_dim, generator=g)
    return latent, timestep, leader, music


def decoder_inputs(config: str, options: frozenset[str], seed: int) -> tuple[torch.Tensor, ...]:
    cfg = CONFIGS[config]
    g = torch.Generator().manual_seed(seed)
    # clean latents: each residual level is quantized to [-1, 1], later levels finer
    scale = torch.tensor([0.5 ** r for r in range(cfg.levels)]).repeat_interleave(
        cfg.groups * cfg.width).repeat(3)
    latent = (torch.rand(cfg.batch, cfg.seq_len, cfg.latent_dim, generator=g) * 2 - 1) * scale
    return (latent,)


def dynamic(config: str, options: frozenset[str]) -> dict[str, dict[int, str]]:
    # sequence lengths are static: the block mask and position tables are graph constants
    return {"latent": {0: "batch"}, "timestep": {0: "batch"}, "leader": {0: "batch"},
            "music": {0: "batch"}}


def decoder_dynamic(config: str, options: frozenset[str]) -> dict[str, dict[int, str]]:
    return {"latent": {0: "batch"}}


def describe(config: str, options: frozenset[str]) -> dict[str, Any]:
    cfg = CONFIGS[config]
    info = dataclasses.asdict(cfg)
    info.update(stream_latent=cfg.stream_latent, latent_dim=cfg.latent_dim, seq_len=cfg.seq_len,
                frames=cfg.frames, pose_dim=cfg.pose_dim, head_dim=cfg.head_dim,
                mask="block-diagonal", mask_block=cfg.block_tokens,
                positions="sinusoidal, restarted per block")
    return info


_PAPER = "ReactDance (arXiv 2505.05589)"

SPEC = register(
    ModelSpec(
        name="reactive-dance",
        description="reactive dance x0 denoiser over residual-FSQ latents (EDGE-like, FiLM, "
                    "block-diagonal attention)",
        configs=tuple(CONFIGS),
        input_names=("latent", "timestep", "leader", "music"),
        output_names=("x0",),
        builder=build,
        inputs=example_inputs,
        dynamic=dynamic,
        describe=describe,
        paper=_PAPER,
        sampling={"kind": "ddim-x0", "samples": {"latent": "x0"}, "timestep": "timestep",
                  "timestep_scale": 1.0, "train_steps": 1000, "schedule": "cosine",
                  # LDCFG's default s = 1.2 mixes (1 + s)·cond − s·uncond, which is
                  # uncond + 2.2·(cond − uncond) in the diffusers form the sampler takes (1.2
                  # there was s = 0.2; the official code's guided_forward returns cond alone)
                  "conditions": ["leader", "music"], "guidance": 2.2, "steps": 50},
    )
)

DECODER_SPEC = register(
    ModelSpec(
        name="reactive-dance-decoder",
        description="ReactDance latent decoder: residual levels summed per stream, 1D convs, "
                    "4x upsampled to poses",
        configs=tuple(CONFIGS),
        input_names=("latent",),
        output_names=("poses",),
        builder=build_decoder,
        inputs=decoder_inputs,
        dynamic=decoder_dynamic,
        describe=describe,
        paper=_PAPER,
    )
)
