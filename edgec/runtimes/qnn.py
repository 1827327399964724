"""QNN runtime: a precompiled EPContext model run by ONNX Runtime's QNN execution provider (HTP).

onnxruntime-qnn is a plugin execution provider: its library is registered with ONNX Runtime once
per process, then sessions select its device. CPU fallback is always disabled, so a session either
runs the whole graph on the NPU or fails to open: never a silent partial offload.
"""

from __future__ import annotations

import logging
import os
import platform
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from edgec._native_stdout import native_stdout_to_stderr
from edgec.artifact import contained_path
from edgec.errors import TargetUnavailableError, UserError
from edgec.runtimes.base import Session
from edgec.runtimes.ort import OrtSession, ort_io_specs, session_options

__all__ = ["PROVIDER_OPTIONS", "FP16_OPTIONS", "QnnSession", "emulator",
           "graph_provider_options", "qnn_session_options"]

# Graph input quantize / output dequantize stay on the NPU; the default (offload to the CPU EP)
# conflicts with disabled fallback.
PROVIDER_OPTIONS: dict[str, str] = {"offload_graph_io_quantization": "0"}
# A QDQ graph with float nodes (``QuantScheme.float_stream``) runs them in fp16, which needs an
# HTP with fp16 units: the SoC is named (Snapdragon X Elite, HTP v73, the QNN EP's reference
# device). Without a SoC the x86 emulator computes float ops in fp32, which no device does
# (1.0001 + 1 gives 2.0001 there, 2.0 with the SoC named), and fails to finalize a float
# RMSNormalization; the quantized ops compute the same either way.
FP16_OPTIONS: dict[str, str] = {"soc_model": "60", "htp_arch": "73",
                                "enable_htp_fp16_precision": "1"}
_BACKENDS = {"htp": "get_qnn_htp_path", "cpu": "get_qnn_cpu_path"}
_lock = threading.Lock()
logger = logging.getLogger(__name__)
# The HTP backend is loaded once per process and keeps the SoC of the first session that named
# one: after an fp16 session (soc_model 60), a session naming none was compiled for SoC 60 too
# and finalized a graph (IsNaN/Where) that a fresh process refuses. The first HTP session's SoC
# options, and whether a later session's differing ones were warned of.
_SOC_KEYS = ("soc_model", "htp_arch")
_first_soc: list[dict[str, str | None]] = []
_soc_warned: list[bool] = []


def emulator(backend: str, machine: str | None = None) -> str | None:
    """What the ``backend`` runs on where it is no NPU, or None: QNN ships the HTP backend for
    x86_64 hosts as a simulation of the NPU (its arithmetic, not its speed: a video-dit small
    step takes a minute sparse, over 14 dense); on an ARM64 host (Snapdragon) it drives the
    NPU."""
    machine = (machine or platform.machine()).lower()
    if backend == "htp" and machine in ("x86_64", "amd64"):
        return "the QNN HTP emulator on this x86_64 CPU (its run times are not the NPU's)"
    if backend == "cpu":
        return "the QNN CPU reference backend (its run times are not the NPU's)"
    return None


def _qnn():
    try:
        import onnxruntime_qnn
    except ImportError as e:
        raise TargetUnavailableError(
            f"the QNN execution provider is not installed ({e}); pip install 'edgec[qnn]'"
        ) from None
    return onnxruntime_qnn


def _qnn_device(qnn) -> ort.OrtEpDevice:
    """The QNN EP's device, registering the plugin library on first use (once per process)."""
    name = qnn.get_ep_name()
    with _lock:
        devices = [d for d in ort.get_ep_devices() if d.ep_name == name]
        if not devices:
            try:
                # The QNN stack prints to fd 1 from native code; stdout may carry --json.
                with native_stdout_to_stderr():
                    ort.register_execution_provider_library(name, qnn.get_library_path())
            except Exception as e:
                raise TargetUnavailableError(
                    f"ONNX Runtime could not load the QNN execution provider: {e}") from e
            devices = [d for d in ort.get_ep_devices() if d.ep_name == name]
    if not devices:
        raise TargetUnavailableError("the QNN execution provider found no device on this machine")
    return devices[0]


def graph_provider_options(model=None) -> dict[str, str]:
    """The provider options a QDQ model (a path or a loaded ``onnx.ModelProto``) compiles and
    runs with: ``PROVIDER_OPTIONS``; ``FP16_OPTIONS`` where its metadata says nodes stay float;
    and the SoC its metadata names (``--soc``: ``targets.qnn_htp.soc``), which replaces
    FP16_OPTIONS' own."""
    options = dict(PROVIDER_OPTIONS)
    if model is not None:
        import onnx

        from edgec.graph_passes.quantization.select import FLOAT_NODES_KEY
        from edgec.targets.qnn_htp.soc import SOC_KEY, SOCS, soc_options

        if not isinstance(model, onnx.ModelProto):
            model = onnx.load(str(model), load_external_data=False)
        meta = {p.key: p.value for p in model.metadata_props}
        if FLOAT_NODES_KEY in meta:
            options.update(FP16_OPTIONS)
        if meta.get(SOC_KEY) in SOCS:
            options.update(soc_options(meta[SOC_KEY]))
    return options


def qnn_session_options(backend: str = "htp", provider_options: Mapping[str, str] | None = None,
                        *, fallback: bool = False, record_assignment: bool = False,
                        optimize: bool = True, quiet: bool = False) -> ort.SessionOptions:
    """Session options selecting the QNN EP on ``backend``; CPU fallback off unless ``fallback``.

    ``record_assignment`` records which EP runs each node (``get_provider_graph_assignment_info``);
    ``quiet`` silences ORT's own error log (the caller reports the failure itself).
    """
    qnn = _qnn()
    if backend not in _BACKENDS:
        raise UserError(f"unknown QNN backend {backend!r}; choose one of {', '.join(_BACKENDS)}")
    opts = session_options(optimize)
    if quiet:
        opts.log_severity_level = 4
    if not fallback:
        opts.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    if record_assignment:
        opts.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    options = {**PROVIDER_OPTIONS, **dict(provider_options or {}),
               "backend_path": getattr(qnn, _BACKENDS[backend])()}
    if backend == "htp":
        _check_soc(options)
    opts.add_provider_for_devices([_qnn_device(qnn)], options)
    return opts


def _check_soc(options: Mapping[str, str]) -> None:
    """Warn (once a process) where an HTP session names other SoC options than the process's
    first one: the backend may compile it for the first one's SoC (see ``_first_soc``), so
    what it accepts and computes can depend on what ran before it in the process."""
    soc = {k: options.get(k) for k in _SOC_KEYS}
    if not _first_soc:
        _first_soc.append(soc)
    elif soc != _first_soc[0] and not _soc_warned:
        _soc_warned.append(True)

        def said(d):
            return ", ".join(f"{k} {v}" for k, v in d.items() if v) or "no SoC"

        logger.warning("this process opened a QNN HTP session with %s before, and one with %s "
                       "now: the HTP backend keeps the first SoC for the whole process, so this "
                       "graph may be compiled and checked for that one; build graphs that need "
                       "another SoC (--quantize ...:stream=fp16 names soc_model 60) in a "
                       "process of their own", said(_first_soc[0]), said(soc))


def _check_context_paths(root: Path, model: str) -> None:
    """Refuse an EPContext node whose context binary (``ep_cache_context`` with
    ``embed_mode=0``) lies outside the artifact: edgec writes a bare file name beside the model,
    so another path is an edit. ONNX Runtime refuses '..' itself; this names the file and also
    covers an absolute path. A model that does not parse is left to ONNX Runtime."""
    import onnx

    path = root / model
    try:
        graph = onnx.load(path, load_external_data=False).graph
    except Exception:  # noqa: BLE001 — ORT names the failure (and _refuse_if_damaged the file)
        return
    top = root.resolve()
    for node in graph.node:
        if node.op_type != "EPContext":
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        location = attrs.get("ep_cache_context")
        if attrs.get("embed_mode", 1) != 0 or not isinstance(location, bytes):
            continue
        rel = location.decode(errors="replace")
        target = (path.parent / rel).resolve()
        if ".." in Path(rel).parts or Path(rel).is_absolute() or not target.is_relative_to(top):
            raise UserError(f"{root}: {model} names its context binary {rel!r}, outside the "
                            "artifact; refusing to follow it (the artifact is damaged or was "
                            "edited, recompile or restore it)")


class QnnSession(Session):
    """An EPContext model (``target/model_ctx.onnx`` + its ``.bin``) on the QNN EP."""

    runtime = "onnxruntime-qnn (HTP)"
    input_errors = OrtSession.input_errors

    def __init__(self, model_path: str | os.PathLike, runtime: Mapping[str, Any],
                 quiet: bool = False):
        """``quiet``: ORT's own error log off, where the caller expects a failure and says why
        (a probe: the shared-context load, refused by the x86_64 emulator)."""
        backend = runtime.get("backend", "htp")
        self.runtime = f"onnxruntime-qnn ({backend.upper()})"
        opts = qnn_session_options(backend, runtime.get("provider_options"), quiet=quiet)
        for key, value in (runtime.get("session_config") or {}).items():  # a shared context
            opts.add_session_config_entry(key, str(value))
        try:
            with native_stdout_to_stderr():  # the QNN backend's banner goes to fd 1
                self._sess = ort.InferenceSession(str(model_path), sess_options=opts)
        except Exception as e:
            first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
            # ORT's refusal of a context-binary path with '..' (or another bad path): edgec
            # writes a bare file name, so the artifact was edited, not built by another version
            fix = ("the artifact is damaged or was edited, recompile or restore it"
                   if "ep_cache_context" in first
                   else "recompile the artifact with this edgec/onnxruntime-qnn")
            raise UserError(f"the QNN {backend.upper()} backend could not load {model_path}: "
                            f"{first}; {fix}") from e
        super().__init__(ort_io_specs(self._sess.get_inputs()),
                         ort_io_specs(self._sess.get_outputs()))
        self._output_names = [o.name for o in self._outputs]
        self.emulator = emulator(backend)

    @classmethod
    def from_artifact(cls, root: Path, runtime: Mapping[str, Any]) -> QnnSession:
        _check_context_paths(root, runtime["model"])
        session = cls(root / runtime["model"], runtime)
        decode = runtime.get("decode")
        if decode:  # a static-cache decoder: the one-token graph beside the prefill graph
            model = contained_path(root, decode.get("model"), "runtime.decode.model")
            _check_context_paths(root, decode["model"])
            session.decode_session = cls(model, decode)
        return session

    def _kv_cache(self, info, batch: int, capacity: int):
        from edgec.runtimes.static_cache import StaticBufferCache

        decode = getattr(self, "decode_session", None)
        if decode is None:
            return super()._kv_cache(info, batch, capacity)
        chunk = self._inputs[0].shape[1]  # input_ids [1, tokens per prefill run]
        return StaticBufferCache(self, decode, info, chunk, batch)

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self._output_names, self._sess.run(self._output_names, feeds)))
