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
    assert len(targets) == 14 and not any("lm_head" in p for p in targets.values())


@pytest.mark.parametrize("bad", ["magnitude:1.5", "3:2", "sparse", "2:4,foo=1"])
def test_bad_specs_are_refused(bad):
    with pytest.raises(UserError):
        PruneConfig.parse(bad)
