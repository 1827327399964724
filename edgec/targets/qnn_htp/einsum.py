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

with identity Transposes and Reshapes left out. Shapes must be static (qnn-htp's are) and equal
where an index is shared (no broadcasting of a size-1 dim); an index summed within one operand
only, or a repeated index is left as it is (the HTP then names it). A graph output keeps its
name. The same multiply-adds in another order: exact up to float rounding.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from edgec.graph_passes._infra import register_constant as _const

__all__ = ["lower_einsum", "einsum_plan"]


def einsum_plan(equation: str, a_dims: list[int], b_dims: list[int]) -> dict | None:
    """The lowering's index groups and sizes, or None where the equation is not a batched
    matrix product of these shapes."""
    eq = equation.replace(" ", "")
    if "..." in eq or "->" not in eq:
        return None
    lhs, out = eq.split("->")
    terms = lhs.split(",")
    if len(terms) != 2:
        return None
    a, b = terms
    if any(len(set(t)) != len(t) for t in (a, b, out)) or \
            (len(a), len(b)) != (len(a_dims), len(b_dims)):
        return None
    size: dict[str, int] = {}
    for idx, dims in ((a, a_dims), (b, b_dims)):
        for c, d in zip(idx, dims):
            if size.setdefault(c, d) != d:
                return None
    if any(c not in size for c in out):
        return None
    batch = [c for c in out if c in a and c in b]
    free_a = [c for c in out if c in a and c not in b]
    free_b = [c for c in out if c in b and c not in a]
    contracted = [c for c in a if c in b and c not in out]
    if len(batch) + len(free_a) + len(free_b) != len(out) or \
            len(batch) + len(free_a) + len(contracted) != len(a) or \
            len(batch) + len(free_b) + len(contracted) != len(b):
        return None  # an index summed within one operand only
    return {"a": a, "b": b, "out": out, "batch": batch, "free_a": free_a, "free_b": free_b,
            "contracted": contracted, "size": size}


def lower_einsum(graph: ir.Graph, node: ir.Node) -> bool:
    """Replace ``node`` (an Einsum) by its MatMul form where ``einsum_plan`` allows."""
    if len(node.inputs) != 2 or any(v is None for v in node.inputs):
        return False
    dims = [_static(v) for v in node.inputs]
    equation = node.attributes.get_string("equation", "")
    plan = None if None in dims else einsum_plan(equation, dims[0], dims[1])
    if plan is None:
        return False
    size, base = plan["size"], node.name or "einsum"
    new: list[ir.Node] = []

    def prod(idx):
        return math.prod(size[c] for c in idx)

    def arrange(x: ir.Value, idx: str, order: list[str], shape: list[int], tag: str):
        perm = [idx.index(c) for c in order]
        if perm != sorted(perm):
            t = ir.node("Transpose", [x], attributes={"perm": perm}, name=f"{base}_{tag}_t")
            new.append(t)
            x = t.outputs[0]
        if [size[c] for c in order] != shape:
            shp = _const(graph, f"{base}_{tag}_shape", np.array(shape, np.int64))
            r = ir.node("Reshape", [x, shp], name=f"{base}_{tag}_reshape")
            new.append(r)
            x = r.outputs[0]
        return x

    batch, fa, fb, k = plan["batch"], plan["free_a"], plan["free_b"], plan["contracted"]
    lhs = arrange(node.inputs[0], plan["a"], batch + fa + k, [prod(batch), prod(fa), prod(k)],
                  "a")
    rhs = arrange(node.inputs[1], plan["b"], batch + k + fb, [prod(batch), prod(k), prod(fb)],
                  "b")
    mm = ir.node("MatMul", [lhs, rhs], name=f"{base}_matmul")
    new.append(mm)
    y = mm.outputs[0]
    made = batch + fa + fb
    if [prod(batch), prod(fa), prod(fb)] != [size[c] for c in made]:
        shp = _const(graph, f"{base}_out_shape", np.array([size[c] for c in made], np.int64))
        r = ir.node("Reshape", [y, shp], name=f"{base}_out_reshape")
        new.append(r)
        y = r.outputs[0]
    perm = [made.index(c) for c in plan["out"]]
    if perm != sorted(perm):
        t = ir.node("Transpose", [y], attributes={"perm": perm}, name=f"{base}_out_t")
        new.append(t)
        y = t.outputs[0]
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


def _static(value: ir.Value) -> list[int] | None:
    shape = value.shape
    if shape is None or not shape.is_static():
        return None
    return [int(d) for d in shape]
