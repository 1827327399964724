"""Block-wise symmetric weight-only quantization of constant MatMul weights (w4a16).

    MatMul(x, W[K, N])  ⇒  MatMul(x, DequantizeLinear(W_q[K, N]; s[K/b, N], axis=0, block_size=b))
    Gemm(x, W[N, K], transB=1)  ⇒  the same with blocks along axis 1 (K)

Symmetric (``QuantScheme.weight_symmetric``, TensorRT): scales absmax/qmax per block of ``b``
input channels, always positive (TensorRT's rule), no zero point. Asymmetric (the CPU targets):
unsigned integers and a zero point per block over [min(w, 0), max(w, 0)], so all 16 levels
cover the block's own range (all-MiniLM-L6-v2 w4a16 min embedding cosine 0.953 → 0.970, where
NNCF's INT4_SYM / INT4_ASYM give 0.964 / 0.970). A weight read by several nodes (one Linear
called twice) is quantized once and its DequantizeLinear shared.

With ``QuantScheme.weight_backup_int8`` (the CPU targets), the layers NNCF's 4-bit weight
compression keeps at 8 bits get 8 bits here too: the last weighted MatMul on each path to an
output (an LM head; a BERT's last FFN projection) in int8 blocks, and the embedding tables
(``Gather`` from a constant [rows, width] table) as int8 rows with one scale per row:

    Gather(E, ids)  ⇒  Mul(Cast(Gather(E_q, ids)), Gather(s, ids))

so only the gathered rows are dequantized (a float table was most of a small model's bytes:
all-MiniLM-L6-v2's word embeddings are 45 of its 87 MB).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.convenience import replace_all_uses_with

__all__ = ["blockwise_weights"]

_TYPES = {"int4": (ir.DataType.INT4, 7), "int8": (ir.DataType.INT8, 127)}
_UNSIGNED = {"int4": (ir.DataType.UINT4, 15), "int8": (ir.DataType.UINT8, 255)}


def _grid(blocks: np.ndarray, bits: str, symmetric: bool
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, ir.DataType]:
    """Integers, scales and zero points (None: symmetric) of ``blocks`` [K/b, b, N] per block:
    symmetric absmax / qmax (signed), or asymmetric over [min(w, 0), max(w, 0)] (unsigned, an
    integer zero point per block: every level spent on the block's own range, as NNCF's
    INT4_ASYM and ORT's MatMulNBits asymmetric blocks)."""
    if symmetric:
        dtype, qmax = _TYPES[bits]
        scale = np.abs(blocks).max(axis=1) / qmax
        scale = np.where(scale > 0, scale, np.float32(1e-8)).astype(np.float32)  # positive
        q = np.clip(np.rint(blocks / scale[:, None, :]), -qmax - 1, qmax).astype(np.int8)
        return q, scale, None, dtype
    dtype, qmax = _UNSIGNED[bits]
    lo = np.minimum(blocks.min(axis=1), 0)
    hi = np.maximum(blocks.max(axis=1), 0)
    scale = (hi - lo) / qmax
    scale = np.where(scale > 0, scale, np.float32(1e-8)).astype(np.float32)
    zero = np.clip(np.rint(-lo / scale), 0, qmax)
    q = np.clip(np.rint(blocks / scale[:, None, :]) + zero[:, None, :], 0, qmax)
    return q.astype(np.uint8), scale, zero.astype(np.uint8), dtype


def blockwise_weights(model: ir.Model, scheme, exclude: set[str]) -> dict[str, Any]:
    """Rewrite every eligible MatMul weight of ``model`` in place; returns stats."""
    block = scheme.block_size or 128
    backup = (last_weighted(model) - exclude if scheme.weight_backup_int8
              else set())
    done, skipped = 0, {}
    shared: dict[tuple[str, int], ir.Value] = {}  # (weight, K axis) → its dequantized value
    for node in list(model.graph):
        if node.op_type not in ("MatMul", "Gemm") or {node.name, node.op_type} & exclude:
            continue
        attrs = {k: a.value for k, a in node.attributes.items()}
        if attrs.get("transA", 0):
            continue
        axis = 1 if node.op_type == "Gemm" and attrs.get("transB", 0) else 0  # the K axis
        w = node.inputs[1]
        if w is None or w.const_value is None or w.const_value.dtype != ir.DataType.FLOAT:
            continue
        bits = "int8" if node.name in backup else scheme.weights
        if (w.name, axis) in shared:  # a weight read by several nodes: quantized once
            node.replace_input_with(1, shared[w.name, axis])
            _drop_if_unused(model, w)
            continue
        arr = w.const_value.numpy()
        if arr.ndim != 2 or arr.shape[axis] % block:
            reason = "not 2-D" if arr.ndim != 2 else f"K not a multiple of {block}"
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        kn = arr if axis == 0 else arr.T  # [K, N] view
        k, n = kn.shape
        blocks = kn.reshape(k // block, block, n)
        q, scale, zero, dtype = _grid(blocks, bits, scheme.weight_symmetric)
        q = q.reshape(k, n)
        if axis == 1:
            q, scale = np.ascontiguousarray(q.T), np.ascontiguousarray(scale.T)
            zero = None if zero is None else np.ascontiguousarray(zero.T)
        base = w.name if all(k[0] != w.name for k in shared) else f"{w.name}_axis{axis}"
        wq = ir.Value(name=f"{base}_q", const_value=ir.tensor(q, dtype=dtype))
        ws = ir.Value(name=f"{base}_scale", const_value=ir.tensor(scale))
        inputs = [wq, ws]
        if zero is not None:
            inputs.append(ir.Value(name=f"{base}_zero_point",
                                   const_value=ir.tensor(zero, dtype=dtype)))
        for v in inputs:
            model.graph.register_initializer(v)
        dq = ir.node("DequantizeLinear", inputs, attributes={"axis": axis, "block_size": block},
                     name=f"{node.name}_weight_dq")
        dq.outputs[0].name = f"{base}_dequantized"
        dq.outputs[0].dtype, dq.outputs[0].shape = ir.DataType.FLOAT, ir.Shape(list(arr.shape))
        model.graph.insert_before(node, dq)
        node.replace_input_with(1, dq.outputs[0])
        shared[w.name, axis] = dq.outputs[0]
        _drop_if_unused(model, w)
        done += 1
    stats = {"weights_blockwise": done, "block_size": block,
             **({"skipped": skipped} if skipped else {})}
    if backup:
        stats["weights_int8"] = sorted(backup)
    if scheme.weight_backup_int8:
        tables = embedding_rows_int8(model, exclude)
        if tables:
            stats["embeddings_int8"] = tables
    return stats


def _weighted(node: ir.Node) -> bool:
    """A MatMul/Gemm reading a constant 2-D float weight: what the pass quantizes."""
    if node.op_type not in ("MatMul", "Gemm") or len(node.inputs) < 2 or node.inputs[1] is None:
        return False
    w = node.inputs[1].const_value
    return w is not None and w.dtype == ir.DataType.FLOAT and len(w.shape) == 2


def last_weighted(model: ir.Model) -> set[str]:
    """Names of the weighted MatMuls no other weighted MatMul reads from, directly or through
    any ops: the last linear layer on each path to an output (NNCF's "last linear layers")."""
    below: dict[int, bool] = {}  # node id → a weighted MatMul is downstream of its outputs
    last = set()
    for node in reversed(list(model.graph)):  # consumers before producers
        downstream = False
        for out in node.outputs:
            for user, _ in out.uses():
                if _weighted(user) or below.get(id(user), False):
                    downstream = True
        below[id(node)] = downstream
        if _weighted(node) and not downstream:
            last.add(node.name)
    return last


def embedding_rows_int8(model: ir.Model, exclude: set[str]) -> list[str]:
    """Each ``Gather(axis=0)`` from a constant float [rows, width] table (an embedding) reads
    int8 rows and their scales instead (symmetric, one scale per row); returns the tables."""
    done: dict[str, tuple[ir.Value, ir.Value]] = {}  # table → its int8 rows and row scales
    for node in list(model.graph):
        if node.op_type != "Gather" or {node.name, node.op_type} & exclude:
            continue
        table = node.inputs[0]
        axis = node.attributes["axis"].value if "axis" in node.attributes else 0
        tv = table.const_value if table is not None else None
        if (axis != 0 or tv is None or tv.dtype != ir.DataType.FLOAT or len(tv.shape) != 2
                or tv.shape[0] < 2):
            continue
        if table.name not in done:  # a table read by several Gathers: quantized once
            arr = tv.numpy()
            scale = np.abs(arr).max(axis=1, keepdims=True) / 127
            scale = np.where(scale > 0, scale, np.float32(1e-8)).astype(np.float32)
            q = np.clip(np.rint(arr / scale), -127, 127).astype(np.int8)
            done[table.name] = (ir.Value(name=f"{table.name}_q", const_value=ir.tensor(q)),
                                ir.Value(name=f"{table.name}_row_scale",
                                         const_value=ir.tensor(scale)))
            for v in done[table.name]:
                model.graph.register_initializer(v)
        tq, ts = done[table.name]
        ids = node.inputs[1]
        rows = ir.node("Gather", [tq, ids], attributes={"axis": 0}, name=f"{node.name}_q")
        scales = ir.node("Gather", [ts, ids], attributes={"axis": 0},
                         name=f"{node.name}_row_scale")
        cast = ir.node("Cast", [rows.outputs[0]], attributes={"to": ir.DataType.FLOAT},
                       name=f"{node.name}_dequantize")
        out = node.outputs[0]
        mul = ir.node("Mul", [cast.outputs[0], scales.outputs[0]], name=f"{node.name}_scaled")
        for v, suffix in ((rows.outputs[0], "rows_q"), (scales.outputs[0], "row_scales"),
                          (cast.outputs[0], "rows")):
            v.name = f"{node.name}_{suffix}"
        mul.outputs[0].dtype, mul.outputs[0].shape = ir.DataType.FLOAT, out.shape
        model.graph.insert_before(node, [rows, scales, cast, mul])
        mul.outputs[0].name = f"{node.name}_dequantized_rows"
        was_output = out.is_graph_output()
        replace_all_uses_with(out, mul.outputs[0], replace_graph_outputs=True)
        if was_output:  # a graph output keeps its name
            name = out.name
            out.name = f"{name}_float_gather"
            mul.outputs[0].name = name
        model.graph.remove(node, safe=True)
        _drop_if_unused(model, table)
    return sorted(done)


def _drop_if_unused(model: ir.Model, w: ir.Value) -> None:
    if not w.uses() and w.name in model.graph.initializers:
        model.graph.initializers.pop(w.name)
