"""The FFN outlier-channel split (``--quantize w8a8:split=R``): exact in fp32, each branch planned
as its target needs (float on the CPU targets, 16-bit on the NPU). What it does on trained weights
is in tests/test_real_decoder.py."""

import numpy as np
import onnx_ir as ir
import pytest

import edgec
from edgec.errors import UserError
from edgec.graph_passes import PassManager
from edgec.graph_passes.quantization.outlier_split import (
    OUTLIER_TAG,
    OutlierSplitPass,
    outlier_channels,
)
from edgec.graph_passes.quantization.select import plan_quantization
from edgec.runtimes.ort import run_model


def test_channels_are_the_peaks_far_above_the_median_capped():
    peaks = np.ones(128)
    peaks[[5, 90, 17]] = [300.0, 80.0, 40.0]
    assert outlier_channels(peaks, 50).tolist() == [5, 90]
    assert outlier_channels(peaks, 30, max_share=1 / 64).tolist() == [5, 90]  # 2 of 128 at most
    assert outlier_channels(peaks, 30, max_share=1 / 32).tolist() == [5, 17, 90]
    assert outlier_channels(np.zeros(8), 2).size == 0


@pytest.fixture(scope="module")
def split():
    """llama tiny split at a low ratio (random weights have no massive channels): the pass's
    record and the rewritten model."""
    from edgec.exporters.sources import resolve_source

    src = resolve_source("llama", "tiny")
    pm = PassManager([OutlierSplitPass(2.0, src)], check=True, feeds=src.feeds)
    model = pm(src.model.clone())
    return src, pm.records[0], model


def test_the_split_is_exact_and_adds_one_branch_per_down_projection(split):
    src, record, model = split
    assert record.check["exact"] and record.check["rtol"] == 1e-4
    assert record.check["outputs"]["logits"]["max_rel"] <= 1e-4
    ref = run_model(src.model, src.feeds)["logits"]
    out = run_model(model, src.feeds)["logits"]
    assert np.abs(out - ref).max() / np.abs(ref).max() <= 1e-5
    sites = record.stats["split"]
    assert len(sites) == 2 and not record.stats["skipped"]  # one per layer
    for site in sites:
        assert 1 <= len(site["channels"]) <= 2 and site["peak"] > site["rest_peak"]
    tagged = [n for n in model.graph if OUTLIER_TAG in n.metadata_props]
    # per layer: gate, up, the SwiGLU's elementwise ops, down, all on the split channels
    assert sum(n.op_type == "MatMul" for n in tagged) == 3 * 2
    widths = {n.outputs[0].shape[-1] for n in tagged if n.outputs[0].shape is not None}
    assert widths <= {1, 2} | {src.model.graph.outputs[0].shape[-1], 64}
    # the original weights are gone, not left beside their two halves
    used = {v.name for n in model.graph for v in n.inputs if v is not None}
    assert set(model.graph.initializers) <= used


def test_the_outlier_branch_is_float_on_cpu_targets_and_16_bit_on_the_npu(split):
    _, _, model = split
    tagged = [n for n in model.graph if OUTLIER_TAG in n.metadata_props]
    cpu = plan_quantization(model, fully_quantized=False)
    assert {n.name for n in tagged} <= set(cpu.nodes_to_exclude)
    assert {cpu.reasons[n.name] for n in tagged} == {"outlier channels"}
    npu = plan_quantization(model, fully_quantized=True)
    branch = {v.name for n in tagged if n.op_type == "MatMul" for v in (n.inputs[0], n.outputs[0])}
    assert branch <= set(npu.tensors_16bit)


def test_a_down_projection_the_split_cannot_follow_is_left_alone():
    """An activation scaled per channel by a constant (slicing it is not done): reported."""
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 4]))
    w1, w2, c = (ir.Value(name=n, const_value=ir.tensor(np.full(s, 0.5, np.float32)))
                 for n, s in (("w1", (4, 8)), ("w2", (8, 4)), ("c", (8,))))
    up = ir.node("MatMul", [x, w1], name="up")
    act = ir.node("Sigmoid", up.outputs, name="act")
    scale = ir.node("Mul", [act.outputs[0], c], name="scale")
    down = ir.node("MatMul", [scale.outputs[0], w2], name="down")
    add = ir.node("Add", [down.outputs[0], x], name="residual")
    add.outputs[0].name = "y"
    graph = ir.Graph([x], add.outputs, nodes=[up, act, scale, down, add],
                     initializers=[w1, w2, c], opset_imports={"": 18}, name="g")
    result = OutlierSplitPass(2.0, None, samples=[])(ir.Model(graph, ir_version=9))
    assert not result.modified
    (skip,) = result.stats["skipped"]
    assert skip["node"] == "down" and "per-channel constant" in skip["reason"]


def test_split_must_be_a_ratio_above_one(tmp_path):
    with pytest.raises(UserError, match="split"):
        edgec.compile("llama", target="ort-cpu", config="tiny", quantize="w8a8:split=1",
                      output_dir=tmp_path / "o")
    assert not (tmp_path / "o").exists()
