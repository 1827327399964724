"""motion-gen reference model: deterministic build, shapes, per-sample routing between text and
reference-motion cross-attention, export fidelity, compiles on ort-cpu / openvino-cpu / qnn-htp."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgec.exporters.verify import compare_outputs
from edgec.models import registry
from edgec.models.motion_dit import timestep_embedding

SPEC = registry.get("motion-gen")
# The exporter warns when one dim name ("batch") is given on several inputs; that is intended.
pytestmark = pytest.mark.filterwarnings("ignore:# The axis name:UserWarning")


def _rel_err(actual: np.ndarray, expected: np.ndarray) -> float:
    """Norm-wise max relative error, as edgec's own verification computes it."""
    return compare_outputs({"y": actual}, {"y": expected})["y"]["max_rel"]


def _one_branch(model, motion, timestep, text, ref_motion, branch: str) -> torch.Tensor:
    """ViMoGen's forward for a batch that takes one branch: only that cross-attention runs."""
    x = model.motion_embedding(motion) + model.pos_embedding
    e = model.time_embedding(timestep_embedding(timestep, model.time_freqs))
    e0 = model.time_projection(e).unflatten(1, (6, model.cfg.dim))
    context, ref = model.text_embedding(text), model.encode_reference(ref_motion, e0)
    for blk in model.blocks:
        m = (blk.modulation + e0).chunk(6, dim=1)
        h = blk.norm1(x) * (1 + m[1]) + m[0]
        x = x + blk.self_attn(h, h) * m[2]
        if branch == "text":
            x = x + blk.cross_attn(blk.norm3(x), context)
        else:
            x = x + blk.ref_motion_cross_attn(blk.norm4(x), ref)
        x = x + blk.ffn(blk.norm2(x) * (1 + m[4]) + m[3]) * m[5]
    shift, scale = (model.head_modulation + e[:, None]).chunk(2, dim=1)
    return model.head(model.norm_out(x) * (1 + scale) + shift)


@pytest.fixture(scope="module")
def tiny():
    module, inputs = SPEC.build("tiny"), SPEC.example_inputs("tiny")
    with torch.no_grad():
        output = module(*inputs)
    return module, inputs, output


@pytest.fixture(scope="module")
def artifacts(model_artifact):
    """tiny on ort-cpu, openvino-cpu and qnn-htp (w8a16), from one static-shape export."""
    return {t: model_artifact("motion-gen", t, static=True)
            for t in ("ort-cpu", "openvino-cpu", "qnn-htp")}


def test_tiny_forward_shapes_and_scale(tiny):
    _, (motion, timestep, text, ref_motion, use_text), out = tiny
    assert motion.shape == out.shape == (2, 60, 276)
    assert text.shape == (2, 16, 64) and ref_motion.shape == (2, 60, 138)
    assert timestep.dtype == torch.float32 and 0 <= timestep.min() and timestep.max() < 1000
    assert use_text.tolist() == [1.0, 0.0]  # the example batch takes both branches
    assert torch.isfinite(out).all() and 0.2 < out.std().item() < 5.0


def test_describe_and_spec():
    info = SPEC.hyperparameters("tiny")
    assert (info["dim"], info["heads"], info["depth"], info["ref_depth"]) == (128, 4, 2, 1)
    assert info["seq_len"] == 60 and info["motion_dim"] == 276 and info["ref_dim"] == 138
    assert info["text_tokens"] == 0 and "grid" not in info
    base = SPEC.hyperparameters("base")  # describe only: never built
    assert (base["dim"], base["heads"], base["depth"], base["ref_depth"]) == (1536, 12, 30, 15)
    assert all(dims == {0: "batch"} for dims in SPEC.dynamic_shapes("tiny").values())
    assert SPEC.paper.startswith("ViMoGen")
    assert SPEC.sampling["samples"] == {"motion": "velocity"}
    assert SPEC.sampling["conditions"] == ["text", "ref_motion"]
    assert (SPEC.sampling["guidance"], SPEC.sampling["shift"]) == (5.0, 5.0)


def test_routing_is_per_sample_and_hard(tiny):
    module, (motion, timestep, text, ref_motion, _), mixed = tiny
    ones, zeros = torch.ones(2), torch.zeros(2)
    with torch.no_grad():
        to_text, to_ref = module(*tiny[1][:4], ones), module(*tiny[1][:4], zeros)
        args = (motion, timestep, text, ref_motion)
        text_branch, ref_branch = _one_branch(module, *args, "text"), _one_branch(
            module, *args, "ref")
        # the other branch's input has no effect at all
        assert torch.equal(module(motion, timestep, text, ref_motion * 3, ones), to_text)
        assert torch.equal(module(motion, timestep, text * 3, ref_motion, zeros), to_ref)
        assert torch.equal(module(*args, torch.tensor([True, False])), mixed)
    assert _rel_err(to_text.numpy(), to_ref.numpy()) > 0.1
    assert _rel_err(to_text.numpy(), text_branch.numpy()) <= 1e-6
    assert _rel_err(to_ref.numpy(), ref_branch.numpy()) <= 1e-6
    # sample 0 attends to the text, sample 1 to the reference motion
    assert torch.allclose(mixed[0], to_text[0], rtol=0, atol=1e-6)
    assert torch.allclose(mixed[1], to_ref[1], rtol=0, atol=1e-6)


def test_forward_is_batch_polymorphic(tiny):
    """The exported batch stays dynamic: torch.export raises if any op pins it (the ONNX
    exporter captures with the same torch.export), and the captured program runs at batch 3."""
    module = tiny[0]
    batch = torch.export.Dim("batch")
    program = torch.export.export(module, tiny[1],
                                  dynamic_shapes={n: {0: batch} for n in SPEC.input_names})
    a, b = SPEC.example_inputs("tiny", seed=7), SPEC.example_inputs("tiny", seed=8)
    inputs = [torch.cat((x, y[:1])) for x, y in zip(a, b)]
    inputs[-1] = torch.tensor([1.0, 0.0, 0.0])
    with torch.no_grad():
        expected, actual = module(*inputs), program.module()(*inputs)
    assert actual.shape == (3, 60, 276) and _rel_err(actual.numpy(), expected.numpy()) <= 1e-6


@pytest.mark.parametrize("target", ["ort-cpu", "openvino-cpu"])
def test_fp32_compiles_keep_fidelity(artifacts, target):
    fidelity = artifacts[target].report["fidelity"]
    assert fidelity["export_vs_pytorch"]["outputs"]["velocity"]["max_rel"] <= 1e-5
    out = fidelity["target_vs_source"]["outputs"]["velocity"]
    assert out["max_rel"] <= 1e-5 and out["cosine"] > 0.99999


def test_exported_graph_routes_each_sample(tiny, artifacts):
    """The graph computes both branches and routes by the input: swapped routes, swapped rows."""
    module, inputs, _ = tiny
    inputs = (*inputs[:4], torch.tensor([0.0, 1.0]))
    with torch.no_grad():
        expected = module(*inputs).numpy()
    sess = artifacts["ort-cpu"].load()
    actual = sess.run({n: x.numpy() for n, x in zip(SPEC.input_names, inputs)})["velocity"]
    assert _rel_err(actual, expected) <= 1e-5


def test_qnn_htp_w8a16_agrees_with_onnxruntime(artifacts):
    art = artifacts["qnn-htp"]
    tvs = art.report["fidelity"]["target_vs_source"]
    assert tvs["vs_rewritten_onnx"]["outputs"]["velocity"]["cosine"] >= 0.998
    assert tvs["outputs"]["velocity"]["cosine"] >= 0.995  # measured ≥ 0.9998
    assert art.manifest["runtime"]["name"] == "qnn"
    assert all(isinstance(d, int) for i in art.manifest["inputs"] for d in i["shape"])
