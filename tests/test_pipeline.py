import json

import numpy as np
import pytest
import torch

import edgec
from edgec.artifact import FORMAT
from edgec.errors import UserError


def test_registry_model_compiles_for_both_targets(dit_tiny_artifacts):
    for art, runtime in zip(dit_tiny_artifacts, ("ort", "openvino")):
        m = art.manifest
        assert m["format"] == FORMAT and m["runtime"]["name"] == runtime
        assert [i["name"] for i in m["inputs"]] == ["latent", "timestep", "text"]
        assert [o["name"] for o in m["outputs"]] == ["output"]
        assert m["source"]["name"] == "video-dit" and m["source"]["config"] == "tiny"
        # every file the artifact ships is hashed
        assert {"model.onnx", "model.onnx.data", "example_inputs.npz"} <= set(m["hashes"])
        fid = art.report["fidelity"]
        for key in ("export_vs_pytorch", "target_vs_source"):
            assert fid[key]["outputs"]["output"]["max_rel"] <= 1e-5
        assert (art.path / "report.md").read_text().startswith("# edgec report")
        assert json.loads((art.path / "report.json").read_text())["target"] == m["target"]["name"]
    assert (dit_tiny_artifacts[1].path / "target" / "model.xml").is_file()


def test_check_records_each_pass(dit_tiny_artifacts):
    ort_art = dit_tiny_artifacts[0]
    recipe = ort_art.manifest["recipe"]
    # unsigned-weights: ort-cpu's last pass where this host's int8 saturates (host_int8)
    assert [p for p in recipe["passes"] if p != "unsigned-weights"] == ["cleanup"]
    assert recipe["check"] is True and recipe["options"] == {}
    assert ort_art.manifest["passes"][0]["name"] == "cleanup"


def test_parameter_map_covers_the_dit_weights(dit_tiny_artifacts):
    pmap = dit_tiny_artifacts[0].manifest["parameter_map"]
    from edgec.models import registry

    module = registry.get("video-dit").build("tiny")
    weights = [n for n, p in module.named_parameters() if p.ndim >= 1]
    missing = [w for w in weights if w not in pmap]
    assert not missing, missing


def test_plain_module_compiles(tmp_path, tiny_mlp):
    module, inputs = tiny_mlp
    art = edgec.compile(module, example_inputs=inputs, target="openvino-cpu",
                        output_dir=tmp_path / "out")
    sess = edgec.load(art.path)
    got = sess.run({"x": inputs[0].numpy()})["output"]
    np.testing.assert_allclose(got, module(*inputs).detach().numpy(), rtol=1e-5, atol=1e-5)


def test_foreign_onnx_compiles_and_matches_ort(tmp_path, mlp_onnx, tiny_mlp):
    art = edgec.compile(str(mlp_onnx), target="ort-cpu", output_dir=tmp_path / "out")
    assert art.report["fidelity"]["export_vs_pytorch"] is None
    assert art.report["fidelity"]["target_vs_source"]["reference"] == "onnxruntime"
    module, _ = tiny_mlp
    x = torch.randn(3, 5, 16)
    sess = edgec.load(art.path)
    got = sess.run({"x": x.numpy()})[sess.outputs[0].name]
    np.testing.assert_allclose(got, module(x).detach().numpy(), rtol=1e-5, atol=1e-5)


def test_an_onnx_example_tuple_is_bound_to_its_inputs_in_order(tmp_path, cnn_onnx):
    """A tuple of arrays was a TypeError (unhashable ndarray); of tensors, a refusal that
    printed the whole tensor as an unknown input name."""
    x = np.random.default_rng(1).standard_normal((2, 3, 16, 16)).astype(np.float32)
    for i, example in enumerate(((x,), [torch.from_numpy(x)], x)):
        art = edgec.compile(str(cnn_onnx), target="openvino-cpu", output_dir=tmp_path / str(i),
                            example_inputs=example)
        assert art.load().default_feeds["img"].shape == (2, 3, 16, 16)
    with pytest.raises(UserError) as e:
        edgec.compile(str(cnn_onnx), target="openvino-cpu", output_dir=tmp_path / "two",
                      example_inputs=(torch.from_numpy(x), torch.from_numpy(x)))
    assert str(e.value) == (f"{cnn_onnx}: example_inputs has 2 arrays, the graph takes 1 inputs "
                            "['img']; give one per input in that order, or a dict by name")
    with pytest.raises(UserError, match=r"^inputs are keyed by input name \['img'\], not by "
                                        r"Tensor$"):
        edgec.compile(str(cnn_onnx), target="openvino-cpu", output_dir=tmp_path / "key",
                      example_inputs={torch.from_numpy(x): x})


def test_a_failure_on_edgecs_own_onnx_example_names_it(tmp_path, cnn_onnx):
    """OpenVINO refuses a 1x1 image under a 2x2 MaxPool; the message named neither the example
    edgec made (each dynamic dim 1) nor how to give a real one."""
    with pytest.raises(UserError, match=r"^openvino could not run the model on these inputs: "
                                        r".*; these are edgec's own example inputs \(img "
                                        r"\[1, 3, 1, 1\]: the file gives no size for its "
                                        r"dynamic dims \['b', 'h', 'w'\], so each is 1\); give "
                                        r"real ones with --inputs FILE.npz \(Python: "
                                        r"example_inputs=\)$"):
        edgec.compile(str(cnn_onnx), target="openvino-cpu", output_dir=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_failed_compile_leaves_nothing(tmp_path, mlp_onnx):
    out = tmp_path / "out"
    with pytest.raises(UserError, match="unknown target"):
        edgec.compile(str(mlp_onnx), target="nope", output_dir=out)
    with pytest.raises(UserError):
        edgec.compile("video-dit", target="ort-cpu", output_dir=out, config="huge")
    assert list(tmp_path.iterdir()) == []


def test_failure_after_export_removes_staging(tmp_path, mlp_onnx, monkeypatch):
    from edgec.targets import ORT_CPU

    def boom(*a, **k):
        raise UserError("simulated build failure")

    monkeypatch.setattr(type(ORT_CPU), "build", property(lambda self: boom), raising=False)
    with pytest.raises(UserError, match="simulated"):
        edgec.compile(str(mlp_onnx), target="ort-cpu", output_dir=tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_output_dir_rules(tmp_path, mlp_onnx):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not an edgec artifact"):
        edgec.compile(str(mlp_onnx), target="ort-cpu", output_dir=foreign)
    assert (foreign / "keep.txt").read_text() == "mine"
    # an existing artifact is replaced
    art = tmp_path / "art"
    edgec.compile(str(mlp_onnx), target="ort-cpu", output_dir=art)
    edgec.compile(str(mlp_onnx), target="openvino-cpu", output_dir=art)
    assert json.loads((art / "manifest.json").read_text())["target"]["name"] == "openvino-cpu"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "foreign"]


def test_hand_written_onnx_compiles_for_both_targets(tmp_path, rng):
    """An .onnx from another producer (onnx.helper, inline weights, opset 17, no edgec metadata)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    k = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["image", "k"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c"], ["r"]),
         helper.make_node("ReduceMean", ["r"], ["scores"], axes=[2, 3], keepdims=0),
         # one tensor returned twice (`return y, y`): the cleanup merged the two outputs
         helper.make_node("Identity", ["scores"], ["again"])],
        "conv",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 4]) for n in ("scores",
                                                                                 "again")],
        initializer=[numpy_helper.from_array(k, "k")])
    # onnx 1.23 defaults to IR version 14, which ORT 1.31 refuses (max 13): pin it like
    # exporters in the wild do.
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10),
              tmp_path / "conv.onnx")
    image = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    results = []
    for target in ("ort-cpu", "openvino-cpu"):
        art = edgec.compile(str(tmp_path / "conv.onnx"), target=target,
                            output_dir=tmp_path / target)
        assert art.manifest["inputs"][0]["shape"] == ["N", 3, 8, 8]
        outs = edgec.load(art.path).run({"image": image})
        np.testing.assert_array_equal(outs["again"], outs["scores"])
        results.append(outs["scores"])
    np.testing.assert_allclose(results[1], results[0], rtol=1e-5, atol=1e-6)


def test_export_mismatch_names_the_output(tmp_path, tiny_mlp, monkeypatch):
    from edgec import fp32_noise
    from edgec.errors import VerificationError
    from edgec.exporters import sources

    monkeypatch.setattr(sources, "EXPORT_RTOL", -1.0)  # every real error is now "too large"
    monkeypatch.setattr(fp32_noise, "NOISE_MULTIPLE", 0.0)  # and float32 explains none of it
    module, inputs = tiny_mlp
    with pytest.raises(VerificationError, match=r"vs PyTorch: output 'output' differs by max "
                                                r"relative error"):
        edgec.compile(module, example_inputs=inputs, target="ort-cpu", output_dir=tmp_path / "o")
    assert not (tmp_path / "o").exists()
    # a batch-1 example is exported at batch 2 (torch.export cannot keep size 1 dynamic): said
    with pytest.raises(VerificationError, match=r"PyTorch \(traced at batch 2: edgec doubles"):
        edgec.export(module, (inputs[0][:1],), tmp_path / "m.onnx",
                     dynamic_shapes={"x": {0: "batch"}})


def test_a_qdq_onnx_compiles_as_it_is_judged_as_quantized(tmp_path):
    """A model quantized elsewhere (QDQ) compiles without --quantize on a float target; its
    runtime fuses the QDQ pairs into integer kernels that round unlike the plain graph, so the
    check is the quantized one (it was held to 1e-5 and refused as the user's error). On
    qnn-htp, --quantize refuses it naming the float model and the targets that take it."""
    import onnx
    from onnx import TensorProto as T
    from onnx import helper as h

    rng = np.random.default_rng(0)
    inits = [h.make_tensor("Wq", T.INT8, [16, 16], rng.integers(-127, 127, 256).tolist()),
             h.make_tensor("ws", T.FLOAT, [], [0.01]), h.make_tensor("wz", T.INT8, [], [0]),
             h.make_tensor("xs", T.FLOAT, [], [0.02]), h.make_tensor("xz", T.UINT8, [], [128])]
    nodes = [h.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             h.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             h.make_node("DequantizeLinear", ["Wq", "ws", "wz"], ["W"]),
             h.make_node("MatMul", ["xd", "W"], ["y"])]
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [4, 16])],
                         [h.make_tensor_value_info("y", T.FLOAT, [4, 16])], initializer=inits)
    proto = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.save(proto, tmp_path / "qdq.onnx")
    art = edgec.compile(str(tmp_path / "qdq.onnx"), target="ort-cpu", output_dir=tmp_path / "o")
    fid = art.report["fidelity"]["target_vs_source"]
    assert fid["approximate"] is True and fid["outputs"]["y"]["cosine"] >= 0.999
    with pytest.raises(UserError, match="compile its float model with --quantize .* ort-cpu, "
                                        "openvino-cpu; tensorrt where its quantization is"):
        edgec.compile(str(tmp_path / "qdq.onnx"), target="qnn-htp", output_dir=tmp_path / "q",
                      quantize="w8a8")


def test_a_dynamic_onnx_on_qnn_htp_is_told_how_to_fix_its_dims(tmp_path):
    """--config does not apply to .onnx files, which the message used to suggest."""
    import onnx
    from onnx import TensorProto as T
    from onnx import helper as h

    w = h.make_tensor("W", T.FLOAT, [3, 3], np.eye(3, dtype=np.float32).ravel().tolist())
    graph = h.make_graph([h.make_node("MatMul", ["x", "W"], ["y"])], "g",
                         [h.make_tensor_value_info("x", T.FLOAT, ["N", 3])],
                         [h.make_tensor_value_info("y", T.FLOAT, ["N", 3])], initializer=[w])
    proto = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.save(proto, tmp_path / "dyn.onnx")
    with pytest.raises(UserError, match="make_dynamic_shape_fixed --dim_param N --dim_value 1"):
        edgec.compile(str(tmp_path / "dyn.onnx"), target="qnn-htp", output_dir=tmp_path / "o",
                      quantize="w8a8")
    assert not (tmp_path / "o").exists()


def test_tensorrt_note_asks_for_the_whole_compile_where_companions_are_built():
    """A decoder with a sparse prefill graph, a diffusion model with a dense companion: the
    engine built later from model.onnx alone would drop them (the note said to)."""
    from edgec.pipeline import _has_companions
    from edgec.recipe import Recipe

    def has(**options):
        return _has_companions(Recipe.parse("tensorrt", **options))

    assert has(generate=True, sparse_attention="keep=0.5")
    assert has(sparse_attention="keep=0.5,dense_steps=2")
    assert not has(sparse_attention="keep=0.5") and not has(generate=True)
    assert not has()
