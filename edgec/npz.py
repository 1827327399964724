"""Write an .npz of named arrays whatever the names are.

``np.savez(path, **arrays)`` passes the names as keyword arguments: an output named
``allow_pickle`` was taken as that flag and left out of the file, and one named ``file`` failed
with "got multiple values for argument 'file'". Each array is written as numpy does (``name.npy``
in a zip, read back by ``np.load``), into a temporary file renamed over ``path`` once complete, so
a failure leaves no half-written file.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

__all__ = ["save_npz"]


def save_npz(path: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> None:
    """Write ``arrays`` to ``path`` exactly (no ``.npz`` appended), one member per name."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, arr in arrays.items():
                with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, np.asanyarray(arr), allow_pickle=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
