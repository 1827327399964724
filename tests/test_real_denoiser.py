"""A real trained diffusion network: Adaptive Diffusion Terrain's one-step consistency UNet
(``benchmarks/_terrain.py``: the .onnx its PyPI wheel ships, fetched once without the package's
``onnxruntime-gpu`` dependency). Trained weights give it activations no random model has: the
residual stream reaches ~10⁹ before the decoder's last GroupNorm, peaking on the border pixels.

Here: edgec compiles the file as shipped (GroupNorm as InstanceNormalization, Einsum attention,
Resize upsampling, skip concatenations) on both CPU targets and the artifacts generate the
terrain the shipped model does; and the data the benchmark calibrates on are what the package
feeds its network. The quantization figures (w8a8 needs ~30 of 255 convolutions in float to
hold a 0.98 floor; NNCF's defaults give 0.1) are ``benchmarks/real_denoiser.py``'s: its floor
searches take minutes each.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import edgec

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def terrain():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from _sibling import load_sibling

        mod = load_sibling("_terrain", "edgec_bench_terrain")
    finally:
        sys.path.remove(str(BENCHMARKS))
    return mod


@pytest.fixture(scope="module")
def shipped(terrain):
    """(static .onnx, fp32 ORT session on the file as shipped)."""
    path = terrain.static_onnx_file()
    return path, ort.InferenceSession(str(terrain.onnx_file()),
                                      providers=["CPUExecutionProvider"])


def _cos(a, b):
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("target", ["ort-cpu", "openvino-cpu"])
def test_trained_unet_generates_as_shipped_on_the_cpu_targets(terrain, shipped, tmp_path,
                                                               target):
    path, fp32 = shipped
    gen = terrain.generation(3, 5)
    art = edgec.compile(str(path), target=target, output_dir=tmp_path / target,
                        example_inputs=terrain.one(gen, 0))
    fid = art.report["fidelity"]["target_vs_source"]["outputs"]["denoised"]
    assert fid["cosine"] >= 0.99999
    session = art.load()
    for i in (1, 2):  # other generations than the compile's example
        feeds = terrain.one(gen, i)
        want = fp32.run(["denoised"], feeds)[0]
        got = session.run(feeds)["denoised"]
        assert np.abs(got - want).max() <= 1e-3 and _cos(got, want) >= 0.99999


def test_calibration_data_are_the_packages_two_uses(terrain, shipped):
    _, fp32 = shipped

    def run(feeds):
        return fp32.run(["denoised"], feeds)[0]

    gen, var = terrain.generation(4, 1), terrain.variation(run, 2, 2)
    assert np.all(gen["sigma"] == terrain.SIGMA_MAX)
    assert 0.1 < gen["noisy"].std() / terrain.SIGMA_MAX < 10
    assert np.all((var["sigma"] > terrain.SIGMA_MIN) & (var["sigma"] < terrain.SIGMA_MAX))
    # difficulty d in 1..100 as (d - 1) / 99, as TerrainGenerator feeds it
    d = gen["difficulty"] * 99 + 1
    assert np.allclose(d, np.round(d), atol=1e-4) and d.min() >= 1 and d.max() <= 100
    data = terrain.interleave(gen, var)
    assert data["noisy"].shape == (6, 1, 1, 128, 128) and data["sigma"].shape == (6, 1)
    # every third sample a variation, so the last ones (a floor's held-out) hold both
    assert [bool(s < terrain.SIGMA_MAX) for s in data["sigma"][:, 0]] == [False, False, True,
                                                                        False, False, True]
    # a variation re-noises a terrain the model generated: the noise is σ-scaled around it
    terrains = np.concatenate([run(terrain.one(terrain.generation(2, 3), i)) for i in range(2)])
    assert np.abs(terrains).max() <= 1.0  # the network's output space, [-1, 1]
    resid = var["noisy"] - terrains
    assert np.allclose(resid.std(axis=(1, 2, 3)), var["sigma"], rtol=0.05)
