"""A PyTorch module's outputs as the flat tensor list its ONNX export has, whatever it returns.

Tensors, tuples/lists, dicts and Hugging Face ``ModelOutput``s (an ordered dict whose unset
fields are absent) flatten in order, as ``torch.export`` flattens them; ``None`` is skipped.
Every place that runs a module (export check, LoRA reference) reads outputs through this.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from edgec.errors import UserError

__all__ = ["flatten_outputs", "output_keys", "positional_names"]


def flatten_outputs(out: Any) -> list:
    import torch

    if isinstance(out, torch.Tensor):
        return [out]
    if out is None:
        return []
    if isinstance(out, Mapping):  # dict, ModelOutput
        return [t for v in out.values() for t in flatten_outputs(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in flatten_outputs(v)]
    hint = ("; a transformers KV cache: call the model with use_cache=False (edgec turns "
            "model.config.use_cache off for its export)" if type(out).__name__.endswith("Cache")
            else "")
    raise UserError(f"forward returned {type(out).__name__}; edgec exports tensors and "
                    f"tuples/lists/dicts (or ModelOutputs) of tensors{hint}")


def output_keys(out: Any) -> list[str] | None:
    """The keys of a dict / ``ModelOutput`` of tensors, in ``flatten_outputs`` order: the names
    its outputs are exported under; None when ``out`` is anything else (nested: numbered)."""
    import torch

    if not isinstance(out, Mapping):
        return None
    items = [(k, v) for k, v in out.items() if v is not None]
    if items and all(isinstance(k, str) and k and isinstance(v, torch.Tensor) for k, v in items):
        return [k for k, _ in items]
    return None


def positional_names(out: Any) -> list[str]:
    """The default names of ``out``'s ONNX outputs: ``output`` for one tensor, else
    ``output_<i>`` with ``i`` the tensor's position among everything forward returned in
    ``flatten_outputs`` order, a skipped ``None`` counted (``(y, None, s)`` → ``output_0``,
    ``output_2``), so that a name maps back to its place in what forward returned."""
    import torch

    def leaves(v) -> list:
        if isinstance(v, Mapping):
            return [x for w in v.values() for x in leaves(w)]
        if isinstance(v, (tuple, list)):
            return [x for w in v for x in leaves(w)]
        return [v]

    flat = leaves(out)
    if len(flat) == 1:
        return ["output"] if isinstance(flat[0], torch.Tensor) else []
    return [f"output_{i}" for i, v in enumerate(flat) if v is not None]
