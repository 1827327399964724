"""Reading a user's .npz (``run --inputs``, calibration data) with every malformed file a
one-line UserError: numpy raised TypeError (an .npy renamed .npz is an array, not a context
manager), BadZipFile (a truncated zip), EOFError (an empty file) and MemoryError (a header
declaring 32 TiB, allocated before a byte was read)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from edgec.errors import UserError

__all__ = ["load_npz", "npy_headers"]

# deflate expands at most ~1032:1; a member whose directory entry claims more is lying
_DEFLATE_RATIO = 1100


def npy_headers(path: str | Path) -> dict[str, tuple[tuple[int, ...], np.dtype, int]]:
    """Each ``.npy`` member's (shape, dtype, bytes its directory entry says it holds), from the
    headers alone (no data read). Raises ValueError, OSError, EOFError, zipfile.BadZipFile."""
    out = {}
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            if not info.filename.endswith(".npy"):
                continue
            with z.open(info) as f:
                version = np.lib.format.read_magic(f)
                read = {(1, 0): np.lib.format.read_array_header_1_0,
                        (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                if read is None:  # 3.0 (utf-8 field names): no public reader
                    shape, _, dtype = np.lib.format._read_array_header(f, version)
                else:
                    shape, _, dtype = read(f)
            held = info.file_size
            if info.compress_type != zipfile.ZIP_STORED:
                held = min(held, info.compress_size * _DEFLATE_RATIO + 1024)
            out[info.filename[:-4]] = (tuple(shape), np.dtype(dtype), held)
    return out


def load_npz(path: Path, missing: str, hint: str) -> dict[str, np.ndarray]:
    """``path``'s arrays by key. ``missing``: what to say where there is no such file (after
    "PATH: "); ``hint``: how to make a good one (after "; ")."""
    if not path.is_file():
        raise UserError(f"{path}: {missing}")
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic == b"\x93NUMPY":
        raise UserError(f"{path}: one array (.npy), not an .npz keyed by input names; {hint}")
    if not magic.startswith(b"PK"):  # numpy read a text file as a pickle: "pickled data"
        raise UserError(f"{path}: not an .npz (numpy's zip of arrays); {hint}")

    def unreadable(e: BaseException) -> UserError:
        why = (str(e).splitlines() or [type(e).__name__])[0] or type(e).__name__
        return UserError(f"{path}: not a readable .npz ({why}); {hint}")

    try:
        headers = npy_headers(path)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise unreadable(e) from None
    for key, (shape, dtype, held) in headers.items():
        if dtype.hasobject:
            raise UserError(f"{path}: holds object arrays, which are never loaded (pickles); "
                            "save numeric arrays with numpy.savez")
        declared = int(np.prod(shape, dtype=object)) * dtype.itemsize
        if declared > held:
            raise UserError(f"{path}: array {key!r} declares shape {shape} ({declared} bytes) "
                            f"but its member holds at most {held}; the file is damaged; {hint}")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise UserError(f"{path}: holds object arrays, which are never loaded (pickles); "
                            "save numeric arrays with numpy.savez") from None
        raise unreadable(e) from None
    except (OSError, EOFError, zipfile.BadZipFile) as e:  # zlib / a truncated member
        raise unreadable(e) from None
