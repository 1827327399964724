import numpy as np
import onnx
import onnx_ir as ir
import pytest

from edgec.errors import UserError
from edgec.onnx_io import load_onnx, save_model


def _model_with_weight(n: int = 512) -> ir.Model:
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([n]))
    w = ir.Value(name="w", const_value=ir.tensor(np.arange(n, dtype=np.float32)))
    node = ir.node("Add", [x, w], outputs=[ir.Value(name="y")])
    node.outputs[0].dtype = ir.DataType.FLOAT
    node.outputs[0].shape = ir.Shape([n])
    graph = ir.Graph([x], node.outputs, nodes=[node], initializers=[w], opset_imports={"": 20})
    return ir.Model(graph, ir_version=10)


def test_roundtrip_with_external_data(tmp_path):
    save_model(_model_with_weight(), tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx.data").stat().st_size == 512 * 4
    model = load_onnx(tmp_path / "m.onnx")
    np.testing.assert_array_equal(model.graph.initializers["w"].const_value.numpy(),
                                  np.arange(512, dtype=np.float32))


@pytest.mark.parametrize("content,match", [
    (None, "no such file"),
    (b"", "empty"),
    (b"this is a text file, not a model\n", "not a valid ONNX model"),
])
def test_bad_files(tmp_path, content, match):
    p = tmp_path / "bad.onnx"
    if content is not None:
        p.write_bytes(content)
    with pytest.raises(UserError, match=match):
        load_onnx(p)


def test_truncated_model(tmp_path):
    model = _model_with_weight(8)
    ir.save(model, tmp_path / "full.onnx")  # weights inline
    data = (tmp_path / "full.onnx").read_bytes()
    (tmp_path / "cut.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="not a valid ONNX model|no nodes"):
        load_onnx(tmp_path / "cut.onnx")


def test_directory_is_refused(tmp_path):
    with pytest.raises(UserError, match="not a file"):
        load_onnx(tmp_path)


def test_external_data_outside_model_dir_is_refused(tmp_path):
    inner = tmp_path / "models"
    inner.mkdir()
    save_model(_model_with_weight(), tmp_path / "m.onnx")
    proto = onnx.load(tmp_path / "m.onnx", load_external_data=False)
    for entry in proto.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = "../m.onnx.data"
    onnx.save(proto, inner / "evil.onnx")
    with pytest.raises(UserError, match="outside the model's directory"):
        load_onnx(inner / "evil.onnx")


def test_missing_or_short_external_data(tmp_path):
    save_model(_model_with_weight(), tmp_path / "m.onnx")
    data = tmp_path / "m.onnx.data"
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(UserError, match="shorter"):
        load_onnx(tmp_path / "m.onnx")
    data.unlink()
    with pytest.raises(UserError, match="missing"):
        load_onnx(tmp_path / "m.onnx")


def test_an_ir_version_newer_than_onnxruntime_reads_is_named(tmp_path):
    """onnx >= 1.18 saves IR 11+ by default; the raw ORT message was a long C++ line."""
    import edgec

    save_model(_model_with_weight(8), tmp_path / "m.onnx")
    proto = onnx.load(tmp_path / "m.onnx")
    proto.ir_version = 99
    onnx.save(proto, tmp_path / "new.onnx")
    with pytest.raises(UserError, match=r"ONNX IR version 99 is newer than this onnxruntime "
                                        r"reads \(\d+\); save it with model.ir_version"):
        edgec.compile(str(tmp_path / "new.onnx"), target="ort-cpu", output_dir=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def _constant_with_external_value(location: str, in_subgraph: bool = False,
                                  in_function: bool = False) -> onnx.ModelProto:
    """y = x @ Constant(value=<8x8 float in ``location``>), the Constant in an If branch if
    ``in_subgraph``, in a local function the graph calls if ``in_function``."""
    from onnx import TensorProto, helper

    value = TensorProto(name="c", data_type=TensorProto.FLOAT, dims=[8, 8])
    value.data_location = TensorProto.EXTERNAL
    for key, v in (("location", location), ("offset", "0"), ("length", "256")):
        entry = value.external_data.add()
        entry.key, entry.value = key, v
    const = helper.make_node("Constant", [], ["w"], value=value)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])
    if in_subgraph:
        w = helper.make_tensor_value_info("w", TensorProto.FLOAT, [8, 8])
        branch = helper.make_graph([const], "b", [], [w])
        cond = helper.make_tensor("cond", TensorProto.BOOL, [], [True])
        nodes = [helper.make_node("If", ["cond"], ["w"], then_branch=branch, else_branch=branch)]
        inits = [cond]
    else:
        nodes, inits = [const], []
    functions = []
    if in_function:  # the graph calls local.weights(), whose one node is the Constant
        functions = [helper.make_function("local", "weights", [], ["w"], [const],
                                          [helper.make_opsetid("", 17)])]
        nodes = [helper.make_node("weights", [], ["w"], domain="local")]
    graph = helper.make_graph(nodes + [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [x], [y], inits)
    model = helper.make_model(graph, functions=functions, opset_imports=[
        helper.make_opsetid("", 17), helper.make_opsetid("local", 1)])
    model.ir_version = 10
    return model


@pytest.mark.parametrize("case", ["dotdot", "absolute", "symlink", "subgraph", "function"])
def test_an_attribute_tensor_outside_the_model_dir_is_refused(tmp_path, case):
    """A Constant's value tensor with external data outside the model's directory was left to
    ONNX Runtime's own check: `edgec inspect` and the compile's load read it (exit 0)."""
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.arange(64, dtype=np.float32).tobytes())
    inner = tmp_path / "models"
    inner.mkdir()
    if case == "symlink":
        (inner / "link.bin").symlink_to(secret)
    location = {"dotdot": "../secret.bin", "absolute": str(secret), "symlink": "link.bin",
                "subgraph": "../secret.bin", "function": "../secret.bin"}[case]
    onnx.save(_constant_with_external_value(location, case == "subgraph", case == "function"),
              inner / "m.onnx")
    with pytest.raises(UserError, match=r"attribute 'value' of Constant node .* outside the "
                                        r"model's directory"):
        load_onnx(inner / "m.onnx")


def test_an_attribute_tensor_inside_the_model_dir_loads(tmp_path):
    (tmp_path / "c.bin").write_bytes(np.arange(64, dtype=np.float32).tobytes())
    onnx.save(_constant_with_external_value("c.bin"), tmp_path / "m.onnx")
    load_onnx(tmp_path / "m.onnx")
    (tmp_path / "c.bin").write_bytes(b"short")
    with pytest.raises(UserError, match="attribute 'value' .* shorter"):
        load_onnx(tmp_path / "m.onnx")
