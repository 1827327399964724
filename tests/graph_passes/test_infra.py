import numpy as np
import onnx_ir as ir
import pytest

from edgec.errors import VerificationError
from edgec.graph_passes import CleanupPass, EdgecPass, PassManager, PassResult
from edgec.runtimes.ort import run_model

MODEL = """
<ir_version: 10, opset_import: ["" : 20]>
g (float[N, 4] x) => (float[N, 4] y) <float[4] w = {1.0, 2.0, 3.0, 4.0}> {
    a = Identity(x)
    b = Mul(a, w)
    dead = Relu(b)
    y = Add(b, x)
}
"""


def _model() -> ir.Model:
    return ir.from_onnx_text(MODEL)


def _feeds():
    return {"x": np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)}


class ScaleWeight(EdgecPass):
    """A deliberately wrong 'exact' pass: scales the weight."""

    name = "scale-weight"

    def __init__(self, factor: float, exact: bool = True):
        super().__init__()
        self.factor = factor
        self.exact = exact

    def call(self, model):
        w = model.graph.initializers["w"]
        w.const_value = ir.tensor(w.const_value.numpy() * self.factor)
        return PassResult(model, True, {"weights_scaled": 1})


def test_cleanup_removes_identity_and_dead_nodes_exactly():
    model = _model()
    before = run_model(model, _feeds())
    pm = PassManager([CleanupPass()], check=True, feeds=_feeds())
    model = pm(model)
    assert [n.op_type for n in model.graph] == ["Mul", "Add"]
    (record,) = pm.records
    # the text format leaves nodes unnamed: the quantizer and LPBQ's fp32 lookup need names
    assert record.stats == {"nodes_removed": 2, "initializers_removed": 0, "nodes_named": 2}
    assert [n.name for n in model.graph] == ["Mul_0", "Add_1"]
    assert record.check["outputs"]["y"]["max_rel"] <= 1e-6
    np.testing.assert_allclose(run_model(model, _feeds())["y"], before["y"], rtol=1e-6, atol=0)


def test_cleanup_keeps_a_tensor_returned_twice():
    """``return y, y`` exports as ``y2 = Identity(y)``, both graph outputs: onnx-ir merged them
    into two outputs of one name and ``y`` was lost."""
    model = ir.from_onnx_text("""
<ir_version: 10, opset_import: ["" : 20]>
g (float[N, 4] x) => (float[N, 4] y, float[N, 4] y2, float[N, 4] x2) {
    y = Neg(x)
    y2 = Identity(y)
    x2 = Identity(x)
}
""")
    model = PassManager([CleanupPass()], check=True, feeds=_feeds())(model)
    assert [v.name for v in model.graph.outputs] == ["y", "y2", "x2"]
    out = run_model(model, _feeds())
    np.testing.assert_array_equal(out["y2"], -_feeds()["x"])
    np.testing.assert_array_equal(out["y"], out["y2"])


def test_cleanup_lifts_constants_of_an_onnx_file_exactly():
    """The legacy exporter writes a Resize's scales, a Reshape's shape, as Constant nodes (the
    HTP's quantizer then quantized them); with ``lift_constants`` they become initializers."""
    model = ir.from_onnx_text("""
<ir_version: 10, opset_import: ["" : 20]>
g (float[N, 4] x) => (float[N, 4] y) {
    s = Constant <value = float[1] {2.0}> ()
    shape = Constant <value_ints = [-1, 4]> ()
    m = Mul(x, s)
    y = Reshape(m, shape)
}
""")
    pm = PassManager([CleanupPass(lift_constants=True)], check=True, feeds=_feeds())
    model = pm(model)
    assert [n.op_type for n in model.graph] == ["Mul", "Reshape"]
    assert sorted(model.graph.initializers) == ["s", "shape"]
    assert pm.records[0].stats == {"nodes_removed": 0, "initializers_removed": 0,
                                   "nodes_named": 2, "constants_lifted": 2}
    np.testing.assert_array_equal(run_model(model, _feeds())["y"], 2 * _feeds()["x"])


def test_cleanup_makes_initializer_inputs_weights_and_names_unnamed_nodes(tmp_path):
    """An IR-3 style file lists its weights as graph inputs (the manifest then named W as an
    input every session refused), and onnx.helper files leave nodes unnamed (passes that index
    nodes by name took them for one another: w4a8 on qnn-htp raised an IndexError)."""
    import onnx
    from onnx import TensorProto, helper

    import edgec

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    w = helper.make_tensor("W", TensorProto.FLOAT, [3, 3],
                           np.arange(9, dtype=np.float32) / 9)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["m"]), helper.make_node("Relu", ["m"], ["y"])],
        "g", [x, helper.make_tensor_value_info("W", TensorProto.FLOAT, [3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], initializer=[w])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.save(proto, tmp_path / "m.onnx")
    art = edgec.compile(str(tmp_path / "m.onnx"), target="ort-cpu", output_dir=tmp_path / "o")
    assert [i["name"] for i in art.manifest["inputs"]] == ["x"]
    saved = onnx.load(tmp_path / "o" / "model.onnx")
    names = [n.name for n in saved.graph.node]
    assert all(names) and len(set(names)) == len(names)
    feeds = {"x": np.ones((2, 3), np.float32)}
    np.testing.assert_allclose(art.load().run(feeds)["y"],
                               np.maximum(feeds["x"] @ (np.arange(9) / 9).reshape(3, 3), 0),
                               rtol=1e-6)


def test_check_catches_a_pass_that_changes_the_numbers():
    pm = PassManager([ScaleWeight(1.01)], check=True, feeds=_feeds())
    with pytest.raises(VerificationError, match="pass 'scale-weight' changed output 'y'"):
        pm(_model())


def test_exact_pass_within_tolerance_passes():
    pm = PassManager([ScaleWeight(1 + 1e-7)], check=True, feeds=_feeds())
    pm(_model())
    assert pm.records[0].check["exact"] is True


def test_approximating_pass_reports_instead_of_failing():
    pm = PassManager([ScaleWeight(1.5, exact=False)], check=True, feeds=_feeds())
    pm(_model())
    check = pm.records[0].check
    assert check["exact"] is False and check["rtol"] is None
    assert 0 < check["outputs"]["y"]["rel_l2"] < 1
    assert pm.records[0].stats == {"weights_scaled": 1}


def test_without_check_no_runtime_is_needed_and_feeds_are_required_with_it():
    pm = PassManager([ScaleWeight(2.0)])
    pm(_model())
    assert pm.records[0].check is None
    with pytest.raises(ValueError):
        PassManager([CleanupPass()], check=True)
