"""Attention sites in a graph: the exporter's MatMul/Softmax/MatMul forms and the ONNX Attention op.

Each site is returned as (Q carrying the whole score scale, K, V) so that ``softmax(q·kᵀ)·v`` is the
site's output; a skipped site is counted with the reason it stays dense.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter

import numpy as np
import onnx_ir as ir

__all__ = ["AttentionSite", "find_attention_sites", "static_dim"]


@dataclasses.dataclass
class AttentionSite:
    q: ir.Value          # Q [B,H,N,d] carrying the whole score scale (softmax(q·kᵀ) is exact)
    k: ir.Value          # K [B,H,N,d] (a Transpose of Kᵀ added to the graph if needed)
    v: ir.Value
    softmax: ir.Node     # the Softmax, or the Attention op itself
    output: ir.Value     # the dense attention output this site replaces
    anchor: ir.Node      # the final MatMul


def _const_scalar(value: ir.Value | None) -> float | None:
    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    if tensor is None or tensor.size != 1:
        return None
    return float(tensor.numpy().reshape(()))


def _producer(value: ir.Value, *ops: str) -> ir.Node | None:
    node = value.producer()
    return node if node is not None and node.op_type in ops and node.domain == "" else None


def _match(softmax: ir.Node) -> tuple[dict | None, str]:
    """Bindings for one Softmax-centred site, or (None, reason it stays dense)."""
    uses = list(softmax.outputs[0].uses())
    if len(uses) != 1 or uses[0].node.op_type != "MatMul" or uses[0].idx != 0:
        return None, "softmax output not consumed by one MatMul(·, V)"
    scores = softmax.inputs[0]
    rank = len(scores.shape) if scores.shape is not None else None
    axis = softmax.attributes.get_int("axis", -1)
    if rank is None or axis not in (-1, rank - 1):
        return None, "softmax not over the last axis"
    scale = 1.0
    node = _producer(scores, "Mul", "Div", "Add", "MatMul")
    if node is not None and node.op_type == "Add":
        return None, "additive mask"
    if node is not None and node.op_type in ("Mul", "Div"):
        s = _const_scalar(node.inputs[1])
        if s is None:
            return None, "score scale is not a constant scalar"
        scale = s if node.op_type == "Mul" else 1.0 / s
        node = _producer(node.inputs[0], "MatMul")
    if node is None:
        return None, "scores not produced by MatMul(Q, Kᵀ)"
    q, kt = node.inputs
    return {"q": q, "kt": kt, "scale": scale, "v": uses[0].node.inputs[1],
            "anchor": uses[0].node, "softmax": softmax, "qk": node}, ""


def _match_attention_op(node: ir.Node) -> tuple[dict | None, str]:
    """ONNX Attention (opset 23): 4-D Q/K/V, no mask/past/causal/softcap, same head counts."""
    inputs = list(node.inputs) + [None] * (6 - len(node.inputs))
    if any(x is not None for x in inputs[3:]):
        return None, "Attention op with mask or past key/value"
    if any(len(out.uses()) or out.is_graph_output() for out in node.outputs[1:]):
        return None, "Attention op present key/value outputs are used"
    attrs = node.attributes
    if attrs.get_int("is_causal", 0) or attrs.get_float("softcap", 0.0) or attrs.get_int(
            "qk_matmul_output_mode", 0):
        return None, "Attention op with is_causal / softcap / qk output"
    q, k, v = inputs[:3]
    if any(x.shape is None or len(x.shape) != 4 for x in (q, k, v)):
        return None, "Attention op inputs not 4-D [B,H,N,d]"
    if q.shape[1] != k.shape[1]:
        return None, "Attention op with grouped key/value heads"
    d = q.shape[3]
    scale = attrs.get_float("scale", None)
    if scale is None:
        if not isinstance(d, int):
            return None, "head dim not static"
        scale = 1.0 / math.sqrt(d)
    return {"q": q, "k": k, "scale": scale, "v": v, "anchor": node}, ""


def _untransposed(kt: ir.Value) -> tuple[ir.Value | None, float]:
    """K and a scale such that ``kt == Transpose(K)·scale``, read off the producers, if visible.

    Recognizes a scalar Mul, a last-two-axes Transpose, and the dynamo exporter's
    ``Reshape([B·H,N,d]) → Transpose(0,2,1) → Reshape([B,H,d,N])``; saves two copies of K.
    """
    scale = 1.0
    node = _producer(kt, "Mul")
    if node is not None:
        s = _const_scalar(node.inputs[1])
        if s is None:
            return None, 1.0
        scale, kt = s, node.inputs[0]
    node = _producer(kt, "Transpose", "Reshape")
    if node is not None and node.op_type == "Transpose":
        perm = list(node.attributes.get_ints("perm", []))
        return (node.inputs[0], scale) if perm == [0, 1, 3, 2] else (None, 1.0)
    if node is None:
        return None, 1.0
    inner = _producer(node.inputs[0], "Transpose")
    if inner is None or list(inner.attributes.get_ints("perm", [])) != [0, 2, 1]:
        return None, 1.0
    flat = _producer(inner.inputs[0], "Reshape")
    if flat is None:
        return None, 1.0
    k = flat.inputs[0]
    if k.shape is None or kt.shape is None or len(k.shape) != 4 or len(kt.shape) != 4:
        return None, 1.0
    if list(k.shape.dims) != [*kt.shape.dims[:2], kt.shape.dims[3], kt.shape.dims[2]]:
        return None, 1.0
    return k, scale


def static_dim(dim) -> int | None:
    return dim if isinstance(dim, int) else None


def find_attention_sites(model: ir.Model) -> tuple[list[AttentionSite], Counter]:
    """Attention sites of the main graph (adds a Transpose Kᵀ→K per site), and skip reasons."""
    sites, skipped = [], Counter()
    for node in list(model.graph):
        if node.domain != "" or node.op_type not in ("Softmax", "Attention"):
            continue
        b, reason = _match(node) if node.op_type == "Softmax" else _match_attention_op(node)
        if b is None:
            skipped[reason] += 1
            continue
        shapes = [x.shape for x in (b["q"], b.get("kt", b.get("k")), b["v"])]
        if any(s is None or len(s) != 4 for s in shapes):
            skipped["Q/K/V not 4-D [B,H,N,d]"] += 1
            continue
        tape = ir.tape.Tape()
        k = b.get("k")
        if "kt" in b:  # resolve K (and any scale on Kᵀ) before emitting Q's scale
            k, k_scale = _untransposed(b["kt"])
            if k is None:  # unknown producer: transpose back explicitly
                k = tape.op("Transpose", [b["kt"]], {"perm": [0, 1, 3, 2]})
                k.dtype = b["kt"].dtype
                k.shape = ir.Shape([*b["kt"].shape[:2], b["kt"].shape[3], b["kt"].shape[2]])
            else:  # fold K's scale into Q: (Q·a)(K·b)ᵀ = (Q·ab)Kᵀ
                b["scale"] *= k_scale
        q = b["q"]
        if b["scale"] != 1.0:
            dtype = q.dtype.numpy()
            q = tape.op("Mul", [q, tape.initializer(ir.tensor(np.array(b["scale"], dtype)),
                                                    name=f"{node.name}_sparse_scale")])
            q.dtype, q.shape = b["q"].dtype, b["q"].shape
        model.graph.insert_before(b["anchor"], tape.nodes)
        for init in tape.initializers:
            model.graph.register_initializer(init)
        sites.append(AttentionSite(q, k, b["v"], node, b["anchor"].outputs[0], b["anchor"]))
    # Kᵀ → K Transposes of sites that end up skipped are removed by the pass's DCE.
    return sites, skipped
