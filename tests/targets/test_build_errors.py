"""Target builds classify failures: an op the target cannot run → UserError, a broken model → not.

The model a build gets was written by edgec from a source ONNX Runtime already loaded, so a model
that does not load is edgec's fault (InternalError, exit 1), not the user's (UserError, exit 2).
"""

from __future__ import annotations

from types import SimpleNamespace

import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as H

from edgec.errors import InternalError, UserError
from edgec.targets import openvino_cpu, ort_cpu

TARGET = SimpleNamespace(runtime_config={})  # _build reads only this of its target


def _write(path, nodes, inputs=None, domains=()):
    inputs = inputs or [H.make_tensor_value_info("x", T.FLOAT, [2])]
    graph = H.make_graph(nodes, "g", inputs, [H.make_tensor_value_info("y", T.FLOAT, [2])])
    opsets = [H.make_opsetid("", 20), *(H.make_opsetid(d, 1) for d in domains)]
    onnx.save(H.make_model(graph, opset_imports=opsets, ir_version=10), path)
    return path


@pytest.fixture
def relu(tmp_path):
    return _write(tmp_path / "relu.onnx", [H.make_node("Relu", ["x"], ["y"])])


@pytest.fixture
def custom_op(tmp_path):
    """An op of a custom domain: no runtime or converter knows it."""
    frob = H.make_node("Frob", ["x"], ["y"], domain="com.example")
    return _write(tmp_path / "custom.onnx", [frob], domains=["com.example"])


@pytest.fixture
def type_mismatch(tmp_path):
    """Add of float and int64: an invalid graph, as a broken pass would write it."""
    return _write(tmp_path / "mismatch.onnx", [H.make_node("Add", ["x", "c"], ["y"])],
                  [H.make_tensor_value_info("x", T.FLOAT, [2]),
                   H.make_tensor_value_info("c", T.INT64, [2])])


@pytest.fixture
def unknown_op(tmp_path):
    return _write(tmp_path / "unknown.onnx", [H.make_node("Frobnicate", ["x"], ["y"])])


def test_ort_cpu_loads_a_valid_model(relu, tmp_path):
    result = ort_cpu._build(TARGET, relu, tmp_path / "target")
    assert result.runtime["providers"] == ["CPUExecutionProvider"]


@pytest.mark.parametrize("model", ["custom_op", "type_mismatch", "unknown_op"])
def test_ort_cpu_load_failure_of_the_rewritten_model_is_internal(model, request, tmp_path):
    path = request.getfixturevalue(model)
    with pytest.raises(InternalError) as e:
        ort_cpu._build(TARGET, path, tmp_path / "target")
    assert not isinstance(e.value, UserError)
    msg = str(e.value)
    assert "ONNX Runtime CPU cannot load the rewritten model" in msg and "edgec bug" in msg
    assert str(path) in msg and "\n" not in msg


def test_openvino_converts_a_valid_model(relu, tmp_path):
    result = openvino_cpu._build(TARGET, relu, tmp_path / "target")
    assert (tmp_path / "target" / "model.xml").is_file()
    assert result.files == ["target/model.xml", "target/model.bin"]


@pytest.mark.parametrize("model", ["custom_op", "unknown_op"])
def test_openvino_op_without_conversion_rule_is_a_user_error(model, request, tmp_path):
    path = request.getfixturevalue(model)
    with pytest.raises(UserError, match=r"^OpenVINO cannot convert the model: -- No conversion "
                                        r"rule found for operations: .*Frob"):
        openvino_cpu._build(TARGET, path, tmp_path / "target")
    assert not (tmp_path / "target").exists()


def test_openvino_conversion_that_fails_validation_is_internal(type_mismatch, tmp_path):
    """OpConversionFailure for an op that has a rule but whose node is invalid: edgec's fault."""
    with pytest.raises(InternalError, match=r"OpenVINO failed to convert the rewritten model .*"
                                            r"OpConversionFailure.*Add") as e:
        openvino_cpu._build(TARGET, type_mismatch, tmp_path / "target")
    assert not isinstance(e.value, UserError)


def test_openvino_unexpected_failure_is_internal(relu, tmp_path, monkeypatch):
    import openvino as ov

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(ov, "convert_model", boom)
    with pytest.raises(InternalError, match=r"RuntimeError: boom\)") as e:
        openvino_cpu._build(TARGET, relu, tmp_path / "target")
    assert not isinstance(e.value, UserError)
    assert isinstance(e.value.__cause__, RuntimeError)


def test_openvino_builds_from_a_directory_with_a_comma(tmp_path):
    """OpenVINO's convert_model splits a path at commas; a directory named after a recipe
    (``out-keep=0.25,layer=2``) still builds."""
    where = tmp_path / "out-keep=0.25,layer=2"
    where.mkdir()
    model = _write(where / "model.onnx", [H.make_node("Relu", ["x"], ["y"])])
    built = openvino_cpu._build(TARGET, model, where / "target")
    assert (where / "target" / "model.xml").is_file() and built.runtime["model"]


def test_openvino_keeps_a_graph_input_that_is_also_an_output(tmp_path):
    """convert_model split such an input into two parameters (x and x_1, the output renamed),
    so the artifact asked for an input the model does not have."""
    import numpy as np

    from edgec.runtimes.openvino import OpenVINOSession

    x = H.make_tensor_value_info("x", T.FLOAT, [2])
    graph = H.make_graph([H.make_node("Relu", ["x"], ["y"])], "g", [x],
                         [H.make_tensor_value_info("y", T.FLOAT, [2]), x])
    model = tmp_path / "passthrough.onnx"
    onnx.save(H.make_model(graph, opset_imports=[H.make_opsetid("", 20)], ir_version=10), model)
    built = openvino_cpu._build(TARGET, model, tmp_path / "target")
    session = OpenVINOSession(tmp_path / built.runtime["model"])
    assert [i.name for i in session.inputs] == ["x"]
    assert sorted(o.name for o in session.outputs) == ["x", "y"]
    feed = np.array([-1.0, 2.0], np.float32)
    out = session.run({"x": feed})
    np.testing.assert_array_equal(out["x"], feed)
    np.testing.assert_array_equal(out["y"], [0.0, 2.0])
