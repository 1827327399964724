"""Runtimes: ``load(dir)`` reads an artifact's manifest and opens the session it names."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from edgec.artifact import contained_path
from edgec.errors import UserError
from edgec.runtimes.base import IOSpec, Session, latency_stats
from edgec.runtimes.openvino import OpenVINOSession
from edgec.runtimes.ort import OrtSession
from edgec.runtimes.qnn import QnnSession
from edgec.runtimes.tensorrt import TensorRTSession

__all__ = ["IOSpec", "Session", "latency_stats", "load", "open_session", "EXAMPLE_INPUTS",
           "RUNTIMES"]

EXAMPLE_INPUTS = "example_inputs.npz"
logger = logging.getLogger(__name__)

# A manifest's ``runtime.name`` → the session class that opens it (``from_artifact``). Each module
# imports its runtime's heavy package only when a session is opened.
RUNTIMES: dict[str, type[Session]] = {
    "ort": OrtSession,
    "openvino": OpenVINOSession,
    "qnn": QnnSession,
    "tensorrt": TensorRTSession,
}


def open_session(root: Path, runtime: dict[str, Any]) -> Session:
    """Open the session described by a manifest's ``runtime`` entry, relative to ``root``."""
    name = runtime.get("name")
    if name not in RUNTIMES:
        raise UserError(f"{root}: unknown runtime {name!r} in the manifest; upgrade edgec")
    model = contained_path(root, runtime.get("model", ""), "the runtime's model")
    if not model.is_file():
        raise UserError(f"{root}: the manifest names model file {runtime.get('model')!r}, which "
                        "is missing from the artifact; recompile it")
    try:
        return RUNTIMES[name].from_artifact(root, runtime)
    except UserError:
        raise
    except Exception as e:
        _refuse_if_damaged(root, runtime, e)
        raise


def _refuse_if_damaged(root: Path, runtime: dict[str, Any], e: Exception) -> None:
    """A runtime that cannot open the artifact's files, which changed since the compile hashed
    them (a truncated model.onnx: InvalidProtobuf; a cut model.onnx.data: "Deserialize tensor
    failed"; an external-data location rewritten to /etc/passwd, which ONNX Runtime refused to
    follow), is the user's damaged artifact, not edgec's fault: one line saying which file."""
    from edgec.artifact import read_manifest, verify_files

    try:
        manifest = read_manifest(root)
    except UserError:
        manifest = {}
    damaged = {f: what for f, what in (verify_files(root, manifest).items()
                                       if manifest.get("hashes") else ())
               if what != "added" and not f.endswith(".cache")}
    if damaged:
        f, what = next(iter(damaged.items()))
        more = f" (and {len(damaged) - 1} more)" if len(damaged) > 1 else ""
        raise UserError(f"{root}: the artifact is damaged ({f} {what} since it was compiled"
                        f"{more}; the runtime could not open it: {type(e).__name__}); `edgec "
                        f"inspect {root} --verify` lists damaged files; recompile it") from e
    model = root / runtime.get("model", "")
    if manifest and model.suffix == ".onnx":  # no hash to tell: a user's .onnx's checks (not
        # at compile, before the manifest: a bad file there is edgec's own)
        from edgec.onnx_io import load_onnx

        try:
            load_onnx(model)
        except UserError as bad:
            raise UserError(f"{root}: the artifact is damaged: {bad}") from e


def _warn_saturating_weights(root: Path, manifest: dict) -> None:
    """An artifact built where int8 kernels do not saturate (VNNI), loaded on a CPU where they
    do: its 8-bit int8 weights overflow the u8 × s8 pair sums there, and the outputs drift
    (video-dit tiny w8a8: cosine 0.9899 to PyTorch, 0.99955 with the weights as uint8)."""
    n = (manifest.get("int8_weights") or {}).get("int8", 0)  # recorded for the CPU targets
    if not n:
        return
    from edgec.graph_passes.quantization.host_int8 import ENV, int8_saturates

    if int8_saturates():
        logger.warning("%s: %d of its int8 weights use all 8 bits, which this CPU's int8 "
                       "kernels (x86 without VNNI) saturate, so its outputs drift from what "
                       "the compile verified; recompile it on this host, or anywhere with "
                       "%s=1 for such hosts", root, n, ENV)


def load(path: str | os.PathLike) -> Session:
    """Open a compiled artifact directory on the runtime its target uses."""
    from edgec.artifact import read_manifest

    root = Path(path)
    manifest = read_manifest(root)
    # a deleted model.onnx.data was ORT's "Fail" (exit 1); a cache (TensorRT's timing) is rebuilt
    missing = [f for f in manifest.get("hashes") or {}
               if not f.endswith(".cache") and not (root / f).is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"{root}: file {missing[0]} of the artifact is missing{more}; "
                        f"`edgec inspect {root} --verify` lists damaged files; recompile it")
    # absolute: companion graphs, the tokenizer and OpenVINO's paged decoder are opened at the
    # first generate/sample, which failed or fell back after an os.chdir
    root = root.resolve()
    _warn_saturating_weights(root, manifest)
    session = open_session(root, manifest["runtime"])
    session.manifest = manifest
    session.name_dims(manifest)
    session.root = root
    if (manifest.get("lora") or {}).get("mode") == "swappable":
        session.attach_adapters(manifest["lora"], root)
    example = root / EXAMPLE_INPUTS
    if example.is_file():
        with np.load(example, allow_pickle=False) as data:
            session.default_feeds = {k: data[k] for k in data.files}
    return session
