"""ONNX file I/O: load a file edgec did not write (refusing anything malformed or unsafe), save.

Guarantees: the path exists and parses as an ONNX ModelProto with a graph; every external-data
location resolves inside the model's own directory (no ``../`` or absolute escapes); errors are
:class:`UserError` with one line saying what was wrong.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx_ir as ir

from edgec.errors import UserError

__all__ = ["load_onnx", "check_external_data", "save_model", "dim_label"]


def dim_label(dim) -> int | str:
    """A graph dim as the manifest, inspect and sessions show it: its size, its name, or ``"?"``
    for a dynamic dim without a name (``str()`` of an unnamed onnx_ir SymbolicDim is ``"None"``,
    which read as a dim name every such input shared: x [None, None] given (3, 5) was refused
    as "inputs 'x' and 'x' share dim 'None'")."""
    if isinstance(dim, int):
        return dim
    value = getattr(dim, "value", dim)
    return "?" if value is None or value == "" else str(value)


def load_onnx(path: str | os.PathLike) -> ir.Model:
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: no such file; give the path of an .onnx model")
    if not p.is_file():
        raise UserError(f"{p}: is not a file; give the path of an .onnx model")
    if p.stat().st_size == 0:
        raise UserError(f"{p}: is empty, not an ONNX model; re-export it")
    try:
        model = ir.load(p)
    except Exception as e:  # noqa: BLE001 — protobuf's DecodeError, RuntimeWarnings, ...: any
        # failure to parse a user's file means it is not a model
        raise UserError(
            f"{p}: is not a valid ONNX model ({type(e).__name__}); the file is truncated or of "
            "another format, re-export it"
        ) from None
    if len(model.graph) == 0 or not model.graph.outputs:
        raise UserError(f"{p}: parses but has no nodes or no outputs; not a usable ONNX model")
    check_external_data(model, p.parent)
    return model


def check_external_data(model: ir.Model, base_dir: Path) -> None:
    """Refuse external tensors whose file lies outside ``base_dir`` (symlinks resolved) or is
    missing: initializers, and tensors in node attributes (a ``Constant``'s ``value``), in
    subgraphs too. ONNX Runtime has its own check; this one names the tensor in one line."""
    root = base_dir.resolve()
    for what, tensor in _all_tensors(model):
        if isinstance(tensor, ir.ExternalTensor):
            target = (root / tensor.location).resolve()
            if not target.is_relative_to(root):
                raise UserError(
                    f"{what} points its external data outside the model's "
                    f"directory ({tensor.location!r}); refusing to follow it"
                )
            if not target.is_file():
                raise UserError(
                    f"{what}: external data file {tensor.location!r} is "
                    f"missing next to the model; copy it into {root}"
                )
            end = tensor.offset or 0
            if end + tensor.nbytes > target.stat().st_size:
                raise UserError(
                    f"{what}: external data file {tensor.location!r} is "
                    "shorter than the model says (truncated?); re-export it"
                )


def _all_tensors(model: ir.Model):
    """``(label, tensor)`` for every initializer and attribute tensor, subgraphs and local
    functions included (a function's Constant was never checked)."""
    def graph_initializers(graph):
        for value in graph.initializers.values():
            yield f"initializer {value.name!r}", value.const_value

    yield from graph_initializers(model.graph)
    functions = [(f" in function {f.name!r}", f) for f in model.functions.values()]
    for where, graph_like in [("", model.graph), *functions]:
        for node in ir.traversal.RecursiveGraphIterator(graph_like):
            for attr in node.attributes.values():
                if attr.type == ir.AttributeType.GRAPH:
                    yield from graph_initializers(attr.value)
                elif attr.type == ir.AttributeType.GRAPHS:
                    for graph in attr.value:
                        yield from graph_initializers(graph)
                elif attr.type in (ir.AttributeType.TENSOR, ir.AttributeType.TENSORS):
                    tensors = [attr.value] if attr.type == ir.AttributeType.TENSOR else attr.value
                    for tensor in tensors:
                        yield (f"attribute {attr.name!r} of {node.op_type} node "
                               f"{node.name or '(unnamed)'!r}{where}"), tensor


def save_model(model: ir.Model, path: Path) -> None:
    """Save with weights over 1 KiB in ``<name>.data`` beside it; ``model`` stays valid.

    Always a new path: onnx-ir invalidates tensors memory-mapped from a file it overwrites.
    """
    ir.save(model, path, external_data=path.name + ".data", size_threshold_bytes=1024)
