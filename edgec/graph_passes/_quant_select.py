"""What the quantization pass quantizes, and at which precision (per target rules).

Two facts about real transformers drive this module:
- attention masks (``Where(keep, 0, finfo.min)``, ``(1 - mask) · finfo.min``), position ids and
  token ids are not activations: quantizing a tensor that holds −3.4e38 destroys every score that
  shares its range. They are found by taint from integer/bool graph inputs and huge constants.
- on a fully quantized target (QNN) every tensor must be quantized, so the sensitive ones (the
  attention-score chain up to and through Softmax, masks, user exclusions) get 16 bits instead.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from edgec.graph_passes.mask_fill import HUGE, _constant

__all__ = ["QuantPlan", "plan_quantization"]

_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Where", "Expand", "Reshape", "Unsqueeze", "Squeeze",
                "Transpose", "Slice", "Concat", "Tile", "Identity", "Min", "Max", "Neg",
                "Cast", "Gather", "GatherND", "GatherElements"}
_SCORE_CHAIN = {"Add", "Sub", "Mul", "Div", "Where", "Reshape", "Transpose", "Identity", "Cast"}


@dataclasses.dataclass
class QuantPlan:
    nodes_to_exclude: list[str]
    tensors_16bit: list[str]
    mask_tensors: list[str]
    reasons: dict[str, str]  # node → why it was excluded


def _is_float(v: ir.Value) -> bool:
    return v.dtype is not None and v.dtype.is_floating_point()


def _mask_taint(model: ir.Model) -> set[str]:
    """Float tensors derived from integer/bool inputs or from huge (mask fill) constants."""
    tainted: set[str] = {v.name for v in model.graph.inputs
                         if v.dtype is not None and not v.dtype.is_floating_point()}
    for node in model.graph:  # topological order: one forward sweep propagates
        ins = [v for v in node.inputs if v is not None]
        seeded = any(v.name in tainted for v in ins)
        huge = any((c := _constant(v)) is not None and np.issubdtype(c.dtype, np.floating)
                   and c.size and np.all(c <= -HUGE) for v in ins)
        if node.op_type == "Gather" and len(ins) == 2 and ins[0].name not in tainted:
            seeded = False  # an embedding lookup: integer indices, float table → real activation
        if (seeded or huge) and (node.op_type in _ELEMENTWISE or not any(map(_is_float, ins))):
            tainted.update(o.name for o in node.outputs)
    return {n for n in tainted if n not in {v.name for v in model.graph.inputs}}


def _score_chain(model: ir.Model) -> set[str]:
    """Tensors from an attention-score MatMul through Softmax (its input chain and output)."""
    out: set[str] = set()
    for node in model.graph:
        if node.op_type != "Softmax":
            continue
        out.update(o.name for o in node.outputs)
        stack = [node.inputs[0]]
        while stack:
            v = stack.pop()
            if v is None or v.name in out or not _is_float(v):
                continue
            out.add(v.name)
            prod = v.producer()
            if prod is not None and prod.op_type in _SCORE_CHAIN:
                stack.extend(prod.inputs)
    return out


def plan_quantization(model: ir.Model, rules: str, exclude: tuple[str, ...] = ()) -> QuantPlan:
    """Decide exclusions (``rules="ort"``) or 16-bit tensors (``rules="qnn"``)."""
    mask = _mask_taint(model)
    wanted = set(exclude)
    excluded, reasons, sixteen = [], {}, set()
    for node in model.graph:
        float_ins = [v for v in node.inputs if v is not None and _is_float(v)]
        user = node.name in wanted or node.op_type in wanted
        touches_mask = any(v.name in mask for v in float_ins)
        if rules == "qnn":
            if user:
                sixteen.update(v.name for v in (*float_ins, *node.outputs) if _is_float(v)
                               and v.const_value is None)
            continue
        if user:
            excluded.append(node.name)
            reasons[node.name] = "excluded by the user"
        elif touches_mask:
            excluded.append(node.name)
            reasons[node.name] = "reads an attention mask / integer-derived tensor"
    if rules == "qnn":
        floats = {o.name for n in model.graph for o in n.outputs if _is_float(o)}
        sixteen |= (mask & floats) | _score_chain(model)
    return QuantPlan(excluded, sorted(sixteen), sorted(mask), reasons)
