"""Export a source to one .onnx (+ .onnx.data) file, atomically, with its parameter map inside.

The parameter map is stored as model metadata ``edgec.parameter_map`` (JSON), so an .onnx
written by edgec still tells later passes (LoRA, rotations) which initializer is which weight.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from edgec.errors import UserError

__all__ = ["export_to_file", "stored_parameter_map", "PARAMETER_MAP_KEY"]

PARAMETER_MAP_KEY = "edgec.parameter_map"


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
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".edgec-export-", dir=path.parent) as tmp:
        staged = Path(tmp) / path.name
        save_model(src.model, staged)
        data = staged.with_name(staged.name + ".data")
        if data.exists():
            os.replace(data, path.with_name(path.name + ".data"))
        os.replace(staged, path)
    return src.export_fidelity


def stored_parameter_map(model) -> dict[str, dict[str, str]]:
    raw = model.metadata_props.get(PARAMETER_MAP_KEY)
    try:
        return json.loads(raw) if raw else {}
    except ValueError:
        return {}
