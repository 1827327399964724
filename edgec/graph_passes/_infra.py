"""Pass infrastructure: passes that report stats, and a PassManager that checks each one.

``PassManager(passes, check=True, feeds=...)`` runs the model in ONNX Runtime (graph
optimizations disabled, so ORT's own fusions cannot hide a broken rewrite) before the first pass
and after every pass that modified the graph. Exact passes must stay within their ``rtol``
(norm-wise max relative error, see ``exporters.verify``); approximating passes report cosine and
relative L2 error instead of asserting.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir

from edgec.errors import VerificationError

__all__ = ["PassResult", "EdgecPass", "PassManager", "PassRecord"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class PassResult(ir.passes.PassResult):
    """onnx-ir's PassResult plus ``stats`` (sites matched, rewritten, skipped and why)."""

    stats: dict[str, Any] = dataclasses.field(default_factory=dict)


class EdgecPass(ir.passes.InPlacePass):
    """An in-place pass with a name, a tolerance and stats.

    Subclasses implement ``call(model) -> PassResult``. ``exact`` passes preserve semantics up to
    ``rtol``; approximating ones (sparse attention, quantization) set ``exact = False``.
    """

    name: ClassVar[str] = "pass"
    exact: ClassVar[bool] = True
    rtol: ClassVar[float] = 1e-4

    @classmethod
    def wanted(cls) -> bool:
        """Whether a target's pass has work on this host (a host-specific one may not)."""
        return True


def static_dims(value: ir.Value) -> list[int] | None:
    """``value``'s dims where its shape is known and static, else None."""
    shape = value.shape
    if shape is None or not shape.is_static():
        return None
    return [int(d) for d in shape]


def fresh_name(graph: ir.Graph, name: str) -> str:
    """``name``, or ``name.1``, ``name.2``... : the first no initializer of ``graph`` holds."""
    k, base = 0, name
    while name in graph.initializers:
        k += 1
        name = f"{base}.{k}"
    return name


def register_constant(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """``array`` as a new initializer ``name`` of ``graph`` (typed and shaped), returned."""
    tensor = ir.tensor(array, name=name)
    value = ir.Value(name=name, type=ir.TensorType(tensor.dtype), shape=tensor.shape,
                     const_value=tensor)
    graph.register_initializer(value)
    return value


@dataclasses.dataclass
class PassRecord:
    name: str
    modified: bool
    seconds: float
    stats: dict[str, Any]
    check: dict[str, Any] | None = None
    exact: bool = True  # the pass preserves semantics (up to its rtol)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _pass_name(p: ir.passes.PassBase) -> str:
    name = getattr(p, "name", None)
    return name if isinstance(name, str) else type(p).__name__


class PassManager:
    """Run passes in order; with ``check=True`` verify each against the model before it."""

    def __init__(
        self,
        passes: Sequence[ir.passes.PassBase],
        check: bool = False,
        feeds: Mapping[str, np.ndarray] | None = None,
    ):
        if check and feeds is None:
            raise ValueError("PassManager(check=True) needs feeds to run the model on")
        self.passes = list(passes)
        self.check = check
        self.feeds = dict(feeds) if feeds is not None else None
        self.records: list[PassRecord] = []

    def __call__(self, model: ir.Model) -> ir.Model:
        from edgec.exporters.verify import compare_outputs
        from edgec.runtimes.ort import run_model

        before = run_model(model, self.feeds) if self.check else None
        for p in self.passes:
            t0 = time.perf_counter()
            result = p(model)
            model = result.model
            stats = dict(getattr(result, "stats", {}) or {})
            exact = bool(getattr(p, "exact", True))
            record = PassRecord(_pass_name(p), bool(result.modified), time.perf_counter() - t0,
                                stats, exact=exact)
            if self.check and result.modified:
                after = run_model(model, self.feeds)
                errors = compare_outputs(after, before)
                rtol = getattr(p, "rtol", 1e-4)
                worst = max(errors.values(), key=lambda e: e["max_rel"])
                record.check = {"exact": exact, "rtol": rtol if exact else None, "outputs": errors}
                if exact and not worst["max_rel"] <= rtol:
                    name = next(k for k, e in errors.items() if e is worst)
                    raise VerificationError(
                        f"pass {record.name!r} changed output {name!r} by max relative error "
                        f"{worst['max_rel']:.3g} (tolerance {rtol:g}); this is an edgec bug, "
                        "please report it with the model"
                    )
                before = after
            logger.info("pass %s: modified=%s stats=%s (%.2fs)", record.name, record.modified,
                        stats, record.seconds)
            self.records.append(record)
        return model
