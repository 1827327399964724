"""``--quantize ...:stream=fp16`` on qnn-htp: the residual stream (its sums, the norms reading
them) stays float, which the HTP runs in fp16; the MatMuls stay quantized."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

import edgec
from edgec.errors import UserError
from edgec.graph_passes.quantization.select import (
    FLOAT_NODES_KEY,
    plan_quantization,
    residual_sums,
)
from edgec.runtimes.qnn import FP16_OPTIONS, PROVIDER_OPTIONS, graph_provider_options

pytest.importorskip("onnxruntime_qnn")


@pytest.fixture(scope="module")
def llama_src():
    from edgec.exporters.sources import resolve_source

    return resolve_source("llama", "tiny")


def test_plan_keeps_the_residual_stream_float_only_where_asked(llama_src):
    from edgec.targets.qnn_htp import FuseRmsNormPass

    model = FuseRmsNormPass()(llama_src.model.clone()).model  # as the HTP's compile does
    sums = residual_sums(model)
    norms = {n.name for n in model.graph if n.op_type == "RMSNormalization"
             and n.inputs[0].name in sums}
    adds = {n.name for n in model.graph if any(o.name in sums for o in n.outputs)}
    plan = plan_quantization(model, True, stream=True, float_stream=True)
    assert adds and norms and adds | norms == set(plan.nodes_to_exclude)
    assert all(plan.reasons[a].startswith("float residual stream") for a in adds | norms)
    assert not sums & set(plan.tensors_16bit) and not plan.stream_tensors
    # the norms' outputs feed quantized MatMuls: 16 bits, as after a 16-bit stream
    assert {n.outputs[0].name for n in model.graph if n.name in norms} <= set(
        plan.tensors_16bit)
    # the 16-bit stream (the default) and a CPU target's plan do not change
    assert set(plan_quantization(model, True, stream=True).tensors_16bit) >= sums
    assert not plan_quantization(model, True, stream=True).nodes_to_exclude
    assert plan_quantization(model, False, float_stream=True) == plan_quantization(model, False)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """llama tiny+outliers on the HTP emulator: the 16-bit stream (default) and the fp16 one."""
    root = tmp_path_factory.mktemp("float-stream")
    out = {}
    for name, q in (("int16", "w8a8:min_cos=0"), ("fp16", "w8a8:stream=fp16,min_cos=0")):
        art = edgec.compile("llama", target="qnn-htp", config="tiny+outliers", quantize=q,
                            output_dir=root / name)
        out[name] = (root / name, art.report)
    return out


def _logits(report):
    return report["fidelity"]["target_vs_source"]["outputs"]["logits"]


def test_fp16_stream_builds_for_an_fp16_htp_and_holds_accuracy(built):
    path, report = built["fp16"]
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["runtime"]["provider_options"] == {**PROVIDER_OPTIONS, **FP16_OPTIONS}
    default = json.loads((built["int16"][0] / "manifest.json").read_text())
    assert "soc_model" not in default["runtime"]["provider_options"]
    stats = next(p for p in report["passes"] if p["name"] == "quantize")["stats"]
    assert stats["scheme"]["float_stream"] and not stats["scheme"]["stream_16bit"]
    assert stats["excluded_nodes"] >= 4 and stats["stream_tensors_16bit"] == 0
    # measured on the device (the emulator named as an fp16 SoC) against fp32 PyTorch: no worse
    # than the 16-bit stream beyond noise (llama tiny+outliers: 0.9748 / 0.9749)
    fp16, int16 = _logits(report), _logits(built["int16"][1])
    assert fp16["cosine"] >= int16["cosine"] - 0.005 and fp16["cosine"] > 0.96
    session = edgec.load(path)
    feeds = dict(np.load(path / "example_inputs.npz"))
    assert np.isfinite(session.run(feeds)["logits"]).all()


def test_float_stream_graph_reads_no_converts_and_stays_float(built):
    """Every residual Add computes in float on unquantized inputs or on the first dequantized
    form of a MatMul's output (no 16 → 8-bit convert in between), and its sum is not rounded."""
    path, _ = built["fp16"]
    model = onnx.load(str(path / "model.onnx"), load_external_data=False)
    assert FLOAT_NODES_KEY in {p.key for p in model.metadata_props}
    assert graph_provider_options(path / "model.onnx") == {**PROVIDER_OPTIONS, **FP16_OPTIONS}
    producer = {o: n for n in model.graph.node for o in n.output}
    readers: dict[str, list] = {}
    for n in model.graph.node:
        for x in n.input:
            readers.setdefault(x, []).append(n)
    norms = [n for n in model.graph.node if n.op_type == "RMSNormalization"]
    adds = [producer[n.input[0]] for n in norms if n.input[0] in producer
            and producer[n.input[0]].op_type == "Add"]
    assert len(adds) >= 3
    for add in adds:
        assert not any(r.op_type == "QuantizeLinear" for r in readers[add.output[0]])
        for x in add.input:
            dq = producer.get(x)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = producer[dq.input[0]]
            assert q.op_type == "QuantizeLinear"
            assert producer.get(q.input[0]) is None or \
                producer[q.input[0]].op_type != "DequantizeLinear"


def test_stream_option_is_checked():
    with pytest.raises(UserError, match="fully quantized target"):
        edgec.compile("llama", target="openvino-cpu", config="tiny",
                      quantize="w8a8:stream=fp16")
    with pytest.raises(UserError, match="one of fp16, 16bit, 8bit"):
        edgec.compile("llama", target="qnn-htp", config="tiny", quantize="w8a8:stream=fp32")


def _residual_block(path):
    """x [1, 8, 16] → h = x + x·W1 → LayerNormalization(h) → ·W2: one residual sum a norm reads."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1, w2 = (numpy_helper.from_array(rng.normal(0, 0.2, (16, 16)).astype(np.float32), n)
              for n in ("w1", "w2"))
    gamma = numpy_helper.from_array(np.ones(16, np.float32), "gamma")
    beta = numpy_helper.from_array(np.zeros(16, np.float32), "beta")
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["p"], name="proj"),
             helper.make_node("Add", ["x", "p"], ["h"], name="residual"),
             helper.make_node("LayerNormalization", ["h", "gamma", "beta"], ["n"], axis=-1,
                              name="norm"),
             helper.make_node("MatMul", ["n", "w2"], ["y"], name="out")]
    graph = helper.make_graph(nodes, "block",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 16])],
                              [w1, w2, gamma, beta])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                                ir_version=10), path)


@pytest.mark.parametrize("scale, refused", [(1e5, True), (1.0, False)])
def test_fp16_stream_refuses_a_residual_sum_beyond_fp16(tmp_path, scale, refused):
    _residual_block(tmp_path / "block.onnx")
    x = np.random.default_rng(1).normal(0, 1, (8, 1, 8, 16)).astype(np.float32) * scale
    np.savez(tmp_path / "calib.npz", x=x)
    out = tmp_path / "out"
    kwargs = dict(target="qnn-htp", output_dir=out, quantize="w8a8:stream=fp16,min_cos=0",
                  calibration=str(tmp_path / "calib.npz"))
    if refused:
        with pytest.raises(UserError, match=r"'h' reaches .* beyond fp16's largest value "
                                            r"\(65504\).*stream=16bit"):
            edgec.compile(str(tmp_path / "block.onnx"), **kwargs)
        assert not out.exists()  # nothing half-written
        return
    art = edgec.compile(str(tmp_path / "block.onnx"), **kwargs)
    quant = next(p for p in art.report["passes"] if p["name"] == "quantize")
    assert quant["stats"]["scheme"]["float_stream"] and quant["stats"]["excluded_nodes"] == 2
