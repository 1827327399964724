"""ONNX Runtime backend: Session over an .onnx file, and a one-shot runner for in-memory IR."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument, RuntimeException

from edgec.lora.binding import lora_sites, site_feeds
from edgec.onnx_io import save_model
from edgec.runtimes.base import IOSpec, Session

__all__ = ["OrtSession", "LEAN", "exact_qdq", "run_model", "open_model", "model_feeds",
           "ort_io_specs"]

_ORT_TYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8",
    "tensor(uint8)": "uint8", "tensor(bool)": "bool", "tensor(int16)": "int16",
    "tensor(uint16)": "uint16",
}


def ort_io_specs(args) -> list[IOSpec]:
    return [IOSpec(a.name, tuple(d if isinstance(d, int) else (d or "?") for d in a.shape),
                   _ORT_TYPES.get(a.type, a.type)) for a in args]


def session_options(optimize: bool = True, config: Mapping[str, Any] | None = None
                    ) -> ort.SessionOptions:
    """ORT session options; ``config`` is a target's ``runtime_config`` (manifest ``config``):
    ``graph_optimization_level`` (an ``ORT_*`` name), ``intra_op_num_threads``,
    ``inter_op_num_threads``, ``execution_order`` (``PRIORITY_BASED``...),
    ``enable_mem_pattern``, ``enable_cpu_mem_arena``, and ``session.*`` config entries (e.g.
    spinning)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                     else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    opts.log_severity_level = 3
    for key, value in (config or {}).items():
        if key == "graph_optimization_level":
            if optimize:  # an unoptimized (reference) session stays unoptimized
                opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, value)
        elif key in ("intra_op_num_threads", "inter_op_num_threads"):
            setattr(opts, key, int(value))
        elif key == "execution_order":  # an ExecutionOrder name
            opts.execution_order = getattr(ort.ExecutionOrder, value)
        elif key in ("enable_mem_pattern", "enable_cpu_mem_arena"):
            setattr(opts, key, bool(value))
        elif key.startswith("session."):
            opts.add_session_config_entry(key, str(value))
    return opts


_QUIET = ort.RunOptions()
_QUIET.log_severity_level = 4  # a failing run raises; its red ERROR log line said it again


class OrtSession(Session):
    runtime = "onnxruntime"
    # ORT's pybind errors derive from Exception alone (they were internal errors)
    input_errors = (*Session.input_errors, Fail, InvalidArgument, RuntimeException)

    def __init__(self, path: str | os.PathLike, providers: list[str] | None = None,
                 optimize: bool = True, provider_options: list[dict[str, Any]] | None = None,
                 config: Mapping[str, Any] | None = None):
        self._sess = ort.InferenceSession(
            str(path), sess_options=session_options(optimize, config),
            providers=providers or ["CPUExecutionProvider"], provider_options=provider_options)
        super().__init__(ort_io_specs(self._sess.get_inputs()),
                         ort_io_specs(self._sess.get_outputs()))
        self._output_names = [o.name for o in self._outputs]

    @classmethod
    def from_artifact(cls, root: Path, runtime: Mapping[str, Any]) -> OrtSession:
        return cls(root / runtime["model"], providers=runtime.get("providers"),
                   config=runtime.get("config"))

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self._output_names,
                        self._sess.run(self._output_names, feeds, _QUIET)))


# Session settings for runs that measure rather than serve (calibration, the accuracy floor's
# samples, sensitivity): in priority order each node runs as soon as its inputs exist and
# tensors are freed as soon as possible (ORT's default order computed statistics after the rest
# of the graph, keeping every tensor alive), without the memory pattern (which from the second
# run on preallocated twice the need) and without the CPU arena, which keeps each session's
# peak until the session closes (sensitivity holds two sessions open; histogram calibration's
# first run per group grew 7 GB past the others with it). video-dit small fp32, unoptimized:
# 10.1 → 4.9 GB peak.
LEAN = {"execution_order": "PRIORITY_BASED", "enable_mem_pattern": False,
        "enable_cpu_mem_arena": False}


def exact_qdq(model: ir.Model | None = None) -> dict[str, str]:
    """Session config for a run that measures a QDQ graph's own arithmetic, on a host whose int8
    kernels saturate (``host_int8``: x86 without VNNI): ORT's QDQ fusions off. There ORT's fused
    u8 x s8 kernels saturate on 8-bit weights, so an optimized session measured this host's
    overflow, not the graph: the NPU's graph (qnn-htp w8a8 motion-dit tiny: the HTP agreed
    with ORT at cosine 0.9900 fused, 0.9980 unfused) or the accuracy floor's probes. Empty
    elsewhere (VNNI accumulates exactly; the fused kernels stay), and for a ``model`` that
    quantizes no activation (weight-only: DequantizeLinear of constants alone), whose only
    fusion, MatMulNBits, does not saturate (one 576x1536 layer, AVX2: 0.5% relative error
    against the unfused graph, its per-block input rounding): the fusions left on, the floor
    measures the kernel ort-cpu runs (unfused, it had measured float arithmetic there)."""
    from edgec.graph_passes.quantization.host_int8 import int8_saturates

    if model is not None and not any(n.op_type in ("QuantizeLinear", "DynamicQuantizeLinear")
                                      for n in model.graph.all_nodes()):
        return {}
    return {"session.disable_quant_qdq": "1"} if int8_saturates() else {}


@contextlib.contextmanager
def open_model(model: ir.Model, optimize: bool = False) -> Iterator[OrtSession]:
    """An OrtSession (``LEAN`` settings) over an in-memory model, saved to a temp dir with
    external data (>2 GB safe) for as long as the ``with`` block runs. It measures: a QDQ
    graph's fusions stay off where they would saturate (``exact_qdq``)."""
    with tempfile.TemporaryDirectory(prefix="edgec-ort-") as tmp:
        path = Path(tmp) / "model.onnx"
        save_model(model, path)
        yield OrtSession(path, optimize=optimize, config={**LEAN, **exact_qdq(model)})


def model_feeds(model: ir.Model, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``feeds`` reduced to the model's inputs; a swappable-LoRA graph's adapter inputs default to
    the base model (unbound adapters), adapter feeds given in ``feeds`` win."""
    names = {i.name for i in model.graph.inputs}
    feeds = {k: v for k, v in feeds.items() if k in names}
    sites = lora_sites(model)
    return {**site_feeds(sites, None), **feeds} if sites else feeds


def run_model(model: ir.Model, feeds: Mapping[str, np.ndarray], optimize: bool = False
              ) -> dict[str, np.ndarray]:
    """Run an in-memory model once in ORT."""
    with open_model(model, optimize) as sess:
        return sess.run(model_feeds(model, feeds))


def run_samples(model: ir.Model, samples: Sequence[Mapping[str, np.ndarray]],
                optimize: bool = False) -> list[dict[str, np.ndarray]]:
    """Run an in-memory model on each of ``samples`` in one ORT session (the model is
    serialized once: on a 30-layer decoder that is most of a run's cost)."""
    with open_model(model, optimize) as sess:
        return [sess.run(model_feeds(model, feeds)) for feeds in samples]
