"""Sparse attention through edgec.compile / the CLI on video-dit tiny, on both targets."""

import json

import pytest
from typer.testing import CliRunner

import edgec
from edgec.cli import app

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
