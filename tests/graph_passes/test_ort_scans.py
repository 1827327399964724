"""onnxruntime.quantization's scans replaced inside ``fast_ort_scans``: the same edits as the
originals, and the originals back afterwards."""

from __future__ import annotations

import contextlib
import copy

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import onnx_model, quant_utils

from edgec.graph_passes.quantization.ort_scans import fast_ort_scans


def _graph() -> onnx.ModelProto:
    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    twin = numpy_helper.from_array(np.zeros((4, 4), np.float32), "w")  # a second "w"
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"], name="m0"),
             helper.make_node("Add", ["a", "a"], ["b"], name="add"),  # one name twice
             helper.make_node("Mul", ["b", "x"], ["y"], name="mul")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w, twin])
    return helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 17)])


def _edit(model: onnx.ModelProto):
    m = onnx_model.ONNXModel(model)
    m.replace_input_of_all_nodes("a", "a_dq")
    m.replace_input_of_all_nodes("x", "x_dq")
    m.replace_input_of_all_nodes("absent", "z")
    m.replace_output_of_all_nodes("y", "y_q")
    found = m.get_initializer("w")
    return ([list(n.input) + list(n.output) for n in model.graph.node],
            numpy_helper.to_array(found).sum(),
            quant_utils.find_by_name("mul", model.graph.node).name,
            quant_utils.find_by_name("none", model.graph.node))


def test_the_replacements_edit_as_the_originals_do():
    originals = (onnx_model.ONNXModel.replace_input_of_all_nodes, quant_utils.find_by_name)
    plain = _edit(_graph())
    with fast_ort_scans():
        assert onnx_model.ONNXModel.replace_input_of_all_nodes is not originals[0]
        with fast_ort_scans():  # nested: still replaced
            pass
        assert quant_utils.find_by_name is not originals[1]
        fast = _edit(_graph())
    assert (onnx_model.ONNXModel.replace_input_of_all_nodes, quant_utils.find_by_name) == originals
    assert fast == plain
    assert plain[0][1] == ["a_dq", "a_dq", "b"] and plain[0][2] == ["b", "x_dq", "y_q"]
    assert plain[1] == 16.0 and plain[2] == "mul" and plain[3] is None  # the first "w"


def _edits_over_time(model: onnx.ModelProto):
    """ORT's edits interleaved with lookups: each lookup must see every edit before it."""
    m = onnx_model.ONNXModel(model)
    seen = [m.get_initializer("w") is not None]
    m.replace_input_of_all_nodes("x", "x_dq")  # indexes built here
    m.add_node(helper.make_node("Neg", ["x_dq"], ["n"], name="neg"))  # indexed from the tail
    m.replace_input_of_all_nodes("x_dq", "x_dq2")
    ONNXModel = onnx_model.ONNXModel
    ONNXModel.replace_node_input(model.graph.node[1], "a", "a_one")  # one node moves
    m.replace_input_of_all_nodes("a_one", "a_two")
    m.add_initializer(numpy_helper.from_array(np.full((2,), 3.0, np.float32), "s"))
    seen.append(float(numpy_helper.to_array(m.get_initializer("s")).sum()))
    m.remove_node(model.graph.node[0])  # indexes dropped, rebuilt on the next lookup
    m.replace_input_of_all_nodes("b", "b_dq")
    m.remove_initializer(m.get_initializer("s"))
    seen.append(m.get_initializer("s"))
    m.add_initializer(numpy_helper.from_array(np.ones((2,), np.float32), "s"))
    seen.append(float(numpy_helper.to_array(m.get_initializer("s")).sum()))
    m.replace_output_of_all_nodes("n", "n_q")
    m.replace_input_of_all_nodes("a_two", "a_three")
    return [list(n.input) + list(n.output) for n in model.graph.node], seen


def test_the_indexes_follow_every_edit():
    plain = _edits_over_time(_graph())
    with fast_ort_scans():
        fast = _edits_over_time(_graph())
    assert fast == plain
    nodes, seen = plain
    assert seen == [True, 6.0, None, 2.0]
    assert sorted(map(tuple, nodes)) == sorted([("a_three", "a_three", "b"), ("b_dq", "x_dq2", "y"),
                                                ("x_dq2", "n_q")])


def test_quantize_static_writes_the_same_graph(tmp_path):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    model = _graph()
    del model.graph.initializer[1]
    onnx.save(model, tmp_path / "f.onnx")
    rng = np.random.default_rng(0)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"x": rng.normal(size=(1, 4)).astype(np.float32)}
                               for _ in range(4)])

        def get_next(self):
            return next(self.items, None)

    def run(name, fast):
        rng.bit_generator.state = copy.deepcopy(state)
        if fast:
            with fast_ort_scans():
                quantize_static(tmp_path / "f.onnx", tmp_path / name, Reader(),
                                quant_format=QuantFormat.QDQ)
        else:
            quantize_static(tmp_path / "f.onnx", tmp_path / name, Reader(),
                            quant_format=QuantFormat.QDQ)
        return onnx.load(tmp_path / name)

    state = copy.deepcopy(rng.bit_generator.state)
    plain, fast = run("plain.onnx", False), run("fast.onnx", True)
    assert sum(n.op_type == "QuantizeLinear" for n in fast.graph.node) >= 2
    assert fast.graph.SerializeToString() == plain.graph.SerializeToString()


@pytest.fixture(scope="module")
def llama_tiny():
    from edgec.exporters.sources import resolve_source

    return resolve_source("llama", "tiny")


@pytest.mark.parametrize("target,scheme,wide", [("qnn-htp", "w4a8", True),
                                                ("ort-cpu", "w8a8", False),
                                                ("openvino-cpu", "w8a8", False)])
def test_edgec_quantization_writes_orts_graph(llama_tiny, monkeypatch, target, scheme, wide):
    """The targets' own QDQ configurations (on the NPU with a MatMul kept at w8a16: 8-bit
    weights, 16-bit activations converted for their 8-bit readers) through ``quantize_static``
    as ORT runs it and with the indexed scans and whole-weight quantization (``ort_weights``):
    the same graph, byte for byte."""
    import onnx_ir as ir

    from edgec.calibration import collect_cache
    from edgec.graph_passes.quantization import ort_scans, ort_weights
    from edgec.graph_passes.quantization.options import QuantOptions
    from edgec.graph_passes.quantization.quantize import QuantizePass
    from edgec.targets import get

    tgt = get(target)
    model = llama_tiny.model
    exclude = [n.name for n in model.graph if n.op_type == "MatMul"
               and n.inputs[1].const_value is not None][1:2] if wide else []
    options = QuantOptions.parse({"scheme": scheme, "min_cos": 0.0,
                                  "exclude": ";".join(exclude)}, tgt)
    s = options.scheme_on(tgt)
    work = model.clone()
    for p in tgt.before_quantize:
        work = p()(work).model
    cache = collect_cache(work, options.calibration_request(tgt), llama_tiny)

    vectorized = []

    def written(fast: bool) -> ir.Model:
        if fast:  # counted: the whole-weight path ran, not ORT's behind it
            params = ort_weights.channel_params
            monkeypatch.setattr(ort_weights, "channel_params",
                                lambda *a: vectorized.append(1) or params(*a))
        else:
            monkeypatch.setattr(ort_scans, "fast_ort_scans", contextlib.nullcontext)
            monkeypatch.setattr(ort_weights, "fast_ort_weights", contextlib.nullcontext)
        out = QuantizePass(s, tgt, cache, options.exclude)(work.clone()).model
        monkeypatch.undo()
        return out

    fast = written(True)
    assert len(vectorized) >= 4
    assert ir.to_proto(fast).graph.SerializeToString() == ir.to_proto(
        written(False)).graph.SerializeToString()
    weights = {n.name: n.inputs[1].producer().inputs[0].dtype for n in fast.graph
               if n.op_type == "MatMul" and n.inputs[1].producer() is not None
               and n.inputs[1].producer().inputs[0].const_value is not None}
    assert len(weights) >= 4
    if wide:  # the kept MatMul's weight int8, the layers' int4; 16-bit converted to 8 for readers
        assert weights.pop(exclude[0]) == ir.DataType.INT8
        assert ir.DataType.INT4 in set(weights.values())
        assert any(n.op_type == "QuantizeLinear" and n.inputs[0].producer() is not None
                   and n.inputs[0].producer().op_type == "DequantizeLinear" for n in fast.graph)
