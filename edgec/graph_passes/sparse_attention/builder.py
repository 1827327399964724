"""Emit block-sparse attention for one site in standard ONNX ops (opset ≥ 13).

    q, k, v [B,H,N,d] (q·k already scaled) ⇒ [dense prefix rows] ⊕ permute → pad → block means
    → q̂k̂ᵀ (+sinks) → TopK | per-head pattern choice → Gather K/V blocks → per query block
    softmax([q·k_prefixᵀ | q·k_selᵀ]) → ·[v_prefix | v_sel] → unpad → unpermute

The FLOPs really drop: only the selected key/value blocks are gathered and multiplied. Query
blocks are processed in static chunks when the gathered tensors would exceed the memory budget.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from edgec.graph_passes.sparse_attention.layout import kept_blocks, query_block_pattern

__all__ = ["SiteShape", "build_sparse_attention"]

I64 = ir.DataType.INT64
MAX = np.iinfo(np.int64).max
NEG = -1e30  # masks padded keys; finite so an all-masked row can never make NaN


@dataclasses.dataclass(frozen=True)
class SiteShape:
    d: int                # head dim (static)
    n: int | None         # total sequence length when static
    batch_heads: int | None  # B·H when static (for the chunk memory budget)
    dtype: ir.DataType


class _Emitter:
    def __init__(self, prefix: str, dtype: ir.DataType):
        self.tape = ir.tape.Tape()
        self.prefix = prefix
        self.dtype = dtype
        self._n = 0

    def const(self, value, dtype=None) -> ir.Value:
        arr = np.asarray(value, dtype=(dtype or self.dtype.numpy()))
        self._n += 1
        return self.tape.initializer(ir.tensor(arr), name=f"{self.prefix}_c{self._n}")

    def i64(self, *values) -> ir.Value:
        return self.const(np.array(values, dtype=np.int64), np.int64)

    def __getattr__(self, op_type: str):
        def make(*inputs, _outputs: int = 1, **attrs):
            if _outputs == 1:
                return self.tape.op(op_type, list(inputs), attrs or None)
            return self.tape.op_multi_out(op_type, list(inputs), attrs or None,
                                          num_outputs=_outputs)
        return make

    def tr(self, x, perm):
        return self.Transpose(x, perm=perm)

    def slice(self, x, start, end, axis: int):
        start = start if isinstance(start, ir.Value) else self.i64(start)
        end = end if isinstance(end, ir.Value) else self.i64(end)
        return self.Slice(x, start, end, self.i64(axis))


def build_sparse_attention(name: str, q: ir.Value, k: ir.Value, v: ir.Value, shape: SiteShape,
                           cfg, layout, regroup_by_transpose: bool = False
                           ) -> tuple[ir.Value, ir.tape.Tape, dict]:
    """Return (output value, tape of new nodes/initializers, per-site stats).

    ``regroup_by_transpose``: join each chunk's [B, H·nbq, qbs, d] output into [B, H, N, d]
    as [B,H,nbq,qbs,d] → [B,nbq,qbs,H,d] → [B,N,H,d] → [B,H,N,d] (two Transposes) instead of one
    Reshape. The QNN HTP computes a Reshape that regroups the batch axes of a 16-bit MatMul's
    output wrong (the softmax·V MatMul: device vs ORT cosine 0.25–0.30, also through an
    elementwise op or a second Reshape; this sequence 0.99999), so fully quantized targets
    take it; the others keep the one Reshape."""
    e = _Emitter(name, shape.dtype)
    d, bs, p = shape.d, cfg.block, cfg.prefix
    n_video = layout.n_video if layout.n_video is not None else (
        shape.n - p if shape.n is not None else None)

    # Query blocks of ``qb`` tokens share one selection of key blocks of ``bs`` tokens.
    qbs = cfg.query_block
    table = _whole_block_table(e, q, k, v, p, bs, n_video, layout)
    if table is not None:  # prefix and video rows already whole blocks: no Slice/Concat copies
        qv, k_all, v_all = table
    else:
        qv, kv, vv = q, k, v
        if p:
            qv, kv, vv = (e.slice(x, p, MAX, 2) for x in (q, k, v))
        if layout.perm is not None:
            perm = e.const(layout.perm, np.int64)
            qv, kv, vv = (e.Gather(x, perm, axis=2) for x in (qv, kv, vv))
    if n_video is not None:
        nbq, nb = -(-n_video // qbs), -(-n_video // bs)
        padq, pad = nbq * qbs - n_video, nb * bs - n_video
        k_sel = kept_blocks(nb, cfg.keep, len(layout.sink))
        nv_t, nb_t, k_t = e.i64(n_video), e.i64(nb), e.i64(k_sel)
    else:  # dynamic length: computed in the graph
        nbq = nb = padq = pad = k_sel = None
        nv_t = e.Shape(qv, start=2, end=3)
        nb_t = e.Div(e.Add(nv_t, e.i64(bs - 1)), e.i64(bs))
        budget = e.Cast(e.Ceil(e.Mul(e.Cast(nb_t, to=ir.DataType.FLOAT),
                                     e.const([cfg.keep], np.float32))), to=I64)
        k_t = e.Min(e.Add(budget, e.i64(len(layout.sink))), nb_t)
    qb = _blocks(e, qv, qbs, d, padq, nv_t)
    q_hat = _block_means(e, qb, qbs, padq, nv_t, shape.dtype)
    npb = -(-p // bs)
    if table is None:
        kb, vb = (_blocks(e, x, bs, d, pad, nv_t) for x in (kv, vv))
        k_hat = _block_means(e, kb, bs, pad, nv_t, shape.dtype)
    else:  # [prefix blocks | video blocks] tables; the selection scores the video blocks
        kb, vb = (_blocks(e, x, bs, d, 0, None) for x in (k_all, v_all))
        k_hat = e.slice(e.ReduceMean(kb, e.i64(3), keepdims=0), npb, MAX, 2)
    if cfg.share == "batch":  # one selection from batch element 0 (RainFusion2.0): the CFG
        q_hat, k_hat = (e.slice(x, 0, 1, 0) for x in (q_hat, k_hat))  # pair shares its mask
    block_scores = e.MatMul(q_hat, e.tr(k_hat, [0, 1, 3, 2]))  # [B,H,nbq,nb]
    # Key table = [prefix blocks | video blocks]. Forced blocks (the prefix, the sinks) join the
    # selection as indices, never as scores: a score forced by +1e9 left a quantized target
    # (the HTP rounds every tensor, TopK's input too) one step of 3e4 over all real scores, so
    # every block tied and the device kept others than ONNX Runtime.
    idx = _top_blocks(e, block_scores, k_t, k_sel, nb, npb, layout.sink)
    if npb:
        if table is None:
            kp, vp = (_blocks(e, e.slice(x, 0, p, 2), bs, d, npb * bs - p, None)
                      for x in (k, v))
            kb, vb = e.Concat(kp, kb, axis=2), e.Concat(vp, vb, axis=2)
        nb_t, k_t = e.Add(nb_t, e.i64(npb)), e.Add(k_t, e.i64(npb))
    k_total = None if k_sel is None else k_sel + npb
    stats = {"mode": cfg.mode}
    if cfg.mode == "rainfusion":
        if table is not None:
            kv = e.slice(k_all, p, MAX, 2) if p else k_all
        if cfg.share == "batch":  # element 0 chooses each head's pattern too (from every
            qv, kv = (e.slice(x, 0, 1, 0) for x in (qv, kv))  # row: [B,H] vs top-k's [1,H])
        idx = _choose_pattern_per_head(e, qv, kv, idx, nb, k_sel, npb, n_video, cfg, layout)

    # Flat indices into [B·H·blocks, bs·d] so a plain Gather fetches whole blocks.
    bh = e.Shape(q, start=0, end=2)
    offsets = e.Mul(e.Range(_scalar(e, 0), _scalar_of(e, e.ReduceProd(bh, keepdims=1)),
                            _scalar(e, 1)), nb_t)
    flat = e.Add(idx, e.Reshape(offsets, e.Concat(bh, e.i64(1, 1), axis=0)))
    kflat, vflat = (e.Reshape(x, e.i64(-1, bs * d)) for x in (kb, vb))
    key_bias = _key_bias(e, p, npb, bs, pad, nv_t, nb_t)
    keys = e.i64(k_total * bs) if k_total is not None else e.Mul(k_t, e.i64(bs))
    kv_shape = e.Concat(e.Shape(q, start=0, end=1), e.i64(-1), keys, e.i64(d), axis=0)
    out_shape = e.Concat(bh, e.i64(-1, d), axis=0)

    chunks = _chunks(nbq, k_total, bs, d, shape, cfg)
    outs = []
    for lo, hi in chunks:
        q_c, flat_c, idx_c = qb, flat, idx
        if len(chunks) > 1:
            q_c, flat_c, idx_c = (e.slice(x, lo, hi, 2) for x in (qb, flat, idx))
        q4 = e.Reshape(q_c, e.i64(0, -1, qbs, d))            # [B, H·nbq_c, qbs, d]
        gk, gv = (e.Reshape(_gather_rows(e, x, flat_c), kv_shape) for x in (kflat, vflat))
        scores = e.MatMul(q4, e.tr(gk, [0, 1, 3, 2]))         # [B, H·nbq_c, qbs, k·bs]
        if key_bias is not None:
            bias = e.Reshape(_gather_rows(e, key_bias, idx_c), e.Concat(
                e.Shape(idx_c, start=0, end=1), e.i64(-1, 1), keys, axis=0))
            scores = e.Add(scores, bias)
        out = e.MatMul(e.Softmax(scores, axis=-1), gv)
        if regroup_by_transpose:
            out = e.tr(e.Reshape(out, e.Concat(bh, e.i64(-1, qbs, d), axis=0)), [0, 2, 3, 1, 4])
            out = e.tr(e.Reshape(out, e.Concat(e.Shape(q, start=0, end=1), e.i64(-1),
                                               e.Shape(q, start=1, end=2), e.i64(d), axis=0)),
                       [0, 2, 1, 3])
        else:
            out = e.Reshape(out, out_shape)
        outs.append(out)
    out = outs[0] if len(outs) == 1 else e.Concat(*outs, axis=2)
    if padq != 0:
        out = e.Slice(out, e.i64(0), nv_t, e.i64(2))
    if layout.inverse is not None:
        out = e.Gather(out, e.const(layout.inverse, np.int64), axis=2)
    if p:  # text rows stay dense: they attend to every key
        q_p = e.slice(q, 0, p, 2)
        dense = e.MatMul(e.Softmax(e.MatMul(q_p, e.tr(k, [0, 1, 3, 2])), axis=-1), v)
        out = e.Concat(dense, out, axis=2)
    stats.update({"blocks": nb, "query_blocks": nbq, "kept_blocks": k_sel,
                  "prefix_blocks": npb, "chunks": len(chunks)})
    return out, e.tape, stats


def _gather_rows(e: _Emitter, table, idx) -> ir.Value:
    """Rows of a 2-D ``table`` at ``idx`` (any shape), as [idx.size, row]: one Gather of 1-D
    indices. The QNN HTP refuses a Gather whose output is rank 6 ([B,H,nbq,k,bs,d]) and
    computes a rank-5 one wrong once the batch is 2 (device vs ORT, indices [2,4,2,3] into a
    [40,128] table: wrong rows; [1,4,2,3] and 1-D indices right)."""
    return e.Gather(table, e.Reshape(idx, e.i64(-1)), axis=0)


def _top_blocks(e: _Emitter, scores, k_t, k_sel: int | None, nb: int | None, npb: int,
                sink: np.ndarray) -> ir.Value:
    """Indices into the key table [prefix | video blocks] of each query block's selection
    [B,H,nbq,npb+k]: the prefix blocks, the sink blocks, then the top-scoring other blocks."""
    sink = np.asarray(sink, np.int64)
    forced = np.concatenate([np.arange(npb), npb + sink]).astype(np.int64)
    cand, picks = scores, k_t
    if len(sink):  # sinks need the grid: nb and k_sel are static
        free = np.setdiff1d(np.arange(nb), sink)
        contiguous = np.array_equal(free, np.arange(len(sink), nb))
        cand = e.slice(scores, len(sink), nb, 3) if contiguous else \
            e.Gather(scores, e.const(free, np.int64), axis=3)
        picks = e.i64(k_sel - len(sink))
    parts = []
    if len(forced):
        shape = e.Concat(e.Shape(scores, start=0, end=3), e.i64(len(forced)), axis=0)
        parts.append(e.Expand(e.const(forced, np.int64), shape))
    if not len(sink) or k_sel > len(sink):
        _, top = e.TopK(cand, picks, axis=-1, largest=1, sorted=1, _outputs=2)
        if len(sink):
            top = e.Add(top, e.i64(len(sink))) if contiguous else \
                e.Gather(e.const(free, np.int64), top, axis=0)
        parts.append(e.Add(top, e.i64(npb)) if npb else top)
    return parts[0] if len(parts) == 1 else e.Concat(*parts, axis=-1)


def _whole_block_table(e: _Emitter, q, k, v, p: int, bs: int, n_video: int | None, layout):
    """(q video rows, k table, v table) when the prefix and the video are whole blocks: the
    key/value table [prefix | permuted video] is then one Gather of K (or K itself without a
    permutation) instead of Slice → Gather → Slice → Concat, four full copies of K and V per site
    that OpenVINO runs with reference kernels. None otherwise."""
    if n_video is None or p % bs or n_video % bs or (not p and layout.perm is None):
        return None
    if layout.perm is None:
        return e.slice(q, p, MAX, 2), k, v
    rows = e.const(np.concatenate([np.arange(p), p + layout.perm]).astype(np.int64), np.int64)
    k_all, v_all = (e.Gather(x, rows, axis=2) for x in (k, v))
    return e.Gather(q, e.const(p + layout.perm, np.int64), axis=2), k_all, v_all


def _key_bias(e: _Emitter, p: int, npb: int, bs: int, pad: int | None, nv_t, nb_t):
    """[blocks, bs] additive bias masking padded tokens of the key table (None if no padding)."""
    prefix_pad = npb * bs - p
    if prefix_pad == 0 and pad == 0:
        return None
    prefix = np.zeros(npb * bs, dtype=np.float32)
    prefix[p:] = NEG
    video_len = e.Mul(e.Sub(nb_t, e.i64(npb)), e.i64(bs))
    positions = e.Range(_scalar(e, 0), _scalar_of(e, video_len), _scalar(e, 1))
    video = e.Where(e.Less(positions, nv_t), e.const(0.0), e.const(NEG))
    parts = [e.const(prefix), video] if npb else [video]
    table = e.Concat(*parts, axis=0) if npb else video
    return e.Reshape(table, e.i64(-1, bs))


def _blocks(e: _Emitter, x, size: int, d: int, pad: int | None, nv_t) -> ir.Value:
    """[B,H,N,d] → zero-pad to whole blocks → [B,H,n_blocks,size,d]."""
    if pad != 0:
        amount = e.i64(pad) if pad is not None else e.Sub(
            e.Mul(e.Div(e.Add(nv_t, e.i64(size - 1)), e.i64(size)), e.i64(size)), nv_t)
        x = e.Pad(x, e.Concat(e.i64(0, 0, 0, 0, 0, 0), amount, e.i64(0), axis=0))
    return e.Reshape(x, e.i64(0, 0, -1, size, d))


def _block_means(e: _Emitter, blocks, size: int, pad: int | None, nv_t, dtype) -> ir.Value:
    """Mean of each block over its real (unpadded) tokens: [B,H,n_blocks,d]."""
    if pad == 0:
        return e.ReduceMean(blocks, e.i64(3), keepdims=0)
    n_blocks = e.Div(e.Add(nv_t, e.i64(size - 1)), e.i64(size))
    starts = e.Mul(e.Range(_scalar(e, 0), _scalar_of(e, n_blocks), _scalar(e, 1)), e.i64(size))
    count = e.Cast(e.Min(e.Sub(nv_t, starts), e.i64(size)), to=dtype)
    return e.Div(e.ReduceSum(blocks, e.i64(3), keepdims=0), e.Unsqueeze(count, e.i64(1)))


def _scalar(e: _Emitter, value: int) -> ir.Value:
    return e.const(np.array(value, dtype=np.int64), np.int64)


def _scalar_of(e: _Emitter, one_element: ir.Value) -> ir.Value:
    return e.Squeeze(one_element, e.i64(0))


def _chunks(nbq, k_sel, bs, d, shape: SiteShape, cfg) -> list[tuple[int, int]]:
    """Static query-block chunks keeping gathered K, V and scores under ``cfg.chunk_mb``."""
    if nbq is None or shape.batch_heads is None:
        return [(0, 0)]
    keys = k_sel * bs + cfg.prefix
    per_qblock = keys * (2 * d + cfg.query_block) * shape.dtype.itemsize * shape.batch_heads
    per_chunk = max(1, int(cfg.chunk_mb * 2**20 // max(per_qblock, 1)))
    if per_chunk >= nbq:
        return [(0, nbq)]
    return [(lo, min(nbq, lo + per_chunk)) for lo in range(0, nbq, per_chunk)]


def _choose_pattern_per_head(e, qv, kv, topk_idx, nb, k_sel, npb, n_video, cfg, layout):
    # q_blocks index query blocks; tables map each query block to k_sel key blocks.
    """RainFusion: per head, keep whichever of spatial / temporal / textural captures the most
    exact attention mass on a few sampled query rows (an ARM-style online test)."""
    rows = np.unique(np.linspace(0, n_video - 1, cfg.samples).round().astype(np.int64))
    q_blocks = rows // cfg.query_block
    qs = e.Gather(qv, e.const(rows, np.int64), axis=2)  # [B,H,r,d] (unpadded, permuted)
    kv_real = e.slice(kv, 0, n_video, 2)
    probs = e.Softmax(e.MatMul(qs, e.tr(kv_real, [0, 1, 3, 2])), axis=-1)  # [B,H,r,Nv]
    pad = nb * cfg.block - n_video
    if pad:
        probs = e.Pad(probs, e.i64(0, 0, 0, 0, 0, 0, 0, pad))
    mass = e.ReduceSum(e.Reshape(probs, e.i64(0, 0, 0, nb, cfg.block)), e.i64(4), keepdims=0)
    tables, captured = [], []
    for kind in ("spatial", "temporal"):
        table = query_block_pattern(layout.grid, layout.tile, k_sel, kind,
                                    cfg.query_block // cfg.block, forced=layout.sink)
        onehot = np.zeros((len(rows), nb), dtype=np.float32)
        np.put_along_axis(onehot, table[q_blocks], 1.0, axis=1)
        prefix_cols = np.broadcast_to(np.arange(npb), (len(table), npb))
        tables.append(e.const(np.concatenate([prefix_cols, table + npb], axis=1), np.int64))
        captured.append(e.ReduceSum(e.Mul(mass, e.const(onehot)), e.i64(2, 3), keepdims=1))
    if npb:  # prefix blocks carry no video mass
        cols = e.Concat(e.Shape(mass, start=0, end=3), e.i64(npb), axis=0)
        mass = e.Concat(e.Expand(e.const(np.array(0.0, np.float32)), cols), mass, axis=-1)
    sampled_idx = e.Gather(topk_idx, e.const(q_blocks, np.int64), axis=2)
    captured.append(e.ReduceSum(e.GatherElements(mass, sampled_idx, axis=3), e.i64(2, 3),
                                keepdims=1))
    choice = e.ArgMax(e.Concat(*captured, axis=-1), axis=-1, keepdims=1)  # [B,H,1,1]
    return e.Where(e.Equal(choice, e.i64(0)), tables[0],
                   e.Where(e.Equal(choice, e.i64(1)), tables[1], topk_idx))
