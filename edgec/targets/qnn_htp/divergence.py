"""Where the HTP first departs from ONNX Runtime on the same quantized graph (numeric bisection).

When the device disagrees with ONNX Runtime on a QDQ graph that ONNX Runtime itself runs close to
fp32 (``fidelity.judge_quantized``: "device"), the compile fails as a target bug; this names the
node. Graph prefixes (cut where only float tensors cross, closed at their Q/DQ pairs: the same
prefixes the build-failure bisection compiles, ``epcontext._prefix``) run on the HTP and on ONNX
Runtime's CPU EP with the same feeds; the first prefix whose outputs depart is found by bisection
(a departure, once made, is carried by every later tensor), and the nodes between it and the
prefix before are the answer.

A prefix departs when an output's cosine drops below ``DEPART_COSINE`` *or its norm ratio* moves
more than ``DEPART_NORM`` from 1. The norm is not optional: the HTP bug this was written for (a
quantized Reciprocal scaling its result by its input range's maximum) made every RMSNorm output
5.9× too small with cosine 1.0 (cosine cannot see a uniform scale), and a cosine-only search
pointed at a node far downstream, where the scale finally turned into a direction.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from edgec._native_stdout import native_stdout_to_stderr
from edgec.runtimes.ort import exact_qdq
from edgec.targets.qnn_htp.epcontext import (
    _cuts,
    _elem_types,
    _first_failing,
    _live,
    _prefix,
    _stretch,
)

__all__ = ["Departure", "first_departure", "locate_departure", "in_child", "ChildCrashed",
           "DEPART_COSINE", "DEPART_NORM"]

logger = logging.getLogger(__name__)

DEPART_COSINE = 0.99  # fixed-point rounding alone keeps a prefix's outputs well above this
DEPART_NORM = 0.1  # |‖device‖ / ‖ORT‖ − 1| beyond this is a scale error, not rounding


@dataclasses.dataclass
class Departure:
    nodes: list[tuple[str, str]]  # (op, name) between the last agreeing cut and the first not
    tensor: str  # the prefix output that departs most
    cosine: float
    norm_ratio: float  # ‖HTP‖ / ‖ORT‖
    probes: int

    def describe(self) -> str:
        named = ", ".join(f"{op} {name!r}" for op, name in self.nodes[:5])
        where = (named if len(self.nodes) == 1 else f"one of {len(self.nodes)} nodes ({named}"
                 f"{', ...' if len(self.nodes) > 5 else ''})")
        return (f"the HTP first departs from ONNX Runtime at {where}: {self.tensor!r} comes out "
                f"{self.norm_ratio:.3g}× ONNX Runtime's norm at cosine {self.cosine:.4f}, while "
                f"the graph before it agrees")


def _compare(device: Mapping[str, np.ndarray], ref: Mapping[str, np.ndarray]
             ) -> tuple[str, float, float]:
    """The output that departs most: (name, cosine, norm ratio)."""
    worst = None
    for name, b in ref.items():
        a = np.asarray(device[name], np.float64).ravel()
        b = np.asarray(b, np.float64).ravel()
        na, nb = np.linalg.norm(a), np.linalg.norm(b)
        if nb == 0 and na == 0:
            cos, ratio = 1.0, 1.0
        elif nb == 0 or na == 0 or not np.isfinite(na):
            cos, ratio = 0.0, float("inf") if nb == 0 else float(na / nb)
        else:
            cos, ratio = float(a @ b / (na * nb)), float(na / nb)
        badness = max(1.0 - cos, abs(ratio - 1.0) * (1 - DEPART_COSINE) / DEPART_NORM)
        if worst is None or badness > worst[0]:
            worst = (badness, name, cos, ratio)
    assert worst is not None
    return worst[1], worst[2], worst[3]


def _departs(cos: float, ratio: float) -> bool:
    return not (cos >= DEPART_COSINE and abs(ratio - 1.0) <= DEPART_NORM)


def first_departure(model_path: Path, feeds: Mapping[str, np.ndarray]) -> Departure | None:
    """Bisect ``model_path`` (a QDQ model) for the first stretch of nodes where the HTP's
    outputs depart from ONNX Runtime CPU's on ``feeds``; None when every prefix agrees."""
    import onnx
    import onnxruntime as ort

    from edgec.runtimes.qnn import graph_provider_options, qnn_session_options

    # weights stay external: the probe is written beside the model, so its references resolve
    model = onnx.shape_inference.infer_shapes(onnx.load(str(model_path),
                                                        load_external_data=False))
    provider = graph_provider_options(model)
    nodes = list(model.graph.node)
    live, elem = _live(model), _elem_types(model)
    cuts = _cuts(model, live, elem)
    if not cuts or cuts[-1] != len(nodes) - 1:
        cuts.append(len(nodes) - 1)  # the whole graph: its outputs
    probe = model_path.with_name(f".{model_path.stem}.qnn-departure.onnx")
    inputs = {i.name for i in model.graph.input}
    given = {k: v for k, v in feeds.items() if k in inputs}
    measured: dict[int, tuple[str, float, float]] = {}
    quiet = ort.SessionOptions()
    quiet.log_severity_level = 3  # the prefixes leave unused Q/DQ initializers behind
    for key, value in exact_qdq().items():  # the graph's arithmetic, not this host's overflow
        quiet.add_session_config_entry(key, value)

    def at(k: int) -> tuple[str, float, float]:
        if k not in measured:
            onnx.save(_prefix(model, cuts[k], live, elem), str(probe))
            cpu = ort.InferenceSession(str(probe), quiet, providers=["CPUExecutionProvider"])
            names = [o.name for o in cpu.get_outputs()]
            ref = dict(zip(names, cpu.run(None, given)))
            try:
                with native_stdout_to_stderr():  # the QNN backend prints to fd 1
                    htp = ort.InferenceSession(str(probe),
                                               sess_options=qnn_session_options(
                                                   provider_options=provider, quiet=True))
                    got = dict(zip(names, htp.run(None, given)))
            except Exception as e:  # noqa: BLE001 — a prefix the HTP cannot run: treat as departed
                logger.debug("qnn-htp: prefix %d does not run on the HTP: %s", k, e)
                got = {n: np.full_like(v, np.nan, dtype=np.float64) for n, v in ref.items()}
            measured[k] = _compare(got, ref)
        return measured[k]

    try:  # the last cut (the whole graph) is the one known to depart
        lo = _first_failing(len(cuts) - 1, lambda k: _departs(*at(k)[1:]))
        tensor, cos, ratio = at(lo)
    finally:
        probe.unlink(missing_ok=True)
    if not _departs(cos, ratio):
        return None  # the whole graph agrees on these feeds
    return Departure(_stretch(nodes, live, cuts, lo), tensor, cos, ratio, len(measured))


def locate_departure(model_path: Path, feeds: Mapping[str, np.ndarray]) -> str | None:
    """``Target.locate_departure`` for qnn-htp: ``first_departure`` as a sentence, run in a
    child process: a probe the emulator crashes on (SIGSEGV inside the QNN backend, met on a
    trained diffusion UNet's w8a16 graph) would otherwise kill the compile with no word and
    leave the probe file behind; the crash is then the sentence."""
    model_path = Path(model_path)
    try:
        found = in_child(first_departure, model_path, dict(feeds))
    except ChildCrashed as e:
        model_path.with_name(f".{model_path.stem}.qnn-departure.onnx").unlink(missing_ok=True)
        return f"locating where the HTP departs crashed the QNN emulator ({e}): not named"
    if found is None:
        return None
    logger.info("qnn-htp: %s (%d prefixes probed)", found.describe(), found.probes)
    return found.describe()


class ChildCrashed(RuntimeError):
    """The child process died (a signal, or an exit without a result)."""


def in_child(fn, *args):
    """``fn(*args)`` in a spawned process (``fn`` importable, arguments and result picklable);
    an exception in it is raised here as it was, a crash as ``ChildCrashed``."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # fork would copy ORT's threads' state
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_child_main, args=(send, fn, args), daemon=True)
    child.start()
    send.close()
    try:
        ok, value = receive.recv()
    except EOFError:  # it died before answering
        child.join()
        code = child.exitcode
        raise ChildCrashed(f"signal {-code}" if code is not None and code < 0
                           else f"exit status {code}") from None
    finally:
        receive.close()
    child.join()
    if ok:
        return value
    raise value


def _child_main(send, fn, args) -> None:
    try:
        result = (True, fn(*args))
    except BaseException as e:  # noqa: BLE001 — raised again in the parent
        result = (False, e)
    send.send(result)
    send.close()
