"""OpenVINO's CPU plugin holds int64 tensors in 32 bits: what that makes wrong, found in the graph.

Measured with OpenVINO 2026.4 (no CPU property keeps i64: not ``INFERENCE_PRECISION_HINT``,
not ``EXECUTION_MODE_HINT=ACCURACY``; the plugin lists no such option): an int64 input of
2**40 + 7 passed straight to an output came back as 7, ``x * 3 + 1`` wrapped at 2**31 and
``(f * 1e6).long()`` of 5000.0 gave -2**31, each reported as int64 with exit 0. Only a Cast
of the input to a float type reads the whole value (then rounded to float32).

Two consequences, recorded in the manifest's runtime entry (``int64_in_32_bits``):

- ``inputs``: the int64 inputs whose values the graph holds as integers (any use but a Cast to
  float); every run refuses a feed of such an input outside the int32 range.
- ``outputs``: the int64 outputs computed by arithmetic from the inputs' values (``x * 3``,
  ``cumsum``, a float cast to int64), not from shapes: they wrap (or saturate) once a value
  leaves the int32 range, which no feed check can rule out; the build warns naming them, once
  per built model file (``warned_before``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["int64_in_32_bits", "check_int64_feeds", "warned_before"]

# ops whose integer result may leave the range of their operands (int32 wraps there)
_GROWS = {"Add", "Sub", "Mul", "Pow", "Sum", "CumSum", "ReduceSum", "ReduceProd",
          "ReduceSumSquare", "ReduceL1", "MatMul", "MatMulInteger", "Gemm", "Einsum",
          "BitShift", "Neg", "Abs"}
# (op, input index): inputs that say where or how much, not values carried into the output
_NOT_CARRIED = {("Gather", 1), ("GatherElements", 1), ("GatherND", 1), ("Reshape", 1),
                ("Expand", 1), ("Tile", 1), ("Unsqueeze", 1), ("Squeeze", 1), ("Pad", 1),
                ("TopK", 1), ("OneHot", 1), ("ScatterND", 1), ("ScatterElements", 1),
                ("Resize", 1), ("Resize", 2), ("Resize", 3), ("Where", 0)}
_NOT_CARRIED |= {("Slice", i) for i in range(1, 5)}
_WIDE = {7, 13}  # INT64, UINT64
_FLOATS = {1, 10, 11, 16}  # FLOAT, FLOAT16, DOUBLE, BFLOAT16
_SIZES = {"Shape", "Size"}  # values of sizes, not of the inputs

_warned: set[Path] = set()  # built model files whose wrapping outputs were warned of


def warned_before(model_file: str | os.PathLike) -> bool:
    """Whether this process warned of ``model_file``'s wrapping int64 outputs already (and
    record that it has now): its build warns, so the sessions the same compile opens on it
    (verification, companions) do not repeat it (one compile printed it 3 times). A later
    load of the finished artifact, at its own path, warns again."""
    path = Path(model_file).resolve()
    if path in _warned:
        return True
    _warned.add(path)
    return False


def int64_in_32_bits(model) -> dict[str, list[str]]:
    """``{"inputs": [...], "outputs": [...]}`` of the ONNX ModelProto (module docstring);
    empty lists where the graph has neither."""
    import onnx

    try:
        model = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 (types from value_info only: fewer ops recognized)
        pass
    graph = model.graph
    types: dict[str, int] = {}
    for v in (*graph.input, *graph.value_info, *graph.output):
        if v.type.HasField("tensor_type"):
            types[v.name] = v.type.tensor_type.elem_type
    for t in graph.initializer:
        types[t.name] = t.data_type
    inputs = [v.name for v in graph.input if types.get(v.name) in _WIDE]
    # data: values that depend on an input's values; wide: int64 values that arithmetic on
    # them may have pushed past int32, and what carries those on
    data = {v.name for v in graph.input}
    wide: set[str] = set()
    # inputs used other than by a Cast to float (an input that is an output is held too)
    held = {v.name for v in graph.output}
    for node in graph.node:
        for name in node.input:
            if name in inputs and not (node.op_type == "Cast"
                                       and _attr(node, "to") in _FLOATS):
                held.add(name)
        if node.op_type in _SIZES:
            continue
        ins = [(i, n) for i, n in enumerate(node.input) if n]
        from_data = any(n in data for _, n in ins)
        carried = any(n in wide for i, n in ins if (node.op_type, i) not in _NOT_CARRIED)
        for out in node.output:
            if not out:
                continue
            if from_data:
                data.add(out)
            if types.get(out) not in _WIDE:
                continue
            grows = from_data and (node.op_type in _GROWS or (
                node.op_type in ("Cast", "CastLike")
                and types.get(node.input[0]) in _FLOATS))
            if grows or carried:
                wide.add(out)
    return {"inputs": [n for n in inputs if n in held],
            "outputs": [v.name for v in graph.output if v.name in wide]}


def _attr(node, name: str) -> Any:
    return next((a.i for a in node.attribute if a.name == name), None)


def check_int64_feeds(feeds, names, runtime: str = "openvino-cpu") -> None:
    """Refuse a feed of ``names`` (int64 inputs the runtime holds in 32 bits) outside int32."""
    import numpy as np

    from edgec.errors import UserError

    info = np.iinfo(np.int32)
    for name in names:
        arr = feeds.get(name)
        if arr is None or not np.size(arr) or not np.issubdtype(np.asarray(arr).dtype,
                                                                np.integer):
            continue
        lo, hi = int(np.min(arr)), int(np.max(arr))
        if lo < info.min or hi > info.max:
            raise UserError(f"input {name!r} holds {lo if lo < info.min else hi}, outside int32 "
                            f"[{info.min}, {info.max}]: {runtime} holds int64 values in 32 bits "
                            "and would wrap it; pass values in that range (or use ort-cpu)")
