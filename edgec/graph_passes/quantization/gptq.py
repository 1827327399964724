"""GPTQ weight rounding (``--quantize w4a8:gptq=true``): the quantized graph's weight integers
chosen with error feedback instead of rounded to nearest.

For a weight W [K, N] read as ``x·W`` and the calibration activations X [n, K] of its input,
GPTQ (Frantar et al. 2023) rounds W one input row at a time and spreads each row's rounding
error over the rows not yet rounded, weighted by the inverse Hessian H⁻¹ (H = XᵀX), so that
‖X·W − X·Ŵ‖ is what it minimizes rather than ‖W − Ŵ‖. Rows are rounded in order in blocks of
128 with lazy updates, as in the paper. The damping added to H's diagonal is 0.1% of its mean,
not the paper's 1%: when a rotated massive channel dominates H, 1% of its mean diagonal swamps
the ordinary channels' structure (llama tiny+outliers, hadamard, w4a8 on qnn-htp: logits cosine
0.773 with 1%, 0.844 with 0.1%; small+outliers 0.966 either way).

It acts on the QDQ graph the quantizer wrote: every ``DequantizeLinear`` of a constant integer
weight feeding a MatMul (or a Gemm, either layout) keeps its zero points and block size, and
its scales (constant, or dequantized from integer block scales: ``lpbq``) except that a
symmetric per-output-channel scale may shrink (``clipped_scale``), so the graph is unchanged
but for those numbers, and the grid is the one the runtime dequantizes with. X comes from
the fp32 model the quantizer started from (one run per calibration sample with every such
MatMul's input exposed; one H per distinct input, shared by the q/k/v or gate/up projections
that read it).

Cost: one fp32 run per calibration sample, and every distinct input's H held at once in
float64 (K² × 8 bytes each: `llama small`, 17 of them, ≤ 15 MB each). That suits edge-size
models; a 7B-class model would need the Hessians collected layer by layer (not done here).

Why it is needed: after a rotation (QuaRot/DartQuant) a residual stream with massive,
nearly constant channels becomes a large component of *every* rotated channel, so each
weight's rounding error is multiplied by that component. Round-to-nearest int4 on the rotated
`llama small+outliers` gives a logits cosine of 0.42 (weight-only, fp32 activations); GPTQ,
which sees that component in H, gives 0.976 (the unrotated model: 0.979).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

__all__ = ["gptq_round", "gptq_weights"]

_RANGE = {ir.DataType.INT4: (-8, 7), ir.DataType.UINT4: (0, 15), ir.DataType.INT8: (-128, 127),
          ir.DataType.UINT8: (0, 255), ir.DataType.INT16: (-32768, 32767),
          ir.DataType.UINT16: (0, 65535)}
# ONNX Runtime's reduce_range grid for int8 weights (its get_qmin_qmax_for_qType)
_RANGE_7BIT = (-64, 64)
DAMP = 0.001
BLOCK = 128
CLIP = np.linspace(1.0, 0.55, 10)  # shrink factors tried for a symmetric per-channel scale


def clipped_scale(w: np.ndarray, h: np.ndarray, scale: np.ndarray, qmin: int, qmax: int
                  ) -> np.ndarray:
    """Per output channel, the absmax scale shrunk by the factor in ``CLIP`` whose nearest
    rounding has the least output error (e_nᵀ·H·e_n for column n's error e_n): clipping the
    few largest weights buys a finer grid for the rest. ``scale`` is [N] (symmetric grid)."""
    w = w.astype(np.float64)
    best, best_err = scale.astype(np.float64), None
    for factor in CLIP:
        s = scale * factor
        e = w - np.clip(np.rint(w / s), qmin, qmax) * s
        err = np.einsum("kn,kn->n", e, h @ e)
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best, best_err = np.where(better, s, best), np.where(better, err, best_err)
    return best


def gptq_round(w: np.ndarray, h: np.ndarray, scale: np.ndarray, zero: np.ndarray,
               qmin: int, qmax: int, act_order: bool = True,
               pruned: np.ndarray | None = None) -> np.ndarray:
    """Integers q [K, N] with W ≈ (q − zero)·scale that minimize ‖X(W − Ŵ)‖ given H = XᵀX.
    ``scale``/``zero`` broadcast to [K, N] (per tensor, per output channel or per block).
    ``act_order``: rows rounded in order of decreasing H diagonal (the inputs with the most
    energy first, while the most rows are left to absorb their error), as GPTQ's ``desc_act``.
    ``pruned`` [K, N] (bool): entries that stay exactly zero (q = zero), as SparseGPT's mask:
    the error feedback may reach them, and what it left there is fed on like a rounding error
    (so the rows after them absorb it) instead of being written into a pruned weight."""
    if act_order:
        perm = np.argsort(-np.diag(h), kind="stable")
        q = np.empty(w.shape, np.int64)
        q[perm] = gptq_round(w[perm], h[np.ix_(perm, perm)],
                             np.broadcast_to(scale, w.shape)[perm],
                             np.broadcast_to(zero, w.shape)[perm], qmin, qmax, False,
                             None if pruned is None else pruned[perm])
        return q
    k = w.shape[0]
    w = w.astype(np.float64, copy=True)
    scale = np.broadcast_to(scale, w.shape).astype(np.float64)
    zero = np.broadcast_to(zero, w.shape).astype(np.float64)
    h = h.astype(np.float64, copy=True)
    dead = np.diag(h) == 0  # an input channel that is always zero: its row does not matter
    h[dead, dead] = 1.0
    w[dead] = 0.0
    h[np.diag_indices(k)] += DAMP * np.mean(np.diag(h))
    # the upper Cholesky factor of H⁻¹: row i's error feedback onto rows i+1..
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    q = np.empty(w.shape, np.int64)
    for a in range(0, k, BLOCK):
        b = min(a + BLOCK, k)
        wb, ub = w[a:b].copy(), u[a:b, a:b]
        err = np.empty_like(wb)
        for i in range(b - a):
            row = a + i
            qi = np.clip(np.rint(wb[i] / scale[row]) + zero[row], qmin, qmax)
            if pruned is not None:  # the zero point: dequantizes to exactly 0
                qi = np.where(pruned[row], zero[row], qi)
            q[row] = qi
            err[i] = (wb[i] - (qi - zero[row]) * scale[row]) / ub[i, i]
            wb[i + 1:] -= np.outer(ub[i, i + 1:], err[i])
        w[b:] -= u[a:b, b:].T @ err
    return q


def _weight_dq(quantized: ir.Model) -> list[tuple[ir.Node, ir.Node, bool]]:
    """(MatMul/Gemm, its weight's DequantizeLinear, weight stored [N, K]) pairs."""
    found = []
    for node in quantized.graph:
        if node.op_type not in ("MatMul", "Gemm") or len(node.inputs) < 2:
            continue
        dq = node.inputs[1].producer() if node.inputs[1] is not None else None
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        data = dq.inputs[0]
        if data.const_value is None or data.const_value.dtype not in _RANGE:
            continue
        attrs = {k: a.value for k, a in node.attributes.items()}
        if attrs.get("transA", 0) or len(data.const_value.shape) != 2:
            continue
        found.append((node, dq, bool(node.op_type == "Gemm" and attrs.get("transB", 0))))
    return found


def _dequantized_scale(value: ir.Value) -> np.ndarray:
    """A DequantizeLinear's scale: a constant, or itself dequantized from constants (the
    LPBQ form: integer block scales × a float scale per channel, ``lpbq``)."""
    if value.const_value is not None:
        return value.const_value.numpy().astype(np.float64)
    dq = value.producer()
    x, s = (v.const_value.numpy().astype(np.float64) for v in dq.inputs[:2])
    zp = (dq.inputs[2].const_value.numpy().astype(np.float64)
          if len(dq.inputs) > 2 and dq.inputs[2] is not None else np.zeros_like(s))
    axis = {k: a.value for k, a in dq.attributes.items()}.get("axis", 1) % x.ndim
    shape = [1] * x.ndim
    shape[axis] = -1
    return (x - zp.reshape(shape)) * s.reshape(shape)


def _grid(dq: ir.Node, shape: tuple[int, int], trans: bool) -> tuple[np.ndarray, np.ndarray]:
    """The DequantizeLinear's scale and zero point, broadcast to the [K, N] weight."""
    scale = _dequantized_scale(dq.inputs[1])
    zp = (dq.inputs[2].const_value.numpy().astype(np.float64)
          if len(dq.inputs) > 2 and dq.inputs[2] is not None else np.zeros_like(scale))
    stored = shape[::-1] if trans else shape  # the DQ's own layout
    attrs = {k: a.value for k, a in dq.attributes.items()}
    axis, block = attrs.get("axis", 1) % 2, attrs.get("block_size", 0)
    if scale.ndim == 0 or scale.size == 1:
        full_s, full_z = np.full(stored, scale.item()), np.full(stored, zp.item())
    elif block:
        full_s = np.repeat(scale, block, axis=axis)[:stored[0], :stored[1]]
        full_z = np.repeat(zp, block, axis=axis)[:stored[0], :stored[1]]
    else:
        shape_b = (-1, 1) if axis == 0 else (1, -1)
        full_s = np.broadcast_to(scale.reshape(shape_b), stored)
        full_z = np.broadcast_to(zp.reshape(shape_b), stored)
    if trans:
        full_s, full_z = full_s.T, full_z.T
    return full_s, full_z


def _per_output_channel(dq: ir.Node, shape: tuple[int, int], zero: np.ndarray) -> bool:
    """A symmetric grid with one scale per output channel, owned by this DequantizeLinear:
    its scales may be chosen again (``clipped_scale``)."""
    scale = dq.inputs[1]
    attrs = {k: a.value for k, a in dq.attributes.items()}
    return (scale.const_value is not None and scale.const_value.size == shape[1] > 1
            and not attrs.get("block_size", 0) and not np.any(zero)
            and len(scale.uses()) == 1 and not scale.is_graph_output())


def _hessians(model: ir.Model, names: Sequence[str], samples: Sequence[dict[str, np.ndarray]]
              ) -> tuple[dict[str, np.ndarray], int]:
    """H = XᵀX (float64) of each named activation over the samples, and the row count."""
    from edgec.runtimes.ort import model_feeds, open_model

    probe = model.clone()
    values = {v.name: v for n in probe.graph for v in n.outputs}
    values.update({v.name: v for v in probe.graph.inputs})
    have = {v.name for v in probe.graph.outputs}
    probe.graph.outputs.extend(values[n] for n in names if n not in have)
    hs: dict[str, np.ndarray] = {}
    rows = 0
    with open_model(probe) as session:  # serialized once, not per sample
        for feeds in samples:
            out = session.run(model_feeds(probe, feeds))
            for name in names:
                x = out[name].astype(np.float64).reshape(-1, out[name].shape[-1])
                hs[name] = hs.get(name, 0) + x.T @ x
            rows += x.shape[0]
    return hs, rows


def gptq_weights(fp32: ir.Model, quantized: ir.Model,
                 samples: Sequence[dict[str, np.ndarray]],
                 memo: dict[str, Any] | None = None, keep_zeros: bool = False,
                 reduce_range: bool = False) -> dict[str, Any]:
    """Replace, in ``quantized`` (in place), the integers of every MatMul/Gemm weight that a
    ``DequantizeLinear`` reads with GPTQ's, using activations of ``fp32`` (the same graph before
    quantization: node names match). ``memo`` keeps the Hessians for the next call on another
    quantization of the same graph (mixed precision's probes). ``keep_zeros`` (a pruned or
    sparse-merged compile): a weight's exact zeros are its pruning mask and stay exactly zero
    (the error feedback refilled them: 2:4 broken in 20% of o_proj's groups). ``reduce_range``:
    int8 weights stay on their 7-bit grid, [−64, 64] (``QuantScheme.reduce_range``; the error
    feedback would carry them past it, into the host's saturating kernels). Returns stats."""
    by_name = {n.name: n for n in fp32.graph}
    todo, skipped = [], {}
    for node, dq, trans in _weight_dq(quantized):
        source = by_name.get(node.name)
        x = source.inputs[0] if source is not None else None
        if x is None or x.const_value is not None:
            skipped["no fp32 activation"] = skipped.get("no fp32 activation", 0) + 1
            continue
        why = ("shared weight" if len(dq.outputs[0].uses()) != 1 else
               "fp32 weight not a constant" if source.inputs[1].const_value is None else None)
        if why:
            skipped[why] = skipped.get(why, 0) + 1
            continue
        todo.append((node, dq, trans, x.name))
    if not todo:
        return {"gptq": {"weights": 0, **({"skipped": skipped} if skipped else {})}}
    memo = {} if memo is None else memo
    names = sorted({t[3] for t in todo})
    if not set(names) <= set(memo.get("h", {})):
        memo["h"], memo["rows"] = _hessians(fp32, names, samples)
    hs, rows = memo["h"], memo["rows"]
    error_rtn = error_gptq = 0.0
    clipped = kept = 0
    for node, dq, trans, x_name in todo:
        data = dq.inputs[0].const_value
        stored = data.numpy()
        w = by_name[node.name].inputs[1].const_value.numpy()
        w = w.T if trans else w
        scale, zero = _grid(dq, w.shape, trans)
        seven = reduce_range and data.dtype == ir.DataType.INT8
        qmin, qmax = _RANGE_7BIT if seven else _RANGE[data.dtype]
        h = hs[x_name]
        rtn = (np.clip(np.rint(w / scale) + zero, qmin, qmax) - zero) * scale
        if _per_output_channel(dq, w.shape, zero):
            channel = clipped_scale(w, h, scale[0], qmin, qmax)
            clipped += int(np.count_nonzero(channel < scale[0]))
            old = dq.inputs[1].const_value
            dq.inputs[1].const_value = ir.tensor(channel.astype(old.numpy().dtype),
                                                 dtype=old.dtype, name=old.name)
            scale = np.broadcast_to(channel, w.shape)
        pruned = (w == 0) if keep_zeros else None
        kept += 0 if pruned is None else int(np.count_nonzero(pruned))
        q = gptq_round(w, h, scale, zero, qmin, qmax, pruned=pruned)
        new = (q - zero) * scale
        error_rtn += float(np.einsum("ij,ik,kj->", w - rtn, h, w - rtn))
        error_gptq += float(np.einsum("ij,ik,kj->", w - new, h, w - new))
        q = q.T if trans else q
        if q.shape != stored.shape:  # zero-padded to whole blocks (blockwise): padding kept
            q = np.concatenate([q, stored[q.shape[0]:]] if not trans else
                               [q, stored[:, q.shape[1]:]], axis=int(trans))
        dq.inputs[0].const_value = ir.tensor(np.ascontiguousarray(q).astype(stored.dtype),
                                             dtype=data.dtype, name=data.name)
    return {"gptq": {"weights": len(todo), "activations": len(hs), "rows": rows,
                     "output_error_vs_nearest": round((error_gptq / error_rtn) ** 0.5, 4)
                     if error_rtn else None, "clipped_channels": clipped,
                     **({"zeros_kept": kept} if keep_zeros else {}),
                     **({"skipped": skipped} if skipped else {})}}
