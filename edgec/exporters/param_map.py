"""Parameter map: which ONNX initializer holds which PyTorch parameter, and in what layout.

The dynamo exporter keeps parameter names for most weights but folds ``Linear`` transposes into
anonymous ``val_N`` initializers (recording ``folded_from`` metadata) and deduplicates equal
constants. Every entry here is *verified against the tensor values*, not trusted from metadata.
Parameters PyTorch ties (one Parameter under several names: a decoder's embedding and LM head)
list each other under ``tied``, so an edit of their shared initializer is known to be what
editing the one PyTorch parameter does, not a change to an unrelated weight that happened to
be equal.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

if TYPE_CHECKING:
    import torch

__all__ = ["build_parameter_map", "strip_prefix"]

_FOLDED_FROM = "pkg.onnxscript.optimizer.folded_from"


def _digest(a: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(a).tobytes(), digest_size=16).hexdigest()


def _numpy(a) -> np.ndarray:
    """A torch tensor's or an ONNX tensor's values as numpy; bfloat16 (no numpy dtype in torch,
    ml_dtypes' in onnx_ir) as float32, exactly, so both sides compare and hash alike."""
    arr = a.float().numpy() if getattr(a, "dtype", None) is _torch_bf16() else a.numpy()
    return arr.astype(np.float32) if arr.dtype.name == "bfloat16" else arr


def _torch_bf16():
    import torch

    return torch.bfloat16


def build_parameter_map(model: ir.Model, module: torch.nn.Module) -> dict[str, dict[str, str]]:
    """Map PyTorch parameter/buffer name → ``{"initializer": name, "layout": "same"|"transposed"}``.

    Parameters the graph does not use (dead, or folded into other constants) are absent.
    """
    import torch
    state = {k: _numpy(v.detach().cpu()) for k, v in module.state_dict(keep_vars=False).items()
             if v.dtype.is_floating_point or v.dtype in (torch.int64, torch.int32)}
    inits = model.graph.initializers
    out: dict[str, dict[str, str]] = {}

    def record(param: str, init_name: str) -> bool:
        value = inits[init_name].const_value
        if value is None or param not in state:
            return False
        arr, ref = _numpy(value), state[param]
        if arr.shape == ref.shape and np.array_equal(arr, ref):
            out[param] = {"initializer": init_name, "layout": "same"}
            return True
        if arr.ndim == 2 and arr.shape == ref.shape[::-1] and np.array_equal(arr, ref.T):
            out[param] = {"initializer": init_name, "layout": "transposed"}
            return True
        return False

    for name, value in inits.items():
        if name in state:
            record(name, name)
        sources = value.meta.get(_FOLDED_FROM) or ()
        if len(sources) == 1:
            record(next(iter(sources)), name)

    missing = [p for p in state if p not in out]
    if missing:  # deduplicated constants: find an initializer holding the same bytes
        by_digest: dict[tuple, str] = {}
        for name, value in inits.items():
            if value.const_value is not None and value.const_value.size > 1:
                arr = _numpy(value.const_value)
                by_digest.setdefault((arr.shape, str(arr.dtype), _digest(arr)), name)
        for p in missing:
            ref = state[p]
            key = (ref.shape, str(ref.dtype), _digest(ref))
            if ref.size > 1 and key in by_digest:
                record(p, by_digest[key])
    groups: dict[int, list[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    for names in groups.values():
        for name in names:
            if name in out and len(names) > 1:
                out[name]["tied"] = sorted(n for n in names if n != name)
    return out


def strip_prefix(parameter_map: dict[str, dict], prefix: str, only: bool = True
                 ) -> dict[str, dict]:
    """``parameter_map`` with ``prefix`` (a wrapper's attribute) taken off every name, the
    ``tied`` lists too; ``only``: drop the names without it."""
    out = {}
    for name, entry in parameter_map.items():
        if only and not name.startswith(prefix):
            continue
        entry = dict(entry)
        if "tied" in entry:
            entry["tied"] = [t.removeprefix(prefix) for t in entry["tied"]]
        out[name.removeprefix(prefix)] = entry
    return out
