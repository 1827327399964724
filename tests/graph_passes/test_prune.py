"""Prune pass: exact sparsity per matrix, the 2:4 pattern along the input dim, options refused."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from edgec.errors import UserError
from edgec.graph_passes.prune import PruneConfig, PrunePass, prunable_weights


def _model(w: np.ndarray) -> ir.Model:
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, w.shape[0]]))
    wv = ir.Value(name="w", const_value=ir.tensor(w, name="w"))
    node = ir.node("MatMul", [x, wv])
    node.outputs[0].name = "y"
    graph = ir.Graph([x], node.outputs, nodes=[node], initializers=[wv],
                     opset_imports={"": 20})
    return ir.Model(graph, ir_version=10)


def test_magnitude_prunes_exactly_the_smallest(rng):
    w = rng.standard_normal((16, 8)).astype(np.float32)
    result = PrunePass(PruneConfig.parse("magnitude:0.25"))(_model(w))
    pruned = result.model.graph.initializers["w"].const_value.numpy()
    assert np.count_nonzero(pruned == 0) == 32
    kept = np.abs(w[pruned != 0])
    assert kept.min() >= np.abs(w[pruned == 0]).max()
    np.testing.assert_array_equal(pruned[pruned != 0], w[pruned != 0])
    assert result.stats["sparsity_before"] == 0 and result.stats["sparsity_after"] == 0.25


def test_two_four_keeps_two_largest_of_every_four_inputs(rng):
    w = rng.standard_normal((16, 8)).astype(np.float32)
    result = PrunePass(PruneConfig.parse("2:4"))(_model(w))
    pruned = result.model.graph.initializers["w"].const_value.numpy()
    groups = pruned.reshape(4, 4, 8)  # [in/4, 4, out]: groups along the reduction dim
    assert (np.count_nonzero(groups, axis=1) == 2).all()
    absw = np.abs(w).reshape(4, 4, 8)
    kept_min = np.where(groups != 0, absw, np.inf).min(axis=1)
    dropped_max = np.where(groups == 0, absw, -np.inf).max(axis=1)
    assert (kept_min >= dropped_max).all()
    assert result.stats["config"] == "2:4" and result.stats["sparsity_after"] == 0.5


def test_lm_head_excluded_on_llama():
    from edgec.exporters.sources import resolve_source

    src = resolve_source("llama", "tiny")
    targets = prunable_weights(src.model, src.parameter_map, PruneConfig().exclude)
    assert len(targets) == 14 and not any("lm_head" in p for p, _ in targets.values())


def _two_readers(w: np.ndarray, op: str) -> ir.Model:
    """``w`` [out, in] read by two nodes: Gemm(transB=1) twice, or MatMul through a Transpose."""
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, w.shape[1]]))
    wv = ir.Value(name="w", const_value=ir.tensor(w, name="w"))
    nodes, read = [], wv
    if op == "MatMul":
        nodes.append(ir.node("Transpose", [wv], attributes={"perm": [1, 0]}))
        read = nodes[-1].outputs[0]
    attrs = {"transB": 1} if op == "Gemm" else {}
    first = ir.node(op, [x, read], attributes=attrs)
    second = ir.node(op, [first.outputs[0], read], attributes=attrs)
    nodes += [first, second]
    second.outputs[0].name = "y"
    graph = ir.Graph([x], second.outputs, nodes=nodes, initializers=[wv], opset_imports={"": 20})
    return ir.Model(graph, ir_version=10)


@pytest.mark.parametrize("op", ["Gemm", "MatMul"])
def test_shared_gemm_and_transposed_weights_are_pruned_once_along_the_input_dim(rng, op):
    w = rng.standard_normal((8, 8)).astype(np.float32)  # [out, in]
    result = PrunePass(PruneConfig.parse("2:4"))(_two_readers(w, op))
    pruned = result.model.graph.initializers["w"].const_value.numpy()
    groups = pruned.reshape(8, 2, 4)  # [out, in/4, 4]: groups along the input dim (axis 1)
    assert (np.count_nonzero(groups, axis=2) == 2).all()
    assert result.stats["weights_pruned"] == 1 and result.stats["sparsity_after"] == 0.5


def test_nothing_to_prune_is_refused(rng):
    w = rng.standard_normal((6, 8)).astype(np.float32)  # 6 inputs: not a multiple of 4
    with pytest.raises(UserError, match="found no MatMul/Gemm weight to prune"):
        PrunePass(PruneConfig.parse("2:4"))(_model(w))


@pytest.mark.parametrize("bad", ["magnitude:1.5", "3:2", "sparse", "2:4,foo=1"])
def test_bad_specs_are_refused(bad):
    with pytest.raises(UserError):
        PruneConfig.parse(bad)


def test_pose_prior_gemm_weights_prune_and_print_their_row(tmp_path):
    """pose-prior's Linears export as Gemm(transB=1), some shared by two Gemms."""
    import json

    from typer.testing import CliRunner

    from edgec.cli import app

    out = tmp_path / "p"
    r = CliRunner().invoke(app, ["compile", "pose-prior", "--config", "tiny", "--target",
                                 "ort-cpu", "-o", str(out), "--prune", "2:4"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    stats = {p["name"]: p["stats"] for p in json.loads((out / "report.json").read_text())
             ["passes"]}["prune"]
    assert stats["weights_pruned"] == 46 and stats["sparsity_after"] == 0.5
    assert "2:4: 46 weights, sparsity 0.0% → 50.0%" in r.stdout
