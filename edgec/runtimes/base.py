"""Session: the one runtime interface (run, inputs, outputs, benchmark) every backend implements."""

from __future__ import annotations

import abc
import dataclasses
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edgec.errors import UserError

__all__ = ["IOSpec", "Session", "latency_stats"]


@dataclasses.dataclass(frozen=True)
class IOSpec:
    """One graph input or output: name, shape (ints or dim names), numpy dtype name."""

    name: str
    shape: tuple[int | str | None, ...]
    dtype: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> IOSpec:
        return cls(d["name"], tuple(d["shape"]), d["dtype"])


def _last_line(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__


def latency_stats(times_s: list[float]) -> dict[str, float]:
    ms = np.asarray(times_s) * 1e3
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "mean_ms": float(ms.mean()),
        "min_ms": float(ms.min()),
        "iterations": len(ms),
    }


class Session(abc.ABC):
    """A loaded model on one runtime."""

    runtime: str = ""

    @classmethod
    @abc.abstractmethod
    def from_artifact(cls, root: Path, runtime: Mapping[str, Any]) -> Session:
        """Open the artifact under ``root`` whose manifest ``runtime`` entry names this runtime
        (``model``: the file to load, relative to ``root``; ``config``: session options)."""

    def __init__(self, inputs: list[IOSpec], outputs: list[IOSpec]):
        self._inputs = inputs
        self._outputs = outputs
        self.default_feeds: dict[str, np.ndarray] | None = None
        self._lora = None  # edgec.lora.binding.AdapterBank of a swappable-LoRA artifact

    @property
    def inputs(self) -> list[IOSpec]:
        return list(self._inputs)

    @property
    def outputs(self) -> list[IOSpec]:
        return list(self._outputs)

    def run(self, feeds: Mapping[str, np.ndarray], adapter: str | None = None
            ) -> dict[str, np.ndarray]:
        """Run once; ``feeds`` maps every input name to an array of the input's dtype.

        ``adapter``: a swappable-LoRA artifact's adapter name (``"base"``: none); default the
        active one (``adapters``, ``active_adapter``, ``load_adapter``).
        """
        feeds = self._adapter_feeds(self._check_feeds(feeds), adapter)
        try:
            return self._run(feeds)
        except (RuntimeError, ValueError) as e:  # the runtime rejected these inputs
            raise UserError(f"{self.runtime} could not run the model on these inputs: "
                            f"{_last_line(e)}") from e

    @abc.abstractmethod
    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def benchmark(self, warmup: int = 3, iterations: int = 20,
                  feeds: Mapping[str, np.ndarray] | None = None,
                  adapter: str | None = None) -> dict[str, float]:
        """Latency over ``iterations`` runs after ``warmup`` runs (p50/p90/mean/min ms)."""
        feeds = self._check_feeds(feeds if feeds is not None else self._require_default_feeds())
        feeds = self._adapter_feeds(feeds, adapter)
        for _ in range(warmup):
            self._run(feeds)
        times = []
        for _ in range(iterations):
            t0 = time.perf_counter()
            self._run(feeds)
            times.append(time.perf_counter() - t0)
        return latency_stats(times)

    # Swappable LoRA: the adapter inputs are bound here, not passed by the caller.
    def attach_adapters(self, spec: Mapping[str, Any], root) -> None:
        from edgec.lora.binding import AdapterBank

        self._lora = AdapterBank(spec, root)
        self._inputs = [i for i in self._inputs if i.name not in self._lora.input_names]

    @property
    def adapters(self) -> list[str]:
        """Adapter names this session can run (``base`` = no adapter); empty if not swappable."""
        return self._lora.names if self._lora is not None else []

    @property
    def active_adapter(self) -> str | None:
        return self._lora.active if self._lora is not None else None

    @active_adapter.setter
    def active_adapter(self, name: str) -> None:
        self._lora_bank().feeds(name)  # validates the name
        self._lora.active = name

    def load_adapter(self, path, name: str | None = None) -> str:
        """Read a PEFT adapter directory and make it runnable by name (no recompilation)."""
        return self._lora_bank().load(path, name)

    def _lora_bank(self):
        if self._lora is None:
            raise UserError("this artifact has no swappable LoRA adapters; compile it with "
                            "--lora DIR --lora-mode swappable")
        return self._lora

    def _adapter_feeds(self, feeds: dict[str, np.ndarray], adapter: str | None):
        if self._lora is None:
            if adapter is not None:
                self._lora_bank()
            return feeds
        return {**feeds, **self._lora.feeds(adapter)}

    def _require_default_feeds(self) -> dict[str, np.ndarray]:
        if self.default_feeds is None:
            raise UserError("no inputs given and the artifact has no example inputs; pass feeds")
        return self.default_feeds

    def _check_feeds(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = {i.name for i in self._inputs}
        extra = sorted(set(feeds) - names)
        missing = sorted(names - set(feeds))
        if extra or missing:
            raise UserError(
                f"inputs do not match the model: missing {missing or 'none'}, unknown "
                f"{extra or 'none'}; the model takes {sorted(names)}"
            )
        out = {}
        for spec in self._inputs:
            arr = np.asarray(feeds[spec.name])
            if arr.dtype != np.dtype(spec.dtype):
                if np.can_cast(arr.dtype, spec.dtype, casting="same_kind"):
                    arr = arr.astype(spec.dtype)
                else:
                    raise UserError(f"input {spec.name!r} has dtype {arr.dtype}, the model "
                                    f"wants {spec.dtype}")
            if arr.ndim != len(spec.shape) or any(
                isinstance(d, int) and d != s for d, s in zip(spec.shape, arr.shape)
            ):
                raise UserError(f"input {spec.name!r} has shape {list(arr.shape)}, the model "
                                f"wants {list(spec.shape)}")
            out[spec.name] = np.ascontiguousarray(arr)
        return out
