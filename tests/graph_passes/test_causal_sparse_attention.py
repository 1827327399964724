"""Causal block-sparse prefill attention (``sparse_attention/causal.py``) against numpy."""

import math

import numpy as np
import onnx_ir as ir
import pytest

from edgec.graph_passes.sparse_attention import SparseAttentionConfig
from edgec.graph_passes.sparse_attention.causal import (
    CausalShape,
    build_causal_sparse_attention,
    forced_blocks,
)
from edgec.runtimes.ort import run_model

B, H, HKV, S, D = 2, 4, 2, 77, 8
PAD = 5  # row 1 is left-padded


def _graph(cfg, scale):
    f32 = ir.TensorType(ir.DataType.FLOAT)
    dims = lambda h: ir.Shape(["b", h, "s", D])  # noqa: E731
    q = ir.Value(name="q", type=f32, shape=dims(H))
    k = ir.Value(name="k", type=f32, shape=dims(HKV))
    v = ir.Value(name="v", type=f32, shape=dims(HKV))
    mask = ir.Value(name="mask", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(["b", "s"]))
    out, tape, stats = build_causal_sparse_attention(
        "t", q, k, v, mask, scale, CausalShape(H, HKV, D, ir.DataType.FLOAT), cfg)
    out.name = "out"
    graph = ir.Graph([q, k, v, mask], [out], nodes=tape.nodes,
                     initializers=tape.initializers, opset_imports={"": 23})
    return ir.Model(graph, ir_version=10), stats


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, H, S, D)).astype(np.float32)
    k = rng.standard_normal((B, HKV, S, D)).astype(np.float32)
    k[:, :, 3] += 4.0 * q[:, ::2, -1]  # a few keys that real queries attend to strongly
    v = rng.standard_normal((B, HKV, S, D)).astype(np.float32)
    mask = np.ones((B, S), np.int64)
    mask[1, :PAD] = 0
    return {"q": q, "k": k, "v": v, "mask": mask}


def _attend(f, allowed, scale):
    """Masked softmax attention; ``allowed`` [B, HKV, S(query), S(key)] per KV head."""
    g = H // HKV
    k, v = (np.repeat(f[x], g, axis=1) for x in "kv")
    s = np.einsum("bhqd,bhkd->bhqk", f["q"] * scale, k)
    s = np.where(np.repeat(allowed, g, axis=1), s, -np.inf)
    with np.errstate(invalid="ignore"):  # padding queries see no key: NaN rows, never read
        p = np.exp(s - s.max(-1, keepdims=True))
        return np.einsum("bhqk,bhkd->bhqd", p / p.sum(-1, keepdims=True), v)


def _dense_allowed(f):
    causal = np.tril(np.ones((S, S), bool))
    return np.broadcast_to(causal & (f["mask"][:, None, None, :] > 0), (B, HKV, S, S))


def _selected_allowed(f, cfg, scale):
    """The selection the graph makes, written out in numpy: [B, HKV, S, S]."""
    bs, qbs, g = cfg.block, cfg.query_block, H // HKV
    nq = -(-S // qbs)
    L, nb, r = nq * qbs, nq * qbs // bs, qbs // bs
    pad = lambda x: np.pad(x, [(0, 0), (0, 0), (0, L - S), (0, 0)])  # noqa: E731
    qg = pad(f["q"] * scale).reshape(B, HKV, g, nq, qbs, D).transpose(0, 1, 3, 2, 4, 5)
    q_hat = qg.reshape(B, HKV, nq, g * qbs, D).mean(3)
    k_hat = pad(f["k"]).reshape(B, HKV, nb, bs, D).mean(3)
    scores = q_hat @ k_hat.transpose(0, 1, 3, 2)
    i, j = np.arange(nq)[:, None], np.arange(nb)[None]
    visible = j < (i + 1) * r
    forced = visible & ((j == 0) | (j >= i * r - 1))
    scores = np.where(forced, 1e9, np.where(visible, scores, -1e30))
    kept = min(nb, math.ceil(cfg.keep * nb) + forced_blocks(bs, qbs))
    idx = np.argsort(-scores, axis=-1, kind="stable")[..., :kept]
    chosen = np.zeros((B, HKV, nq, nb), bool)
    np.put_along_axis(chosen, idx, True, axis=-1)
    per_key = np.repeat(np.repeat(chosen, qbs, axis=2), bs, axis=3)[:, :, :S, :S]
    return per_key & _dense_allowed(f)


@pytest.mark.parametrize("keep", [1.0, 0.2])
def test_causal_sparse_matches_numpy(keep):
    cfg = SparseAttentionConfig(keep=keep, block=4, qblock=8)
    scale = 1 / math.sqrt(D)
    model, stats = _graph(cfg, scale)
    f = _inputs()
    out = run_model(model, f)["out"]
    allowed = _dense_allowed(f) if keep == 1.0 else _selected_allowed(f, cfg, scale)
    want = _attend(f, allowed, scale)
    real = f["mask"].astype(bool)  # padding queries are never read
    for b in range(B):
        np.testing.assert_allclose(out[b][:, real[b]], want[b][:, real[b]], rtol=1e-5,
                                   atol=1e-5)
    assert stats["grouped_heads"] == 2 and stats["forced_blocks"] == 4
    if keep < 1.0:  # the selection really drops keys: dense differs
        dense = _attend(f, _dense_allowed(f), scale)
        assert np.abs(out[0] - dense[0]).max() > 1e-3
        assert _selected_allowed(f, cfg, scale).sum() < 0.8 * _dense_allowed(f).sum()
