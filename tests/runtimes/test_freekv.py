"""FreeKV retrieval: exact while the budget covers the context, approximate (with corrections
reported) beyond it, options refused with one line.

One FreeKV graph (a one-layer ``llama``, pages of 4, budget 32) is exported per module and run in
ONNX Runtime; prefill and the dense reference run the reference model's own ``forward_cached``
in PyTorch (the standard graph is verified against it to 1e-5 at compile time), so the module
needs one export only (~7 s of its time; two layers would take ~12 s).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from edgec.errors import UserError
from edgec.exporters.decoder import reference_decoder
from edgec.exporters.freekv_decoder import build_freekv_graph
from edgec.models.llama import Llama, LlamaConfig
from edgec.runtimes.freekv import (
    FreeKVCache,
    FreeKVConfig,
    budget_covers_context,
    parse_kv_retrieval,
)
from edgec.runtimes.generation import ArrayCache, generate

CONFIG = FreeKVConfig(budget=32, page=4, sink=4, recent=8, tau=0.8)


class _TorchDecoder:
    """The standard decoder's contract (``_run`` on HF-named feeds) in PyTorch."""

    runtime = "onnxruntime"

    def __init__(self, model, info):
        self.model, self.info = model, info

    def _adapter_feeds(self, feeds, adapter):
        return feeds

    def _run(self, feeds):
        past = [(torch.from_numpy(feeds[self.info.past_names[2 * i]]),
                 torch.from_numpy(feeds[self.info.past_names[2 * i + 1]]))
                for i in range(self.info.layers)]
        args = [torch.from_numpy(np.asarray(feeds[k]))
                for k in ("input_ids", "attention_mask", "position_ids")]
        with torch.no_grad():
            logits, presents = self.model.forward_cached(*args, past)
        out = {"logits": logits.numpy()}
        for name, t in zip(self.info.present_names, [t for kv in presents for t in kv]):
            out[name] = t.numpy()
        return out


class _Recorder:
    """A cache that keeps each step's last logits."""

    def __init__(self, cache):
        self.cache, self.logits = cache, []

    def step(self, ids, mask, positions):
        out = self.cache.step(ids, mask, positions)
        self.logits.append(out[:, -1])
        return out


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab=64, dim=32, layers=1, heads=4, kv_heads=2, ffn=64,
                              seq=8)).eval()
    _, info = reference_decoder(model, "llama")
    out = tmp_path_factory.mktemp("freekv")
    graph = out / build_freekv_graph(model, info, CONFIG, out)
    return _TorchDecoder(model, info), info, graph


def _run(decoder, ids, mask, new, tau=None):
    session, info, graph = decoder
    dense = _Recorder(ArrayCache(session, info, ids.shape[0]))
    config = CONFIG if tau is None else dataclasses.replace(CONFIG, tau=tau)
    fkv = _Recorder(FreeKVCache(session, graph, info, config, ids.shape[0]))
    want, _ = generate(session, info, ids, mask, cache=dense, max_new_tokens=new)
    got, _ = generate(session, info, ids, mask, cache=fkv, max_new_tokens=new)
    return want, got, dense.logits, fkv.logits, fkv.cache


@pytest.mark.parametrize("tau", [-1.0, 1.0])  # always speculative / always corrected
def test_exact_while_budget_covers_context(decoder, tau):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, decoder[1].vocab, (2, 11))
    mask = np.ones_like(ids)
    mask[1, :3] = 0  # a left-padded row
    want, got, dense, fkv, cache = _run(decoder, ids, mask, 20, tau)  # context ≤ 31 < 32
    np.testing.assert_array_equal(got, want)
    for a, b in zip(dense, fkv):
        assert np.abs(a - b).max() <= 1e-4 * max(1.0, np.abs(a).max())
    assert cache.stats["decode_steps"] == 19
    assert cache.stats["correction_rate"] == (1.0 if tau == 1.0 else 0.0)


def test_small_budget_runs_and_reports_corrections(decoder):
    rng = np.random.default_rng(1)
    ids = rng.integers(0, decoder[1].vocab, (1, 40))
    _, got, dense, fkv, cache = _run(decoder, ids, None, 24, 0.9)  # context 64 > budget 32
    stats = cache.stats
    assert got.shape == (1, 64) and all(np.isfinite(x).all() for x in fkv)
    assert 0.0 < stats["correction_rate"] <= 1.0
    assert stats["pages_per_head"] == CONFIG.top_pages
    assert 0 < stats["retrieved_pages_mean"] <= CONFIG.top_pages
    assert stats["attended_mean"] <= CONFIG.budget + 1
    # the digests kept up token by token equal digests summarized from scratch
    kmin = [k.copy() for k in cache.kmin]
    kmax = [k.copy() for k in cache.kmax]
    cache._summarize(0, cache.length)
    for a, b in zip(kmin + kmax, cache.kmin + cache.kmax):
        np.testing.assert_array_equal(a, b)


def test_the_report_line_gives_the_page_aligned_recent_window():
    """The line said "recent 32" where a step attends the page being filled and the one before
    it: 16-31 cached tokens (``FreeKVCache._append``'s window), plus the new token."""
    from edgec.report import kv_retrieval_line

    entry = {"model": "freekv.onnx", **FreeKVConfig(budget=128, page=16, sink=32,
                                                    recent=32).to_json()}
    line = kv_retrieval_line(entry)
    assert ("per KV head and step 128 tokens at most: sink 32 + 4 retrieved pages of 16 + the "
            "last 2 page(s) (16–31 cached tokens: the page being filled and the 1 before it) + "
            "the new token; tau 0.8") in line, line
    assert "recent 32" not in line


@pytest.mark.parametrize("spec", [
    "budget=30,page=4", "budget=32,page=4,sink=2,recent=8", "budget=12,page=4,sink=4,recent=8",
    "page=0", "recent=0,page=4,budget=16,sink=4", "tau=-1.5", "tau=1.5", "budget=x", "window=8"])
def test_bad_options_are_user_errors(spec):
    with pytest.raises(UserError) as e:
        FreeKVConfig.parse(spec)
    assert "\n" not in str(e.value)


def test_parse_kv_retrieval():
    cfg = parse_kv_retrieval("freekv:budget=2048,page=32,sink=64,recent=256,tau=0.9")
    assert cfg == FreeKVConfig(tau=0.9) and cfg.top_pages == 54
    assert parse_kv_retrieval("freekv") == FreeKVConfig() == parse_kv_retrieval(True)
    assert parse_kv_retrieval(None) is None
    assert parse_kv_retrieval({"budget": 64, "page": 8, "sink": 8, "recent": 8}).top_pages == 6
    with pytest.raises(UserError, match="method 'quest'"):
        parse_kv_retrieval("quest:budget=64")
    # a dict names the method as quantize's names its scheme (it was "unknown option 'method'")
    assert parse_kv_retrieval({"method": "freekv", "tau": 0.9}) == FreeKVConfig(tau=0.9)
    with pytest.raises(UserError, match="method 'quest'"):
        parse_kv_retrieval({"method": "quest"})


def test_verify_freekv_graph_holds_the_graph_to_its_model(decoder):
    """The compile's check of freekv.onnx: equal to PyTorch within the budget, and a graph of
    other weights fails it."""
    from edgec.errors import VerificationError
    from edgec.exporters.freekv_decoder import verify_freekv_graph

    session, info, graph = decoder
    entry = verify_freekv_graph(session.model, info, graph, "ort")
    assert entry["outputs"]["logits"]["shape"] == [2, 3, info.vocab] and entry["rtol"] == 1e-5
    assert entry["check"].startswith("3 decode steps after a 19-token prompt")
    torch.manual_seed(1)
    other = Llama(session.model.cfg).eval()
    with pytest.raises(VerificationError, match="freekv.onnx on onnxruntime vs PyTorch"):
        verify_freekv_graph(other, info, graph, "ort")


def test_graph_layout_is_checked(decoder):
    session, info, graph = decoder
    with pytest.raises(UserError, match="only tau can change"):
        FreeKVCache(session, graph, info, "budget=64,page=4,sink=4,recent=8", 1)


def test_compile_with_kv_retrieval_generates_with_freekv(tmp_path):
    """--kv-retrieval end to end: freekv.onnx in the artifact (hashed), Session.generate decodes
    with it (exact while the context fits the budget), kv_retrieval=False is full attention;
    what FreeKV cannot carry yet is refused before any export."""
    import edgec

    art = edgec.compile("llama", target="openvino-cpu", output_dir=tmp_path / "a", config="tiny",
                        generate=True, kv_retrieval="freekv:budget=64,page=8,sink=8,recent=16")
    entry = art.manifest["kv_retrieval"]
    assert entry["model"] == "freekv.onnx" and entry["budget"] == 64
    # the report names FreeKV and checks its graph against PyTorch (it listed file sizes only)
    checked = art.report["fidelity"]["freekv_graph_vs_source"]
    assert checked["runtime"] == "openvino" and checked["reference"] == "pytorch"
    assert checked["outputs"]["logits"]["max_rel"] <= 1e-5
    markdown = (art.path / "report.md").read_text()
    # the recent window is page-aligned: 8-15 cached tokens, not "recent 16"
    assert ("FreeKV (freekv.onnx): per KV head and step 64 tokens at most: sink 8 + 5 "
            "retrieved pages of 8 + the last 2 page(s) (8–15 cached tokens: the page being "
            "filled and the 1 before it) + the new token; tau 0.8") in markdown
    assert "## FreeKV graph fidelity (openvino vs pytorch)" in markdown
    assert "freekv.onnx" in art.manifest["hashes"]
    from edgec.inspect import describe  # `edgec inspect` said nothing of FreeKV before

    assert describe(art.path)["kv_retrieval"]["budget"] == 64
    from typer.testing import CliRunner

    from edgec.cli import app  # compare says which graphs it did not run (it said nothing)

    result = CliRunner().invoke(app, ["compare", str(art.path), str(art.path), "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["not_compared"] == ["freekv.onnx"]
    sess = art.load()
    ids = np.random.default_rng(0).integers(0, 256, (1, 20))
    fits = sess.generate(ids, max_new_tokens=24)
    stats = sess.last_generation["kv_retrieval"]
    assert stats["decode_steps"] == 23 and stats["prefill_tokens"] == 20
    np.testing.assert_array_equal(fits, sess.generate(ids, max_new_tokens=24, kv_retrieval=False))
    assert "kv_retrieval" not in sess.last_generation
    long = np.random.default_rng(1).integers(0, 256, (1, 120))
    sess.generate(long, max_new_tokens=4)
    assert sess.last_generation["kv_retrieval"]["retrieved_pages_mean"] > 0
    for kwargs, message in ((dict(), "add --generate"),
                            (dict(generate=True, quantize="w8a8"), "does not carry --quantize"),
                            (dict(generate=True, target="qnn-htp", quantize="w8a8"),
                             "not on qnn-htp")):
        kwargs = {"target": "ort-cpu", **kwargs}
        with pytest.raises(UserError, match=message):
            edgec.compile("llama", output_dir=tmp_path / "x", kv_retrieval="freekv", **kwargs)
    assert not (tmp_path / "x").exists()


def test_hf_checkpoint_decodes_with_freekv_as_with_full_attention(tmp_path):
    """A Qwen2 checkpoint (q/k/v biases, grouped heads): its FreeKV graph comes from the
    checkpoint's own modules and decodes the standard graph's tokens while the context fits."""
    import torch
    import transformers

    import edgec

    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=96, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=256)
    transformers.Qwen2ForCausalLM(cfg).eval().save_pretrained(tmp_path / "qwen2")
    art = edgec.compile(str(tmp_path / "qwen2"), target="ort-cpu", output_dir=tmp_path / "a",
                        generate=True, config="batch=1,seq=8",
                        kv_retrieval="freekv:budget=64,page=8,sink=8,recent=16")
    assert art.manifest["kv_retrieval"]["model"] == "freekv.onnx"
    sess = art.load()
    ids = np.random.default_rng(0).integers(0, 96, (1, 20))
    fits = sess.generate(ids, max_new_tokens=24, eos_token_id=[])
    assert sess.last_generation["kv_retrieval"]["decode_steps"] == 23
    np.testing.assert_array_equal(
        fits, sess.generate(ids, max_new_tokens=24, eos_token_id=[], kv_retrieval=False))


def test_left_padded_batch_equals_each_prompt_alone(decoder):
    """Sink, pages and budget count from each row's first real token: a row left-padded by a
    length that is not a multiple of the page decodes as it does alone, past the budget (the
    sink was the buffer's first slots, padding in a padded row, and its pages were shifted)."""
    rng = np.random.default_rng(3)
    vocab, pad = decoder[1].vocab, 15
    a, b = rng.integers(0, vocab, 45), rng.integers(0, vocab, 30)
    ids = np.stack([a, np.r_[np.zeros(pad, np.int64), b]])
    mask = np.ones_like(ids)
    mask[1, :pad] = 0
    _, got, _, logits, cache = _run(decoder, ids, mask, 24, 0.9)  # context 45..68 > budget 32
    assert cache.stats["retrieved_pages_mean"] > 0
    for row, prompt in ((0, a), (1, b)):
        _, alone, _, alone_logits, _ = _run(decoder, prompt[None], None, 24, 0.9)
        np.testing.assert_array_equal(got[row, 45:], alone[0, len(prompt):])
        for x, y in zip(logits, alone_logits):
            np.testing.assert_allclose(x[row], y[0], atol=1e-4)


def test_buffers_larger_than_memory_are_refused(decoder):
    """The buffers are allocated for prompt + max_new_tokens at the first step: a huge -n on the
    reference model (no context limit) was numpy's MemoryError, an internal error."""
    session, info, graph = decoder
    with pytest.raises(UserError, match=r"a KV cache for 1 x 10000000000 tokens .* lower "
                                        r"max_new_tokens \(-n\)$"):
        FreeKVCache(session, graph, info, CONFIG, 1, capacity=10**10)


def test_a_budget_holding_the_whole_context_is_named():
    """A budget at or past the longest context never retrieves: the compile warns (it shipped
    a second copy of the weights in freekv.onnx under a report describing retrieval)."""
    kv = parse_kv_retrieval("freekv:budget=256,page=32,sink=32,recent=64")
    message = budget_covers_context(kv, 100)
    assert message and "budget=256 covers the whole context (100 tokens)" in message
    assert budget_covers_context(kv, 256) is not None
    assert budget_covers_context(kv, 257) is None and budget_covers_context(kv, None) is None
