"""QNN HTP legalization: exact rewrites that let a static transformer graph run whole on the NPU.

Run on the fp32 graph before quantization (the QDQ quantizer then wraps the new ops), after
``MaskFillPass`` (which bounds -inf/float-min attention masks for the same target):

    Transpose of rank > 5 (± its Reshape in/out)   ⇒  Reshape → Transpose, each rank ≤ 4
    GatherND(data, constant indices)               ⇒  Reshape(data, flat) → Gather(linear indices)
    Where(IsNaN(p), c, p),  p = Softmax(·)          ⇒  p

Why, as measured on the HTP emulator (onnxruntime-qnn 2.x): the HTP takes tensors of rank ≤ 5
only (video-dit's unpatchify is rank 8); it rejects GatherND on bool data (BERT's key mask); and
the IsNaN → Where guard the exporter puts after a masked Softmax fails graph finalization
(QNN_COMMON_ERROR_MEM_ALLOC).

Guarantees: the first two are pure data movement (bit exact). The NaN guard only acts on NaN,
which a Softmax of finite inputs never yields (masks are finite after ``MaskFillPass``).
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from edgec.graph_passes._infra import EdgecPass, PassResult

__all__ = ["MAX_RANK", "QnnLegalizePass"]

MAX_RANK = 5  # the HTP's tensor rank limit (Transpose/Reshape of rank 6 are rejected)


class QnnLegalizePass(EdgecPass):
    """Rewrite the patterns the QNN HTP cannot run (see the module docstring); stats per rewrite."""

    name = "qnn-legalize"
    exact = True
    rtol = 1e-6

    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        stats: dict[str, int] = {"transposes_lowered": 0, "transposes_skipped": 0,
                                 "gathernd_rewritten": 0, "nan_guards_removed": 0}
        for node in list(graph):
            if node.op_type == "Transpose" and node.domain in ("", "ai.onnx"):
                rank = len(node.attributes.get_ints("perm", ()) or ())
                if rank > MAX_RANK:
                    key = "transposes_lowered" if _lower_transpose(graph, node) else \
                        "transposes_skipped"
                    stats[key] += 1
            elif node.op_type == "GatherND" and _gathernd_to_gather(graph, node):
                stats["gathernd_rewritten"] += 1
            elif node.op_type == "Where" and _drop_nan_guard(graph, node):
                stats["nan_guards_removed"] += 1
        ir.passes.common.RemoveUnusedNodesPass()(model)
        modified = any(v for k, v in stats.items() if k != "transposes_skipped")
        return PassResult(model, modified, stats)


def _const(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    tensor = ir.tensor(array, name=name)
    value = ir.Value(name=name, type=ir.TensorType(tensor.dtype), shape=tensor.shape,
                     const_value=tensor)
    graph.register_initializer(value)
    return value


def _static_dims(value: ir.Value) -> list[int] | None:
    shape = value.shape
    if shape is None or not shape.is_static():
        return None
    return [int(d) for d in shape]


def _groups(dims: list[int], perm: list[int]) -> tuple[list[int], list[int]]:
    """Fewest axes that carry the same transpose: drop size-1 axes, merge axes adjacent in both."""
    axes = [a for a in range(len(dims)) if dims[a] != 1]
    order = [a for a in perm if dims[a] != 1]
    groups: list[list[int]] = []
    for a in order:
        if groups and axes.index(a) == axes.index(groups[-1][-1]) + 1:
            groups[-1].append(a)
        else:
            groups.append([a])
    in_order = sorted(range(len(groups)), key=lambda g: groups[g][0])
    sizes = [math.prod(dims[a] for a in groups[g]) for g in in_order]
    rank_of = {g: i for i, g in enumerate(in_order)}
    return sizes, [rank_of[g] for g in range(len(groups))]


def _lower_transpose(graph: ir.Graph, node: ir.Node) -> bool:
    """Replace a rank > 5 Transpose whose result only feeds Reshapes by rank ≤ 4 steps."""
    x, out = node.inputs[0], node.outputs[0]
    dims = _static_dims(x)
    users = [u for u, _ in out.uses()]
    if dims is None or out.is_graph_output() or not users:
        return False
    for u in users:  # a 0 in a Reshape target copies an input dim: its meaning would change
        target = u.inputs[1].const_value if u.op_type == "Reshape" else None
        if target is None or (0 in target.numpy().tolist()
                              and not u.attributes.get_int("allowzero", 0)):
            return False
    producer = x.producer()  # read the un-reshaped tensor: never materialize the rank-6+ view
    if producer is None or producer.op_type != "Reshape":
        return False
    src = producer.inputs[0]
    sizes, perm = _groups(dims, list(node.attributes.get_ints("perm")))
    if not sizes:  # every axis has size 1
        sizes, perm = [1], [0]
    new_nodes: list[ir.Node] = []
    base = node.name or "transpose"

    def emit(shape: list[int], order: list[int]) -> None:
        nonlocal src
        shp = _const(graph, f"{base}_lower{len(new_nodes)}_shape", np.array(shape, np.int64))
        r = ir.node("Reshape", [src, shp], name=f"{base}_lower{len(new_nodes)}_reshape")
        t = ir.node("Transpose", r.outputs, attributes={"perm": order},
                    name=f"{base}_lower{len(new_nodes)}")
        new_nodes.extend([r, t])
        src = t.outputs[0]

    if len(sizes) <= MAX_RANK:
        emit(sizes, perm)
    else:  # bring the next wanted run of axes forward, one rank-4 transpose at a time
        cur = list(range(len(sizes)))
        while cur != perm:
            k = next(i for i, (a, b) in enumerate(zip(cur, perm)) if a != b)
            j = cur.index(perm[k])
            r = 1
            while j + r < len(cur) and k + r < len(perm) and cur[j + r] == perm[k + r]:
                r += 1
            prod = [math.prod(sizes[a] for a in part)
                    for part in (cur[:k], cur[k:j], cur[j:j + r], cur[j + r:])]
            emit(prod, [0, 2, 1, 3])
            cur = cur[:k] + cur[j:j + r] + cur[k:j] + cur[j + r:]
    graph.insert_before(node, new_nodes)
    for u in users:
        u.replace_input_with(0, src)
    graph.remove(node, safe=True)
    return True


def _gathernd_to_gather(graph: ir.Graph, node: ir.Node) -> bool:
    data, indices = node.inputs[0], node.inputs[1]
    dims = _static_dims(data)
    if (dims is None or indices.const_value is None
            or node.attributes.get_int("batch_dims", 0) != 0):
        return False
    idx = indices.const_value.numpy().astype(np.int64)
    k = idx.shape[-1]
    lead = np.array(dims[:k], np.int64)
    idx = np.where(idx < 0, idx + lead, idx)
    strides = np.cumprod(np.concatenate([[1], lead[::-1][:-1]]))[::-1]
    linear = (idx * strides).sum(-1).astype(np.int64)
    base = node.name or "gathernd"
    flat = _const(graph, f"{base}_flat_shape", np.array([int(lead.prod()), *dims[k:]], np.int64))
    lin = _const(graph, f"{base}_linear_indices", linear)
    reshape = ir.node("Reshape", [data, flat], name=f"{base}_flatten")
    gather = ir.node("Gather", [reshape.outputs[0], lin], attributes={"axis": 0}, name=base)
    graph.insert_before(node, [reshape, gather])
    out, new = node.outputs[0], gather.outputs[0]
    new.shape, new.type = out.shape, out.type
    name, out.name = out.name, f"{out.name}_gathernd"
    new.name = name  # keeps a graph output's name
    ir.convenience.replace_all_uses_with(out, new, replace_graph_outputs=True)
    graph.remove(node, safe=True)
    return True


def _drop_nan_guard(graph: ir.Graph, node: ir.Node) -> bool:
    cond, _, p = node.inputs
    isnan = cond.producer() if cond is not None else None
    if (isnan is None or isnan.op_type != "IsNaN" or isnan.inputs[0] is not p
            or p.producer() is None or p.producer().op_type != "Softmax"):
        return False
    out = node.outputs[0]
    if out.is_graph_output():
        if p.is_graph_output():
            return False
        name, out.name = out.name, f"{out.name}_nan_guarded"
        p.name = name  # the graph output keeps its name
    ir.convenience.replace_all_uses_with(out, p, replace_graph_outputs=True)
    graph.remove(node, safe=True)
    return True
