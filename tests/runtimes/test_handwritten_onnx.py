"""Hand-written .onnx sources (unnamed dims, odd dtypes, odd outputs) through compile, load, run."""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import edgec
from edgec.errors import UserError


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


def _add(path):
    """z = x + y, both [2, 3] float32."""
    xs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3]) for n in ("x", "y")]
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 3])
    graph = helper.make_graph([helper.make_node("Add", ["x", "y"], ["z"])], "g", xs, [z])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def add_session(tmp_path_factory):
    root = tmp_path_factory.mktemp("add")
    art = edgec.compile(str(_add(root / "m.onnx")), target="ort-cpu", output_dir=root / "art")
    return edgec.load(art.path)


def test_run_takes_a_list_keywords_or_the_example_and_refuses_the_rest(add_session):
    """run([x, y]) / run((x, y)) / run(x, y) were TypeError unhashable ndarray, run(x=, y=)
    an unexpected keyword, run(None) NoneType not iterable."""
    s = add_session
    x, y = np.ones((2, 3), np.float32), np.full((2, 3), 2, np.float32)
    for out in (s.run([x, y]), s.run((x, y)), s.run(x=x, y=y), s.run({"x": x, "y": y})):
        np.testing.assert_array_equal(out["z"], x + y)
    assert s.run()["z"].shape == (2, 3) == s.run(None)["z"].shape  # the example inputs
    with pytest.raises(UserError, match=r"pass the inputs as one dict .*run\(\[a, b\]\)"):
        s.run(x, y)
    with pytest.raises(UserError, match=r"got 1 arrays, the model takes 2 inputs \['x', 'y'\]"):
        s.run([x])
    with pytest.raises(UserError, match=r"feeds must be a dict keyed by the input names"):
        s.run(x)
    with pytest.raises(UserError, match="not both"):
        s.run({"x": x}, y=y)


@pytest.mark.filterwarnings("error")  # numpy's overflow RuntimeWarning was the only sign
def test_float_feeds_that_do_not_fit_the_float_input_are_refused(tmp_path):
    """1e30 into a float16 input ran as inf (all outputs inf); int64 2**24 + 1 into float32 ran
    as 2**24."""
    f16 = edgec.load(edgec.compile(str(_relu(tmp_path / "h.onnx", [2, 3], TensorProto.FLOAT16)),
                                   target="ort-cpu", output_dir=tmp_path / "h").path)
    with pytest.raises(UserError, match=r"^input 'x' holds 1e\+30, which does not fit its dtype "
                                        r"float16 \(finite up to ±65504\)"):
        f16.run({"x": np.full((2, 3), 1e30)})
    x = np.full((2, 3), 2.5)
    x[0, 0] = np.inf  # not finite to begin with: the value is kept
    out = f16.run({"x": x})["y"]
    assert out.dtype == np.float16 and out[0, 0] == np.inf and out[1, 2] == 2.5
    f32 = edgec.load(edgec.compile(str(_relu(tmp_path / "f.onnx", [2, 3])), target="ort-cpu",
                                   output_dir=tmp_path / "f").path)
    with pytest.raises(UserError, match=r"holds 16777217, which its dtype float32 cannot hold "
                                        r"exactly \(integers up to ±16777216\)"):
        f32.run({"x": np.full((2, 3), 2**24 + 1, np.int64)})
    np.testing.assert_array_equal(f32.run({"x": np.full((2, 3), 2**24, np.int64)})["y"], 2**24)


def test_nan_and_inf_compare_equal_where_both_have_them_and_run_counts_them(tmp_path):
    """`compare A A` on an input with NaN/±inf said max abs inf, cosine 0; `run` showed min/max
    nan although finite and inf elements were there."""
    from edgec.exporters.verify import compare_outputs

    art = edgec.compile(str(_relu(tmp_path / "m.onnx", [2, 3])), target="ort-cpu",
                        output_dir=tmp_path / "art")
    x = np.array([[np.nan, np.inf, -np.inf], [1.0, 2.0, -3.0]], np.float32)
    np.savez(tmp_path / "nan.npz", x=x)
    result = _cli("compare", art.path, art.path, "--inputs", tmp_path / "nan.npz", "--json")
    assert result.exit_code == 0, result.output
    e = json.loads(result.stdout)["outputs"]["y"]
    assert (e["max_abs"], e["nonfinite"]) == (0.0, 2) and e["cosine"] == pytest.approx(1)
    other = x.copy()
    other[0, 0] = 5.0
    assert compare_outputs({"y": other}, {"y": x})["y"]["nonfinite_mismatch"] == 1
    result = _cli("run", art.path, "--inputs", tmp_path / "nan.npz", "--json")
    s = json.loads(result.stdout)["outputs"]["y"]
    assert (s["min"], s["max"], s["nan"], s["posinf"], s["neginf"]) == (0.0, 2.0, 1, 1, 0)
    table = _cli("run", art.path, "--inputs", tmp_path / "nan.npz").stdout
    assert "1 / 1 / 0" in table and "finite elements" in table


def test_an_output_listed_twice_is_one_output(tmp_path):
    """A graph listing y twice as an output: the manifest and Session.outputs listed it twice."""
    art = edgec.compile(str(_relu(tmp_path / "m.onnx", [2, 3], outputs=("y", "y"))),
                        target="ort-cpu", output_dir=tmp_path / "art")
    assert [o["name"] for o in art.manifest["outputs"]] == ["y"]
    assert [o.name for o in edgec.load(art.path).outputs] == ["y"]


def test_compare_title_names_the_artifacts_in_argument_order(tmp_path):
    """`compare A B` titled its table "B vs A" while --json said reference A."""
    a = edgec.compile(str(_relu(tmp_path / "m.onnx", [2, 3])), target="ort-cpu",
                      output_dir=tmp_path / "first")
    b = edgec.compile(str(tmp_path / "m.onnx"), target="ort-cpu", output_dir=tmp_path / "second")
    text = _cli("compare", a.path, b.path).stdout
    assert text.index("first") < text.index("second") and "reference" in text


def _damaged(tmp_path, src, name, damage):
    import shutil

    art = shutil.copytree(src, tmp_path / name)
    damage(art)
    return art


def _relocate(art, location, rehash=False):
    m = onnx.load(art / "model.onnx", load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    onnx.save(m, art / "model.onnx")
    if rehash:  # no hash to tell it changed: the external-data check still refuses
        manifest = json.loads((art / "manifest.json").read_text())
        manifest["hashes"] = {}
        (art / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("case, match", [
    ("cut model", r"damaged \(model.onnx changed since it was compiled"),
    ("cut weights", r"damaged \(model.onnx.data changed since it was compiled"),
    ("escape", r"damaged \(model.onnx changed"),
    ("absolute, no hashes", r"damaged: initializer .* outside the model's directory "
                            r"\('/etc/passwd'\); refusing to follow it"),
])
def test_a_damaged_artifact_is_one_line_exit_2(tmp_path, case, match):
    """ONNX Runtime's InvalidProtobuf, "Deserialize tensor failed" and "External data path
    escapes model directory" were internal errors (exit 1)."""
    src = edgec.compile(str(_matmul_onnx(tmp_path / "m.onnx")), target="ort-cpu",
                        output_dir=tmp_path / "art").path
    assert (src / "model.onnx.data").is_file()
    damage = {"cut model": lambda a: (a / "model.onnx").write_bytes(
                  (a / "model.onnx").read_bytes()[:100]),
              "cut weights": lambda a: (a / "model.onnx.data").write_bytes(
                  (a / "model.onnx.data").read_bytes()[:100]),
              "escape": lambda a: _relocate(a, "../../../../etc/passwd"),
              "absolute, no hashes": lambda a: _relocate(a, "/etc/passwd", rehash=True)}[case]
    art = _damaged(tmp_path, src, "bad", damage)
    result = _cli("run", art)
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), lines
    assert __import__("re").search(match, lines[0]), lines[0]


def _matmul_onnx(path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 32])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 32])
    w = helper.make_tensor("w", TensorProto.FLOAT, [32, 32], np.arange(1024.0).tolist())
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y],
                              [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("target, weights", [("openvino-cpu", "target/model.bin"),
                                             ("ort-cpu", "model.onnx.data")])
def test_a_symbolic_link_out_of_the_artifact_is_refused(tmp_path, target, weights):
    """`run` read OpenVINO's target/model.bin (and QNN's context binary) through a symlink to
    weights outside the artifact, exit 0; `inspect` showed it. A link that stays inside runs."""
    import shutil

    src = edgec.compile(str(_matmul_onnx(tmp_path / "m.onnx")), target=target,
                        output_dir=tmp_path / "art").path
    outside = tmp_path / "elsewhere.bin"
    shutil.copy(src / weights, outside)
    art = _damaged(tmp_path, src, "linked", lambda a: ((a / weights).unlink(),
                                                       (a / weights).symlink_to(outside)))
    for command in ("run", "inspect"):
        result = _cli(command, art)
        assert result.exit_code == 2, result.output
        lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and f"{weights} is a symbolic link to" in lines[0], lines
        assert "outside the artifact" in lines[0]
    with pytest.raises(UserError, match="outside the artifact"):
        edgec.load(art)
    # a directory (ort-cpu: the data file) moved out and linked, and a dangling link
    link = "target" if (src / "target").is_dir() else "model.onnx.data"
    art = _damaged(tmp_path, src, "dir", lambda a: (shutil.move(a / link, tmp_path / "t"),
                                                    (a / link).symlink_to(tmp_path / "t")))
    with pytest.raises(UserError, match=f"{link} is a symbolic link to .* outside the artifact"):
        edgec.load(art)
    (art / link).unlink()
    (art / link).symlink_to(tmp_path / "gone")
    with pytest.raises(UserError, match=f"{link} is a symbolic link that does not resolve"):
        edgec.load(art)
    # inside the artifact: allowed
    art = _damaged(tmp_path, src, "inside", lambda a: (shutil.move(a / weights, a / "w.bin"),
                                                       (a / weights).symlink_to(a / "w.bin")))
    assert _cli("run", art).exit_code == 0


def test_an_npz_of_object_arrays_is_refused(tmp_path):
    """`run --inputs obj.npz`: "Object arrays cannot be loaded when allow_pickle=False" was an
    internal error (numpy reads each array lazily, past the load's except)."""
    art = edgec.compile(str(_relu(tmp_path / "m.onnx", [2])), target="ort-cpu",
                        output_dir=tmp_path / "art")
    np.savez(tmp_path / "obj.npz", x=np.array([1, "a"], dtype=object))
    result = _cli("run", art.path, "--inputs", tmp_path / "obj.npz")
    assert result.exit_code == 2
    assert "holds object arrays" in result.stderr and "save numeric arrays" in result.stderr


@pytest.mark.parametrize("elem, name", [(TensorProto.BFLOAT16, "bfloat16"),
                                        (TensorProto.STRING, "string")])
def test_inputs_numpy_cannot_hold_are_refused(tmp_path, elem, name):
    """A bfloat16 or string input: TypeError "data type 'tensor(bfloat16)' not understood"."""
    x = helper.make_tensor_value_info("x", elem, [2, 3])
    y = helper.make_tensor_value_info("y", elem, [2, 3])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.save(model, tmp_path / "m.onnx")
    with pytest.raises(UserError, match=rf"input 'x' is {name}, which edgec cannot feed"):
        edgec.compile(str(tmp_path / "m.onnx"), target="ort-cpu", output_dir=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_a_truncated_safetensors_checkpoint_is_named(tmp_path, bert_checkpoint):
    """transformers' SafetensorError on a cut model.safetensors was an internal error."""
    import shutil

    ckpt = shutil.copytree(bert_checkpoint, tmp_path / "bert")
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(UserError, match=r"model.safetensors: is not a readable safetensors file"):
        edgec.compile(str(ckpt), target="ort-cpu", output_dir=tmp_path / "o")
