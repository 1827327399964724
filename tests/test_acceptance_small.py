"""The issue's acceptance runs on the `small` configs (marked slow)."""

import json

import pytest
from typer.testing import CliRunner

from edgec.cli import app

runner = CliRunner()


def _cli(*args):
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.mark.slow
def test_llama_small_both_targets_agree(tmp_path):
    for target in ("ort-cpu", "openvino-cpu"):
        report = json.loads(_cli("compile", "llama", "--config", "small", "--target", target,
                                 "-o", tmp_path / target, "--json"))
        for fid in report["fidelity"].values():
            assert fid["outputs"]["logits"]["max_rel"] <= 1e-5
    cmp = json.loads(_cli("compare", tmp_path / "ort-cpu", tmp_path / "openvino-cpu", "--json"))
    assert cmp["outputs"]["logits"]["cosine"] >= 0.9999


@pytest.mark.slow
def test_video_dit_small_sparse_keep_02_compiles_runs_and_holds(tmp_path):
    """One compile at 8192 video tokens: the dense export checked against PyTorch (≤ 1e-5),
    OpenVINO against the rewritten graph (≤ 1e-4), the sparse output against dense PyTorch, and
    `edgec run` on the artifact. A second, dense OpenVINO compile at this size cost ~50 s and
    added only OpenVINO's dense exactness, which the tiny configs check."""
    out = tmp_path / "sparse"
    report = json.loads(_cli("compile", "video-dit", "--config", "small", "--target",
                             "openvino-cpu", "-o", out, "--sparse-attention", "keep=0.2",
                             "--json"))
    assert report["source"]["hyperparameters"]["video_tokens"] == 8192
    assert report["fidelity"]["export_vs_pytorch"]["outputs"]["output"]["max_rel"] <= 1e-5
    stats = report["passes"][1]["stats"]
    assert stats["sites_rewritten"] == 2 and stats["predicted_sparsity"] >= 0.79
    assert stats["config"]["grid"] == [8, 32, 32] and stats["config"]["prefix"] == 64
    fid = report["fidelity"]["target_vs_source"]["outputs"]["output"]
    assert fid["cosine"] >= 0.99, fid  # vs the dense PyTorch model
    assert report["fidelity"]["target_vs_source"]["vs_rewritten_onnx"]["outputs"]["output"][
        "max_rel"] <= 1e-4
    run = json.loads(_cli("run", out, "--json"))
    assert run["outputs"]["output"]["shape"] == [1, 16, 8, 64, 64]
