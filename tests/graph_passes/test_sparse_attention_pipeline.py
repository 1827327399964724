"""Sparse attention through edgec.compile / the CLI on video-dit tiny, on both targets."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

import edgec
from edgec.cli import app
from edgec.models import registry

# tiny: grid (2,4,4) → 32 video tokens after 8 text tokens; 4-token blocks are 1x2x2 tiles
TINY = "block=4,qblock=8,min_seq=0"


@pytest.mark.parametrize("target", ["ort-cpu", "openvino-cpu"])
def test_keep_one_matches_pytorch_on_video_dit_tiny(tmp_path, target):
    art = edgec.compile("video-dit", target=target, config="tiny", output_dir=tmp_path / "o",
                        sparse_attention=f"keep=1.0,{TINY},sink=frame,mode=rainfusion")
    stats = art.manifest["passes"][1]["stats"]
    assert stats["sites_rewritten"] == 2 and stats["config"]["grid"] == [2, 4, 4]
    assert stats["config"]["prefix"] == 8  # filled in from the model's text tokens
    fid = art.report["fidelity"]["target_vs_source"]
    assert fid["approximate"] is False
    assert fid["outputs"]["output"]["max_rel"] <= 1e-5


def test_shared_rainfusion_verifies_a_second_batch(tmp_path):
    """share=batch with mode=rainfusion built a graph that failed at batch > 1: a compile at
    batch 1 (a CogVideoX) passed, then every guidance pair failed. The compile now runs the
    graph at batch 2 too, and the graph takes it."""
    spec = registry.get("video-dit")
    example = [x[:1] for x in spec.example_inputs("tiny")]
    art = edgec.compile(spec.build("tiny"), "ort-cpu", tmp_path / "o", example_inputs=example,
                        dynamic_shapes=spec.dynamic_shapes("tiny"),
                        sparse_attention=f"keep=0.5,{TINY},grid=2x4x4,prefix=8,share=batch,"
                                         "mode=rainfusion")
    assert art.report["fidelity"]["target_vs_source"]["other_batch"]["batch"] == 2
    feeds = {k: np.concatenate([v, v]) for k, v in art.load().default_feeds.items()}
    assert art.load().run(feeds)["output"].shape[0] == 2


def test_sparse_video_dit_reports_error_and_runs_on_openvino(tmp_path):
    result = CliRunner().invoke(app, [
        "compile", "video-dit", "--config", "tiny", "--target", "openvino-cpu",
        "-o", str(tmp_path / "o"), "--sparse-attention", f"keep=0.5,{TINY}", "--json"],
        catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    fid = report["fidelity"]["target_vs_source"]
    assert fid["approximate"] is True and fid["rtol"] is None
    assert 0.9 < fid["outputs"]["output"]["cosine"] < 1.0
    # OpenVINO executes the rewritten graph as ORT does
    assert fid["vs_rewritten_onnx"]["outputs"]["output"]["max_rel"] <= 1e-4
    stats = report["passes"][1]["stats"]
    assert stats["predicted_sparsity"] == 0.5 and stats["blocks"] == 8
    md = (tmp_path / "o" / "report.md").read_text()
    assert "approximate (reported)" in md


def test_bad_sparse_option_is_exit_2(tmp_path):
    result = CliRunner().invoke(app, ["compile", "video-dit", "--target", "ort-cpu", "-o",
                                      str(tmp_path / "o"), "--sparse-attention", "keep=7"])
    assert result.exit_code == 2 and "keep=7.0 must be in (0, 1]" in result.stderr
    assert not (tmp_path / "o").exists()
