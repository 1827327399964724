"""Two-operand Einsum as Transpose → Reshape → MatMul → Reshape → Transpose, for the QNN HTP.

The HTP has no Einsum: a trained diffusion UNet whose attention blocks are written as
``einsum("bct,bcs->bts")`` and ``einsum("bts,bcs->bct")`` (Adaptive Diffusion Terrain's, 56 of
them) was refused whole on qnn-htp ("cannot run 56 node(s): Einsum ..."). Any two-operand
equation without an ellipsis whose every index is a batch index (in both operands and the
output), a free index (in one operand and the output) or a contracted one (in both operands, not
the output) is a batched matrix product:

    A → Transpose(batch, free_A, contracted) → Reshape [B, M, K]
    B → Transpose(batch, contracted, free_B) → Reshape [B, K, N]
    MatMul → [B, M, N] → Reshape(batch…, free_A…, free_B…) → Transpose(output order)

with identity Transposes left out, and the Reshapes too where M, K and N are one index each
(MatMul takes the batch axes as they are): that form needs no shapes, which matters because an
exported attention block computes its q/k/v shapes (Shape → Concat → Reshape) and shape
inference leaves them unknown. Merging several indices into one needs static shapes, equal
where an index is shared (no broadcasting of a size-1 dim); an index summed within one operand
only, or a repeated index is left as it is (the HTP then names it). A graph output keeps its
name. The same multiply-adds in another order: exact up to float rounding.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from edgec.graph_passes._infra import register_constant as _const
from edgec.graph_passes._infra import static_dims

__all__ = ["lower_einsum", "einsum_plan"]


def einsum_plan(equation: str, a_dims: list[int] | None,
                b_dims: list[int] | None) -> dict | None:
    """The lowering's index groups and sizes, or None where the equation is not a batched
    matrix product of these shapes. Without static shapes (``None``: shapes a Shape → Concat
    chain computes) only the form with one free index per operand and one contracted index
    qualifies: MatMul takes it as it is, batch dims and all, with no Reshape."""
    eq = equation.replace(" ", "")
    if "..." in eq or "->" not in eq:
        return None
    lhs, out = eq.split("->")
    terms = lhs.split(",")
    if len(terms) != 2:
        return None
    a, b = terms
    if any(len(set(t)) != len(t) for t in (a, b, out)) or any(c not in a + b for c in out):
        return None
    size: dict[str, int] | None = None
    if a_dims is not None and b_dims is not None:
        if (len(a), len(b)) != (len(a_dims), len(b_dims)):
            return None
        size = {}
        for idx, dims in ((a, a_dims), (b, b_dims)):
            for c, d in zip(idx, dims):
                if size.setdefault(c, d) != d:
                    return None
    batch = [c for c in out if c in a and c in b]
    free_a = [c for c in out if c in a and c not in b]
    free_b = [c for c in out if c in b and c not in a]
    contracted = [c for c in a if c in b and c not in out]
    if len(batch) + len(free_a) + len(free_b) != len(out) or \
            len(batch) + len(free_a) + len(contracted) != len(a) or \
            len(batch) + len(free_b) + len(contracted) != len(b):
        return None  # an index summed within one operand only
    if size is None and not len(free_a) == len(free_b) == len(contracted) == 1:
        return None
    return {"a": a, "b": b, "out": out, "batch": batch, "free_a": free_a, "free_b": free_b,
            "contracted": contracted, "size": size}


def lower_einsum(graph: ir.Graph, node: ir.Node) -> bool:
    """Replace ``node`` (an Einsum) by its MatMul form where ``einsum_plan`` allows."""
    if len(node.inputs) != 2 or any(v is None for v in node.inputs):
        return False
    dims = [static_dims(v) for v in node.inputs]
    equation = node.attributes.get_string("equation", "")
    plan = einsum_plan(equation, dims[0], dims[1])
    if plan is None:
        return False
    size, base = plan["size"], _unique_base(graph, node.name or "einsum")
    batch, fa, fb, k = plan["batch"], plan["free_a"], plan["free_b"], plan["contracted"]
    # one index each in M, K and N: MatMul's own form (batch axes broadcast as they are);
    # else the groups are merged by Reshapes, which need the static sizes
    merge = not len(fa) == len(fb) == len(k) == 1
    new: list[ir.Node] = []

    def prod(idx):
        return math.prod(size[c] for c in idx)

    def transpose(x: ir.Value, perm: list[int], tag: str) -> ir.Value:
        if perm == sorted(perm):
            return x
        t = ir.node("Transpose", [x], attributes={"perm": perm}, name=f"{base}_{tag}_t")
        new.append(t)
        return _typed(t.outputs[0], node.outputs[0].type)

    def reshape(x: ir.Value, shape: list[int], tag: str) -> ir.Value:
        shp = _const(graph, f"{base}_{tag}_shape", np.array(shape, np.int64))
        r = ir.node("Reshape", [x, shp], name=f"{base}_{tag}_reshape")
        new.append(r)
        return _typed(r.outputs[0], node.outputs[0].type, shape)

    lhs = transpose(node.inputs[0], [plan["a"].index(c) for c in batch + fa + k], "a")
    rhs = transpose(node.inputs[1], [plan["b"].index(c) for c in batch + k + fb], "b")
    if merge:
        lhs = reshape(lhs, [prod(batch), prod(fa), prod(k)], "a")
        rhs = reshape(rhs, [prod(batch), prod(k), prod(fb)], "b")
    mm = ir.node("MatMul", [lhs, rhs], name=f"{base}_matmul")
    new.append(mm)
    y = _typed(mm.outputs[0], node.outputs[0].type)
    made = batch + fa + fb
    if merge:
        y = reshape(y, [size[c] for c in made], "out")
    y = transpose(y, [made.index(c) for c in plan["out"]], "out")
    graph.insert_before(node, new)
    out = node.outputs[0]
    y.shape, y.type = out.shape, out.type
    for user, index in list(out.uses()):
        user.replace_input_with(index, y)
    name = out.name
    if out.is_graph_output():  # the output keeps its name
        graph.outputs[graph.outputs.index(out)] = y
    graph.remove(node, safe=True)
    if y.is_graph_output():
        y.name = name
    return True


def _unique_base(graph: ir.Graph, base: str) -> str:
    """A prefix for the new nodes' and constants' names that no node or initializer of
    ``graph`` uses yet: two unnamed Einsums gave two nodes named ``einsum_matmul``, which
    ONNX Runtime's quantizer refused ("two nodes with same node name")."""
    taken = {n.name for n in graph} | set(graph.initializers)
    stem, i = base, 0
    while any(name.startswith(f"{base}_") for name in taken):
        i += 1
        base = f"{stem}_{i}"
    return base


def _typed(value: ir.Value, dtype: ir.TypeProtocol | None, shape: list[int] | None = None
           ) -> ir.Value:
    """``value`` with the Einsum's element type (and a known static shape): later passes read
    types (calibration's histogram ops were typed None from an untyped tensor)."""
    value.type = dtype
    if shape is not None:
        value.shape = ir.Shape(shape)
    return value
