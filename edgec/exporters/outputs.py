"""A PyTorch module's outputs as the flat tensor list its ONNX export has, whatever it returns.

Tensors, tuples/lists, dicts and Hugging Face ``ModelOutput``s (an ordered dict whose unset
fields are absent) flatten in order, as ``torch.export`` flattens them; ``None`` is skipped.
Every place that runs a module (export check, LoRA reference) reads outputs through this.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from edgec.errors import UserError

__all__ = ["flatten_outputs"]


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
    raise UserError(f"forward returned {type(out).__name__}; edgec exports tensors and "
                    "tuples/lists/dicts (or ModelOutputs) of tensors")
