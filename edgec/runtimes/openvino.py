"""OpenVINO backend: Session over a native IR (.xml/.bin) compiled for one device."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edgec.errors import TargetUnavailableError
from edgec.runtimes.base import IOSpec, Session

__all__ = ["OpenVINOSession"]


def _specs(ports) -> list[IOSpec]:
    specs = []
    for p in ports:
        shape = tuple(d.get_length() if d.is_static else p.get_any_name() + f"_{i}"
                      for i, d in enumerate(p.get_partial_shape()))
        dtype = np.dtype(p.get_element_type().to_dtype()).name
        specs.append(IOSpec(p.get_any_name(), shape, dtype))
    return specs


class OpenVINOSession(Session):
    runtime = "openvino"

    def __init__(self, xml_path: str | os.PathLike, device: str = "CPU",
                 config: Mapping[str, Any] | None = None):
        try:
            import openvino as ov
        except ImportError as e:
            raise TargetUnavailableError(f"this artifact needs OpenVINO, which is not installed "
                                         f"({e}); pip install openvino") from None
        core = ov.Core()
        self._compiled = core.compile_model(str(xml_path), device, dict(config or {}))
        super().__init__(_specs(self._compiled.inputs), _specs(self._compiled.outputs))
        self._request = self._compiled.create_infer_request()

    @classmethod
    def from_artifact(cls, root: Path, runtime: Mapping[str, Any]) -> OpenVINOSession:
        return cls(root / runtime["model"], runtime.get("device", "CPU"), runtime.get("config"))

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = self._request.infer(feeds, share_inputs=True)
        return {port.get_any_name(): np.array(results[port], copy=True)
                for port in self._compiled.outputs}
