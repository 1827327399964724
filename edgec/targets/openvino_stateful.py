"""Stateful KV cache for OpenVINO: the cache lives in the runtime, not in the caller's arrays.

What OpenVINO GenAI and optimum-intel expect of a decoder: a ``beam_idx`` input [batch] (i32)
that reorders the cached rows (a Gather in front of every past input, for beam search), then
OpenVINO's own make-stateful transformation, which turns each ``past_key_values.N.*`` input /
``present.N.*`` output pair into a ReadValue/Assign variable. A new sequence starts from an
empty cache: each variable's initial value is zeros of shape [batch, kv_heads, 0, head_dim],
the batch taken from ``input_ids``.
"""

from __future__ import annotations

import re

__all__ = ["kv_pairs", "make_stateful", "BEAM_IDX"]

BEAM_IDX = "beam_idx"
_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")


def kv_pairs(input_names, output_names) -> dict[str, str]:
    """``{past input: present output}`` for a decoder graph with Hugging Face names."""
    outputs = set(output_names)
    pairs = {}
    for name in input_names:
        m = _PAST.match(name)
        if m and f"present.{m[1]}.{m[2]}" in outputs:
            pairs[name] = f"present.{m[1]}.{m[2]}"
    return pairs


def make_stateful(model) -> bool:
    """Make an ``openvino.Model`` decoder stateful in place; False if it has no KV pairs."""
    import numpy as np
    import openvino as ov
    import openvino.opset13 as ops
    from openvino._offline_transformations import apply_make_stateful_transformation

    params = {p.get_friendly_name(): p for p in model.get_parameters()}
    pairs = kv_pairs(params, [o.get_any_name() for o in model.outputs])
    if not pairs:
        return False
    beam = ops.parameter(ov.PartialShape([-1]), ov.Type.i32, name=BEAM_IDX)
    beam.output(0).get_tensor().set_names({BEAM_IDX})
    for name in pairs:
        past = params[name]
        consumers = list(past.output(0).get_target_inputs())
        reordered = ops.gather(past, beam, ops.constant(np.int64(0)))
        for consumer in consumers:
            consumer.replace_source_output(reordered.output(0))
    model.add_parameters([beam])
    apply_make_stateful_transformation(model, pairs)
    _empty_initial_state(model, params["input_ids"], ops)
    model.validate_nodes_and_infer_types()
    return True


def _empty_initial_state(model, input_ids, ops) -> None:
    """Give every ReadValue an initial value of [batch, heads, 0, head_dim] zeros."""
    import numpy as np

    batch = ops.gather(ops.shape_of(input_ids, "i64"), ops.constant(np.array([0], np.int64)),
                       ops.constant(np.int64(0)))
    for op in model.get_ops():
        if op.get_type_name() != "ReadValue":
            continue
        shape = op.get_output_partial_shape(0)
        heads, head_dim = shape[1].get_length(), shape[3].get_length()
        dims = ops.concat([batch, ops.constant(np.array([heads, 0, head_dim], np.int64))], 0)
        zeros = ops.broadcast(ops.constant(np.float32(0)), dims)
        op.set_arguments([zeros.output(0)])
