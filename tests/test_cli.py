import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

import edgec
from edgec.cli import app

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_help_lists_commands_and_each_has_an_example():
    result = _run("--help")
    for cmd in ("models", "export", "compile", "calibrate", "targets", "run", "bench", "compare",
                "inspect"):
        assert cmd in result.output
        sub = _run(cmd, "--help")
        assert sub.exit_code == 0 and "edgec " + cmd in sub.output, cmd


def test_generate_help_shows_the_image_placeholder():
    """Markdown help rendering ate a bare <image> as an HTML tag ("(LLaVA's )")."""
    text = " ".join(_run("generate", "--help").output.replace("│", " ").split())
    assert "(LLaVA's <image>)" in text and "$'USER: <image>\\nWhat is this?" in text


def test_targets_list_schemes_and_notes():
    rows = {r["name"]: r for r in json.loads(_run("targets", "--json").stdout)}
    assert list(rows) == ["ort-cpu", "openvino-cpu", "qnn-htp", "tensorrt"]
    htp = rows["qnn-htp"]
    assert htp["fully_quantized"] and htp["static_shapes"] and set(htp["schemes"]) == {
        "w8a8", "w8a16", "w4a16", "w4a8"}
    assert any("LayerNormalization" in n for n in htp["notes"])
    assert rows["tensorrt"]["schemes"]["w4a16"] == "int4 weights, blocks of 128, weight-only"
    assert rows["openvino-cpu"]["schemes"]["w8a16"] == "int8 weights, per channel, weight-only"
    assert rows["openvino-cpu"]["kv_caches"] == ["f32", "f16", "u8"]
    assert not rows["ort-cpu"]["kv_caches"] and not htp["kv_caches"]
    text = _run("targets").output
    assert "--quantize fp8" in text and "quantized only" in text and "--kv-cache" in text


def test_recipe_options_are_the_same_for_calibrate_and_compile():
    def flags(cmd):
        command = typer.main.get_command(app).commands[cmd]
        return {o for p in command.params if p.param_type_name == "option" for o in p.opts}

    shared = {"--config", "--sparse-attention", "--prune", "--lora", "--lora-mode", "--quantize"}
    assert shared <= flags("compile") and shared <= flags("calibrate")
    assert {"--calib", "--check"} <= flags("compile") - flags("calibrate")


def test_models_json():
    rows = json.loads(_run("models", "--json").stdout)
    names = {r["name"]: r for r in rows}
    assert {"video-dit", "llama", "motion-dit", "motion-gen", "reactive-dance", "pose-prior",
            "motion-recovery"} <= set(names)
    assert names["llama"]["configs"] == ["tiny", "small", "base"]
    assert all(r["paper"] for r in rows)  # each says what it follows
    assert names["reactive-dance"]["sampler"] == "ddim-x0"
    assert names["motion-recovery"]["sampler"] is None and names["llama"]["sampler"] is None


@pytest.mark.parametrize("width", [80, 160])
def test_models_table_never_cuts_a_name(monkeypatch, width):
    """At 80 columns seven columns left the names as `motion-…` and `video-d…`."""
    import edgec.cli

    monkeypatch.setattr(edgec.cli.out, "_width", width)
    text = _run("models").output
    assert "…" not in text and max(map(len, text.splitlines())) <= width
    cells = {c.strip() for line in text.splitlines() for c in line.split("│")}
    assert {r["name"] for r in json.loads(_run("models", "--json").stdout)} <= cells
    assert "follows" in text and ("inputs" in text) and "sampler" in text


def test_run_bench_compare_inspect_json(dit_tiny_artifacts, tmp_path):
    a, b = (art.path for art in dit_tiny_artifacts)
    run = json.loads(_run("run", b, "--json").stdout)
    assert run["runtime"] == "openvino" and run["outputs"]["output"]["shape"][0] == 2
    bench = json.loads(_run("bench", a, "--json", "--warmup", "1", "--iterations", "3").stdout)
    assert bench["iterations"] == 3 and bench["p50_ms"] > 0 and "emulator" not in bench
    cmp = json.loads(_run("compare", a, b, "--json").stdout)
    assert cmp["outputs"]["output"]["cosine"] >= 0.9999
    info = json.loads(_run("inspect", a, "--json").stdout)
    assert info["target"]["name"] == "ort-cpu" and "model.onnx" in info["files"]
    assert set(info["fidelity"]["target_vs_source"]) == {"max_rel", "cosine"}
    assert "quantization" not in info  # an fp32 artifact
    assert "target_vs_source: max_rel " in _run("inspect", a).stdout
    onnx_info = json.loads(_run("inspect", a / "model.onnx", "--json").stdout)
    assert onnx_info["nodes"] > 10 and onnx_info["parameter_map_entries"] == 0
    # --inputs and --save round trip
    feeds = dict(np.load(a / "example_inputs.npz"))
    np.savez(tmp_path / "in.npz", **feeds)
    _run("run", a, "--inputs", tmp_path / "in.npz", "--save", tmp_path / "o.npz")
    assert np.load(tmp_path / "o.npz")["output"].shape == feeds["latent"].shape


class NumpyNames(torch.nn.Module):
    def forward(self, file):
        return {"allow_pickle": file * 2}


def test_names_np_savez_takes_as_arguments_round_trip(tmp_path):
    """np.savez(path, **arrays) took them as its own arguments: an input named `file` failed the
    compile with a TypeError, an output `allow_pickle` was missing from --save's file (exit 0)
    and one named `file` was an internal error."""
    from edgec.npz import save_npz

    art = edgec.compile(NumpyNames(), target="ort-cpu", output_dir=tmp_path / "a",
                        example_inputs=(torch.ones(2),))
    assert list(np.load(art.path / "example_inputs.npz")) == ["file"]
    _run("run", art.path, "--save", tmp_path / "o.npz")
    np.testing.assert_array_equal(np.load(tmp_path / "o.npz")["allow_pickle"], [2, 2])
    names = {"file": np.zeros(1), "allow_pickle": np.ones(2), "args": np.arange(3)}
    save_npz(tmp_path / "n.npz", names)
    with np.load(tmp_path / "n.npz") as back:
        assert {k: back[k].tolist() for k in back} == {k: v.tolist() for k, v in names.items()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "n.npz", "o.npz"]  # no .partial


def test_compare_refuses_artifacts_that_take_different_inputs(dit_tiny_artifacts, tiny_mlp,
                                                              tmp_path):
    """It said "inputs do not match the model" without naming either artifact."""

    module, inputs = tiny_mlp
    other = edgec.compile(module, target="ort-cpu", output_dir=tmp_path / "mlp",
                          example_inputs=inputs).path
    a = dit_tiny_artifacts[0].path
    result = runner.invoke(app, ["compare", str(a), str(other)])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert f"{a} and {other} take different inputs" in result.stderr


def test_export_then_compile_the_file(tmp_path):
    r = _run("export", "llama", "-o", tmp_path / "l.onnx", "--config", "tiny")
    assert r.exit_code == 0, r.output
    assert "max rel error vs PyTorch" in r.stdout
    info = json.loads(_run("inspect", tmp_path / "l.onnx", "--json").stdout)
    assert info["parameter_map_entries"] > 0 and info["inputs"][0]["name"] == "input_ids"
    r = _run("compile", tmp_path / "l.onnx", "--target", "ort-cpu", "-o", tmp_path / "art",
             "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["fidelity"]["target_vs_source"]["reference"] == "onnxruntime"


def test_compile_takes_an_onnx_files_example_inputs(tmp_path, cnn_onnx):
    """A dynamic-H/W CNN .onnx could not compile from the CLI: edgec's example held H and W at
    1 (OpenVINO refused the 1x1 image under its MaxPool) and nothing gave another."""
    x = np.random.default_rng(0).standard_normal((2, 3, 12, 12)).astype(np.float32)
    np.savez(tmp_path / "img.npz", img=x)
    r = _run("compile", cnn_onnx, "-t", "openvino-cpu", "-o", tmp_path / "out", "--inputs",
             tmp_path / "img.npz", "--json")
    assert r.exit_code == 0, r.output
    np.testing.assert_array_equal(edgec.load(tmp_path / "out").default_feeds["img"], x)
    r = _run("compile", "llama", "-t", "ort-cpu", "-o", tmp_path / "llama", "--inputs",
             tmp_path / "img.npz")
    assert r.exit_code == 2 and "--inputs gives an .onnx file its example inputs" in r.stderr
    assert not (tmp_path / "llama").exists()


def test_calibrate_takes_an_onnx_files_example_inputs_as_compile_does(tmp_path):
    """A 3x3 Conv without padding, dynamic H/W: edgec's own example (1x1) fails in ONNX
    Runtime, so calibrating it needed example_inputs=, which only Python could give; the
    cache made with --inputs is the one `compile --inputs --calib` takes."""
    import onnx
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    w = helper.make_tensor("w", TensorProto.FLOAT, (4, 3, 3, 3),
                           rng.standard_normal(108).astype(np.float32).tolist())
    graph = helper.make_graph(
        [helper.make_node("Conv", ["img", "w"], ["y"], kernel_shape=[3, 3])], "conv",
        [helper.make_tensor_value_info("img", TensorProto.FLOAT, [1, 3, "h", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, None, None])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "conv.onnx")
    np.savez(tmp_path / "img.npz", img=rng.standard_normal((1, 3, 8, 8)).astype(np.float32))
    np.savez(tmp_path / "data.npz", img=rng.standard_normal((6, 1, 3, 8, 8)).astype(np.float32))
    common = ("-t", "ort-cpu", "--data", tmp_path / "data.npz")
    r = _run("calibrate", tmp_path / "conv.onnx", *common, "-o", tmp_path / "c0")
    assert r.exit_code == 2 and "--inputs" in r.stderr and not (tmp_path / "c0").exists()
    r = _run("calibrate", tmp_path / "conv.onnx", *common, "-o", tmp_path / "c",
             "--inputs", tmp_path / "img.npz")
    assert r.exit_code == 0, r.output
    r = _run("compile", tmp_path / "conv.onnx", "-t", "ort-cpu", "-o", tmp_path / "o",
             "--quantize", "w8a8", "--calib", tmp_path / "c", "--inputs", tmp_path / "img.npz",
             "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["quantization"]["calibration"]["how"] == "reused cache"
    r = _run("calibrate", "llama", "-t", "ort-cpu", "-o", tmp_path / "x", "--inputs",
             tmp_path / "img.npz")
    assert r.exit_code == 2 and "--inputs gives an .onnx file its example inputs" in r.stderr


def test_export_refuses_a_missing_directory(tmp_path):
    """-o /nonexist/x.onnx created /nonexist/ without a word, where --save refuses it."""
    r = _run("export", "llama", "-o", tmp_path / "no" / "l.onnx")
    assert r.exit_code == 2 and "no directory" in r.stderr and "create it first" in r.stderr
    assert not (tmp_path / "no").exists()


def _npy(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.zeros(3, np.float32))
    return path


def _with_cache(tmp_path, art_dir):
    """A copy of an artifact that an older `edgec calibrate -o` wrote a cache into."""
    import shutil

    from edgec.calibration import CalibrationCache

    art = shutil.copytree(art_dir, tmp_path / "art-with-cache")
    CalibrationCache("ab" * 32, "ort-cpu", "w8a8", "minmax", 1, "x",
                     {"t": {"lowest": 0.0, "highest": 1.0}}).save(art)
    return art


def _bad_cases(tmp_path, art_dir):
    text = tmp_path / "notes.onnx"
    text.write_text("hello, I am not a model\n")
    truncated = tmp_path / "cut.onnx"
    truncated.write_bytes((art_dir / "model.onnx").read_bytes()[:200])
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("x")
    out = tmp_path / "out"
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    (tmp_path / "to-art").symlink_to(art_dir)
    (tmp_path / "d.npz").mkdir()  # output paths that are directories (IsADirectoryError, exit 1,
    (tmp_path / "d.gif").mkdir()  # after the whole run)
    return {
        "missing path": (["compile", tmp_path / "nope.onnx", "-t", "ort-cpu", "-o", out],
                         "no such file"),
        "text file": (["compile", text, "-t", "ort-cpu", "-o", out], "not a valid ONNX model"),
        "truncated": (["compile", truncated, "-t", "ort-cpu", "-o", out], "ONNX"),
        "unknown target": (["compile", "llama", "-t", "tpu", "-o", out], "unknown target"),
        "unknown model": (["compile", "gpt9", "-t", "ort-cpu", "-o", out], "unknown model"),
        "unknown config": (["compile", "llama", "-c", "huge", "-t", "ort-cpu", "-o", out],
                           "unknown config"),
        "foreign out dir": (["compile", "llama", "-t", "ort-cpu", "-o", foreign],
                            "not an edgec artifact"),
        "run non-artifact": (["run", foreign], "not an edgec artifact"),
        "bad inputs file": (["run", art_dir, "--inputs", text], "not an .npz"),
        "npy inputs file": (["run", art_dir, "--inputs", _npy(tmp_path)],
                            "one array (.npy), not an .npz"),
        "save not npz": (["run", art_dir, "--save", tmp_path / "y.txt"],
                         "give a file name ending in .npz"),
        "save a directory": (["run", art_dir, "--save", tmp_path / "d.npz"],
                             "d.npz: is a directory; give a file name"),
        "save unwritable": (["sample", art_dir, "--steps", "1", "--save", "/proc/x.npz"],
                            "/proc/x.npz: cannot write there"),
        "sample video a directory": (["sample", art_dir, "--steps", "1", "--save",
                                      tmp_path / "s.npz", "--video", tmp_path / "d.gif"],
                                     "--video " + str(tmp_path / "d.gif") + ": is a directory"),
        "bench tokens not generation": (["bench", art_dir, "--prompt-tokens", "8"],
                                        "apply to generation artifacts"),
        # whether a temperature applies depends on the artifact's generation config, so an
        # artifact that cannot generate is refused first (tests/runtimes/test_generation.py)
        "greedy with temperature": (["generate", art_dir, "--prompt-ids", "1,2",
                                     "--temperature", "0.5"], "has no KV cache"),
        "weight-only with method": (["compile", "llama", "-t", "ort-cpu", "-o", out, "-q",
                                     "w4a16:method=entropy"], "w4a16 is weight-only, drop method"),
        "block on a static scheme": (["compile", "llama", "-t", "openvino-cpu", "-o", out, "-q",
                                      "w8a8:block=64"], "w8a8 quantizes activations too: drop "
                                                        "block"),
        "inspect missing": (["inspect", tmp_path / "nothing"], "no such file"),
        "out under a file": (["compile", "llama", "-t", "ort-cpu", "-o", text / "sub"],
                             "is not a directory, so nothing can be written there"),
        "compare adapter, none swappable": (["compare", art_dir, art_dir, "--adapter", "a"],
                                            "neither"),
        # a dangling link failed the final rename after the whole export (exit 1); a link to an
        # artifact was renamed aside and left as a hidden .to-art.edgec-old-* link
        "out a dangling link": (["compile", "llama", "-t", "ort-cpu", "-o", tmp_path / "dangling"],
                                "dangling: is a symbolic link; give the directory it points to"),
        "out a link to an artifact": (["compile", "llama", "-t", "ort-cpu", "-o",
                                       tmp_path / "to-art"], "to-art: is a symbolic link"),
        "markup in a path": (["run", tmp_path / "a:smile:[/x]"],
                             f"{tmp_path / 'a:smile:[/x]'}: no such artifact"),
        # calibrate writes a cache as compile writes an artifact: a file was an internal
        # FileExistsError, an artifact or a user's directory got a calibration.json beside
        # their files
        "calibrate into a file": (["calibrate", "llama", "-t", "ort-cpu", "-o", text],
                                  "exists and is not a directory"),
        "calibrate into an artifact": (["calibrate", "llama", "-t", "ort-cpu", "-o", art_dir],
                                       "exists and is not a calibration cache"),
        "calibrate into an artifact with a cache": (
            ["calibrate", "llama", "-t", "ort-cpu", "-o", _with_cache(tmp_path, art_dir)],
            "exists and is not a calibration cache"),
        "calibrate into a user's dir": (["calibrate", "llama", "-t", "ort-cpu", "-o", foreign],
                                        "exists and is not a calibration cache"),
        # --data is samples, not a cache: an .npy said "invalid JSON: 'utf-8' codec ..."
        "calibrate data npy": (["calibrate", "llama", "-t", "ort-cpu", "-o", out, "--data",
                                _npy(tmp_path)], "--data takes an .npz whose keys are the "
                                                 "model's input names"),
        "calibrate data dir": (["calibrate", "llama", "-t", "ort-cpu", "-o", out, "--data",
                                tmp_path], "--data takes an .npz"),
    }


@pytest.mark.parametrize("case", ["missing path", "text file", "truncated", "unknown target",
                                  "unknown model", "unknown config", "foreign out dir",
                                  "run non-artifact", "bad inputs file", "inspect missing",
                                  "out under a file", "markup in a path",
                                  "out a dangling link", "out a link to an artifact",
                                  "npy inputs file", "save not npz", "save a directory",
                                  "save unwritable",
                                  "sample video a directory",
                                  "bench tokens not generation", "greedy with temperature",
                                  "weight-only with method", "block on a static scheme",
                                  "calibrate into a file",
                                  "calibrate into an artifact", "calibrate into a user's dir",
                                  "calibrate into an artifact with a cache",
                                  "calibrate data npy", "calibrate data dir",
                                  "compare adapter, none swappable"])
def test_bad_input_is_one_line_exit_2_and_nothing_written(case, tmp_path, dit_tiny_artifacts):
    args, match = _bad_cases(tmp_path, dit_tiny_artifacts[0].path)[case]
    before = sorted(p.name for p in tmp_path.iterdir())
    result = _run(*args)
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and match in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert (tmp_path / "mine" / "precious.txt").read_text() == "x"
    assert not (dit_tiny_artifacts[0].path / "calibration.json").exists()


def _add_onnx(tmp_path):
    """a [1, n] + b [1, m], written by onnx.helper: no producer name or version."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["y"])], "add",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, "n"]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, "m"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, None])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "add.onnx")
    return tmp_path / "add.onnx"


def test_inspect_an_onnx_file_without_a_producer(tmp_path):
    """--json gave "producer": "None" (the string) for a file that records none."""
    info = json.loads(_run("inspect", _add_onnx(tmp_path), "--json").stdout)
    assert info["producer"] is None and info["inputs"][0]["shape"] == [1, "n"]


def test_bench_refuses_inputs_the_runtime_cannot_run_as_run_does(tmp_path):
    """`edgec bench` ran its feeds outside run()'s wrapper: the runtime's own error on inputs
    that passed every check (a 3-wide plus a 2-wide tensor) was an internal error, exit 1."""
    art = edgec.compile(_add_onnx(tmp_path), target="ort-cpu", output_dir=tmp_path / "art")
    np.savez(tmp_path / "bad.npz", a=np.zeros((1, 3), np.float32), b=np.zeros((1, 2), np.float32))
    for cmd in ("run", "bench"):
        result = _run(cmd, art.path, "--inputs", tmp_path / "bad.npz")
        assert result.exit_code == 2, result.output
        assert "onnxruntime could not run the model on these inputs" in result.stderr


def test_calibrate_refuses_a_dynamic_onnx_for_qnn_htp_as_compile_does(tmp_path):
    """calibrate wrote a cache for a dynamic .onnx on qnn-htp that compile then refused (the
    HTP needs static shapes): both refuse it with the same line, exit 2, nothing written."""
    source = _add_onnx(tmp_path)
    lines = []
    for cmd in ("calibrate", "compile"):
        result = _run(cmd, source, "-t", "qnn-htp", "-q", "w8a8", "-o", tmp_path / cmd)
        assert result.exit_code == 2, result.output
        lines += [ln for ln in result.stderr.splitlines() if ln.strip()]
        assert not (tmp_path / cmd).exists()
    assert len(lines) == 2 and lines[0] == lines[1], lines
    assert "qnn-htp needs static shapes, but input 'a' has shape [1, 'n']" in lines[0]


def test_inspect_verify_names_a_changed_file(dit_tiny_artifacts, tmp_path):
    """The manifest stores every file's sha256, but nothing checked them: 4 flipped bytes in
    model.onnx.data ran with exit 0."""
    import shutil

    art = shutil.copytree(dit_tiny_artifacts[0].path, tmp_path / "a")
    r = _run("inspect", art, "--verify", "--json")
    assert r.exit_code == 0 and "match the manifest" in json.loads(r.stdout)["verified"]
    data = next(p for p in sorted(art.rglob("*.data")))
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    (art / "extra.txt").write_text("x")
    r = _run("inspect", art, "--verify")
    rel = data.relative_to(art).as_posix()
    assert r.exit_code == 2 and f"{rel} changed since the compile (and 1 more)" in r.stderr


def test_a_damaged_manifest_or_report_is_one_line_not_an_internal_error(dit_tiny_artifacts,
                                                                          tmp_path, caplog):
    """A manifest with its ``runtime`` entry deleted was a KeyError in run and inspect, a
    truncated report.json a JSONDecodeError in inspect (exit 1 each)."""
    import shutil

    art = shutil.copytree(dit_tiny_artifacts[0].path, tmp_path / "a")
    report = art / "report.json"
    report.write_text(report.read_text()[:100])
    with caplog.at_level("WARNING"):
        r = _run("inspect", art, "--verify", "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert "fidelity" not in info and "match the manifest" in info["verified"]
    assert "damaged artifact: report.json is unreadable (JSONDecodeError" in caplog.text
    manifest = json.loads((art / "manifest.json").read_text())
    for key, value in (("runtime", None), ("inputs", {"x": 1})):
        edited = {k: v for k, v in manifest.items() if k != key}
        if value is not None:
            edited[key] = value
        (art / "manifest.json").write_text(json.dumps(edited))
        what = "has no" if value is None else "has a dict for"
        for cmd in ("inspect", "run"):
            r = _run(cmd, art)
            lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
            assert r.exit_code == 2 and len(lines) == 1, r.output
            assert f"damaged artifact: the manifest {what} its '{key}' entry" in lines[0]


def test_console_script_exit_status(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "edgec.cli", "compile", str(tmp_path / "x.onnx"),
                           "--target", "ort-cpu", "-o", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "no such file" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_rotate_option_runs_the_rotation_stage_before_quantization(tmp_path):
    out = tmp_path / "rot"
    r = _run("compile", "llama", "-c", "tiny+outliers", "--target", "ort-cpu", "-o", str(out),
             "--rotate", "dartquant:steps=5,r4=true", "--quantize", "w8a8", "--check", "--json")
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "manifest.json").read_text())
    names = [p["name"] for p in manifest["passes"]]
    assert names.index("rotate") < names.index("quantize")
    rot = manifest["passes"][names.index("rotate")]
    assert rot["check"]["exact"] and rot["stats"]["r1"] > 0 and rot["stats"]["r4"] == 2
    assert rot["stats"]["dartquant"]["loss"]["r1"]["final"] < rot["stats"]["dartquant"][
        "loss"]["r1"]["start"]
    assert manifest["recipe"]["rotate"] == {"method": "dartquant", "r4": True, "steps": 5,
                                            "seed": 0, "accept": True}
    row = next(line for line in (out / "report.md").read_text().splitlines()
               if line.startswith("| rotate |"))  # the summary row the CLI prints too
    assert "dartquant: R1 on " in row and "R4 before 2 FFN down projections" in row
    # the online R4 runs in float on a CPU target: its MatMuls read no DequantizeLinear, and
    # the down projection after it quantizes the rotated tensor (once)
    import onnx

    graph = onnx.load(out / "model.onnx", load_external_data=False).graph
    producer = {o: n for n in graph.node for o in n.output}
    r4 = [n for n in graph.node if n.name.startswith("r4/")]
    assert sum(n.op_type == "MatMul" for n in r4) == 4
    for n in r4:
        assert not any(producer.get(i) is not None and producer[i].op_type == "DequantizeLinear"
                       for i in n.input), n.name
    back = {o for n in r4 if n.op_type == "Reshape" and producer.get(n.input[0]) in r4
            for o in n.output}
    quantized = [n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] in back]
    assert len(back) == 2 and len(quantized) == 2
    bad = _run("compile", "llama", "--target", "ort-cpu", "-o", str(tmp_path / "x"),
               "--rotate", "givens")
    assert bad.exit_code == 2 and "unknown rotation 'givens'" in bad.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("argv, message", [
    (["compile", "llama", "--bogus"], "edgec compile: No such option: --bogus; see "
                                      "`edgec compile --help`"),
    (["sample", "out", "--steps", "0"], "edgec sample: Invalid value for '--steps'"),
    (["compile"], "edgec compile: Missing argument 'source'"),
    (["nosuchcommand"], "edgec: No such command 'nosuchcommand'"),
])
def test_a_command_line_typer_cannot_parse_is_one_line(monkeypatch, capsys, argv, message):
    """Parse errors were typer's usage plus a boxed message (4-5 lines); now one line, exit 2."""
    from edgec.cli import main

    monkeypatch.setattr(sys, "argv", ["edgec", *argv])
    with pytest.raises(SystemExit) as e:
        main()
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert e.value.code == 2 and len(lines) == 1 and message in lines[0], lines


def test_help_still_exits_zero(monkeypatch, capsys):
    from edgec.cli import main

    monkeypatch.setattr(sys, "argv", ["edgec", "compile", "--help"])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 0 and "--quantize" in capsys.readouterr().out


@pytest.mark.parametrize("raised, code", [(RuntimeError("boom"), None), (typer.Abort(), 130)])
def test_edgec_debug_shows_the_real_traceback_and_abort_exits_130(monkeypatch, raised, code):
    """main's `except click.Abort` named typer's vendored click, which has no Abort: with
    EDGEC_DEBUG=1 every internal error ended in an AttributeError after its own traceback."""
    import edgec.inspect
    from edgec.cli import main

    def fail(path):
        raise raised

    monkeypatch.setattr(edgec.inspect, "describe", fail)
    monkeypatch.setenv("EDGEC_DEBUG", "1")
    monkeypatch.setattr(sys, "argv", ["edgec", "inspect", "anything"])
    if code is None:
        with pytest.raises(RuntimeError, match="boom"):
            main()
    else:
        with pytest.raises(SystemExit) as e:
            main()
        assert e.value.code == code


def test_json_output_is_strict_json(capsys):
    """run --json of an all-NaN output printed bare NaN, which only Python's parser reads."""
    from edgec.cli import _print_json

    _print_json({"y": {"mean": float("nan"), "max": float("inf"), "shape": [2, 3]}})

    def refuse(constant):
        raise ValueError(constant)

    out = json.loads(capsys.readouterr().out, parse_constant=refuse)
    assert out == {"y": {"mean": None, "max": None, "shape": [2, 3]}}
