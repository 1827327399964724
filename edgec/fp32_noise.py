"""How far float32 itself carries a graph from its exact result on one input: the same graph in
float64, run by ONNX Runtime, against its float32 run.

An fp32 artifact is held to ``fidelity.TARGET_RTOL`` (1e-5) of its source, which the reference
models and ordinary inputs meet with a margin of 10×. Some inputs of trained models do not: on
SmolLM2-135M (30 layers) fed repeated special tokens (ids 0 and 1, what edgec's own example for
an .onnx decoder holds) the residual stream reaches 25,000 and rounding is amplified layer after
layer; measured against float64 the logits of PyTorch fp32 were 9.6e-6 off, ONNX Runtime's 2.1e-5
and OpenVINO's 5.1e-5: two correct fp32 runtimes 7.1e-5 apart. ``fp32_noise`` measures that
floor on the graph the target runs, so the check can tell it from a wrong graph (a rewrite that
changed the arithmetic moves the float32 and float64 runs alike and leaves the floor small).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

import numpy as np
import onnx
import onnx_ir as ir

__all__ = ["NOISE_MULTIPLE", "as_float64", "fp32_noise", "exact_tolerance", "noise_note",
           "assert_exact"]

logger = logging.getLogger(__name__)

# How many times the graph's own float32 error (against float64) two fp32 runs of it may differ
# by: each carries its own rounding, and OpenVINO's was 2.5x ONNX Runtime's on SmolLM2 above.
NOISE_MULTIPLE = 4.0
# ONNX Runtime's refusals of a float64 node: no kernel, or a type its schema lacks
_NO_KERNEL = re.compile(r"implementation for (\w+)\(\d+\)|of operator \((\w+)\)")
_RETRIES = 8
_F32, _F64 = ir.DataType.FLOAT, ir.DataType.DOUBLE
# attributes naming an output element type (Cast, EyeLike, Random*, Multinomial, ...)
_DTYPE_ATTRS = ("to", "dtype")


def as_float64(model: ir.Model, float32_ops: frozenset[str] = frozenset()) -> ir.Model:
    """A copy of ``model`` computing in float64 wherever it computed in float32: initializers,
    inputs, outputs, Casts and constants; float16/bfloat16 parts stay as they are. An op whose
    schema has no float64 (RotaryEmbedding) computes in float32 between Casts: its own rounding
    then counts in both runs, so the floor measured is, if anything, low; so do the op types in
    ``float32_ops`` (those ONNX Runtime has no float64 kernel for: Resize)."""
    from onnx_ir.passes.common import ShapeInferencePass

    # every value typed (an exporter leaves most intermediates untyped): a Cos feeding a
    # RotaryEmbedding must be known to be float before it is known to turn float64
    model = ShapeInferencePass(strict_mode=False)(model.clone()).model
    opset = model.opset_imports.get("", 0)
    graphs = [model.graph, *(n.attributes[a].value for n in ir.traversal.RecursiveGraphIterator(
        model.graph) for a in n.attributes if n.attributes[a].type == ir.AttributeType.GRAPH)]
    for graph in graphs:
        for value in [*graph.inputs, *graph.initializers.values(), *graph.outputs]:
            _retype(value)
        for node in graph:
            for value in node.outputs:
                _retype(value)
            _retype_attributes(node)
        for node in list(graph):
            if node.op_type in float32_ops or _needs_float32(node, opset):
                _in_float32(graph, node)
    return model


def _needs_float32(node: ir.Node, opset: int) -> bool:
    """Whether ``node`` must compute in float32: a float64 input where its schema's type
    parameter has no float64 (RotaryEmbedding's T), or an op of another domain (contrib ops).
    Kernels ONNX Runtime lacks although the schema allows them (Resize) are found by running
    (``fp32_noise``)."""
    wide = [i for i, v in enumerate(node.inputs) if v is not None and v.dtype == _F64]
    if not wide:
        return False
    if node.domain not in ("", "ai.onnx"):
        return True
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, "")
    except onnx.defs.SchemaError:
        return True
    allowed = {t.type_param_str: t.allowed_type_strs for t in schema.type_constraints}
    for i in wide:  # variadic: the last formal repeats
        param = schema.inputs[min(i, len(schema.inputs) - 1)].type_str if schema.inputs else ""
        if param in allowed and "tensor(double)" not in allowed[param]:
            return True
    return False


def _in_float32(graph: ir.Graph, node: ir.Node) -> None:
    """Run ``node`` in float32: Casts down on its float64 inputs, up on its float64 outputs
    (the up-cast takes each output's name, so graph outputs keep theirs)."""
    for i, value in enumerate(node.inputs):
        if value is not None and value.dtype == _F64:
            down = ir.node("Cast", [value], attributes={"to": _F32})
            down.outputs[0].type = ir.TensorType(_F32)
            graph.insert_before(node, down)
            node.replace_input_with(i, down.outputs[0])
    for value in node.outputs:
        if value.dtype == _F64:
            name, value.name = value.name, f"{value.name}__f32"
            value.type = ir.TensorType(_F32)
            up = ir.node("Cast", [value], attributes={"to": _F64})
            up.outputs[0].type = ir.TensorType(_F64)
            value.replace_all_uses_with(up.outputs[0], replace_graph_outputs=True)
            up.replace_input_with(0, value)  # the line above rerouted the Cast's own input
            up.outputs[0].name = name
            graph.insert_after(node, up)


def _retype(value: ir.Value) -> None:
    if value.dtype == _F32:
        value.type = ir.TensorType(_F64)
    tensor = value.const_value
    if tensor is not None and tensor.dtype == _F32:
        value.const_value = ir.tensor(tensor.numpy().astype(np.float64), name=tensor.name)


def _retype_attributes(node: ir.Node) -> None:
    if (node.op_type == "ConstantOfShape" and "value" not in node.attributes
            and node.outputs[0].dtype == _F64):  # float32 zeros by default
        node.attributes["value"] = ir.AttrTensor("value", ir.tensor(np.zeros(1, np.float64)))
    for name, attr in list(node.attributes.items()):
        if name in _DTYPE_ATTRS and attr.type == ir.AttributeType.INT and attr.value == _F32:
            node.attributes[name] = ir.AttrInt64(name, _F64)
        elif attr.type == ir.AttributeType.TENSOR and attr.value.dtype == _F32:
            node.attributes[name] = ir.AttrTensor(name, ir.tensor(
                attr.value.numpy().astype(np.float64), name=attr.value.name))
        elif name == "value_float" and node.op_type == "Constant":
            del node.attributes[name]
            node.attributes["value"] = ir.AttrTensor("value", ir.tensor(np.float64(attr.value)))
        elif name == "value_floats" and node.op_type == "Constant":
            del node.attributes[name]
            node.attributes["value"] = ir.AttrTensor(
                "value", ir.tensor(np.asarray(attr.value, np.float64)))


def fp32_noise(model: ir.Model, feeds: Mapping[str, np.ndarray]) -> dict[str, float] | None:
    """Per float output: max relative error (as ``verify.compare_outputs`` computes it) of the
    graph run in float32 against the same graph in float64, both by ONNX Runtime without graph
    optimizations. None where ONNX Runtime has no float64 kernel for one of its ops (the
    measurement is then not available, and nothing is widened)."""
    from edgec.exporters.verify import compare_outputs
    from edgec.runtimes.ort import model_feeds, run_model

    feeds = model_feeds(model, feeds)  # a swappable graph's adapter inputs bound too
    wide = {k: v.astype(np.float64) if v.dtype == np.float32 else v for k, v in feeds.items()}
    try:
        f32 = run_model(model, feeds)
    except Exception:  # noqa: BLE001 — the comparison that asked has its own run
        return None
    narrow: frozenset[str] = frozenset()
    for _ in range(_RETRIES):  # ONNX Runtime names one op without a float64 kernel at a time
        try:
            f64 = run_model(as_float64(model, narrow), wide)
            break
        except Exception as e:  # noqa: BLE001 — a missing float64 kernel: try without it
            found = _NO_KERNEL.search(str(e))
            op = found and (found[1] or found[2])
            ops = _culprits(model, op, narrow) if op else set()
            if not ops:
                logger.info("fp32 noise not measured: %s", str(e).splitlines()[0])
                return None
            narrow |= ops
    else:
        return None
    floats = {k for k, v in f32.items() if v.dtype == np.float32}
    errors = compare_outputs({k: f32[k] for k in floats}, {k: f64[k] for k in floats})
    return {k: e["max_rel"] for k, e in errors.items()}


def _culprits(model: ir.Model, op: str, narrow: frozenset[str]) -> set[str]:
    """The op types to run in float32 after ONNX Runtime refused ``op`` in float64: ``op``
    itself, or where the graph has none, the op ONNX Runtime expanded into it (a function op
    without a float64 kernel: Gelu into Erf), tried one per refusal. Empty: nothing left."""
    ops = {n.op_type for n in ir.traversal.RecursiveGraphIterator(model.graph)}
    if op in ops:
        return set() if op in narrow else {op}
    opset = model.opset_imports.get("", 0)
    later = []
    for candidate in sorted(ops - narrow):
        try:
            schema = onnx.defs.get_schema(candidate, opset, "")
        except onnx.defs.SchemaError:
            continue
        if schema.has_function and op in {n.op_type for n in schema.function_body.node}:
            return {candidate}
        if schema.has_context_dependent_function:  # its body depends on the node: maybe
            later.append(candidate)
    return set(later[:1])


def exact_tolerance(errors: Mapping[str, Mapping[str, float]], model: ir.Model,
                    feeds: Mapping[str, np.ndarray], rtol: float
                    ) -> tuple[float, dict[str, object] | None]:
    """The tolerance an exact (fp32) comparison is held to on ``feeds``: ``rtol``, or where an
    output is past it, ``NOISE_MULTIPLE`` times the float32 error ``model`` itself makes on
    them (``fp32_noise``) when that is larger. Returns (tolerance, record), the record None
    where nothing was measured: {"outputs": per-output fp32 error against float64,
    "multiple", "rtol": the tolerance, "widened": whether it is past ``rtol``}."""
    if all(e["max_rel"] <= rtol for e in errors.values()):
        return rtol, None
    noise = fp32_noise(model, feeds)
    if not noise:
        return rtol, None
    tolerance = max(rtol, NOISE_MULTIPLE * max(noise.values()))
    return tolerance, {"outputs": noise, "multiple": NOISE_MULTIPLE, "rtol": tolerance,
                       "widened": tolerance > rtol}


def noise_note(record: Mapping[str, object] | None) -> str:
    """What a failed exact comparison adds: the measured floor, and whether it explains the
    difference (it did not, if the comparison failed at the widened tolerance too)."""
    if not record:
        return ""
    worst = max(record["outputs"].values())
    if record["widened"]:
        return (f" (this graph in float32 is {worst:.2g} from its float64 result on these "
                f"inputs; the tolerance is {record['multiple']:g}x that)")
    return (f" (this graph in float32 is {worst:.2g} from its float64 result on these inputs: "
            "the difference is not float32 rounding)")


def assert_exact(errors: Mapping[str, Mapping[str, float]], model: ir.Model,
                 feeds: Mapping[str, np.ndarray], rtol: float, what: str
                 ) -> tuple[float, dict[str, object] | None]:
    """``verify.assert_close`` at ``exact_tolerance``'s tolerance; a failure ends with what the
    float64 run said (``noise_note``). Returns (tolerance, record) as ``exact_tolerance``."""
    from edgec.errors import VerificationError
    from edgec.exporters.verify import assert_close

    tolerance, record = exact_tolerance(errors, model, feeds, rtol)
    try:
        assert_close(errors, tolerance, what)
    except VerificationError as e:
        raise VerificationError(f"{e}{noise_note(record)}") from None
    return tolerance, record
