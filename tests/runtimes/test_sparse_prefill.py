"""Sparse-attention prefill of generation artifacts (``--generate --sparse-attention``): a
causal block-sparse prefill graph beside the dense decoder; ``generate`` runs the prompt through
it, loads the cache it fills and decodes with the decoder. Compiled once per module."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import transformers

import edgec
from edgec.errors import UserError
from edgec.recipe import Recipe

os.environ.setdefault("HF_HUB_OFFLINE", "1")
BLOCKS = "block=16,qblock=32,min_seq=64"
NEW = 24


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    """A grouped-query HF LLaMA (random weights, queries sharpened ×4 so attention is peaked)."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, pad_token_id=0)).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
    path = tmp_path_factory.mktemp("hf-sparse-prefill") / "llama"
    model.save_pretrained(path)
    return path, model


@pytest.fixture(scope="module")
def exact(tmp_path_factory, hf_llama):
    out = tmp_path_factory.mktemp("sp-exact") / "art"
    return edgec.compile(str(hf_llama[0]), target="ort-cpu", output_dir=out, generate=True,
                         config="batch=1,seq=8", sparse_attention=f"keep=1.0,{BLOCKS}",
                         kv_retrieval="freekv:budget=512,page=16,sink=16,recent=32")


@pytest.fixture(scope="module")
def sparse_ov(tmp_path_factory, hf_llama):
    out = tmp_path_factory.mktemp("sp-ov") / "art"
    return edgec.compile(str(hf_llama[0]), target="openvino-cpu", output_dir=out, generate=True,
                         config="batch=1,seq=8", sparse_attention=f"keep=0.2,{BLOCKS}")


def _prompt(length, seed=0):
    return np.random.default_rng(seed).integers(3, 96, (1, length))


def test_keep_1_prefill_graph_is_exact_and_matches_hf_generate(exact, hf_llama):
    session = exact.load()
    ids = _prompt(100)
    with torch.no_grad():
        want = hf_llama[1].generate(torch.as_tensor(ids), max_new_tokens=NEW,
                                    min_new_tokens=NEW, do_sample=False, pad_token_id=0).numpy()
    # FreeKV decoding (its budget covers the context: exact) from the sparse prefill's cache
    np.testing.assert_array_equal(session.generate(ids, max_new_tokens=NEW), want)
    assert session.last_generation["prefill_graph"] == "sparse"
    assert session.last_generation["kv_retrieval"]["prefill_tokens"] == 100
    got = session.generate(ids, max_new_tokens=NEW, kv_retrieval=False)  # the array cache
    assert session.last_generation["prefill_graph"] == "sparse"
    np.testing.assert_array_equal(got, want)
    # a left-padded batch of two prompts decodes as each prompt alone
    short = _prompt(80, seed=1)
    batch = np.zeros((2, 100), np.int64)
    batch[0], batch[1, 20:] = ids[0], short[0]
    mask = (np.arange(100) >= np.array([[0], [20]])).astype(np.int64)
    both = session.generate(batch, mask, max_new_tokens=NEW, kv_retrieval=False)
    np.testing.assert_array_equal(both[0, -NEW:], got[0, -NEW:])
    np.testing.assert_array_equal(both[1, -NEW:],
                                  session.generate(short, max_new_tokens=NEW,
                                                   kv_retrieval=False)[0, -NEW:])
    # below min_seq the dense decoder prefills
    session.generate(_prompt(40), max_new_tokens=2)
    assert session.last_generation["prefill_graph"] == "dense"
    assert exact.manifest["runtime"]["prefill"]["min_tokens"] == 64
    stats = exact.report["sparse_prefill"]
    assert stats["sites_rewritten"] == 2 and stats["grouped_heads"] == 2
    assert "sparse prefill" in (exact.path / "report.md").read_text()
    prefill = exact.report["fidelity"]["prefill_graph_vs_source"]
    assert (prefill["prompt_tokens"], prefill["skips_blocks_from"]) == (72, None)


def test_sparse_prefill_skips_keys_and_loads_both_openvino_caches(sparse_ov, exact):
    session = sparse_ov.load()
    ids = _prompt(256)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids),
             "position_ids": np.arange(256)[None]}
    paged = session.generate(ids, max_new_tokens=NEW)
    assert session.last_generation["prefill_graph"] == "sparse"
    sparse_logits = session.prefill_session.run(feeds)["logits"][0, -1]
    # the exact artifact's prefill graph (keep=1.0) is the dense reference, on ONNX Runtime
    dense = edgec.runtimes.open_session(exact.path, exact.manifest["runtime"]["prefill"])
    dense_logits = dense.run(feeds)["logits"][0, -1]
    gap = np.abs(sparse_logits - dense_logits).max()
    cos = sparse_logits @ dense_logits / np.linalg.norm(sparse_logits) / np.linalg.norm(
        dense_logits)
    assert gap > 1e-3, "keep=0.2 of 16 key blocks should change the logits"
    assert cos > 0.9
    # the compile checked the graph where blocks are skipped (it checked 72 tokens, 4 key
    # blocks all forced: exact, and the report read "cosine 1.0000000" at keep=0.2)
    prefill = sparse_ov.report["fidelity"]["prefill_graph_vs_source"]
    assert (prefill["prompt_tokens"], prefill["skips_blocks_from"]) == (104, 97)
    assert prefill["outputs"]["logits"]["cosine"] < 0.99999
    assert "checked on a 104-token prompt, key blocks skipped" in (
        sparse_ov.path / "report.md").read_text()
    session.paged = False  # the stateful model's variables, loaded from the same prefill
    np.testing.assert_array_equal(session.generate(ids, max_new_tokens=NEW), paged)
    assert session.last_generation["prefill_graph"] == "sparse"


@pytest.mark.parametrize("target,options,why", [
    ("qnn-htp", dict(quantize="w8a8"), "fixed chunks"),
    ("ort-cpu", dict(sparse_extra=",grid=2x4x4"), "causal rf2"),
])
def test_sparse_prefill_refusals(target, options, why):
    extra = options.pop("sparse_extra", "")
    with pytest.raises(UserError, match=why):
        Recipe.parse(target, generate=True, sparse_attention=f"keep=0.2{extra}", **options)


def test_bench_says_which_prefill_graph_ran(exact):
    import json

    from typer.testing import CliRunner

    from edgec.cli import app

    for tokens, graph in ((80, "sparse"), (32, "dense")):
        r = CliRunner().invoke(app, ["bench", str(exact.path), "--prompt-tokens", str(tokens),
                                     "--new-tokens", "3", "--iterations", "2", "--json"])
        assert r.exit_code == 0, r.output
        assert json.loads(r.output)["prefill_graph"] == graph


def test_tensorrt_gets_one_prefill_profile_for_the_prefill_graph(exact):
    """No GPU here: the profile the prefill graph's engine would be built with."""
    import onnx_ir as ir

    from edgec.targets.tensorrt.engine import generation_profiles

    model = ir.load(exact.path / "prefill.onnx")
    assert not any(v.name.startswith("past_key_values") for v in model.graph.inputs)
    generation = {**exact.manifest["generation"], "graph": "prefill", "context": 256}
    (profile,) = generation_profiles(model, generation)
    assert profile["input_ids"] == {"min": [1, 1], "opt": [1, 256], "max": [1, 256]}
    assert profile["attention_mask"]["max"] == [1, 256]


def test_report_counts_forced_blocks_only_where_keep_leaves_some_out(exact, sparse_ov):
    """At keep=1.0 every causally visible block is kept, yet the row said "keep 1.0 of
    16-token key blocks (+3 forced)"."""
    from edgec.report import summary_rows

    row = dict(summary_rows(exact.report))["sparse prefill"]
    assert "forced" not in row and "keep 1.0: every causally visible" in row, row
    row = dict(summary_rows(sparse_ov.report))["sparse prefill"]
    forced = sparse_ov.report["sparse_prefill"]["forced_blocks"]
    assert "keep 0.2 of " in row and f"(+{forced} forced: the sink and the band)" in row, row


def test_prefill_check_length_and_its_label():
    """The prefill graph is checked at the shortest length ≥ min_seq where the last query block
    skips a key block; where --context rules that out, the report says the check was exact."""
    from edgec.pipeline import _prefill_check_tokens
    from edgec.report import prefill_check_line

    def check(**kwargs):
        return _prefill_check_tokens(Recipe.parse("ort-cpu", generate=True, **kwargs))

    # block=qblock=64, min_seq=256: 6 key blocks, 3 forced, ceil(0.25·6) = 2 < 3 picked from
    assert check(sparse_attention="keep=0.25") == (352, 321)
    assert check(sparse_attention="keep=0.25", context=300) == (160, 321)
    assert check(sparse_attention="keep=1.0") == (160, None)
    assert check(sparse_attention=f"keep=0.2,{BLOCKS}") == (104, 97)
    line = prefill_check_line({"prompt_tokens": 160, "skips_blocks_from": 321})
    assert line.startswith("exact at 160 tokens: every key block kept there; blocks are "
                           "skipped from 321 tokens")
