"""qnn-htp: the prefill and decode graphs of a static-cache decoder in one HTP context binary.

The two graphs hold the same weights. ONNX Runtime's EPContext weight sharing compiles them in
sequence with ``ep.share_ep_contexts`` (the last with ``ep.stop_share_ep_contexts``), so both
``*_ctx.onnx`` point at one context binary that stores the weights once; sessions opened with
``ep.share_ep_contexts`` then load that binary once. The build tries it after the two separate
binaries are built and keeps it only when this machine's HTP backend loads it and both graphs
give the separate binaries' outputs (the x86_64 HTP emulator refuses a multi-graph context:
``QNN_COMMON_ERROR_NOT_SUPPORTED``); otherwise the artifact keeps the two binaries and the
manifest says why, with both sizes.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgec._native_stdout import native_stdout_to_stderr

__all__ = ["SHARE_OPTION", "share_context"]

SHARE_OPTION = "ep.share_ep_contexts"
STOP_OPTION = "ep.stop_share_ep_contexts"
SHARED_DIR = "shared"


def _first_line(e: Exception) -> str:
    return next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)


def _bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.glob("*.bin"))


def share_context(graphs: Sequence[tuple[str, Path, Path]], target_dir: Path,
                  feeds: Sequence[Mapping[str, np.ndarray]], runtime: Mapping[str, Any]
                  ) -> dict[str, Any]:
    """``graphs``: (name, QDQ model, its separately built target dir) per graph, in load order;
    ``feeds``: an input for each, to compare the shared context's outputs with the separate
    ones'. Returns the manifest entry: ``shared`` True with each graph's context model (relative
    to ``target_dir``'s parent), or False and why; and the sizes of both forms."""
    import onnxruntime as ort

    from edgec.runtimes.qnn import QnnSession, graph_provider_options, qnn_session_options
    from edgec.targets.qnn_htp.epcontext import CONTEXT_MODEL

    out = target_dir / SHARED_DIR
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    separate = sum(_bytes(d) for _, _, d in graphs)
    entry: dict[str, Any] = {"separate_bytes": separate}
    models = {}
    provider: dict[str, str] = {}  # one context: fp16 for all where any graph needs it
    for _, qdq, _ in graphs:
        provider.update(graph_provider_options(qdq))
    try:
        with native_stdout_to_stderr():
            for i, (name, qdq, _) in enumerate(graphs):
                opts = qnn_session_options(provider_options=provider, quiet=True)
                opts.add_session_config_entry(SHARE_OPTION, "1")
                if i == len(graphs) - 1:
                    opts.add_session_config_entry(STOP_OPTION, "1")
                models[name] = out / f"{name}_ctx.onnx"
                ort.ModelCompiler(opts, str(qdq), graph_optimization_level=(
                    ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)).compile_to_file(
                        str(models[name]))
    except Exception as e:  # noqa: BLE001 — the separate binaries stand; say why
        shutil.rmtree(out, ignore_errors=True)
        return {**entry, "shared": False, "why": f"the shared compile failed: {_first_line(e)}"}
    entry["shared_bytes"] = _bytes(out)
    shared_runtime = {**runtime, "session_config": {SHARE_OPTION: "1"},
                      "provider_options": {**runtime.get("provider_options", {}), **provider}}
    try:
        # quiet: the emulator refuses a shared context with a red ORT error line on a compile
        # that succeeds (the two binaries stand); the build note says why
        sessions = [QnnSession(models[name], shared_runtime, quiet=True) for name, _, _ in graphs]
        for (name, _, built), session, feed in zip(graphs, sessions, feeds):
            alone = QnnSession(built / CONTEXT_MODEL, runtime).run(feed)
            together = session.run(feed)
            if any(not np.array_equal(alone[k], together[k]) for k in alone):
                raise RuntimeError(f"the {name} graph's outputs differ in the shared context")
    except Exception as e:  # noqa: BLE001
        shutil.rmtree(out, ignore_errors=True)
        why = _first_line(e).split("; recompile")[0]  # QnnSession's advice does not apply
        # the staging directory is gone once the artifact is in place: artifact-relative
        why = why.replace(f"{target_dir.parent}{os.sep}", "")
        return {**entry, "shared": False,
                "why": f"this QNN HTP backend does not load the shared context ({why})"}
    rel = target_dir.name
    return {**entry, "shared": True, "session_config": {SHARE_OPTION: "1"},
            "models": {name: f"{rel}/{SHARED_DIR}/{models[name].name}" for name in models}}
