"""How users name and weight LoRA adapters: one rule for the compile (``--lora DIR:0.7``) and for
run time (``--adapter a:0.7,b:0.3``, ``Session.run(adapter={...})``), so that a weight or a name
the one accepts the other does too.

Weights are finite and within float32's range (merges and branches are fp32: 1e39 became inf,
nan ran all-NaN logits). An adapter is named by its directory's resolved name (``--lora .`` was
named ``''``); a swappable adapter's name must be addressable by the blend syntax
``name:weight,name:weight``, so it holds no ``:`` or ``,``, no spaces at its ends (the parser
strips them), and is neither ``base`` (the base model) nor a hidden or repeated name.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edgec.errors import UserError

__all__ = ["adapter_weight", "dir_name", "name_problem", "check_names", "blend_spec"]

NO_ADAPTER = "base"  # reserved adapter name: the base model (every LoRA branch zero)
_F32_MAX = float(np.finfo(np.float32).max)
_DECIMAL = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", re.ASCII)
_BLEND_HINT = "give name:weight,name:weight (e.g. style:0.7,subject:0.5)"


def adapter_weight(value: Any) -> float:
    """``value`` as an adapter weight; ValueError saying what it is instead (the caller's line
    names where it came from). Python's float() also reads "1_0" as 10, Arabic-Indic digits
    and True: a weight is a plain decimal number (or a real number that is no bool)."""
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, str)
                                               and not _DECIMAL.fullmatch(value.strip())
                                               and value.strip().lower().lstrip("+-")
                                               not in ("inf", "infinity", "nan")):
        raise ValueError("is not a number")
    try:
        weight = float(value)
    except (TypeError, ValueError):
        raise ValueError("is not a number") from None
    if not math.isfinite(weight):
        raise ValueError("is not a finite number")
    if abs(weight) > _F32_MAX:
        raise ValueError("overflows float32 (|weight| ≤ 3.4e38)")
    return weight


def dir_name(path: str | Path) -> str:
    """The name an adapter at ``path`` gets: its directory's, with ``.``/``..`` resolved
    (lexically: a symlinked adapter keeps its link's name)."""
    return Path(os.path.abspath(path)).name


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a swappable adapter's name, or None."""
    if name == NO_ADAPTER:
        return "is reserved for the base model"
    if not name.strip() or name != name.strip():
        return "is empty or has spaces at its ends"
    if ":" in name or "," in name:
        return "holds ':' or ',', which --adapter reads as a blend (name:weight,name:weight)"
    if name.startswith(".") or "/" in name or "\\" in name:
        return "is not a plain directory name"
    return None


def check_names(names: Iterable[str], hint: str = "rename the adapter directory") -> None:
    """Refuse a swappable adapter name run time could not address, or one given twice."""
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise UserError(f"adapter name {name!r} is given twice; give each adapter once "
                            "(two different adapters in directories of that name: rename one)")
        problem = name_problem(name)
        if problem:
            plain = re.sub(r"[:,/\\\s]+", "_", name.strip()).strip("._")
            raise UserError(f"adapter name {name!r} {problem}; {hint} (e.g. "
                            f"{plain if plain not in ('', NO_ADAPTER) else 'my_adapter'})")
        seen.add(name)


def blend_spec(spec: str | Mapping[str, float]) -> str | dict[str, float]:
    """An adapter name as it is, or a blend's weights by name (``"a:0.7,b:0.3"``, ``"a,b"`` or
    a mapping); a bad weight, an empty entry or a name given twice is refused in one line."""
    if isinstance(spec, str) and ":" not in spec and "," not in spec:
        return spec
    if isinstance(spec, Mapping):
        items = [(str(k).strip(), v) for k, v in spec.items()]
    elif isinstance(spec, str):
        parts = (p.rpartition(":")[::2] if ":" in p else (p, "1") for p in spec.split(","))
        items = [(name.strip(), weight) for name, weight in parts]
    else:
        raise UserError(f"adapter {spec!r}: give a name, 'name:weight,...' or "
                        "{name: weight}")
    out: dict[str, float] = {}
    for name, weight in items:
        if not name:
            raise UserError(f"adapter blend {spec!r} has an empty entry; {_BLEND_HINT}")
        if name in out:
            raise UserError(f"adapter blend {spec!r} names {name!r} twice; give each adapter "
                            "once with its total weight")
        try:
            out[name] = adapter_weight(weight)
        except ValueError as e:
            raise UserError(f"adapter blend {spec!r}: weight {weight!r} of {name!r} {e}; "
                            f"{_BLEND_HINT}") from None
    if not out:
        raise UserError(f"adapter blend {spec!r} names no adapter; {_BLEND_HINT}")
    return out
