"""reactive-dance (+ its decoder): determinism, shapes, describe, Blockwise Local Context (blocks
are independent, positions restart per block), constant mask, compiles on ort-cpu, openvino-cpu
and qnn-htp (w8a16)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import edgec
from edgec.exporters.verify import compare_outputs
from edgec.models import registry
from edgec.models.reactive_dance import CONFIGS, block_diagonal_mask

SPEC = registry.get("reactive-dance")
DECODER = registry.get("reactive-dance-decoder")
# The exporter warns when one dim name ("batch") is given on several inputs; that is intended.
pytestmark = pytest.mark.filterwarnings("ignore:# The axis name:UserWarning")
B, N, BLOCK, S = 2, 120, 60, 64  # tiny: batch, tokens, tokens per block, latents per stream


@pytest.fixture(scope="module")
def tiny():
    return SPEC.build("tiny"), SPEC.example_inputs("tiny")


@pytest.fixture(scope="module")
def compiled(model_artifact):
    return lambda target: model_artifact("reactive-dance", target)


def _run(module, inputs):
    with torch.no_grad():
        return module(*inputs)


def test_shapes_and_scale(tiny):
    module, (latent, timestep, leader, music) = tiny
    assert latent.shape == (B, N, 3 * S) and timestep.shape == (B,)
    assert leader.shape == (B, N, 72) and music.shape == (B, 4 * N, 54)
    out = _run(module, (latent, timestep, leader, music))
    assert out.shape == latent.shape and torch.isfinite(out).all()
    assert 0.2 < out.std().item() < 5.0


def test_decoder_shapes_and_level_sum():
    """The decoder sums each stream's residual levels, then upsamples 4x to poses."""
    module, (latent,) = DECODER.build("tiny"), DECODER.example_inputs("tiny")
    poses = _run(module, (latent,))
    assert poses.shape == (B, 4 * N, 36 + 36 + 3) and torch.isfinite(poses).all()
    # moving level 1 into level 0 (per stream: [level 0 (32) | level 1 (32)]) changes nothing
    lv = latent.reshape(B, N, 3, 2, S // 2)
    moved = torch.stack((lv[:, :, :, 0] + lv[:, :, :, 1], torch.zeros_like(lv[:, :, :, 1])), 3)
    torch.testing.assert_close(_run(module, (moved.reshape(B, N, 3 * S),)), poses,
                               rtol=1e-5, atol=1e-5)


def test_describe_sampling_and_paper():
    info = SPEC.hyperparameters("tiny")
    assert info["seq_len"] == N and info["mask"] == "block-diagonal" and info["mask_block"] == 60
    assert info["latent_dim"] == 192 and info["stream_latent"] == S and info["frames"] == 4 * N
    small = SPEC.hyperparameters("small")
    assert (small["dim"], small["ff"], small["depth"], small["heads"]) == (512, 1024, 8, 8)
    assert small["seq_len"] == 540 and small["latent_dim"] == 768
    assert SPEC.hyperparameters("base")["seq_len"] % 60 == 0  # described, never built
    assert SPEC.sampling == {"kind": "ddim-x0", "samples": {"latent": "x0"},
                             "timestep": "timestep", "timestep_scale": 1.0, "train_steps": 1000,
                             "schedule": "cosine", "conditions": ["leader", "music"],
                             "guidance": 2.2, "steps": 50}
    assert SPEC.paper.startswith("ReactDance") and DECODER.paper == SPEC.paper
    assert DECODER.sampling is None and DECODER.output_names == ("poses",)


def test_blocks_are_independent(tiny):
    """Perturbing block 2 (its latent tokens, leader tokens and music frames) leaves block 1's
    output bit-identical: every attention is block-diagonal, music is pooled per block."""
    module, (latent, timestep, leader, music) = tiny
    mask = module.block_mask
    assert mask.dtype == torch.bool and torch.equal(mask, block_diagonal_mask(module.cfg))
    assert mask[:BLOCK, :BLOCK].all() and not mask[:BLOCK, BLOCK:].any()
    g = torch.Generator().manual_seed(3)
    changed = [t.clone() for t in (latent, leader, music)]
    for t in changed:
        half = t.shape[1] // 2
        t[:, half:] += torch.randn(t[:, half:].shape, generator=g)
    a = _run(module, (latent, timestep, leader, music))
    b = _run(module, (changed[0], timestep, changed[1], changed[2]))
    torch.testing.assert_close(b[:, :BLOCK], a[:, :BLOCK], rtol=0, atol=1e-6)
    assert (b[:, BLOCK:] - a[:, BLOCK:]).abs().max() > 0.1


def test_positions_restart_per_block(tiny):
    """The sinusoidal table restarts at 0 in every block, so a block that repeats block 1's
    inputs gets block 1's output (with global positions it would not)."""
    module, (latent, timestep, leader, music) = tiny
    pos = module.pos_embed
    assert torch.equal(pos[:BLOCK], pos[BLOCK:]) and not torch.equal(pos[0], pos[1])
    rep = [torch.cat((t[:, : t.shape[1] // 2],) * 2, dim=1) for t in (latent, leader, music)]
    out = _run(module, (rep[0], timestep, rep[1], rep[2]))
    torch.testing.assert_close(out[:, BLOCK:], out[:, :BLOCK], rtol=0, atol=1e-5)


def test_fp32_compiles_match_pytorch(tiny, compiled):
    module, inputs = tiny
    for target in ("ort-cpu", "openvino-cpu"):
        fid = compiled(target).report["fidelity"]
        assert fid["export_vs_pytorch"]["outputs"]["x0"]["max_rel"] <= 1e-5
        assert fid["target_vs_source"]["outputs"]["x0"]["max_rel"] <= 1e-5
    # only batch is dynamic: another batch size runs and matches
    one = tuple(t[:1] for t in SPEC.example_inputs("tiny", seed=5))
    out = compiled("ort-cpu").load().run({n: t.numpy() for n, t in zip(SPEC.input_names, one)})
    expected = _run(module, one).numpy()
    assert compare_outputs({"x0": out["x0"]}, {"x0": expected})["x0"]["max_rel"] <= 1e-5


def test_block_mask_is_a_graph_constant(compiled):
    """Every Softmax's scores get the block mask added from constants only. The exporter writes
    the bool mask as Where(mask, 0, float32 min); its optimizer folds constants of at most 8192
    elements, so the 120 x 120 mask stays a Where over initializers (not one initializer)."""
    model = onnx.load(str(compiled("ort-cpu").path / "model.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    softmaxes = [n for n in model.graph.node if n.op_type == "Softmax"]
    assert len(softmaxes) == 1 + 2 * 2  # leader encoder 1 + (self + cross) x 2 layers
    allowed = block_diagonal_mask(CONFIGS["tiny"]).numpy()
    for sm in softmaxes:
        add = producer[sm.input[0]]
        assert add.op_type == "Add"
        where = producer[add.input[1]]
        assert where.op_type == "Where" and all(i in inits for i in where.input)
        folded = np.where(*(inits[i] for i in where.input))
        assert folded.shape == allowed.shape == (N, N)
        assert (folded[allowed] == 0).all() and (folded[~allowed] <= -1e30).all()


def test_qnn_htp_w8a16(compiled):
    """Measured: NPU vs ORT on the same QDQ graph cosine 0.99998; vs PyTorch 0.99989."""
    fid = compiled("qnn-htp").report["fidelity"]["target_vs_source"]
    assert fid["vs_rewritten_onnx"]["outputs"]["x0"]["cosine"] >= 0.998
    assert fid["outputs"]["x0"]["cosine"] >= 0.99


def test_decoder_compiles_on_ort_cpu(tmp_path):
    art = edgec.compile("reactive-dance-decoder", target="ort-cpu", output_dir=tmp_path / "o",
                        config="tiny")
    fid = art.report["fidelity"]
    assert fid["export_vs_pytorch"]["outputs"]["poses"]["max_rel"] <= 1e-5
    assert fid["target_vs_source"]["outputs"]["poses"]["max_rel"] <= 1e-5
