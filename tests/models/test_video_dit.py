"""video-dit reference model: deterministic build, shapes, ONNX export fidelity at two shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgec.errors import UserError
from edgec.exporters.verify import compare_outputs
from edgec.models import registry

SPEC = registry.get("video-dit")
# The exporter warns when one dim name ("batch") is given on several inputs; that is intended.
pytestmark = pytest.mark.filterwarnings("ignore:# The axis name:UserWarning")


def _rel_err(actual: np.ndarray, expected: np.ndarray) -> float:
    """Norm-wise max relative error, as edgec's own verification computes it."""
    return compare_outputs({"y": actual}, {"y": expected})["y"]["max_rel"]


@pytest.fixture(scope="module")
def tiny():
    return SPEC.build("tiny"), SPEC.example_inputs("tiny")


@pytest.fixture(scope="module")
def session(torch_exported_session):
    return torch_exported_session("video-dit", "tiny")


def test_build_is_deterministic():
    a, b = SPEC.build("tiny").state_dict(), SPEC.build("tiny").state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_tiny_forward_shape_and_scale(tiny):
    module, inputs = tiny
    with torch.no_grad():
        out = module(*inputs)
    latent = inputs[0]
    assert out.shape == latent.shape == (2, 4, 2, 8, 8)
    assert torch.isfinite(out).all()
    assert 0.2 < out.std().item() < 5.0


def test_describe_exposes_grid_and_text_tokens():
    info = SPEC.hyperparameters("tiny")
    assert info["grid"] == (2, 4, 4)
    assert info["video_tokens"] == 32 and info["text_tokens"] == 8
    assert info["head_dim"] * info["heads"] == info["dim"]
    assert SPEC.hyperparameters("small")["video_tokens"] == 8 * 32 * 32


def test_unknown_config_raises_user_error():
    with pytest.raises(UserError):
        SPEC.build("huge")


def test_onnx_matches_torch_at_example_shape(tiny, session):
    module, inputs = tiny
    with torch.no_grad():
        expected = module(*inputs).numpy()
    feeds = {n: t.numpy() for n, t in zip(SPEC.input_names, inputs)}
    (actual,) = session.run(None, feeds)
    assert actual.shape == expected.shape
    assert _rel_err(actual, expected) <= 1e-5


def test_onnx_matches_torch_at_other_dynamic_shape(tiny, session):
    """Batch, text length, frames, height and width all differ from the export example."""
    module, _ = tiny
    g = torch.Generator().manual_seed(7)
    inputs = (
        torch.randn(1, 4, 3, 12, 6, generator=g),
        torch.rand(1, generator=g) * 1000.0,
        torch.randn(1, 5, 32, generator=g),
    )
    with torch.no_grad():
        expected = module(*inputs).numpy()
    (actual,) = session.run(None, {n: t.numpy() for n, t in zip(SPEC.input_names, inputs)})
    assert actual.shape == (1, 4, 3, 12, 6)
    assert _rel_err(actual, expected) <= 1e-5


def test_rope_matmul_form_is_the_interleaved_rotation_bit_for_bit():
    """The exported form (x·cos + (x·P)·∓sin) equals the pairwise rotation exactly."""
    import torch

    from edgec.models.video_dit import _apply_rope

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 50, 16, generator=g)
    angles = torch.rand(50, 8, generator=g) * 6.0
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x[..., 0::2], x[..., 1::2]
    expected = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    assert torch.equal(_apply_rope(x, cos, sin), expected)
