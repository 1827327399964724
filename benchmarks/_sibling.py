"""Load another benchmark script as a module (the scripts are run as files, not a package)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def load_sibling(name: str, alias: str):
    """``benchmarks/<name>.py`` imported under ``alias`` (registered in ``sys.modules``)."""
    path = Path(__file__).resolve().parent / f"{name}.py"
    spec = importlib.util.spec_from_file_location(alias, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[alias] = mod
    spec.loader.exec_module(mod)
    return mod
