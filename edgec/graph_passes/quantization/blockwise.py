"""Block-wise or per-channel weight-only quantization of constant MatMul weights (w4a16, w8a16).

    MatMul(x, W[K, N])  ⇒  MatMul(x, DequantizeLinear(W_q[K, N]; s[K/b, N], axis=0, block_size=b))
    Gemm(x, W[N, K], transB=1)  ⇒  the same with blocks along axis 1 (K)

Without ``QuantScheme.block_size`` (openvino-cpu's int8 w8a16) one block spans the whole K: a
scale (and zero point) per output channel, a plain per-axis ``DequantizeLinear`` (opset 13).

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

A K that is not a multiple of b (a LLaMA's FFN of 172, 1376 in blocks of 128) ends in a shorter
block where the runtime takes one (``QuantScheme.partial_block``: ONNX Runtime fuses it into
MatMulNBits), else its weight is zero-padded to whole blocks and the MatMul's input with it:

    MatMul(x, W[K, N])  ⇒  MatMul(Pad(x, last axis → K'), DequantizeLinear(W_q[K', N]; ...))

(OpenVINO's ONNX frontend refuses a partial block; with the Pad it still runs a u4
FullyConnected). Such weights were left float before, under a report saying int4.
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
    """Rewrite every eligible MatMul weight of ``model`` in place; returns stats.

    A K that is not a multiple of the block ends in a partial block (``scheme.partial_block``)
    or is zero-padded to whole blocks, the MatMul's input with it; a weight that cannot be
    quantized is named in ``stats["skipped"]`` with the reason (node → reason)."""
    block = scheme.block_size  # None: one scale per output channel (blocks of the whole K)
    tables: dict[str, tuple[ir.Value, ir.Value]] = {}  # table → its int8 rows and row scales
    shared_heads = []
    if (scheme.weight_backup_int8 and scheme.weights == "int8" and block is None
            and scheme.tied_table_shared):
        # a head tied to the table reads the lookup's int8 rows (per row = per output channel)
        shared_heads = _share_tied_tables(model, exclude, tables)
    if scheme.weight_backup_int8:  # the head int8 and the table's rows int8 (the table goes)
        _fold_transposed_weights(model)
    backup = (last_weighted(model) - exclude if scheme.weight_backup_int8
              else set())
    done, skipped, int8 = 0, {}, []
    shared: dict[tuple[str, int], ir.Value] = {}  # (weight, K axis) → its dequantized value
    pads: dict[tuple[int, int], ir.Value] = {}  # (activation id, K') → it zero-padded to K'
    for node in list(model.graph):
        if node.op_type not in ("MatMul", "Gemm") or {node.name, node.op_type} & exclude:
            continue
        attrs = {k: a.value for k, a in node.attributes.items()}
        if attrs.get("transA", 0):
            if _weighted(node):
                skipped[node.name] = "Gemm with transA=1"
            continue
        axis = 1 if node.op_type == "Gemm" and attrs.get("transB", 0) else 0  # the K axis
        w = node.inputs[1]
        if w is None or w.const_value is None or w.const_value.dtype != ir.DataType.FLOAT:
            continue
        bits = "int8" if node.name in backup else scheme.weights
        if (w.name, axis) in shared:  # a weight read by several nodes: quantized once
            dq_out = shared[w.name, axis]
            node.replace_input_with(1, dq_out)
            _pad_input(model, node, w.const_value.shape[axis], dq_out.shape[axis], pads)
            _drop_if_unused(model, w)
            int8 += [node.name] if bits == "int8" else []
            continue
        arr = w.const_value.numpy()
        if arr.ndim != 2:
            skipped[node.name] = f"weight is {arr.ndim}-D, not 2-D"
            continue
        kn = arr if axis == 0 else arr.T  # [K, N] view
        k, n = kn.shape
        size = block or k
        kp = -(-k // size) * size  # whole blocks: zero rows dequantize to exactly 0
        padded = np.concatenate([kn, np.zeros((kp - k, n), kn.dtype)]) if kp > k else kn
        blocks = padded.reshape(kp // size, size, n)
        q, scale, zero, dtype = _grid(blocks, bits, scheme.weight_symmetric)
        q = q.reshape(kp, n)
        if scheme.partial_block:  # the last block is shorter: the graph keeps K
            q, kp = q[:k], k
        if block is None:  # per channel: scale [N], on the weight's N axis
            scale, zero = scale[0], None if zero is None else zero[0]
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
        dq_attrs = {"axis": axis, "block_size": block} if block else {"axis": 1 - axis}
        dq = ir.node("DequantizeLinear", inputs, attributes=dq_attrs, name=f"{node.name}_weight_dq")
        dq.outputs[0].name = f"{base}_dequantized"
        dq.outputs[0].dtype, dq.outputs[0].shape = ir.DataType.FLOAT, ir.Shape(list(q.shape))
        model.graph.insert_before(node, dq)
        node.replace_input_with(1, dq.outputs[0])
        _pad_input(model, node, k, kp, pads)
        shared[w.name, axis] = dq.outputs[0]
        _drop_if_unused(model, w)
        done += 1
        int8 += [node.name] if bits == "int8" else []
    stats = {"weights_blockwise": done, "block_size": block,
             **({"skipped": skipped} if skipped else {})}
    if int8 and scheme.weights != "int8":  # the 8-bit backups applied, not those planned
        stats["weights_int8"] = sorted(int8)
    if scheme.weight_backup_int8:
        done_tables = embedding_rows_int8(model, exclude, tables)
        if done_tables:
            stats["embeddings_int8"] = done_tables
    if shared_heads:
        stats["heads_sharing_the_table"] = shared_heads
    return stats


def _share_tied_tables(model: ir.Model, exclude: set[str],
                       tables: dict[str, tuple[ir.Value, ir.Value]]) -> list[str]:
    """A head tied to an embedding table (``MatMul(x, Transpose(E))`` where a ``Gather`` reads
    ``E`` too) reads the table's int8 rows through a per-row ``DequantizeLinear``: a row of
    ``E`` is an output channel of the head, so the lookup's symmetric per-row grid is a
    per-channel grid for the head, and one int8 table serves both. Folded into a head of its own
    (``_fold_transposed_weights``), the table was stored twice (SmolLM2-135M w8a16: 164 MB; now
    136 MB, optimum-intel's int8 135 MB, the same logits). Returns the heads; fills ``tables``."""
    looked_up = {n.inputs[0].name for n in model.graph if n.op_type == "Gather"
                 and n.inputs[0] is not None and n.inputs[0].is_initializer()
                 and (n.attributes["axis"].value if "axis" in n.attributes else 0) == 0}
    heads = []
    for node in list(model.graph):
        t = node.inputs[0] if node.op_type == "Transpose" and node.inputs else None
        perm = node.attributes.get_ints("perm", None) if t is not None else None
        if (t is None or t.name not in looked_up or t.const_value is None
                or t.const_value.dtype != ir.DataType.FLOAT or len(t.const_value.shape) != 2
                or perm not in (None, [1, 0], (1, 0))):
            continue
        readers = [u for u, i in node.outputs[0].uses()]
        if not readers or any(u.op_type != "MatMul" or {u.name, u.op_type} & exclude
                              or u.inputs[1] is not node.outputs[0] for u in readers):
            continue
        rows, scales = _table_rows(model, t, tables)
        flat = ir.Value(name=f"{t.name}_head_scale",
                        const_value=ir.tensor(scales.const_value.numpy().reshape(-1)))
        model.graph.register_initializer(flat)
        dq = ir.node("DequantizeLinear", [rows, flat], attributes={"axis": 0},
                     name=f"{node.name}_table_dq")
        dq.outputs[0].name = f"{t.name}_dequantized"
        dq.outputs[0].dtype, dq.outputs[0].shape = ir.DataType.FLOAT, ir.Shape(
            list(t.const_value.shape))
        model.graph.insert_before(node, dq)
        node.replace_input_with(0, dq.outputs[0])
        heads += [u.name for u in readers]
    return sorted(heads)


def _table_rows(model: ir.Model, table: ir.Value,
                tables: dict[str, tuple[ir.Value, ir.Value]]) -> tuple[ir.Value, ir.Value]:
    """The table's int8 rows and [rows, 1] scales (symmetric, one scale per row), registered
    once."""
    if table.name not in tables:
        arr = table.const_value.numpy()
        scale = np.abs(arr).max(axis=1, keepdims=True) / 127
        scale = np.where(scale > 0, scale, np.float32(1e-8)).astype(np.float32)
        q = np.clip(np.rint(arr / scale), -127, 127).astype(np.int8)
        tables[table.name] = (ir.Value(name=f"{table.name}_q", const_value=ir.tensor(q)),
                              ir.Value(name=f"{table.name}_row_scale",
                                       const_value=ir.tensor(scale)))
        for v in tables[table.name]:
            model.graph.register_initializer(v)
    return tables[table.name]


def _pad_input(model: ir.Model, node: ir.Node, k: int, kp: int,
               pads: dict[tuple[int, int], ir.Value]) -> None:
    """``node``'s activation (input 0) zero-padded on its last axis from ``k`` to ``kp``
    channels, to match a weight padded to whole blocks (no-op when ``kp == k``); one Pad per
    activation (q, k and v read the same one)."""
    x = node.inputs[0]
    if kp == k:
        return
    if (id(x), kp) in pads:
        node.replace_input_with(0, pads[id(x), kp])
        return
    amount = ir.Value(name=f"{node.name}_k_pads",
                      const_value=ir.tensor(np.array([0, kp - k], np.int64)))
    axes = ir.Value(name=f"{node.name}_k_axes", const_value=ir.tensor(np.array([-1], np.int64)))
    for v in (amount, axes):
        model.graph.register_initializer(v)
    pad = ir.node("Pad", [x, amount, None, axes], name=f"{node.name}_k_pad")
    pad.outputs[0].name = f"{node.name}_input_padded"
    pad.outputs[0].dtype = x.dtype
    if x.shape is not None:
        pad.outputs[0].shape = ir.Shape([*x.shape[:-1], kp])
    model.graph.insert_before(node, pad)
    node.replace_input_with(0, pad.outputs[0])
    pads[id(x), kp] = pad.outputs[0]


def _fold_transposed_weights(model: ir.Model) -> None:
    """A weight read through ``Transpose`` (a head tied to the embedding table) becomes its own
    initializer (``FoldWeightTranspose``), so it is quantized as any weight: it was left float,
    and with it the whole float table beside the int8 rows the embedding lookup reads
    (``embedding_rows_int8``; SmolLM2-135M's tied table is 28 M of its 135 M parameters). Only
    with ``weight_backup_int8`` (the head int8, as NNCF): elsewhere the lookup reads the float
    table anyway, and a head kept float is ModelOpt's default too."""
    from onnxscript.rewriter import pattern

    from edgec.graph_passes.fold_weight_transpose import FoldWeightTranspose

    read = [n.inputs[0] for n in model.graph if n.op_type == "Transpose" and n.inputs
            and n.inputs[0] is not None and n.inputs[0].is_initializer()]
    pattern.RewriteRuleSet([FoldWeightTranspose.rule()]).apply_to_model(model)
    for w in read:
        _drop_if_unused(model, w)


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


def embedding_rows_int8(model: ir.Model, exclude: set[str],
                        done: dict[str, tuple[ir.Value, ir.Value]] | None = None) -> list[str]:
    """Each ``Gather(axis=0)`` from a constant float [rows, width] table (an embedding) reads
    int8 rows and their scales instead (symmetric, one scale per row); returns the tables.
    ``done``: tables already quantized (a tied head reads them), by name."""
    done = {} if done is None else done  # table → its int8 rows and row scales
    for node in list(model.graph):
        if node.op_type != "Gather" or {node.name, node.op_type} & exclude:
            continue
        table = node.inputs[0]
        axis = node.attributes["axis"].value if "axis" in node.attributes else 0
        tv = table.const_value if table is not None else None
        if (axis != 0 or tv is None or tv.dtype != ir.DataType.FLOAT or len(tv.shape) != 2
                or tv.shape[0] < 2):
            continue
        tq, ts = _table_rows(model, table, done)  # a table read by several Gathers: once
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
