"""--kv-cache: a generation artifact's KV cache kept in f16 or u8 by OpenVINO's CPU plugin, in the
stateful model and in the paged blocks `generate` runs, measured against an fp32 cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

import edgec
from edgec import fidelity
from edgec.cli import app
from edgec.errors import UserError
from edgec.recipe import Recipe

PROMPT = np.random.default_rng(0).integers(3, 256, (2, 40))  # llama tiny: 256 tokens


def _compile(root, kv_cache):
    return edgec.compile("llama", target="openvino-cpu", output_dir=root / str(kv_cache),
                         generate=True, kv_cache=kv_cache)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("kv")
    return {kv: (_compile(root, kv), edgec.load(root / str(kv))) for kv in (None, "u8", "f16")}


def test_u8_cache_is_configured_measured_and_reported(artifacts):
    art, _ = artifacts["u8"]
    manifest = json.loads((art.path / "manifest.json").read_text())
    assert manifest["runtime"]["config"]["KV_CACHE_PRECISION"] == "u8"
    assert manifest["runtime"]["stateful"]["kv_cache"] == "u8"
    assert manifest["recipe"]["kv_cache"] == "u8"
    kv = art.report["fidelity"]["kv_cache"]
    logits = kv["outputs"]["logits"]
    # lossy (the probe reads 8-bit keys/values back), but far above the floor
    assert fidelity.KV_CACHE_FLOOR <= logits["cosine"] < 1.0 and logits["max_abs"] > 0
    # the graph itself is still verified exact, on an fp32 cache
    assert art.report["fidelity"]["target_vs_source"]["rtol"] == fidelity.TARGET_RTOL
    assert "u8: logits cosine" in (art.path / "report.md").read_text()
    fp32, _ = artifacts[None]
    assert "kv_cache" not in fp32.report["fidelity"]
    assert json.loads((fp32.path / "manifest.json").read_text())["runtime"]["config"][
        "KV_CACHE_PRECISION"] == "f32"


@pytest.mark.parametrize("kv_cache, dtype, key_rows, value_extra, at_most",
                         [("u8", np.uint8, 40, 8, 0.35), ("f16", np.float16, 32, 0, 0.5)])
def test_generate_runs_the_paged_cache_in_that_precision(artifacts, kv_cache, dtype, key_rows,
                                                         value_extra, at_most):
    _, ref = artifacts[None]
    _, sess = artifacts[kv_cache]
    want = ref.generate(PROMPT, max_new_tokens=8)
    got = sess.generate(PROMPT, max_new_tokens=8)
    assert (got[:, 40:] == want[:, 40:]).mean() >= 0.9
    keys, values = sess._paged_blocks[:2]
    f32_keys = ref._paged_blocks[0]
    assert keys.dtype == values.dtype == dtype
    # keys: per-channel scale and zero point rows under each 32-token block; values: per token
    assert keys.shape[1:] == (f32_keys.shape[1], key_rows, f32_keys.shape[3])
    assert values.shape[1:] == (f32_keys.shape[1], 32, f32_keys.shape[3] + value_extra)
    size = sum(b.nbytes for b in sess._paged_blocks) / len(sess._paged_blocks) / keys.shape[0]
    f32_size = sum(b.nbytes for b in ref._paged_blocks) / len(ref._paged_blocks) / f32_keys.shape[0]
    assert size <= at_most * f32_size


def test_a_cache_that_costs_too_much_is_refused_and_nothing_written(tmp_path, monkeypatch):
    monkeypatch.setattr(fidelity, "KV_CACHE_FLOOR", 1.0)  # no lossy cache holds cosine 1
    with pytest.raises(UserError, match="--kv-cache u8 changes this model's logits"):
        _compile(tmp_path, "u8")
    assert not (tmp_path / "u8").exists()


@pytest.mark.parametrize("target, options, match", [
    ("ort-cpu", {"generate": True}, "on openvino-cpu; ort-cpu keeps the cache"),
    ("openvino-cpu", {}, "add --generate"),
    ("openvino-cpu", {"generate": True, "kv_cache": "u4"}, "choose one of: f32 | f16 | u8"),
    ("openvino-cpu", {"generate": True, "kv_retrieval": "freekv"}, "FreeKV's own fp32"),
    ("openvino-cpu", {"generate": True, "sparse_attention": "keep=0.1"}, "sparse prefill"),
])
def test_refusals(target, options, match):
    with pytest.raises(UserError, match=match):
        Recipe.parse(target, **{"kv_cache": "u8", **options})


def test_cli_refusal_is_one_line_exit_2(tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["compile", "llama", "--target", "qnn-htp", "--quantize",
                                      "w8a16", "--generate", "--kv-cache", "u8", "-o", str(out)])
    assert result.exit_code == 2
    assert "--kv-cache" in result.output and not out.exists()


def test_a_vlm_refuses_it_before_any_export(tmp_path):
    """Its prefill graph hands fp32 keys/values to the decoder's cache."""
    with pytest.raises(UserError, match="drop --kv-cache"):
        edgec.compile("vlm", target="openvino-cpu", output_dir=tmp_path / "v", generate=True,
                      kv_cache="u8")
    assert not (tmp_path / "v").exists()
