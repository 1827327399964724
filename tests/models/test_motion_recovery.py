"""motion-recovery (GVHMR temporal network): determinism, shapes, describe, the banded mask (as
GVHMR builds it, a graph constant, really restricting attention), compiles on ort-cpu,
openvino-cpu and qnn-htp (w8a16)."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from edgec.exporters.verify import compare_outputs
from edgec.models import registry
from edgec.models.motion_recovery import MotionRecovery, banded_mask, window_bounds

SPEC = registry.get("motion-recovery")
pytestmark = pytest.mark.filterwarnings("ignore:# The axis name:UserWarning")
B, L, W = 1, 240, 120  # tiny: batch, frames, window
NOT_BETAS = np.r_[0:126, 136:151]  # pred_x columns that are per-frame (betas are clip means)


@pytest.fixture(scope="module")
def tiny():
    return SPEC.build("tiny"), SPEC.example_inputs("tiny")


@pytest.fixture(scope="module")
def compiled(model_artifact):
    return lambda target: model_artifact("motion-recovery", target)


def _run(module, inputs):
    with torch.no_grad():
        return module(*inputs)


def test_shapes_and_outputs(tiny):
    module, inputs = tiny
    assert [tuple(t.shape) for t in inputs] == [(B, L, 17, 3), (B, L, 256), (B, L, 3), (B, L, 6)]
    pred_x, pred_cam, static = _run(module, inputs)
    assert pred_x.shape == (B, L, 151) and pred_cam.shape == (B, L, 3)
    assert static.shape == (B, L, 6)
    assert all(torch.isfinite(t).all() for t in (pred_x, pred_cam, static))
    assert 0.2 < pred_x.std().item() < 5.0
    betas = pred_x[..., 126:136]
    assert torch.equal(betas, betas[:, :1].expand_as(betas))  # averaged over the clip
    assert (pred_cam[..., 0] >= 0.25).all()  # scale clamped as GVHMR
    assert all((blk.gate_msa != 0).all() for blk in module.blocks)  # not GVHMR's zero init


def test_describe_and_registry_fields():
    info = SPEC.hyperparameters("tiny")
    assert info["seq_len"] == L and info["mask"] == "banded" and info["window"] == W
    assert (info["dim"], info["heads"], info["depth"], info["image_dim"]) == (128, 4, 2, 256)
    small = SPEC.hyperparameters("small")
    assert (small["dim"], small["heads"], small["depth"]) == (512, 8, 12)
    assert small["image_dim"] == 1024 and small["seq_len"] == 1024
    assert SPEC.hyperparameters("base")["mask"] == "banded"  # described, never built
    assert SPEC.sampling is None and SPEC.paper.startswith("HumanMM / GVHMR")
    assert SPEC.output_names == ("pred_x", "pred_cam", "static_conf_logits")


def test_banded_mask_is_gvhmrs_window(tiny):
    module, _ = tiny
    mask = module.attn_mask
    assert mask.dtype == torch.float32 and torch.equal(mask, banded_mask(L, W))
    allowed = mask == 0
    assert torch.isinf(mask[~allowed]).all() and (allowed.sum(1) == W).all()
    # GVHMR: [i - 60, i + 60), shifted inside the clip at both ends
    assert window_bounds(L, W)[0] == (0, 120) and window_bounds(L, W)[100] == (40, 160)
    assert window_bounds(L, W)[L - 1] == (120, 240)
    assert allowed[100, 40:160].all() and not allowed[100, 160:].any()
    short = MotionRecovery(dataclasses.replace(module.cfg, frames=W))
    assert short.attn_mask is None  # GVHMR masks only clips longer than the window


def test_frame_outside_the_window_does_not_reach_frame_0(tiny):
    """With 2 layers frame 0 sees frames < 179 (its window, then theirs); the last frame is
    beyond, so changing it (every input) leaves frame 0's outputs identical, except the betas,
    which are the clip mean. A frame inside the window does change frame 0."""
    module, inputs = tiny
    base = _run(module, inputs)
    g = torch.Generator().manual_seed(3)

    def perturbed(frame):
        out = [t.clone() for t in inputs]
        for t in out:
            t[:, frame] += torch.randn(t[:, frame].shape, generator=g)
        return _run(module, out)

    far, near = perturbed(L - 1), perturbed(100)
    for a, b in zip(base, far):
        cols = NOT_BETAS if a.shape[-1] == 151 else slice(None)
        torch.testing.assert_close(b[:, 0, cols], a[:, 0, cols], rtol=0, atol=1e-6)
    assert (far[0][:, 0, 126:136] != base[0][:, 0, 126:136]).any()
    assert (near[0][:, 0, NOT_BETAS] - base[0][:, 0, NOT_BETAS]).abs().max() > 1e-3


def test_low_confidence_joints_use_the_learned_embedding(tiny):
    module, inputs = tiny
    kp = inputs[0].clone()
    kp[:, :, 5, 2] = 0.1  # joint 5 invisible everywhere: its (x, y) no longer matter
    a = _run(module, (kp, *inputs[1:]))
    kp[:, :, 5, :2] += 3.0
    b = _run(module, (kp, *inputs[1:]))
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_fp32_compiles_match_pytorch(tiny, compiled):
    module, _ = tiny
    for target in ("ort-cpu", "openvino-cpu"):
        fid = compiled(target).report["fidelity"]
        for name in SPEC.output_names:
            assert fid["export_vs_pytorch"]["outputs"][name]["max_rel"] <= 1e-5
            assert fid["target_vs_source"]["outputs"][name]["max_rel"] <= 1e-5
    two = tuple(torch.cat(pair) for pair in zip(*(SPEC.example_inputs("tiny", seed=s)
                                                    for s in (5, 6))))  # batch is dynamic
    out = compiled("ort-cpu").load().run({n: t.numpy() for n, t in zip(SPEC.input_names, two)})
    expected = {n: t.numpy() for n, t in zip(SPEC.output_names, _run(module, two))}
    assert out["pred_x"].shape == (2, L, 151)
    errors = compare_outputs(out, expected)
    assert max(e["max_rel"] for e in errors.values()) <= 1e-5


def test_banded_mask_is_an_initializer_before_softmax(compiled):
    model = onnx.load(str(compiled("ort-cpu").path / "model.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    softmaxes = [n for n in model.graph.node if n.op_type == "Softmax"]
    assert len(softmaxes) == 2
    for sm in softmaxes:
        add = producer[sm.input[0]]
        assert add.op_type == "Add"
        const = [inits[i] for i in add.input if i in inits]
        assert len(const) == 1
        np.testing.assert_array_equal(const[0], banded_mask(L, W).numpy())


def test_qnn_htp_w8a16(compiled):
    """Measured: NPU vs ORT on the same QDQ graph cosine ≥ 0.999996 on every output; vs
    PyTorch ≥ 0.99990."""
    fid = compiled("qnn-htp").report["fidelity"]["target_vs_source"]
    for name in SPEC.output_names:
        assert fid["vs_rewritten_onnx"]["outputs"][name]["cosine"] >= 0.998
        assert fid["outputs"][name]["cosine"] >= 0.99
