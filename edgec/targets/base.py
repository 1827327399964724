"""Target: a device described as data (runtime, opsets, shape rules, precision) + its build step."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["Target", "BuildResult"]


@dataclasses.dataclass(frozen=True)
class BuildResult:
    """What a build step produced: the runtime entry of the manifest and the files it wrote."""

    runtime: dict[str, Any]
    files: list[str]
    notes: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class Target:
    """One deployment target.

    Attributes:
        name: CLI name (``openvino-cpu``).
        description: one line for help texts.
        runtime: runtime module under ``edgec.runtimes`` that loads the artifact.
        opset_range: ONNX default-domain opsets the target accepts (inclusive).
        static_shapes: the target needs every dim fixed at build time.
        precision: compute precision of the unquantized artifact (``fp32``).
        runtime_config: settings the runtime must apply (recorded in the manifest).
        notes: op-support and behaviour notes shown by ``edgec compile --help``.
        requires: importable module names the build needs (checked before building).
        build: ``(target, model_path, target_dir) -> BuildResult``; writes the native artifact.
    """

    name: str
    description: str
    runtime: str
    opset_range: tuple[int, int]
    static_shapes: bool
    precision: str
    runtime_config: Mapping[str, Any]
    notes: tuple[str, ...]
    requires: tuple[str, ...]
    build: Callable[[Target, Path, Path], BuildResult]
