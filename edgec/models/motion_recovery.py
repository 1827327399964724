"""World-coordinate human motion recovery: GVHMR's temporal network as HumanMM runs it per shot.

Architecture facts: ../shared/research/model_families.md §5 (HumanMM, arXiv 2503.07597; code read
in zju3dv/GVHMR ``hmr4d/network/gvhmr/relative_transformer.py`` (``NetworkEncoderRoPE``) and
``network/base_arch/transformer/encoder_rope.py``, release config ``siga24_release.yaml``).

``forward(keypoints [B,L,17,3], image_features [B,L,F], cliff_cam [B,L,3], cam_angvel [B,L,6])
-> (pred_x [B,L,151], pred_cam [B,L,3], static_conf_logits [B,L,6])``

* keypoints: COCO-17 ViTPose keypoints (x, y, confidence), bbox-normalized. Each joint's (x, y)
  goes through one shared ``Linear(2→32)``; a joint with confidence ≤ 0.5 is replaced by its
  learned 32-d embedding (mask-multiply, as GVHMR); the 17×32 features → MLP(544 → 2D → D).
* Conditions, each embedded and added to the frame token: image features (LayerNorm + Linear; the
  HMR2.0 ViT token, 1024-d in GVHMR), the CLIFF camera (bbox center/scale over focal, 3 → D → D)
  and the camera angular velocity (6-d rotation delta, 6 → D → D).
* 12 pre-LN blocks (dim 512, 8 heads): 1D RoPE on q/k (interleaved pairs), learned residual gates
  on attention and MLP (4×, GELU-tanh).
* Banded attention when L > 120 [C]: frame i sees frames [i − 60, i + 60) shifted inside [0, L) so
  that every window holds 120 frames (GVHMR's ``max_len`` window). It is an ADDITIVE float mask
  (0 / −inf), a buffer, so a graph constant; L is static, only batch is dynamic.
* Outputs (GVHMR's names): ``pred_x`` 151-d per frame: [0:126] 21 body joints rot6D, [126:136]
  SMPL betas (averaged over the sequence: every frame carries the clip mean), [136:151] [I]
  gravity-view orientation 6 + camera orientation 6 + local translation velocity 3;
  ``pred_cam`` weak-perspective camera (s, tx, ty), de-normalized with GVHMR's statistics, s
  clamped at ≥ 0.25; ``static_conf_logits`` 6 static-contact logits (feet/hands, sigmoid later).
  The betas' sequence mean is the only path by which a frame sees past its window.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgec.models.registry import ModelSpec, register

__all__ = ["MotionRecoveryConfig", "MotionRecovery", "CONFIGS", "SPEC", "banded_mask",
           "window_bounds"]

JOINTS = 17  # COCO-17
OUTPUT_DIM = 151
BETAS = slice(126, 136)
PRED_CAM_MEAN = (1.0606, -0.0027, 0.2702)  # GVHMR's de-normalization statistics [C]
PRED_CAM_STD = (0.1784, 0.0956, 0.0764)


@dataclasses.dataclass(frozen=True)
class MotionRecoveryConfig:
    frames: int  # L, static
    dim: int
    heads: int
    depth: int
    image_dim: int
    window: int = 120  # GVHMR ``max_len`` [C]
    mlp_ratio: int = 4
    joint_dim: int = 32
    cliffcam_dim: int = 3
    cam_angvel_dim: int = 6
    static_conf_dim: int = 6
    batch: int = 1
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def banded(self) -> bool:
        return self.frames > self.window


CONFIGS: dict[str, MotionRecoveryConfig] = {
    # batch 1: the HTP emulator runs this graph for seconds per batch row
    "tiny": MotionRecoveryConfig(frames=240, dim=128, heads=4, depth=2, image_dim=256),
    # GVHMR-exact (12 × 512, 8 heads, HMR2.0's 1024-d image token); 1024 frames: the band keeps
    # 120 of 1024 keys per query (~12 %)
    "small": MotionRecoveryConfig(frames=1024, dim=512, heads=8, depth=12, image_dim=1024),
    # [I] GVHMR-exact over a long multi-shot clip (4096 frames ≈ 2.3 min at 30 fps); describe only
    "base": MotionRecoveryConfig(frames=4096, dim=512, heads=8, depth=12, image_dim=1024),
}


def window_bounds(frames: int, window: int) -> list[tuple[int, int]]:
    """[start, stop) of the keys each frame attends to, exactly as GVHMR builds its mask."""
    bounds = []
    for i in range(frames):
        lo, hi = max(0, i - window // 2), min(frames, i + window // 2)
        hi = max(window, hi)
        lo = min(frames - window, lo)
        bounds.append((lo, hi))
    return bounds


def banded_mask(frames: int, window: int) -> torch.Tensor:
    """Additive float mask [L, L]: 0 inside each frame's window, −inf outside."""
    mask = torch.full((frames, frames), float("-inf"))
    for i, (lo, hi) in enumerate(window_bounds(frames, window)):
        mask[i, lo:hi] = 0.0
    return mask


class Mlp(nn.Module):
    """timm's ``Mlp``: fc1 → GELU (exact unless ``tanh``) → fc2."""

    def __init__(self, dim: int, hidden: int, out: int, tanh: bool = False) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, out)
        self.approximate = "tanh" if tanh else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (2i, 2i+1) of the last axis (GVHMR's ``rotate_half``)."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class RoPEAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        b, n, d = x.shape
        q = self.query(x).reshape(b, n, self.heads, d // self.heads).transpose(1, 2)
        k = self.key(x).reshape(b, n, self.heads, d // self.heads).transpose(1, 2)
        v = self.value(x).reshape(b, n, self.heads, d // self.heads).transpose(1, 2)
        q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(o.transpose(1, 2).reshape(b, n, d))


class EncoderRoPEBlock(nn.Module):
    def __init__(self, cfg: MotionRecoveryConfig) -> None:
        super().__init__()
        d = cfg.dim
        self.norm1 = nn.LayerNorm(d, eps=1e-6)
        self.attn = RoPEAttention(d, cfg.heads)
        self.norm2 = nn.LayerNorm(d, eps=1e-6)
        self.mlp = Mlp(d, cfg.mlp_ratio * d, d, tanh=True)
        # zero-initialized in GVHMR (each block starts as the identity); not zero here, see _init
        self.gate_msa = nn.Parameter(torch.zeros(1, 1, d))
        self.gate_mlp = nn.Parameter(torch.zeros(1, 1, d))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.gate_msa * self.attn(self.norm1(x), cos, sin, mask)
        return x + self.gate_mlp * self.mlp(self.norm2(x))


class MotionRecovery(nn.Module):
    """GVHMR ``NetworkEncoderRoPE`` without the padding mask (every frame of the clip is valid)."""

    def __init__(self, cfg: MotionRecoveryConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.learned_pos_linear = nn.Linear(2, cfg.joint_dim)
        self.learned_pos_params = nn.Parameter(torch.zeros(JOINTS, cfg.joint_dim))
        self.embed_noisyobs = Mlp(JOINTS * cfg.joint_dim, 2 * d, d)
        self.cliffcam_embedder = nn.Sequential(
            nn.Linear(cfg.cliffcam_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.cam_angvel_embedder = nn.Sequential(
            nn.Linear(cfg.cam_angvel_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.imgseq_embedder = nn.Sequential(nn.LayerNorm(cfg.image_dim),
                                             nn.Linear(cfg.image_dim, d))
        self.blocks = nn.ModuleList(EncoderRoPEBlock(cfg) for _ in range(cfg.depth))
        self.final_layer = Mlp(d, d, OUTPUT_DIM)
        self.pred_cam_head = Mlp(d, d, 3)
        self.static_conf_head = Mlp(d, d, cfg.static_conf_dim)
        self.register_buffer("pred_cam_mean", torch.empty(3), persistent=False)
        self.register_buffer("pred_cam_std", torch.empty(3), persistent=False)
        half = cfg.head_dim // 2
        self.register_buffer("rope_cos", torch.empty(cfg.frames, half), persistent=False)
        self.register_buffer("rope_sin", torch.empty(cfg.frames, half), persistent=False)
        if cfg.banded:
            self.register_buffer("attn_mask", torch.empty(cfg.frames, cfg.frames),
                                 persistent=False)
        else:
            self.attn_mask = None
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """Fill the constant tables (again after ``to_empty``), in float64 then rounded once."""
        cfg = self.cfg
        self.pred_cam_mean.copy_(torch.tensor(PRED_CAM_MEAN))
        self.pred_cam_std.copy_(torch.tensor(PRED_CAM_STD))
        hd = cfg.head_dim
        inv = 1.0 / cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
        ang = torch.arange(cfg.frames, dtype=torch.float64)[:, None] * inv[None]
        self.rope_cos.copy_(ang.cos())
        self.rope_sin.copy_(ang.sin())
        if self.attn_mask is not None:
            self.attn_mask.copy_(banded_mask(cfg.frames, cfg.window))

    def forward(self, keypoints: torch.Tensor, image_features: torch.Tensor,
                cliff_cam: torch.Tensor, cam_angvel: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, n = keypoints.shape[:2]
        visible = (keypoints[..., 2:3] > 0.5).to(keypoints.dtype)  # [B, L, 17, 1]
        f_obs = self.learned_pos_linear(keypoints[..., :2] * visible)
        f_obs = f_obs * visible + self.learned_pos_params * (1.0 - visible)
        x = self.embed_noisyobs(f_obs.flatten(2))
        x = x + self.cliffcam_embedder(cliff_cam)
        x = x + self.cam_angvel_embedder(cam_angvel)
        x = x + self.imgseq_embedder(image_features)

        for block in self.blocks:
            x = block(x, self.rope_cos, self.rope_sin, self.attn_mask)

        sample = self.final_layer(x)
        betas = sample[..., BETAS].mean(1, keepdim=True).expand(b, n, BETAS.stop - BETAS.start)
        sample = torch.cat((sample[..., :BETAS.start], betas, sample[..., BETAS.stop:]), dim=-1)
        cam = self.pred_cam_head(x) * self.pred_cam_std + self.pred_cam_mean
        cam = torch.cat((cam[..., :1].clamp_min(0.25), cam[..., 1:]), dim=-1)
        return sample, cam, self.static_conf_head(x)


def _init(model: MotionRecovery, seed: int) -> MotionRecovery:
    """Deterministic init: weights N(0, 1/fan_in), biases N(0, 0.02²), LayerNorm (1, 0),
    learned joint embeddings N(0, 1).

    GVHMR zero-initializes the residual gates and the last layer of each condition embedder, so
    that an untrained network is the identity on its input token. With zeros here every block
    (and every condition) would be a no-op: the model would compute nothing worth compiling and
    quantization errors in the blocks would be invisible. So gates are U(0.25, 0.75) and the
    condition layers are ordinary (each block moves the residual stream by a good fraction).
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.reset_buffers()
        for name, p in model.named_parameters():
            if name.endswith(("gate_msa", "gate_mlp")):
                p.uniform_(0.25, 0.75, generator=g)
            elif name == "learned_pos_params":
                p.normal_(0.0, 1.0, generator=g)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.02, generator=g)
            else:
                p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()), generator=g)
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.fill_(1.0)
                m.bias.zero_()
    return model


# differs from the example/calibration input seeds (0, 1000+), so no weight row equals an input
WEIGHT_SEED = 7597


def build(config: str, options: frozenset[str]) -> nn.Module:
    with torch.device("meta"):
        model = MotionRecovery(CONFIGS[config])
    return _init(model.to_empty(device="cpu"), WEIGHT_SEED).eval()


def example_inputs(config: str, options: frozenset[str], seed: int) -> tuple[torch.Tensor, ...]:
    """Plausible detector outputs: bbox-normalized keypoints in about [-1, 1]; confidences either
    clearly visible (0.55–1, 85 %) or clearly not (0–0.45), so a quantized graph does not flip
    the 0.5 visibility test; ViT-like image features; small camera terms."""
    cfg = CONFIGS[config]
    g = torch.Generator().manual_seed(seed)
    shape = (cfg.batch, cfg.frames, JOINTS)
    xy = (torch.randn(*shape, 2, generator=g) * 0.5).clamp(-1.5, 1.5)
    visible = torch.rand(*shape, generator=g) < 0.85
    conf = torch.where(visible, 0.55 + 0.45 * torch.rand(*shape, generator=g),
                       0.45 * torch.rand(*shape, generator=g))
    keypoints = torch.cat((xy, conf[..., None]), dim=-1)
    image = torch.randn(cfg.batch, cfg.frames, cfg.image_dim, generator=g)
    cliff = torch.randn(cfg.batch, cfg.frames, cfg.cliffcam_dim, generator=g) * 0.3
    angvel = torch.randn(cfg.batch, cfg.frames, cfg.cam_angvel_dim, generator=g) * 0.1
    return keypoints, image, cliff, angvel


def dynamic(config: str, options: frozenset[str]) -> dict[str, dict[int, str]]:
    # L is static: the banded mask and the RoPE tables are graph constants
    return {n: {0: "batch"} for n in SPEC.input_names}


def describe(config: str, options: frozenset[str]) -> dict[str, Any]:
    cfg = CONFIGS[config]
    info = dataclasses.asdict(cfg)
    info.update(seq_len=cfg.frames, head_dim=cfg.head_dim, joints=JOINTS, output_dim=OUTPUT_DIM,
                mask="banded" if cfg.banded else "none", window=cfg.window,
                attended_fraction=min(1.0, cfg.window / cfg.frames))
    return info


SPEC = register(
    ModelSpec(
        name="motion-recovery",
        description="GVHMR temporal network (HumanMM per-shot motion recovery): 2D keypoints + "
                    "image features → SMPL params, RoPE, banded attention",
        configs=tuple(CONFIGS),
        input_names=("keypoints", "image_features", "cliff_cam", "cam_angvel"),
        output_names=("pred_x", "pred_cam", "static_conf_logits"),
        builder=build,
        inputs=example_inputs,
        dynamic=dynamic,
        describe=describe,
        paper="HumanMM / GVHMR (arXiv 2503.07597)",
        sampling=None,
    )
)
