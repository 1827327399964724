"""OpenVINO legalization: exact rewrites that let OpenVINO's ONNX frontend convert a graph.

    Y = Attention(Q [B, Hq, S, D], K [B, Hkv, T, D], V, ...), Hkv < Hq   (grouped-query)
        ⇒  Reshape(Y, [0, Hq, 0, D])

Why: the frontend (OpenVINO 2026.4) converts a grouped-query ``Attention`` (opset 23) to a
``ScaledDotProductAttention`` that computes the right values but infers its output with the
*key's* head count ([B, Hkv, S, D]). A consumer that reshapes by a constant width works (the
``llama`` reference: ``[b, s, heads * head_dim]``), but one that reshapes with ``-1`` (every
transformers model: ``reshape(*input_shape, -1)``) inherits the wrong width, and the next
MatMul fails validation ("Incompatible MatMul matrix dimension ... 128 ... 512"). The Reshape
restates the shape ONNX defines (batch and sequence copied, heads and head size given), so
the frontend's inference is pinned; on any runtime it is a no-op view.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgec.graph_passes._infra import EdgecPass, PassResult

__all__ = ["OpenVINOLegalizePass"]


def _dims(value: ir.Value | None) -> list | None:
    if value is None or value.shape is None or len(value.shape) != 4:
        return None
    return list(value.shape)


class OpenVINOLegalizePass(EdgecPass):
    """Pin the output shape of grouped-query ``Attention`` (see the module docstring)."""

    name = "openvino-legalize"
    exact = True
    rtol = 1e-6

    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        outputs = {id(v) for v in graph.outputs}
        stats = {"gqa_outputs_pinned": 0, "gqa_skipped": 0, "bool_masks_made_additive": 0}
        additive: dict[int, ir.Value] = {}
        for node in list(graph):
            if node.op_type != "Attention" or node.domain not in ("", "ai.onnx"):
                continue
            if len(node.inputs) > 3 and node.inputs[3] is not None and \
                    node.inputs[3].dtype == ir.DataType.BOOL:
                node.replace_input_with(3, _additive(graph, node, node.inputs[3], additive))
                stats["bool_masks_made_additive"] += 1
            q, k = _dims(node.inputs[0]), _dims(node.inputs[1] if len(node.inputs) > 1 else None)
            if q is None or k is None or q[1] == k[1]:
                continue
            y = node.outputs[0]
            heads, width = q[1], q[3]
            if not (isinstance(heads, int) and isinstance(width, int)) or id(y) in outputs:
                stats["gqa_skipped"] += 1
                continue
            shape = ir.tensor(np.array([0, heads, 0, width], np.int64),
                              name=f"{y.name}_gqa_shape")
            const = ir.Value(name=shape.name, type=ir.TensorType(shape.dtype),
                             shape=shape.shape, const_value=shape)
            graph.register_initializer(const)
            uses = list(y.uses())
            pinned = ir.node("Reshape", [y, const], name=f"{node.name}_gqa_pin")
            graph.insert_after(node, pinned)
            out = pinned.outputs[0]
            out.name, out.type, out.shape = f"{y.name}_gqa_pinned", y.type, y.shape
            for use in uses:
                use.node.replace_input_with(use.idx, out)
            stats["gqa_outputs_pinned"] += 1
        return PassResult(model, any(stats[k] for k in ("gqa_outputs_pinned",
                                                        "bool_masks_made_additive")), stats)


def _additive(graph: ir.Graph, node: ir.Node, mask: ir.Value, done: dict[int, ir.Value]
              ) -> ir.Value:
    """``Where(mask, 0, lowest float32)``: the additive form of a boolean attention mask, made
    once per mask (every layer shares it)."""
    if id(mask) in done:
        return done[id(mask)]
    zero = ir.tensor(np.array(0.0, np.float32), name=f"{mask.name}_allowed")
    low = ir.tensor(np.array(np.finfo(np.float32).min, np.float32), name=f"{mask.name}_masked")
    consts = []
    for t in (zero, low):
        v = ir.Value(name=t.name, type=ir.TensorType(t.dtype), shape=t.shape, const_value=t)
        graph.register_initializer(v)
        consts.append(v)
    where = ir.node("Where", [mask, *consts], name=f"{mask.name}_additive")
    producer = mask.producer()
    if producer is not None and producer.graph is graph:
        graph.insert_after(producer, where)
    else:
        graph.insert_before(node, where)
    out = where.outputs[0]
    out.name, out.type, out.shape = f"{mask.name}_additive", ir.TensorType(ir.DataType.FLOAT), \
        mask.shape
    done[id(mask)] = out
    return out
