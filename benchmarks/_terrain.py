"""A real trained diffusion model that installs offline: Adaptive Diffusion Terrain's denoiser.

The PyPI package ``adaptive-terrain-diffusion`` (0.4.2, MIT) ships its trained network as one
ONNX file, ``terrain_consistency_unet_difficulty100.onnx``: a 10.5M-parameter UNet (32 base
channels, GroupNorm, attention blocks, skip concatenations) distilled into a one-step consistency
model over Karras/EDM noise levels (σ from 0.002 to 80), conditioned on a terrain difficulty.
Inputs ``noisy`` [B, 1, 128, 128], ``sigma`` [B], ``difficulty`` [B] (difficulty d in 1..100 as
(d − 1) / 99); output ``denoised`` (the heightfield in model space, [−1, 1]). Its package
depends on ``onnxruntime-gpu``, which would shadow ``onnxruntime``, so only its wheel is fetched
(``_wheel_file``).

Its package uses it in two ways, and the data here follow them:
- ``generation``: a new terrain in one step from pure noise at σ = 80 (``noisy`` = 80·N(0, 1));
  the output is the network's alone (the EDM skip term is 80⁻²-small), which makes it the hard
  case for quantization;
- ``variation``: an existing terrain (here one the fp32 model generated) with noise at
  σ = 0.002·(80/0.002)^strength added (strength 0.3–0.9), denoised in one step.

What trained weights do here and random ones do not: the residual stream grows block after
block to ~10⁹ (max; ~3·10⁷ rms) before the decoder's last GroupNorm, with per-channel spreads of
~250× and the peaks on the border pixels.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

PACKAGE = "adaptive-terrain-diffusion==0.4.2"
MEMBER = "terrain_diffusion/weights/terrain_consistency_unet_difficulty100.onnx"
ONNX_SHA256 = "95be54b4a39d58320e187a7ec533351c957f16a00be58773c86074828ee67887"
SIZE, SIGMA_MIN, SIGMA_MAX = 128, 0.002, 80.0


def onnx_file() -> Path:
    """The trained denoiser's .onnx, downloaded once (about 39 MB) and checked."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    try:
        from _sibling import load_sibling
    finally:
        sys.path.pop(0)
    fetch = load_sibling("_wheel_file", "edgec_bench_wheel_file")
    return fetch.wheel_file(PACKAGE, MEMBER, ONNX_SHA256, "terrain")


def static_onnx_file(batch: int = 1) -> Path:
    """The same model with its ``batch`` dim fixed (the NPU target takes static shapes only),
    as ONNX Runtime's ``make_dynamic_shape_fixed`` tool fixes it; cached beside the original."""
    import onnx
    from onnxruntime.tools.onnx_model_utils import fix_output_shapes, make_dim_param_fixed

    src = onnx_file()
    out = src.with_name(f"{src.stem}_batch{batch}.onnx")
    if not out.is_file():
        model = onnx.load(str(src))
        make_dim_param_fixed(model.graph, "batch", batch)
        fix_output_shapes(model)
        tmp = out.with_suffix(".part")
        onnx.save(model, str(tmp))
        tmp.replace(out)
    return out


def generation(n: int, seed: int) -> dict[str, np.ndarray]:
    """``n`` one-step generations' inputs, batch-major ([n, ...]), as the package draws them."""
    rng = np.random.default_rng(seed)
    noisy = rng.standard_normal((n, 1, SIZE, SIZE), dtype=np.float32) * np.float32(SIGMA_MAX)
    difficulty = (rng.integers(1, 101, n) - 1) / 99
    return {"noisy": noisy, "sigma": np.full(n, SIGMA_MAX, np.float32),
            "difficulty": difficulty.astype(np.float32)}


def variation(run, n: int, seed: int) -> dict[str, np.ndarray]:
    """``n`` variations' inputs: terrains ``run`` (feeds → ``denoised``) generated, re-noised
    at strengths drawn in [0.3, 0.9]."""
    rng = np.random.default_rng(seed)
    made = generation(n, seed + 1)
    terrains = np.concatenate([run(one(made, i)) for i in range(n)])
    sigma = (SIGMA_MIN * (SIGMA_MAX / SIGMA_MIN) ** rng.uniform(0.3, 0.9, n)).astype(np.float32)
    noisy = terrains + rng.standard_normal(terrains.shape, dtype=np.float32) * sigma[:, None,
                                                                                      None, None]
    difficulty = (rng.integers(1, 101, n) - 1) / 99
    return {"noisy": noisy.astype(np.float32), "sigma": sigma,
            "difficulty": difficulty.astype(np.float32)}


def one(feeds: dict[str, np.ndarray], i: int) -> dict[str, np.ndarray]:
    """Sample ``i`` of batch-major feeds, as a batch of one."""
    return {k: v[i:i + 1] for k, v in feeds.items()}


def interleave(gen: dict[str, np.ndarray], var: dict[str, np.ndarray],
               every: int = 3) -> dict[str, np.ndarray]:
    """One .npz-ready dict with a leading sample axis ([N, 1, ...]): every ``every``-th sample a
    variation, the rest generations (so the last few, an accuracy floor's held-out samples,
    hold both)."""
    order, g, v = [], 0, 0
    for j in range(len(gen["sigma"]) + len(var["sigma"])):
        if j % every == every - 1 and v < len(var["sigma"]) or g == len(gen["sigma"]):
            order.append((var, v))
            v += 1
        else:
            order.append((gen, g))
            g += 1
    return {k: np.stack([src[k][i:i + 1] for src, i in order]) for k in gen}
