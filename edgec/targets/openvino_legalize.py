"""OpenVINO legalization: exact rewrites so OpenVINO converts a graph and runs it fused.

    Attention(Q [B, Hq, S, D], K [B, Hkv, T, D], V, ...), Hkv < Hq   (grouped-query)
        ⇒  K, V each Unsqueeze(2) → Expand [B, Hkv, Hq/Hkv, T, D] → Reshape [B, Hq, T, D]
    Attention(..., mask bool)  ⇒  Attention(..., Where(mask, 0, lowest float32))

Why, measured with OpenVINO 2026.4: its ``ScaledDotProductAttention`` (what the frontend makes of
an opset-23 ``Attention``) has no grouped form. Given K/V with fewer heads than Q, the frontend
either fails validation ("key_input_correctness", when it knows both head counts: decoders
exported by transformers 5.5) or, when RoPE hides Q's head count (transformers 5.24), converts
but infers the output with the key's heads, so a following ``reshape(..., -1)`` gets the wrong
width and the next MatMul fails ("Incompatible MatMul matrix dimension"). transformers'
``repeat_kv`` chain, spelled out here, is what the CPU plugin expects: it folds it back into its
grouped ``ScaledDotProductAttentionWithKVCache`` over the stateful cache (the repeat is never
materialized; the ``llama`` reference, which OpenVINO ran as plain MatMul/Softmax, went from 159
to 450 decode tokens/s at a 1024-token context). A boolean mask made the fused attention take a
slow path in prefill (7.5 s → 1.7 s at 4096 tokens on llama small with the additive form). Both
rewrites are exact: the repeat is a copy, and ``exp(lowest - max)`` is 0 in float32 as the
boolean mask's exclusion is (a finite fill, so a fully masked padding row stays finite).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgec.graph_passes._infra import EdgecPass, PassResult
from edgec.graph_passes._infra import register_constant as _const

__all__ = ["OpenVINOLegalizePass"]


def _dims(value: ir.Value | None) -> list | None:
    if value is None or value.shape is None or len(value.shape) != 4:
        return None
    return list(value.shape)


class OpenVINOLegalizePass(EdgecPass):
    """Spell out grouped-query K/V and make boolean masks additive (module docstring)."""

    name = "openvino-legalize"
    exact = True
    rtol = 1e-6

    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        stats = {"gqa_kv_repeated": 0, "gqa_skipped": 0, "bool_masks_made_additive": 0}
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
            heads, kv_heads, width = q[1], k[1], q[3]
            if not all(isinstance(d, int) for d in (heads, kv_heads, width)):
                stats["gqa_skipped"] += 1
                continue
            for i in (1, 2):  # K and V
                node.replace_input_with(i, _repeat_heads(graph, node, node.inputs[i],
                                                         heads // kv_heads, heads, width))
            stats["gqa_kv_repeated"] += 1
        return PassResult(model, any(stats[k] for k in ("gqa_kv_repeated",
                                                        "bool_masks_made_additive")), stats)


def _repeat_heads(graph: ir.Graph, node: ir.Node, kv: ir.Value, group: int, heads: int,
                  width: int) -> ir.Value:
    """[B, Hkv, T, D] → [B, Hkv·group, T, D], each KV head repeated for its query group:
    Unsqueeze → Expand → Reshape, transformers' ``repeat_kv``, which OpenVINO's CPU plugin
    recognizes and folds back into its grouped attention over the stateful cache."""
    base = f"{node.name}_{kv.name}_grouped"
    axes = _const(graph, f"{base}_axes", np.array([2], np.int64))
    reps = _const(graph, f"{base}_reps", np.array([1, 1, group, 1, 1], np.int64))
    shape = _const(graph, f"{base}_shape", np.array([0, heads, -1, width], np.int64))
    unsq = ir.node("Unsqueeze", [kv, axes], name=f"{base}_unsqueeze")
    expand = ir.node("Expand", [unsq.outputs[0], reps], name=f"{base}_expand")
    reshape = ir.node("Reshape", [expand.outputs[0], shape], name=f"{base}_reshape")
    for n in (unsq, expand, reshape):
        graph.insert_before(node, n)
    dims = list(kv.shape)
    unsq.outputs[0].name, expand.outputs[0].name = f"{base}_5d", f"{base}_expanded"
    out = reshape.outputs[0]
    out.name, out.type = base, kv.type
    out.shape = ir.Shape([dims[0], heads, dims[2], width])
    return out


def _additive(graph: ir.Graph, node: ir.Node, mask: ir.Value, done: dict[int, ir.Value]
              ) -> ir.Value:
    """``Where(mask, 0, lowest float32)``: the additive form of a boolean attention mask, made
    once per mask (every layer shares it)."""
    if id(mask) in done:
        return done[id(mask)]
    consts = [_const(graph, f"{mask.name}_allowed", np.array(0.0, np.float32)),
              _const(graph, f"{mask.name}_masked",
                     np.array(np.finfo(np.float32).min, np.float32))]
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
