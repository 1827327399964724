"""Hand-written .onnx sources (unnamed dims, odd dtypes, odd outputs) through compile, load, run."""

import numpy as np
import onnx
from onnx import TensorProto, helper

import edgec


def _relu(path, shape, elem=TensorProto.FLOAT, outputs=("y",)):
    """y = Relu(x), x of ``shape`` (None: a dynamic dim without a name); ``outputs`` names the
    graph outputs (a repeated name: the same value listed twice)."""
    x = helper.make_tensor_value_info("x", elem, shape)
    ys = [helper.make_tensor_value_info(n, elem, shape) for n in outputs]
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], ys)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.save(model, path)
    return path


def test_unnamed_dynamic_dims_are_question_marks_not_a_shared_name(tmp_path):
    """x [None, None] (no dim_param): the manifest said "None" for both, and run refused (3, 5)
    as "inputs 'x' and 'x' share dim 'None' but have sizes 3 and 5"."""
    art = edgec.compile(str(_relu(tmp_path / "m.onnx", [None, None])), target="ort-cpu",
                        output_dir=tmp_path / "art")
    assert art.manifest["inputs"][0]["shape"] == ["?", "?"]
    assert art.manifest["outputs"][0]["shape"] == ["?", "?"]
    from edgec.inspect import describe

    assert describe(tmp_path / "m.onnx")["inputs"][0]["shape"] == ["?", "?"]
    sess = edgec.load(art.path)
    x = -np.ones((3, 5), np.float32)
    np.testing.assert_array_equal(sess.run({"x": x})["y"], np.zeros((3, 5), np.float32))


def _cli(*args):
    from typer.testing import CliRunner

    from edgec.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_run_prints_an_empty_output(tmp_path):
    """A Relu on [0, 3]: `edgec run` was an internal KeyError 'mean' (exit 1)."""
    art = edgec.compile(str(_relu(tmp_path / "m.onnx", [0, 3])), target="ort-cpu",
                        output_dir=tmp_path / "art")
    np.savez(tmp_path / "x.npz", x=np.zeros((0, 3), np.float32))
    result = _cli("run", art.path, "--inputs", tmp_path / "x.npz")
    assert result.exit_code == 0, result.output
    assert "[0, 3]" in result.stdout and "–" in result.stdout
