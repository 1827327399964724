"""edgec: export PyTorch models to ONNX, rewrite them with checked passes, build for edge targets.

Public API: ``export``, ``compile``, ``load``. Heavy packages (torch, onnxruntime, openvino) load
only when one of these is called.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["export", "compile", "load", "calibrate", "__version__"]
__version__ = "0.1.0"


def export(module: Any, example_inputs: Sequence[Any], path: str | os.PathLike,
           dynamic_shapes: Mapping[str, Mapping[int, str]] | None = None) -> str:
    """Export ``module`` to ``path`` (.onnx + .onnx.data), verified against PyTorch.

    ``dynamic_shapes`` maps forward-argument names to ``{axis: dim_name}``. Returns the path.
    """
    from edgec.exporters.export_file import export_to_file

    export_to_file(module, path, example_inputs=example_inputs, dynamic_shapes=dynamic_shapes)
    return str(path)


def compile(source: Any, target: str = "ort-cpu", output_dir: str | os.PathLike = "out",
            config: str | None = None, example_inputs: Sequence[Any] | None = None,
            sparse_attention: Any = None, check: bool = False,
            dynamic_shapes: Mapping[str, Mapping[int, str]] | None = None,
            lora: Any = None, lora_mode: str = "merge", prune: Any = None,
            quantize: Any = None, calibration: Any = None):
    """Compile ``source`` (registry name, .onnx path or nn.Module) for ``target``.

    ``sparse_attention``: ``"keep=0.2,block=64,..."``, a dict of the same options, a
    ``SparseAttentionConfig`` or True for the defaults (see ``edgec compile --help``).
    ``lora``: PEFT adapter dir(s): ``"dir"``, ``["a", "b"]``, ``{"a": 0.7, "b": 0.3}`` (weights
    for merge modes); ``lora_mode``: ``merge`` | ``sparse-merge`` (LoSA: keeps the base's zeros)
    | ``swappable`` (adapters as graph inputs, ``Session.run(..., adapter=name)``).
    ``prune``: ``"magnitude:0.5"`` or ``"2:4"`` (MatMul weights, before LoRA).
    ``quantize``: a scheme the target offers (``w8a8``, ``w8a16``, ``w4a16``, ``fp8``), optionally
    ``"w8a8:method=entropy,exclude=Softmax;/lm_head/MatMul,samples=32"``.
    ``calibration``: a cache from ``edgec calibrate`` (directory or calibration.json), an .npz of
    samples (leading sample axis), or None (calibrate with the source's own generator).
    Returns an ``Artifact`` (``.path``, ``.manifest``, ``.report``, ``.load()``).
    """
    from edgec.pipeline import compile_model

    return compile_model(source, target=target, output_dir=output_dir, config=config,
                         example_inputs=example_inputs, dynamic_shapes=dynamic_shapes,
                         sparse_attention=sparse_attention, check=check, lora=lora,
                         lora_mode=lora_mode, prune=prune, quantize=quantize,
                         calibration=calibration)


def calibrate(source: Any, target: str, output_dir: str | os.PathLike, config: str | None = None,
              data: str | os.PathLike | None = None, quantize: str = "w8a8", **recipe: Any):
    """Calibrate ``source`` for ``target`` (see ``edgec.calibration.calibrate``)."""
    from edgec.calibration import calibrate as _calibrate

    return _calibrate(source, target, output_dir, config=config, data=data, quantize=quantize,
                      **recipe)


def load(path: str | os.PathLike):
    """Open a compiled artifact directory: ``Session.run/inputs/outputs/benchmark``."""
    from edgec.runtimes import load as _load

    return _load(path)
