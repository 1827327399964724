"""Deployment targets: one module per device, each a ``Target`` (data) plus a small build step."""

from __future__ import annotations

import importlib.util

from edgec.errors import TargetUnavailableError, UserError
from edgec.targets.base import BuildResult, Target
from edgec.targets.openvino_cpu import OPENVINO_CPU
from edgec.targets.ort_cpu import ORT_CPU
from edgec.targets.qnn_htp import QNN_HTP
from edgec.targets.tensorrt import TENSORRT

__all__ = ["Target", "BuildResult", "TARGETS", "get"]

TARGETS: dict[str, Target] = {t.name: t for t in (ORT_CPU, OPENVINO_CPU, QNN_HTP, TENSORRT)}


def get(name: str) -> Target:
    """The target called ``name``; raises UserError naming the known targets."""
    if name not in TARGETS:
        raise UserError(f"unknown target {name!r}; choose one of: {', '.join(TARGETS)}")
    target = TARGETS[name]
    for module in target.requires:
        if importlib.util.find_spec(module) is None:
            raise TargetUnavailableError(
                f"target {name!r} needs the Python package {module!r}, which is not installed")
    return target
