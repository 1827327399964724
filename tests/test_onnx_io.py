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
