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
            config: str | None = None, example_inputs: Sequence[Any] | None = None, *,
            dynamic_shapes: Mapping[str, Mapping[int, str]] | None = None, **options: Any):
    """Compile ``source`` (model name, .onnx path, HF checkpoint dir or nn.Module) for ``target``.

    ``options`` are the recipe (``edgec.recipe.Recipe``; an unknown one is refused):
    ``sparse_attention``: ``"keep=0.2,block=64,..."``, a dict of the same options, a
    ``SparseAttentionConfig`` or True for the defaults (see ``edgec compile --help``).
    ``lora``: PEFT adapter dir(s): ``"dir"``, ``["a", "b"]``, ``{"a": 0.7, "b": 0.3}`` (weights
    for merge modes); ``lora_mode``: ``merge`` | ``sparse-merge`` (LoSA: keeps the base's zeros)
    | ``swappable`` (adapters as graph inputs, ``Session.run(..., adapter=name)``).
    ``prune``: ``"magnitude:0.5"`` or ``"2:4"`` (MatMul/Gemm weights, before LoRA).
    ``quantize``: a scheme the target offers (``w8a8``, ``w8a16``, ``w4a16``, ``fp8``), optionally
    ``"w8a8:method=entropy,exclude=Softmax;/lm_head/MatMul,samples=32"`` or a dict of the same.
    ``calibration``: a cache from ``edgec calibrate`` (directory or calibration.json), an .npz of
    samples (leading sample axis), or None (calibrate with the source's own generator).
    ``check``: verify every pass numerically.
    ``soc``: qnn-htp's device, ``"sm8650"`` or ``"8-gen-3"`` (``edgec targets`` lists them).
    ``kv_cache``: a generation artifact's KV cache precision on openvino-cpu, ``"f32"``
    (default), ``"f16"`` or ``"u8"`` (measured against fp32 at compile time).
    Returns an ``Artifact`` (``.path``, ``.manifest``, ``.report``, ``.load()``).
    """
    from edgec.pipeline import compile_model
    from edgec.recipe import Recipe

    progress = options.pop("progress", None)
    recipe = Recipe.parse(target, config=config, **options)  # validated before any export
    return compile_model(source, recipe, output_dir, example_inputs=example_inputs,
                         dynamic_shapes=dynamic_shapes, progress=progress)


def calibrate(source: Any, target: str, output_dir: str | os.PathLike, config: str | None = None,
              data: str | os.PathLike | None = None, quantize: Any = "w8a8", *,
              example_inputs: Sequence[Any] | None = None,
              dynamic_shapes: Mapping[str, Mapping[int, str]] | None = None, **options: Any):
    """Collect activation ranges of ``source`` as ``target`` will quantize it; save the cache.

    ``quantize`` is the scheme (with options, as for ``compile``); ``data`` an .npz of samples
    (leading sample axis) or None for the source's own generator; ``options`` are compile's other
    recipe options (sparse_attention, lora, lora_mode, prune), so the calibrated graph is the one
    the compile quantizes. Writes ``output_dir/calibration.json`` only once calibration
    succeeded; returns the ``CalibrationCache``.
    """
    from edgec.pipeline import calibrate_source
    from edgec.recipe import Recipe

    step, progress = options.pop("step", None), options.pop("progress", None)
    recipe = Recipe.parse(target, config=config, quantize=quantize, **options)
    return calibrate_source(source, recipe, output_dir, data=data, example_inputs=example_inputs,
                            dynamic_shapes=dynamic_shapes, step=step, progress=progress)


def load(path: str | os.PathLike):
    """Open a compiled artifact directory: ``Session.run/inputs/outputs/benchmark``."""
    from edgec.runtimes import load as _load

    return _load(path)
