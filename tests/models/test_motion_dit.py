"""motion-dit reference model: deterministic build, shapes, MVS-RoPE's fractional motion positions,
joint attention, a batch-polymorphic forward, compiles on ort-cpu / openvino-cpu / qnn-htp."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from edgec.exporters.verify import compare_outputs
from edgec.models import registry
from edgec.models.motion_dit import MOTION_DIM, TOKENS_PER_FRAME, MotionDiT

SPEC = registry.get("motion-dit")
# The exporter warns when one dim name ("batch") is given on several inputs; that is intended.
pytestmark = pytest.mark.filterwarnings("ignore:# The axis name:UserWarning")


def _rel_err(actual: np.ndarray, expected: np.ndarray) -> float:
    """Norm-wise max relative error, as edgec's own verification computes it."""
    return compare_outputs({"y": actual}, {"y": expected})["y"]["max_rel"]


@pytest.fixture(scope="module")
def tiny():
    module, inputs = SPEC.build("tiny"), SPEC.example_inputs("tiny")
    with torch.no_grad():
        outputs = module(*inputs)
    return module, inputs, outputs


@pytest.fixture(scope="module")
def artifacts(model_artifact):
    """tiny on ort-cpu, openvino-cpu and qnn-htp (w8a16), from one static-shape export."""
    return {t: model_artifact("motion-dit", t, static=True)
            for t in ("ort-cpu", "openvino-cpu", "qnn-htp")}


def test_tiny_forward_shapes_and_scale(tiny):
    _, (video, motion, timestep, text), (video_out, motion_out) = tiny
    assert video.shape == video_out.shape == (2, 4, 2, 4, 4)
    assert motion.shape == motion_out.shape == (2, 5, MOTION_DIM) and MOTION_DIM == 235
    assert timestep.dtype == torch.float32 and 0 <= timestep.min() and timestep.max() < 1000
    assert text.shape == (2, 16, 64)
    for out in (video_out, motion_out):
        assert torch.isfinite(out).all() and 0.2 < out.std().item() < 5.0


def test_describe_and_spec():
    info = SPEC.hyperparameters("tiny")
    assert info["grid"] == (2, 2, 2) and info["text_tokens"] == 0
    assert info["video_tokens"] == 8 and info["motion_tokens"] == 5 * 51 == 255
    assert info["seq_len"] == 263 and info["rope_dims"] == (12, 10, 10)
    base = SPEC.hyperparameters("base")  # describe only: never built
    assert base["video_tokens"] == 21 * 30 * 52 and base["motion_tokens"] == 81 * 51
    assert base["rope_dims"] == (44, 42, 42)
    assert SPEC.hyperparameters("small")["seq_len"] == 9 * 15 * 26 + 33 * 51
    assert all(dims == {0: "batch"} for dims in SPEC.dynamic_shapes("tiny").values())
    assert SPEC.paper.startswith("EchoMotion")
    assert SPEC.sampling["samples"] == {"video": "video_out", "motion": "motion_out"}
    assert SPEC.sampling["shift"] == 8.0 and SPEC.sampling["timestep_scale"] == 1000.0


def test_mvs_rope_puts_motion_tokens_at_fractional_times(tiny):
    module, inputs, (_, motion_out) = tiny
    cfg = module.cfg
    pos = module.positions(cfg.grid, cfg.motion_frames)
    assert pos.shape == (263, 3) and pos.dtype == torch.float32
    video, motion = pos[:8], pos[8:].reshape(5, TOKENS_PER_FRAME, 3)
    assert video[-1].tolist() == [1, 1, 1]
    assert motion[:, 0, 0].tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]  # R(f/4, H+i, W+i)
    diagonal = (2 + torch.arange(51.0)).tolist()
    assert motion[3, :, 1].tolist() == diagonal == motion[3, :, 2].tolist()
    # angles are position × inverse frequency: motion frame 1 sits between latent frames 0 and
    # 1, where no row of Wan's integer-position table lies
    angles = module.rope_angles(pos)
    inv_t = module.rope_freqs[:6]
    frame1 = angles[8 + TOKENS_PER_FRAME, :6]
    assert torch.equal(frame1, 0.25 * inv_t)
    integer_table = torch.arange(1024.0)[:, None] * inv_t[None]
    assert (integer_table - frame1).abs().amax(-1).min() > 1e-3
    # and they matter: the appendix's integer variant R(t, H+i, W+i) computes something else
    other = MotionDiT(dataclasses.replace(cfg, motion_time_scale=1.0))
    other.load_state_dict(module.state_dict())
    with torch.no_grad():
        _, other_out = other.eval()(*inputs)
    assert _rel_err(other_out.numpy(), motion_out.numpy()) > 1e-2


def test_joint_attention_couples_the_modalities(tiny):
    module, (video, motion, timestep, text), (video_out, motion_out) = tiny
    with torch.no_grad():
        v2, _ = module(video, motion.flip(1), timestep, text)
        _, m3 = module(video.flip(2), motion, timestep, text)
    assert _rel_err(v2.numpy(), video_out.numpy()) > 1e-3  # video attends to the motion tokens
    assert _rel_err(m3.numpy(), motion_out.numpy()) > 1e-3  # and motion to the video tokens


def test_forward_is_batch_polymorphic(tiny):
    """The exported batch stays dynamic: torch.export raises if any op pins it (the ONNX
    exporter captures with the same torch.export), and the captured program runs at batch 3."""
    module = tiny[0]
    batch = torch.export.Dim("batch")
    program = torch.export.export(module, tiny[1],
                                  dynamic_shapes={n: {0: batch} for n in SPEC.input_names})
    a, b = SPEC.example_inputs("tiny", seed=7), SPEC.example_inputs("tiny", seed=8)
    inputs = [torch.cat((x, y[:1])) for x, y in zip(a, b)]
    with torch.no_grad():
        expected, actual = module(*inputs), program.module()(*inputs)
    for e, x in zip(expected, actual):
        assert x.shape[0] == 3 and _rel_err(x.numpy(), e.numpy()) <= 1e-6


@pytest.mark.parametrize("target", ["ort-cpu", "openvino-cpu"])
def test_fp32_compiles_keep_fidelity(artifacts, target):
    fidelity = artifacts[target].report["fidelity"]
    export = fidelity["export_vs_pytorch"]["outputs"]
    assert set(export) == {"video_out", "motion_out"}
    assert max(e["max_rel"] for e in export.values()) <= 1e-5
    outs = fidelity["target_vs_source"]["outputs"].values()
    assert max(e["max_rel"] for e in outs) <= 1e-5 and min(e["cosine"] for e in outs) > 0.99999


def test_qnn_htp_w8a16_agrees_with_onnxruntime(artifacts):
    art = artifacts["qnn-htp"]
    tvs = art.report["fidelity"]["target_vs_source"]
    agree = tvs["vs_rewritten_onnx"]["outputs"]
    assert set(agree) == {"video_out", "motion_out"}
    assert min(e["cosine"] for e in agree.values()) >= 0.998
    assert min(e["cosine"] for e in tvs["outputs"].values()) >= 0.995  # measured ≥ 0.9995
    assert art.manifest["runtime"]["name"] == "qnn"
    assert all(isinstance(d, int) for i in art.manifest["inputs"] for d in i["shape"])
