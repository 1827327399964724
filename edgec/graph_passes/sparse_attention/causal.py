"""Causal block-sparse attention for a decoder's prefill (long prompts), in standard ONNX ops.

    q [B,H,S,d], k, v [B,Hkv,S,d] (grouped-query: H = G·Hkv), key_valid [B,S] (0 = padding)
    ⇒ pad S to whole query blocks → per KV head: block means of the group's queries and of the
    keys → q̂k̂ᵀ [B,Hkv,nq,nb] → TopK over the blocks before the band (sink forced) ⊕ the band
    → Gather whole K/V blocks → per query block one fused ``Attention`` (opset 23) over them
    → back to [B,H,S,d]

One selection per KV head and query block, shared by the G query heads of the group (as FreeKV
and grouped sparse-prefill kernels do), so K/V are neither repeated nor gathered per query head;
the group's heads are rows of the query block. The budget is ceil(keep · nb) scored blocks on
top of the forced ones: block 0 (the attention sink the first tokens become in trained LLMs) and
the band (the key blocks under the query block and the one before it).

Masks cost no pass over the scores: the band's causal triangle is a static 2-D ``Attention``
mask, and padding keys carry a large negative bias in an extra K column that a constant-1 extra
Q column picks up in the dot product. A query block early in the prompt has fewer blocks before
its band than the budget: those picks read a dead block (all biased out). keep=1.0 is exact
causal attention. (The first form compared positions over every score: in OpenVINO's profile
of a 4096-token prefill that compare took as long as the attention MatMuls.)
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
    """[G·qbs, (r+1)·bs] additive causal mask of a query block (its G query heads' rows) over
    its band: key u sits at position start − bs + u, query t at start + t; visible when
    u − bs ≤ t."""
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

    # Q carries the scale and a constant 1 in an extra column; K carries an additive key bias
    # there (0, or NEG for padding and for the dead block), so q'·k' = q·k·scale + bias: the
    # per-key masks cost nothing and the runtime's fused Attention gets a 2-D mask only.
    q = e.Mul(q, e.const(np.array(scale, shape.dtype.numpy()))) if scale != 1.0 else q
    ones = e.Expand(e.const(np.ones((1, 1, 1, 1), shape.dtype.numpy())),
                    e.Concat(e.Shape(q, start=0, end=3), e.i64(1), axis=0))
    q_blocks = e.Reshape(padded(e.Concat(q, ones, axis=-1)), e.i64(0, hkv * g, -1, qbs, d + 1))
    q_hat = e.ReduceMean(e.Reshape(e.Slice(q_blocks, e.i64(0), e.i64(d), e.i64(4)),
                                   e.i64(0, hkv, g, -1, qbs, d)), e.i64(2, 4), keepdims=0)
    kp, vp = padded(k), padded(v)                                      # [B,Hkv,L,d]
    k_hat = e.ReduceMean(e.Reshape(kp, e.i64(0, hkv, -1, bs, d)), e.i64(3), keepdims=0)
    block_scores = e.MatMul(q_hat, e.tr(k_hat, [0, 1, 3, 2]))          # [B,Hkv,nq,nb]

    valid = e.Cast(padded(e.Cast(key_valid, to=I64), rank=2, axis=1), to=ir.DataType.BOOL)
    bias = e.Where(valid, e.const(0.0), e.const(NEG))                  # [B, L]
    bias = e.Expand(e.Unsqueeze(bias, e.i64(1, 3)),
                    e.Concat(e.Shape(k, start=0, end=2), length, e.i64(1), axis=0))
    dead_shape = e.Concat(e.Shape(k, start=0, end=2), e.i64(bs, d + 1), axis=0)
    dead_k = np.zeros((1, 1, 1, d + 1), shape.dtype.numpy())
    dead_k[..., d] = NEG
    k_table = e.Concat(e.Concat(kp, bias, axis=-1), e.Expand(e.const(dead_k), dead_shape),
                       axis=2)                                         # [B,Hkv,L+bs,d+1]
    v_table = e.Concat(vp, e.Expand(e.const(np.zeros((1, 1, 1, d), shape.dtype.numpy())),
                                    e.Concat(e.Shape(k, start=0, end=2), e.i64(bs, d),
                                             axis=0)), axis=2)         # [B,Hkv,L+bs,d]
    dead = nb_t  # the index of the dead block

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
    # picks past the band start (fewer far blocks than the budget, early on) read the dead block
    far_idx = e.Where(e.Less(far_idx, band_start), far_idx, dead)      # [B,Hkv,nq,Kf]
    band_idx = e.Add(band_start, e.const(np.arange(r + 1), np.int64))  # [nq, r+1]
    band_idx = e.Where(e.GreaterOrEqual(band_idx, e.i64(0)), band_idx, dead)
    expand_to = e.Concat(e.Shape(far_idx, start=0, end=3), e.i64(r + 1), axis=0)
    idx = e.Concat(far_idx, e.Expand(band_idx, expand_to), axis=-1)    # [B,Hkv,nq,K]

    # whole blocks out of [B·Hkv·(nb+1), bs, ·], gathered in [B, nq, Hkv] order
    idx = e.tr(idx, [0, 2, 1, 3])                                      # [B,nq,Hkv,K]
    bh = e.Shape(k, start=0, end=2)
    rows = e.Range(_scalar(e, 0), _scalar_of(e, e.ReduceProd(bh, keepdims=1)), _scalar(e, 1))
    offsets = e.Reshape(e.Mul(rows, e.Add(nb_t, e.i64(1))), e.Concat(
        e.Shape(k, start=0, end=1), e.i64(1), e.Shape(k, start=1, end=2), e.i64(1), axis=0))
    flat = e.Add(idx, offsets)
    keys = e.Mul(e.Add(k_far, e.i64(r + 1)), e.i64(bs))
    gk, gv = (e.Reshape(e.Gather(e.Reshape(t, e.i64(-1, bs, w)), flat, axis=0),
                        e.Concat(e.i64(-1, hkv), keys, e.i64(w), axis=0))
              for t, w in ((k_table, d + 1), (v_table, d)))            # [B·nq,Hkv,K·bs,·]
    # a group's query heads are rows of one query block (no grouped-head support needed)
    q4 = e.tr(e.Reshape(q_blocks, e.i64(0, hkv, g, -1, qbs, d + 1)), [0, 3, 1, 2, 4, 5])
    q4 = e.Reshape(q4, e.i64(-1, hkv, g * qbs, d + 1))                 # [B·nq,Hkv,G·qbs,d+1]
    far_cols = e.Concat(e.i64(g * qbs), e.Mul(k_far, e.i64(bs)), axis=0)
    mask = e.Concat(e.Expand(e.const(np.zeros((1, 1), shape.dtype.numpy())), far_cols),
                    e.const(_band_triangle(g, qbs, bs, r, shape.dtype.numpy())), axis=-1)
    out = e.Attention(q4, gk, gv, mask, scale=1.0)                     # [B·nq,Hkv,G·qbs,d]
    out = e.Reshape(out, e.Concat(e.Shape(k, start=0, end=1), e.i64(-1, hkv, g, qbs, d),
                                  axis=0))
    out = e.Reshape(e.tr(out, [0, 2, 3, 1, 4, 5]), e.i64(0, hkv * g, -1, d))  # [B,H,L,d]
    out = e.Slice(out, e.i64(0), s_t, e.i64(2))
    stats = {"mode": "causal", "block": bs, "query_block": qbs, "keep": cfg.keep,
             "forced_blocks": forced_blocks(bs, qbs), "grouped_heads": g}
    return out, e.tape, stats
