"""Causal block-sparse attention for a decoder's prefill (long prompts), in standard ONNX ops.

    q [B,H,S,d], k, v [B,Hkv,S,d] (grouped-query: H = G·Hkv), key_valid [B,S] (0 = padding)
    ⇒ pad S to whole query blocks → per KV head: block means of the group's queries and of the
    keys → q̂k̂ᵀ [B,Hkv,nq,nb] → causal block bias, forced sink + local blocks → TopK → Gather
    whole K/V blocks → per query block softmax over the selected keys (causal and padding
    masks by position) → ·V → back to [B,H,S,d]

One selection per KV head and query block, shared by the G query heads of the group (as FreeKV
and grouped sparse-prefill kernels do), so K/V are neither repeated nor gathered per query head.
The budget is ceil(keep · nb) scored blocks on top of the forced ones: block 0 (the attention
sink the first tokens become in trained LLMs) and the local band (the key blocks under the
query block and the one before it). A query block early in the prompt sees fewer blocks than
the budget; the surplus picks are masked by position, so every row attends to exactly the
causally visible keys of its selected blocks. keep=1.0 is exact causal attention.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from edgec.graph_passes.sparse_attention.builder import NEG, _Emitter, _scalar, _scalar_of
from edgec.graph_passes.sparse_attention.layout import FORCE

__all__ = ["CausalShape", "build_causal_sparse_attention", "forced_blocks"]

I64 = ir.DataType.INT64


@dataclasses.dataclass(frozen=True)
class CausalShape:
    heads: int
    kv_heads: int
    d: int
    dtype: ir.DataType


def _band_triangle(g: int, qbs: int, bs: int, r: int, dtype) -> np.ndarray:
    """[G·qbs, (r+1)·bs] additive causal mask of a query block over its band: key u of the band
    sits at position start − bs + u, query t at start + t; visible when u − bs ≤ t."""
    t = np.tile(np.arange(qbs), g)[:, None]
    u = np.arange((r + 1) * bs)[None]
    return np.where(u - bs <= t, 0.0, NEG).astype(dtype)


def forced_blocks(block: int, query_block: int) -> int:
    """Blocks every query block keeps outside the budget: the sink, its own key blocks and the
    one before them."""
    return query_block // block + 2


def build_causal_sparse_attention(name: str, q: ir.Value, k: ir.Value, v: ir.Value,
                                  key_valid: ir.Value, scale: float, shape: CausalShape, cfg
                                  ) -> tuple[ir.Value, ir.tape.Tape, dict]:
    """(output [B,H,S,d], tape of new nodes and initializers, stats). ``q`` unscaled."""
    e = _Emitter(name, shape.dtype)
    d, bs, qbs = shape.d, cfg.block, cfg.query_block
    hkv, g = shape.kv_heads, shape.heads // shape.kv_heads
    r = qbs // bs  # key blocks per query block

    s_t = e.Shape(q, start=2, end=3)                                   # [1] prompt length
    nq_t = e.Div(e.Add(s_t, e.i64(qbs - 1)), e.i64(qbs))               # query blocks
    length = e.Mul(nq_t, e.i64(qbs))                                   # padded length L
    nb_t = e.Mul(nq_t, e.i64(r))                                       # key blocks
    pad = e.Sub(length, s_t)

    def padded(x, rank=4, axis=2):  # zeros after the prompt, up to L, on the sequence axis
        parts = [e.i64(*[0] * (rank + axis)), pad]
        parts += [e.i64(*[0] * (rank - axis - 1))] if rank - axis - 1 else []
        return e.Pad(x, e.Concat(*parts, axis=0))

    if scale != 1.0:
        q = e.Mul(q, e.const(np.array(scale, shape.dtype.numpy())))
    # queries grouped by KV head and query block: [B, Hkv, nq, G·qbs, d]
    qg = e.Reshape(padded(q), e.i64(0, hkv, g, -1, qbs, d))            # [B,Hkv,G,nq,qbs,d]
    qg = e.Reshape(e.tr(qg, [0, 1, 3, 2, 4, 5]), e.i64(0, hkv, -1, g * qbs, d))
    kb, vb = (e.Reshape(padded(x), e.i64(0, hkv, -1, bs, d)) for x in (k, v))  # [B,Hkv,nb,bs,d]
    q_hat = e.ReduceMean(qg, e.i64(3), keepdims=0)                     # [B,Hkv,nq,d]
    k_hat = e.ReduceMean(kb, e.i64(3), keepdims=0)                     # [B,Hkv,nb,d]
    block_scores = e.MatMul(q_hat, e.tr(k_hat, [0, 1, 3, 2]))          # [B,Hkv,nq,nb]

    # The band: the key blocks under the query block and the one before it (r + 1 blocks, the
    # last ones of each selection), where a static triangle is the causal mask. The far blocks:
    # TopK among the blocks before the band, the sink (block 0) forced; all causally visible.
    qi = e.Unsqueeze(e.Range(_scalar(e, 0), _scalar_of(e, nq_t), _scalar(e, 1)), e.i64(1))
    kj = e.Unsqueeze(e.Range(_scalar(e, 0), _scalar_of(e, nb_t), _scalar(e, 1)), e.i64(0))
    band_start = e.Sub(e.Mul(qi, e.i64(r)), e.i64(1))                  # [nq, 1] (−1 at i = 0)
    far = e.Less(kj, band_start)                                       # [nq, nb]
    sink = e.And(far, e.Equal(kj, e.i64(0)))
    block_scores = e.Where(sink, e.const(FORCE), e.Where(far, block_scores, e.const(NEG)))
    budget = e.Cast(e.Ceil(e.Mul(e.Cast(nb_t, to=ir.DataType.FLOAT),
                                 e.const([cfg.keep], np.float32))), to=I64)
    k_far = e.Min(e.Add(budget, e.i64(1)), nb_t)
    _, far_idx = e.TopK(block_scores, k_far, axis=-1, largest=1, sorted=1, _outputs=2)
    # a pick past the band start (fewer far blocks than the budget early on) is masked
    far_ok = e.Less(far_idx, band_start)                               # [B,Hkv,nq,Kf]
    band_idx = e.Add(band_start, e.const(np.arange(r + 1), np.int64))  # [nq, r+1]
    band_ok = e.GreaterOrEqual(band_idx, e.i64(0))
    expand_to = e.Concat(e.Shape(far_idx, start=0, end=3), e.i64(r + 1), axis=0)
    idx = e.Concat(far_idx, e.Expand(e.Max(band_idx, e.i64(0)), expand_to), axis=-1)
    block_ok = e.Concat(far_ok, e.Expand(band_ok, expand_to), axis=-1)  # [B,Hkv,nq,K]

    # whole blocks out of [B·Hkv·nb, bs, d]
    bh = e.Shape(k, start=0, end=2)
    rows = e.Range(_scalar(e, 0), _scalar_of(e, e.ReduceProd(bh, keepdims=1)), _scalar(e, 1))
    flat = e.Add(idx, e.Reshape(e.Mul(rows, nb_t), e.Concat(bh, e.i64(1, 1), axis=0)))
    keys = e.Mul(e.Add(k_far, e.i64(r + 1)), e.i64(bs))
    kv_shape = e.Concat(e.i64(0, hkv, -1), keys, e.i64(d), axis=0)    # [B,Hkv,nq,K·bs,d]
    gk, gv = (e.Reshape(e.Gather(e.Reshape(x, e.i64(-1, bs, d)), flat, axis=0), kv_shape)
              for x in (kb, vb))
    scores = e.MatMul(qg, e.tr(gk, [0, 1, 2, 4, 3]))                   # [B,Hkv,nq,G·qbs,K·bs]

    # masks as additive biases, each broadcast: per key (padding, invalid blocks) over the
    # query rows, and the band's static causal triangle over the batch, heads and blocks
    valid = e.Cast(padded(e.Cast(key_valid, to=I64), rank=2, axis=1), to=ir.DataType.BOOL)
    batch_rows = e.Range(_scalar(e, 0), _scalar_of(e, e.Shape(k, start=0, end=1)),
                         _scalar(e, 1))
    key_pos = e.Add(e.Unsqueeze(e.Mul(idx, e.i64(bs)), e.i64(-1)),
                    e.const(np.arange(bs), np.int64))                  # [B,Hkv,nq,K,bs]
    where = e.Add(key_pos, e.Reshape(e.Mul(batch_rows, length), e.i64(-1, 1, 1, 1, 1)))
    key_ok = e.And(e.Gather(e.Reshape(valid, e.i64(-1)), where, axis=0),
                   e.Unsqueeze(block_ok, e.i64(-1)))
    key_bias = e.Reshape(e.Where(key_ok, e.const(0.0), e.const(NEG)),
                         e.Concat(e.i64(0, hkv), e.Shape(idx, start=2, end=3), e.i64(1), keys,
                                  axis=0))                             # [B,Hkv,nq,1,K·bs]
    far_cols = e.Concat(e.i64(g * qbs), e.Mul(k_far, e.i64(bs)), axis=0)
    causal = e.Concat(e.Expand(e.const(np.zeros((1, 1), shape.dtype.numpy())), far_cols),
                      e.const(_band_triangle(g, qbs, bs, r, shape.dtype.numpy())), axis=-1)
    probs = e.Softmax(e.Add(e.Add(scores, causal), key_bias), axis=-1)
    out = e.MatMul(probs, gv)                                          # [B,Hkv,nq,G·qbs,d]
    out = e.tr(e.Reshape(out, e.i64(0, hkv, -1, g, qbs, d)), [0, 1, 3, 2, 4, 5])
    out = e.Reshape(out, e.i64(0, hkv * g, -1, d))                     # [B,H,L,d]
    out = e.Slice(out, e.i64(0), s_t, e.i64(2))
    stats = {"mode": "causal", "block": bs, "query_block": qbs, "keep": cfg.keep,
             "forced_blocks": forced_blocks(bs, qbs), "grouped_heads": g}
    return out, e.tape, stats
