"""Export a source to one .onnx (+ .onnx.data) file, atomically, with its parameter map inside.

The parameter map is stored as model metadata ``edgec.parameter_map`` (JSON), so an .onnx
written by edgec still tells later passes (LoRA, rotations) which initializer is which weight;
a diffusion model's sampler as ``edgec.sampling`` (JSON, the manifest's ``sampling`` entry), so
an artifact compiled from the .onnx still samples.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from edgec.errors import UserError

__all__ = ["PARAMETER_MAP_KEY", "SAMPLING_KEY", "export_to_file", "stored_parameter_map",
           "store_sampling", "stored_sampling", "store_example_dims", "stored_example_dims"]

PARAMETER_MAP_KEY = "edgec.parameter_map"
SAMPLING_KEY = "edgec.sampling"
EXAMPLE_DIMS_KEY = "edgec.example_dims"


def export_to_file(source: Any, path: str | os.PathLike, config: str | None = None,
                   example_inputs: Sequence[Any] | None = None,
                   dynamic_shapes: Mapping[str, Mapping[int, str]] | None = None) -> dict:
    """Export, verify against PyTorch, write ``path``; returns the export fidelity."""
    from edgec.exporters.sources import resolve_source
    from edgec.onnx_io import save_model

    path = Path(path)
    if path.suffix != ".onnx":
        raise UserError(f"{path}: the output must end in .onnx")
    if path.is_dir():
        raise UserError(f"{path}: is a directory; give a file path ending in .onnx")
    src = resolve_source(source, config, example_inputs, dynamic_shapes)
    if src.kind == "onnx":
        raise UserError("export takes a model name or an nn.Module; an .onnx file is already "
                        "exported (use `edgec compile` on it)")
    src.model.metadata_props[PARAMETER_MAP_KEY] = json.dumps(src.parameter_map)
    store_sampling(src.model, src.info)
    store_example_dims(src.model, src.feeds)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".edgec-export-", dir=path.parent) as tmp:
        staged = Path(tmp) / path.name
        save_model(src.model, staged)
        data = staged.with_name(staged.name + ".data")
        if data.exists():
            os.replace(data, path.with_name(path.name + ".data"))
        os.replace(staged, path)
    return src.export_fidelity


_LAYOUTS = ("same", "transposed")


def stored_parameter_map(model) -> dict[str, dict[str, str]]:
    """The parameter map ``export_to_file`` stored in ``model``; ``{}`` if edgec did not write it.

    A present but unreadable map is an error, not "no map": passes that need it (LoRA, pruning)
    would otherwise silently find no weights.
    """
    raw = model.metadata_props.get(PARAMETER_MAP_KEY)
    if raw is None:
        return {}
    try:
        pmap = json.loads(raw)
    except ValueError as e:
        raise UserError(f"the model's {PARAMETER_MAP_KEY} metadata is not valid JSON ({e}); "
                        "re-export the model with `edgec export`") from None
    problem = _parameter_map_problem(pmap)
    if problem:
        raise UserError(f"the model's {PARAMETER_MAP_KEY} metadata is malformed ({problem}); "
                        "re-export the model with `edgec export`")
    return pmap


def _parameter_map_problem(pmap: Any) -> str | None:
    """What is wrong with a decoded map (the shape ``build_parameter_map`` writes), or None."""
    if not isinstance(pmap, dict):
        return f"expected an object of parameters, got {type(pmap).__name__}"
    for param, entry in pmap.items():
        if not isinstance(entry, dict):
            return f"entry {param!r} is {type(entry).__name__}, not an object"
        if not isinstance(entry.get("initializer"), str):
            return f"entry {param!r} has no \"initializer\" name"
        if entry.get("layout") not in _LAYOUTS:
            return f"entry {param!r} has layout {entry.get('layout')!r}, not one of {_LAYOUTS}"
    return None


def store_sampling(model, info: Mapping[str, Any]) -> None:
    """Keep the source's sampler (``info["sampling"]``, a diffusion model's) in ``model``."""
    if info.get("sampling"):
        model.metadata_props[SAMPLING_KEY] = json.dumps(info["sampling"])


def stored_sampling(model, inputs: Sequence[str], outputs: Sequence[str]) -> dict | None:
    """The sampler ``store_sampling`` kept in ``model`` (None if none), checked as the sampler
    reads a manifest's entry and against the graph's input and output names: a malformed one
    is refused here, not at the artifact's first ``sample``."""
    raw = model.metadata_props.get(SAMPLING_KEY)
    if raw is None:
        return None
    try:
        entry = json.loads(raw)
    except ValueError as e:
        raise UserError(f"the model's {SAMPLING_KEY} metadata is not valid JSON ({e}); "
                        "re-export the model with `edgec export`") from None
    problem = _sampling_problem(entry, set(inputs), set(outputs))
    if problem:
        raise UserError(f"the model's {SAMPLING_KEY} metadata is malformed ({problem}); "
                        "re-export the model with `edgec export`")
    return entry


def _sampling_problem(entry: Any, inputs: set[str], outputs: set[str]) -> str | None:
    from edgec.runtimes.sampling import SamplerSpec

    if not isinstance(entry, dict) or not entry:
        return "expected a non-empty object"
    try:
        spec = SamplerSpec.from_manifest({"sampling": entry})
    except UserError as e:
        return str(e)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        return f"{type(e).__name__}: {e}"
    names = [(n, inputs, "input") for n in (*spec.samples, spec.timestep, *spec.conditions)]
    names += [(o, outputs, "output") for o in spec.samples.values()]
    wrong = next(((n, what) for n, known, what in names if n not in known), None)
    return f"{wrong[0]!r} is not a graph {wrong[1]}" if wrong else None


def store_example_dims(model, feeds: Mapping[str, Any]) -> None:
    """Keep the size each named dynamic dim had in the example inputs: compiled from the .onnx,
    the example is made at those sizes, not at 1 (video-dit came out 1×4×1×2×2, and TensorRT's
    optimization profile, whose max is the example size, would take nothing larger)."""
    dims: dict[str, int] = {}
    for value in model.graph.inputs:
        feed = feeds.get(value.name)
        if feed is None or value.shape is None or len(value.shape) != len(feed.shape):
            continue
        for dim, size in zip(value.shape.dims, feed.shape):
            name = getattr(dim, "value", None)
            if isinstance(name, str) and name:
                dims.setdefault(name, int(size))
    if dims:
        model.metadata_props[EXAMPLE_DIMS_KEY] = json.dumps(dims)


def stored_example_dims(model) -> dict[str, int]:
    """What ``store_example_dims`` kept (``{}`` if none or malformed: the sizes are a
    convenience, the dims' ranges are checked separately)."""
    try:
        dims = json.loads(model.metadata_props.get(EXAMPLE_DIMS_KEY) or "{}")
    except ValueError:
        return {}
    if not isinstance(dims, dict):
        return {}
    return {k: v for k, v in dims.items()
            if isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 1}
