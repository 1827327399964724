"""A quantized graph with some of its quantized ops reading float again: the mixed-precision
search's probes on targets where high precision means float (the CPU targets, TensorRT).

Keeping node N in float, as ``quantize_static(nodes_to_exclude=[N])`` would, changes N's inputs
only: its activations are read before their QuantizeLinear, its weights are the fp32 model's.
Every other quantizer stays as it was, with the same calibrated ranges (a tensor N shares with
quantized readers keeps its Q/DQ pair for them), so the probe computes what the rebuilt graph
computes. A probe is then a graph edit, not a quantization: on a 30-layer decoder
``quantize_static`` takes most of a probe, computing every weight's per-channel scales again in
Python. The search's final choice is still built by ``quantize_static`` and measured again.
"""

from __future__ import annotations

from collections.abc import Iterable

import onnx_ir as ir

__all__ = ["keep_float"]


def keep_float(quantized: ir.Model, fp32: ir.Model, names: Iterable[str]) -> ir.Model:
    """A copy of ``quantized`` in which each node named in ``names`` reads the values its
    counterpart in ``fp32`` reads (same node name, as the ORT quantizer keeps them): activations
    by name, constants as initializers of their own. Raises ``LookupError`` where a node or an
    activation has no counterpart (the caller rebuilds instead)."""
    names = set(names)
    if not names:
        return quantized
    probe = quantized.clone()
    graph = probe.graph
    nodes = {n.name: n for n in graph if n.name in names}
    sources = {n.name: n for n in fp32.graph if n.name in names}
    values = {v.name: v for n in graph for v in n.outputs}
    values.update({v.name: v for v in graph.inputs})
    taken = set(values) | set(graph.initializers)
    replaced: list[ir.Value] = []
    for name in names:
        node, source = nodes.get(name), sources.get(name)
        if node is None or source is None or len(node.inputs) != len(source.inputs):
            raise LookupError(f"node {name!r} is not in both graphs")
        for i, original in enumerate(source.inputs):
            if original is None or node.inputs[i] is None:
                continue
            replaced.append(node.inputs[i])
            if original.const_value is not None:
                node.replace_input_with(i, _initializer(graph, original, taken))
            elif original.name in values:
                node.replace_input_with(i, _unquantized(graph, values, original, taken))
            else:
                raise LookupError(f"activation {original.name!r} of {name!r} is not in the "
                                  "quantized graph")
    graph.sort()
    _prune(graph, replaced)
    return probe


_LAYOUT_OPS = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten"})


def _unquantized(graph: ir.Graph, values: dict[str, ir.Value], original: ir.Value,
                 taken: set[str]) -> ir.Value:
    """The value computing fp32's ``original`` in ``graph`` without the quantizer in front of
    it: the same-named value, unless it comes out of layout ops that read a DequantizeLinear
    (openvino-cpu moves its Q/DQ pairs above the head reshapes: ``x → Q → DQ → Reshape →
    Transpose → MatMul``); then those layout ops are copied over the float input."""
    here = values[original.name]
    made, source = here.producer(), original.producer()
    if (made is None or source is None or made.op_type not in _LAYOUT_OPS
            or source.op_type != made.op_type or not source.inputs
            or source.inputs[0] is None or source.inputs[0].name not in values):
        return here
    inner = _unquantized(graph, values, source.inputs[0], taken)
    if made.inputs[0] is inner:
        return here
    name = f"{here.name}_float"
    while name in taken:
        name += "_"
    taken.add(name)
    copy = ir.Node(made.domain, made.op_type, [inner, *made.inputs[1:]],
                   attributes=list(made.attributes.values()), name=f"{made.name}_float")
    copy.outputs[0].name = name
    graph.append(copy)
    return copy.outputs[0]


def _initializer(graph: ir.Graph, original: ir.Value, taken: set[str]) -> ir.Value:
    """The fp32 constant as an initializer of ``graph`` (a fresh name where it is taken)."""
    name = original.name or "edgec_float_weight"
    existing = graph.initializers.get(name)
    if existing is not None and existing.const_value is original.const_value:
        return existing
    while name in taken:
        name += "_float"
    taken.add(name)
    value = ir.Value(name=name, type=original.type, shape=original.shape,
                     const_value=original.const_value)
    graph.register_initializer(value)
    return value


def _prune(graph: ir.Graph, replaced: list[ir.Value]) -> None:
    """Drop what only the float nodes read before: their Q/DQ pairs (and layout ops between),
    the quantized weights and their scales."""
    outputs = {id(v) for v in graph.outputs}
    todo = list(replaced)
    while todo:
        value = todo.pop()
        if value.uses() or id(value) in outputs:
            continue
        node = value.producer()
        if node is not None and node.graph is not graph:  # removed already
            continue
        if node is None:
            if value.name in graph.initializers and value.const_value is not None:
                graph.initializers.pop(value.name)
            continue
        if all(not v.uses() and id(v) not in outputs for v in node.outputs):
            inputs = [v for v in node.inputs if v is not None]
            graph.remove(node, safe=True)
            todo.extend(inputs)
