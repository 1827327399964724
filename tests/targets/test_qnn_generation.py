"""Generation on qnn-htp: static prefill (N tokens) and decode (1 token) graphs over a KV buffer
owned by the runtime, quantized, compiled to EPContext and run on the HTP emulator."""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np
import pytest

import edgec
from edgec.errors import UserError
from edgec.runtimes.generation import generate
from edgec.runtimes.ort import OrtSession
from edgec.runtimes.static_cache import StaticBufferCache

pytest.importorskip("onnxruntime_qnn", reason="qnn extra (installed by dev) is required")
PROMPT = np.arange(1, 21)[None]  # 20 tokens: two prefill chunks of 16, the last right-padded


@pytest.fixture(scope="module")
def qnn_art(tmp_path_factory):
    return edgec.compile("llama", target="qnn-htp", config="tiny", generate=True,
                         quantize="w8a16", context=64,
                         output_dir=tmp_path_factory.mktemp("qnngen") / "a")


def test_static_graphs_and_manifest(qnn_art):
    m = qnn_art.manifest
    assert m["generation"]["cache"] == "static" and m["generation"]["context"] == 64
    assert m["generation"]["tokens"] == 16 and m["runtime"]["decode"]["tokens"] == 1
    shapes = {i["name"]: i["shape"] for i in m["inputs"]}
    assert shapes["input_ids"] == [1, 16] and shapes["past_key_values.0.key"] == [1, 2, 48, 16]
    assert {o["name"]: o["shape"] for o in m["outputs"]}["present.0.key"] == [1, 2, 16, 16]
    assert (qnn_art.path / m["runtime"]["decode"]["model"]).is_file()
    decode = qnn_art.report["fidelity"]["decode_graph_vs_source"]
    assert decode["outputs"]["logits"]["cosine"] > 0.97


def test_the_decode_graph_calibrates_on_as_many_activations_as_the_prefill_graph(qnn_art):
    """The one-token decode graph sees one token per sample: at the prefill graph's 16 samples
    (16 × 16 tokens here) its ranges came from 16 activations per tensor, too narrow; it takes
    DECODE_SAMPLES by default, and the report says both counts."""
    from edgec.calibration.samples import DECODE_SAMPLES, DEFAULT_SAMPLES

    q = qnn_art.report["quantization"]
    assert q["calibration"]["samples"] == DEFAULT_SAMPLES
    assert q["decode_calibration"]["samples"] == DECODE_SAMPLES == 128
    assert q["decode_calibration"]["how"] == "calibrated during compile"
    assert "decode_calibration" not in qnn_art.manifest["quantization"]
    assert "decode graph calibrated during compile: 128 samples" in \
        (qnn_art.path / "report.md").read_text()
    # 0.99972 (rel L2 0.024) on 16 samples, 0.99996 (0.009) on 128
    decode = qnn_art.report["fidelity"]["decode_graph_vs_source"]["outputs"]["logits"]
    assert decode["cosine"] > 0.9999


def test_prefill_and_decode_share_one_context_where_the_backend_loads_it(qnn_art):
    shared = qnn_art.manifest["runtime"]["shared_context"]
    assert shared["shared_bytes"] < shared["separate_bytes"]  # the weights stored once
    if platform.machine() == "x86_64":  # the HTP emulator refuses a multi-graph context
        assert not shared["shared"] and "does not load the shared context" in shared["why"]
        assert any("two contexts" in n for n in qnn_art.report["notes"])
        assert not (qnn_art.path / "target" / "shared").exists()
    else:
        assert shared["shared"]
        assert qnn_art.manifest["runtime"]["decode"]["session_config"]


def test_npu_generation_agrees_with_ort_on_the_same_qdq_graphs(qnn_art):
    sess = qnn_art.load()
    ours = sess.generate(PROMPT, max_new_tokens=12)
    info = sess.decoder_info
    graphs = [OrtSession(qnn_art.path / f, optimize=False) for f in ("model.onnx", "decode.onnx")]
    ref, _ = generate(None, info, PROMPT, cache=StaticBufferCache(*graphs, info, 16),
                      max_new_tokens=12)
    np.testing.assert_array_equal(ours, ref)
    with pytest.raises(UserError, match="context of 64"):
        sess.generate(np.ones((1, 40), np.int64), max_new_tokens=30)
    with pytest.raises(UserError, match="one sequence at a time"):
        sess.generate(np.ones((2, 4), np.int64), max_new_tokens=2)


def test_static_buffer_decoding_equals_the_dynamic_cache(tmp_path):
    """fp32: the static graphs driven through the runtime-owned buffer (chunked prefill, the last
    chunk right-padded; one-token decode) give the dynamic-cache greedy tokens exactly."""
    from edgec.exporters.decoder import DecoderInfo, StaticCache
    from edgec.exporters.sources import resolve_source
    from edgec.onnx_io import save_model

    sessions = []
    for tokens in (16, 1):
        src = resolve_source("llama", "tiny", dynamic_shapes={},
                             generate=StaticCache(64, tokens))
        save_model(src.model, Path(tmp_path / f"g{tokens}.onnx"))
        sessions.append(OrtSession(tmp_path / f"g{tokens}.onnx"))
    info = DecoderInfo.from_json(src.info["generation"])
    import torch

    from edgec.models import registry

    model = registry.get("llama").build("tiny")
    # 20 tokens: the last of two chunks padded; 40 + 25 new: the prompt's 40 slots, not its
    # 48 as whole chunks, + 24 fed back fill the 64 exactly (refused as beyond the static
    # context while the padding kept its slots)
    for prompt, new in ((PROMPT, 20), (np.arange(3, 43)[None], 25)):
        static, _ = generate(None, info, prompt, cache=StaticBufferCache(*sessions, info, 16),
                             max_new_tokens=new, eos_token_id=[])
        seq = torch.as_tensor(prompt)
        with torch.no_grad():
            for _ in range(new):
                seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
        np.testing.assert_array_equal(static, seq.numpy())
    with pytest.raises(UserError, match=r"\(40 tokens\) \+ max_new_tokens \(26\) - 1 exceeds the "
                                        r"model's context of 64 tokens; set max_new_tokens \(-n\) "
                                        "to at most 25"):
        generate(None, info, np.arange(3, 43)[None], cache=StaticBufferCache(*sessions, info, 16),
                 max_new_tokens=26)


def _matmul_weights(path: Path) -> dict[str, np.ndarray]:
    import onnx_ir as ir

    out = {}
    for node in ir.load(path).graph:
        dq = node.inputs[1].producer() if node.op_type == "MatMul" else None
        if dq is not None and dq.op_type == "DequantizeLinear" and dq.inputs[0].is_initializer():
            out[node.name] = dq.inputs[0].const_value.numpy()
    return out


def test_a_calibration_cache_serves_the_decode_graph_too(qnn_art, tmp_path):
    """`edgec calibrate --generate` on the NPU calibrates the one-token decode graph beside the
    prefill graph (``decode/``), and `compile --calib` takes it: the decode graph refused the
    prefill graph's cache as another graph's, so the README's calibrate-then-compile flow could
    not work for an NPU decoder. Same generated samples: the same graphs as calibrated inside
    the compile."""
    import json

    import onnx_ir as ir
    from typer.testing import CliRunner

    from edgec.cli import app

    r = CliRunner().invoke(app, ["calibrate", "llama", "--target", "qnn-htp", "--config", "tiny",
                                 "--generate", "--quantize", "w8a16", "--context", "64", "-o",
                                 str(tmp_path / "c"), "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)  # the decode graph's own default count, as compile's
    assert summary["samples"] == 16 and summary["decode"]["samples"] == 128
    stored = json.loads((tmp_path / "c" / "decode" / "calibration.json").read_text())
    assert stored["samples"] == 128
    art = edgec.compile("llama", target="qnn-htp", config="tiny", generate=True,
                        quantize="w8a16", context=64, calibration=str(tmp_path / "c"),
                        output_dir=tmp_path / "a")
    assert art.report["quantization"]["calibration"]["how"] == "reused cache"
    assert art.report["quantization"]["decode_calibration"]["how"] == "reused cache"
    assert not any("decode graph reused" in n for n in art.report.get("notes", []))
    for graph in ("model.onnx", "decode.onnx"):
        ours, theirs = (ir.load(p / graph) for p in (art.path, qnn_art.path))
        scales = {n: v.const_value.numpy() for n, v in ours.graph.initializers.items()
                  if n.endswith("_scale")}
        assert scales, graph
        for name, value in scales.items():
            np.testing.assert_array_equal(value, theirs.graph.initializers[name].const_value
                                          .numpy(), err_msg=f"{graph}: {name}")
    # a cache an older edgec made: its decode graph's ranges from 16 samples are reused, with
    # a note (as a compile that asks for samples=16 takes it without one); samples=16 against
    # this cache is refused by the decode graph's cache, named
    from types import SimpleNamespace

    from edgec.calibration.cache import CalibrationCache
    from edgec.graph_passes.quantization.options import QuantOptions
    from edgec.pipeline import _few_decode_samples
    from edgec.targets import get

    def recipe(samples):
        return SimpleNamespace(quantize=SimpleNamespace(samples=samples))

    old = {"how": "reused cache", "samples": 16}
    assert "re-run `edgec calibrate --generate`" in _few_decode_samples(recipe(None), old)[0]
    assert not _few_decode_samples(recipe(16), old)
    assert not _few_decode_samples(recipe(None), {**old, "how": "calibrated during compile"})
    cache = CalibrationCache.load(tmp_path / "c").companion("decode")
    with pytest.raises(UserError, match=r"samples=16, but the calibration cache \(.*decode\) was "
                                        "made from 128 samples"):
        QuantOptions.parse("w8a16:samples=16", get("qnn-htp")).make_pass(
            get("qnn-htp"), cache, None, print)
    # a cache an older edgec made over empty KV buffers: its past ranges are zero, and the
    # decoder would ignore its cache on the device
    cal = tmp_path / "c" / "calibration.json"
    raw = json.loads(cal.read_text())
    cal.write_text(json.dumps({**raw, "data": "prefill prompts (empty KV cache)"}))
    with pytest.raises(UserError, match="empty KV buffer .* re-run `edgec calibrate`"):
        edgec.compile("llama", target="qnn-htp", config="tiny", generate=True,
                      quantize="w8a16", context=64, calibration=str(tmp_path / "c"),
                      output_dir=tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_dartquant_decode_graph_rotates_as_the_prefill_graph(tmp_path):
    """The decode graph takes the prefill graph's DartQuant rotations instead of calibrating its
    own, so both hold the same weights and the shared context stores them once (calibrated
    apart, none of llama tiny's 15 weight matrices matched)."""
    art = edgec.compile("llama", target="qnn-htp", config="tiny", generate=True,
                        quantize="w8a8", rotate="dartquant:accept=false", context=64,
                        output_dir=tmp_path / "a")
    rotate = next(p for p in art.report["passes"] if p["name"] == "rotate")["stats"]
    assert "learned" in rotate["dartquant"]["kept"].values()  # not the seeded Hadamards alone
    prefill, decode = (_matmul_weights(art.path / f) for f in ("model.onnx", "decode.onnx"))
    assert len(prefill) == 15 and prefill.keys() == decode.keys()
    for name, w in prefill.items():
        np.testing.assert_array_equal(w, decode[name], err_msg=name)


def test_a_context_past_the_models_positions_is_refused_before_the_export(tmp_path):
    """--context 100000 on SmolLM2 (8192 positions) exported static buffers for 8 minutes at
    2 GB before anyone stopped it."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1, max_position_embeddings=32)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "ckpt")
    with pytest.raises(UserError, match="--context 64 is longer than the model's 32 positions"):
        edgec.compile(str(tmp_path / "ckpt"), target="qnn-htp", generate=True,
                      quantize="w8a16", context=64, output_dir=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_bench_fits_its_defaults_to_the_artifacts_context(qnn_art):
    """`edgec bench` on an NPU decoder (context 64) refused its own defaults (128 + 32 tokens)
    and labelled the static prefill "sparse"."""
    import json

    from typer.testing import CliRunner

    from edgec.cli import app

    runner = CliRunner()
    r = runner.invoke(app, ["bench", str(qnn_art.path), "--json", "--iterations", "1",
                            "--warmup", "0"])
    assert r.exit_code == 0, r.output
    stats = json.loads(r.stdout)
    assert stats["prompt_tokens"] == 32 and stats["new_tokens"] == 32
    assert stats["prefill_graph"] == "dense"
    r = runner.invoke(app, ["bench", str(qnn_art.path), "--prompt-tokens", "60"])
    assert r.exit_code == 2 and "exceed the artifact's context of 64 tokens" in r.stderr


def test_hf_llama_npu_decoding_reads_the_kv_cache(tmp_path):
    """A Hugging Face LLaMA on the NPU, teacher-forced along transformers' greedy tokens: each
    step's logits match transformers'. Calibration fed the static graphs an all-zero, masked
    KV buffer, so the past inputs were quantized to [0, 1e-4] and every cached key/value read
    as zero: the NPU's tokens diverged from the second one on (logits cosine 0.55 against
    PyTorch) while the held-out floor, measured on the same empty buffers, said 0.9996."""
    import torch

    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=512,
                                      initializer_range=0.1)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(tmp_path / "ckpt")
    art = edgec.compile(str(tmp_path / "ckpt"), target="qnn-htp", generate=True,
                        quantize="w8a16", context=64, output_dir=tmp_path / "a")
    sess = art.load()
    info = sess.decoder_info
    rng = np.random.default_rng(0)
    for length in (6, 20):  # one prefill chunk; two, the first left-padded
        prompt = rng.integers(4, 128, (1, length))
        with torch.no_grad():
            seq = model.generate(torch.as_tensor(prompt), max_new_tokens=12, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)
            expected = model(seq).logits[0, length - 1:-1].numpy()
        seq = seq.numpy()
        cache = StaticBufferCache(sess, sess.decode_session, info, 16)
        got = [cache.step(prompt, np.ones_like(prompt), np.arange(length)[None])[0, -1]]
        for i in range(length, seq.shape[1] - 1):
            got.append(cache.step(seq[:, i:i + 1], np.ones((1, i + 1), np.int64),
                                  np.array([[i]]))[0, -1])
        got = np.stack(got)
        cosine = (got * expected).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(
            expected, axis=-1)
        assert cosine.min() > 0.98, (length, cosine)  # 0.99+ here; 0.2-0.7 reading zeros
        agree = (got.argmax(-1) == expected.argmax(-1)).mean()  # near-ties flip (margins of
        assert agree >= 0.6, (length, got.argmax(-1), expected.argmax(-1))  # 0.02 to 0.14)
    assert art.report["quantization"]["calibration"]["data"] == (
        "prompts after a KV buffer the model filled")
    assert art.report["fidelity"]["decode_graph_vs_source"]["outputs"]["logits"]["cosine"] > 0.98
