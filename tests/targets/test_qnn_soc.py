"""--soc: a qnn-htp context binary compiled for a named Snapdragon, the name checked first."""

from __future__ import annotations

import json
import subprocess
import sys

import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as H

from edgec.errors import UserError
from edgec.graph_passes.quantization.select import FLOAT_NODES_KEY
from edgec.recipe import Recipe
from edgec.runtimes.qnn import FP16_OPTIONS, PROVIDER_OPTIONS, graph_provider_options
from edgec.targets.qnn_htp.soc import SOC_KEY, SOCS, soc_named


def test_a_soc_is_named_by_chip_or_device_and_refused_elsewhere():
    assert soc_named("SM8650") == soc_named("8-gen-3") == soc_named("Snapdragon 8 Gen 3") \
        == "sm8650"
    assert soc_named("x-elite") == "sc8380xp" and SOCS["sc8380xp"].htp_arch == 73
    with pytest.raises(UserError, match=r"not a Snapdragon edgec knows; name one of: SM8350 "):
        soc_named("sm9999")
    assert Recipe.parse("qnn-htp", quantize="w8a8", soc="8-elite").soc == "sm8750"
    with pytest.raises(UserError, match="ort-cpu builds none: drop --soc"):
        Recipe.parse("ort-cpu", soc="sm8650")
    # an HTP without fp16 units cannot run the fp16 residual stream (the v68 emulator fails
    # to finalize its RMSNormalization); v69 on can
    with pytest.raises(UserError, match="HTP v68 of the Snapdragon 888 .* use stream=16bit"):
        Recipe.parse("qnn-htp", quantize="w8a8:stream=fp16", soc="888")
    assert Recipe.parse("qnn-htp", quantize="w8a8:stream=fp16", soc="8-gen-1").soc == "sm8450"


def _graph(**metadata) -> onnx.ModelProto:
    node = H.make_node("Identity", ["x"], ["y"])
    graph = H.make_graph([node], "g", [H.make_tensor_value_info("x", T.FLOAT, [1])],
                         [H.make_tensor_value_info("y", T.FLOAT, [1])])
    model = H.make_model(graph)
    for k, v in metadata.items():
        model.metadata_props.add(key=k, value=v)
    return model


def test_sessions_take_the_soc_from_the_graphs_metadata():
    assert graph_provider_options(_graph()) == PROVIDER_OPTIONS
    named = graph_provider_options(_graph(**{SOC_KEY: "sm8650"}))
    assert named == {**PROVIDER_OPTIONS, "soc_model": "57", "htp_arch": "75"}
    # the fp16 stream keeps its fp16 precision on the named SoC, not FP16_OPTIONS' own
    fp16 = graph_provider_options(_graph(**{SOC_KEY: "sm8550", FLOAT_NODES_KEY: "[]"}))
    assert fp16 == {**PROVIDER_OPTIONS, **FP16_OPTIONS, "soc_model": "43", "htp_arch": "73"}


def test_a_compile_for_a_named_soc_builds_and_runs_its_binary(tmp_path):
    """In a process of its own: the HTP backend keeps a process's first SoC for sessions that
    name none (``runtimes.qnn._check_soc``), and this worker may have opened one."""
    pytest.importorskip("onnxruntime_qnn")
    out = tmp_path / "soc"
    proc = subprocess.run(
        [sys.executable, "-m", "edgec.cli", "compile", "llama", "--config", "tiny", "--target",
         "qnn-htp", "--quantize", "w8a8:min_cos=0", "--soc", "8-gen-3", "-o", str(out),
         "--json"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["runtime"]["provider_options"] == {**PROVIDER_OPTIONS, "soc_model": "57",
                                                       "htp_arch": "75"}
    assert manifest["recipe"]["soc"] == "sm8650"
    meta = {p.key: p.value for p in onnx.load(str(out / "model.onnx"),
                                              load_external_data=False).metadata_props}
    assert meta[SOC_KEY] == "sm8650"
    report = json.loads((out / "report.json").read_text())
    fid = report["fidelity"]["target_vs_source"]
    assert fid["runtime"].startswith("onnxruntime-qnn")
    assert fid["outputs"]["logits"]["cosine"] > 0.99
    assert "Snapdragon 8 Gen 3 (SM8650): soc_model 57, HTP v75" in (out / "report.md").read_text()
    # calibrate takes no --soc: the SoC is the build's, and calibration runs on the CPU
    bad = subprocess.run([sys.executable, "-m", "edgec.cli", "calibrate", "llama", "--target",
                          "qnn-htp", "--quantize", "w8a8", "--soc", "sm8650", "-o",
                          str(tmp_path / "cal")], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--soc" in bad.stderr and not (tmp_path / "cal").exists()
