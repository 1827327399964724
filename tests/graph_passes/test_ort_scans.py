"""onnxruntime.quantization's scans replaced inside ``fast_ort_scans``: the same edits as the
originals, and the originals back afterwards."""

from __future__ import annotations

import copy

import numpy as np
import onnx
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
