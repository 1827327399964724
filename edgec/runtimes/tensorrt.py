"""TensorRT backend: a Session over a serialized engine (target/model.plan), run by TrtRunner.

Polygraphy owns the CUDA side (device buffers, streams, dynamic input shapes); this module adds the
artifact's contract: one clear error when the artifact has no engine or TensorRT is missing, and
inputs checked against the optimization profile the engine was built for.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edgec.artifact import contained_path
from edgec.errors import TargetUnavailableError, UserError
from edgec.runtimes.base import IOSpec, Session

__all__ = ["TensorRTSession", "check_profile", "decode_profile"]


class TensorRTSession(Session):
    runtime = "tensorrt"

    def __init__(self, root: Path, runtime: Mapping[str, Any]):
        engine = runtime.get("engine")
        if not engine:
            why = runtime.get("unavailable") or "it was built without TensorRT"
            raise TargetUnavailableError(
                f"{root}: this tensorrt artifact has no engine to run ({why})")
        try:
            import tensorrt as trt
            from polygraphy.backend.trt import EngineFromPath, TrtRunner
            from polygraphy.exception import PolygraphyException
        except ImportError as e:
            raise TargetUnavailableError(
                f"{root}: running a TensorRT engine needs {e.name or 'tensorrt'}, which is not "
                "installed; pip install 'edgec[tensorrt]' on a machine with an NVIDIA GPU"
            ) from None
        plan = contained_path(root, engine, "runtime.engine")
        if not plan.is_file():
            raise UserError(f"{root}: the manifest names engine {engine!r}, which is missing from "
                            "the artifact; recompile it")
        self._profile = dict(runtime.get("profile") or {})
        # a KV-cache decoder's engine has [prefill, decode] profiles (targets.tensorrt.engine)
        self._profiles = list(runtime.get("profiles") or [])
        self._active = 0
        self._runner = TrtRunner(EngineFromPath(str(plan)))
        try:
            self._runner.activate()
        except (PolygraphyException, RuntimeError) as e:  # e.g. a plan from another TensorRT/GPU
            raise TargetUnavailableError(f"{plan}: TensorRT cannot load this engine ({e}); "
                                         "engines are tied to the TensorRT version and GPU that "
                                         "built them: recompile here") from None
        engine_obj = self._runner.engine
        names = [engine_obj.get_tensor_name(i) for i in range(engine_obj.num_io_tensors)]
        specs = {n: IOSpec(n, tuple(d if d >= 0 else None for d in engine_obj.get_tensor_shape(n)),
                           np.dtype(trt.nptype(engine_obj.get_tensor_dtype(n))).name)
                 for n in names}
        is_input = {n: engine_obj.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        super().__init__([specs[n] for n in names if is_input[n]],
                         [specs[n] for n in names if not is_input[n]])

    @classmethod
    def from_artifact(cls, root: Path, runtime: Mapping[str, Any]) -> TensorRTSession:
        return cls(root, runtime)

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._profiles:
            index = decode_profile(feeds)
            if index != self._active:
                self._runner.set_profile(index)
                self._active = index
            check_profile(feeds, self._profiles[index])
        else:
            check_profile(feeds, self._profile)
        outputs = self._runner.infer(feeds, check_inputs=False)
        return {o.name: np.array(outputs[o.name], copy=True) for o in self._outputs}

    def __del__(self):
        runner = getattr(self, "_runner", None)
        if runner is not None and runner.is_active:
            runner.deactivate()


def decode_profile(feeds: Mapping[str, np.ndarray]) -> int:
    """Which of a decoder engine's profiles a step uses: 1 (decode) for one new token over a
    non-empty cache, else 0 (prefill)."""
    past = next((v for k, v in feeds.items() if k.startswith("past_key_values.")), None)
    one = np.shape(feeds.get("input_ids", np.zeros((1, 2))))[1] == 1
    return 1 if one and past is not None and np.shape(past)[2] > 0 else 0


def check_profile(feeds: Mapping[str, np.ndarray], profile: Mapping[str, Mapping[str, list]]
                  ) -> None:
    """Refuse inputs outside the engine's optimization profile with what sizes it takes."""
    for name, p in profile.items():
        if name not in feeds:
            continue
        shape = list(np.shape(feeds[name]))
        lo, hi = list(p["min"]), list(p["max"])
        if len(shape) != len(lo) or any(not a <= s <= b for s, a, b in zip(shape, lo, hi)):
            if name.startswith("lora."):  # bound from the adapter bank, not by the caller
                raise UserError(f"adapter input {name} has shape {shape}; this TensorRT engine "
                                f"was built for {lo} to {hi} (ranks up to the sum of the "
                                "compiled adapters' ranks); recompile with this adapter among "
                                "--lora")
            built = (f"input {name!r} has shape {shape}; this TensorRT engine was built for "
                     f"shapes from {lo} to {hi} (its optimization profile)")
            if len(shape) != len(lo):
                raise UserError(f"{built}; give a rank-{len(lo)} input")
            if any(s > b for s, b in zip(shape, hi)):
                raise UserError(f"{built}; recompile with an example input this large")
            # below the minimum: a larger example does not help (a decoder built without
            # --generate has no empty-cache profile: past length 0 is under its 1)
            raise UserError(f"{built}; " + (
                "recompile the decoder with --generate --context N (its prefill profile takes "
                "an empty cache)" if name.startswith("past_key_values.") else
                "give an input at least its minimum size"))
