"""Emit exact block-sparse attention for a site whose mask is known at compile time.

    q, k, v [B,H,N,d] (q·k scaled), plan ⇒ per group of query blocks: Gather the kept key tokens
    (one static index list) → q_g·k_gᵀ (+ the mask's values on the kept tiles) → Softmax → ·v_g
    → concat groups → unpad

Only tiles holding a visible entry are multiplied; inside them the mask's own values (or −∞ where
it hides a key, pads a tile, or fills a short row) are added, so the output equals the dense
masked attention. Blocks are the leading axis ([blocks, B, H, tokens, d]): with q/k/v merely
reshaped to [B, H, blocks, tokens, d] (or [B, H·blocks, ...]), OpenVINO's conversion-time SDPA
fusion looks through the reshapes and fuses one dense, unmasked attention over all tokens
(0.29 max abs error measured on a block-diagonal mask; openvino 2026.4). The transposes cost
one copy of q, k, v and the output per group.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgec.graph_passes.sparse_attention.builder import NEG, _Emitter
from edgec.graph_passes.sparse_attention.mask import MaskPlan

__all__ = ["build_masked_attention"]


def build_masked_attention(name: str, q: ir.Value, k: ir.Value, v: ir.Value, d: int,
                           plan: MaskPlan, seen: np.ndarray, values: np.ndarray | None,
                           dtype: ir.DataType) -> tuple[ir.Value, ir.tape.Tape, dict]:
    """Return (output [B,H,Nq,d], tape of new nodes/initializers, per-site stats)."""
    e = _Emitter(name, dtype)
    bs, n_q, n_k = plan.block, plan.n_q, plan.n_k
    nbq = -(-n_q // bs)
    if nbq * bs != n_q:  # pad query rows to whole blocks; the padded rows are sliced off
        q = e.Pad(q, e.i64(0, 0, 0, 0, 0, 0, nbq * bs - n_q, 0))
    outs, keys = [], 0
    for group in plan.groups:
        rows, width = group.hi - group.lo, group.table.shape[1] * bs
        tokens = (group.table[..., None] * bs + np.arange(bs)).reshape(rows, width)
        valid = np.repeat(group.valid, bs, axis=1) & (tokens < n_k)
        tokens = np.where(tokens < n_k, tokens, 0)
        bias = _bias(seen, values, group.lo * bs, rows, bs, tokens, valid, dtype)
        flat = tokens.reshape(-1)
        if len(flat) == n_k and np.array_equal(flat, np.arange(n_k)):  # every key, in order
            kg, vg = k, v
        else:
            idx = e.const(flat, np.int64)
            kg, vg = (e.Gather(x, idx, axis=2) for x in (k, v))
        kg, vg = (e.Reshape(x, e.i64(0, 0, rows, width, d)) for x in (kg, vg))
        whole = len(plan.groups) == 1  # one group covers every (padded) query row
        qg = e.Reshape(q if whole else e.slice(q, group.lo * bs, group.hi * bs, 2),
                       e.i64(0, 0, rows, bs, d))
        qg, vg = e.tr(qg, [2, 0, 1, 3, 4]), e.tr(vg, [2, 0, 1, 3, 4])  # blocks first
        scores = e.MatMul(qg, e.tr(kg, [2, 0, 1, 4, 3]))       # [rows, B, H, bs, width]
        if bias is not None:
            scores = e.Add(scores, e.const(bias[:, None, None]))
        out = e.MatMul(e.Softmax(scores, axis=-1), vg)          # [rows, B, H, bs, d]
        outs.append(e.Reshape(e.tr(out, [1, 2, 0, 3, 4]), e.i64(0, 0, rows * bs, d)))
        keys += rows * width
    out = outs[0] if len(outs) == 1 else e.Concat(*outs, axis=2)   # [B, H, Nq_pad, d]
    if nbq * bs != n_q:
        out = e.slice(out, 0, n_q, 2)
    stats = {"mode": "mask", "exact": True, **plan.to_json(), "queries": n_q, "keys": n_k,
             "keys_per_query": round(keys / (nbq * bs), 1)}
    return out, e.tape, stats


def _bias(seen, values, start, rows, bs, tokens, valid, dtype) -> np.ndarray | None:
    """[rows, bs, width] additive bias over the gathered keys, None if it would be all zeros."""
    width = tokens.shape[1]
    n_q = seen.shape[0]
    bias = np.zeros((rows, bs, width), dtype=dtype.numpy())
    for r in range(rows):
        q_lo = start + r * bs
        q_hi = min(q_lo + bs, n_q)
        if q_hi <= q_lo:
            bias[r] = NEG
            continue
        cols = tokens[r]
        vis = seen[q_lo:q_hi][:, cols] & valid[r][None, :]
        vals = np.zeros_like(vis, dtype=np.float32) if values is None else values[q_lo:q_hi][
            :, cols]
        bias[r, :q_hi - q_lo] = np.where(vis, vals, NEG)
        bias[r, q_hi - q_lo:] = NEG  # padded query rows: uniform, sliced off afterwards
    return None if not bias.any() else bias
