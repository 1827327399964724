"""Artifact directory: manifest I/O, content hashes, and atomic creation (stage, then rename).

A failed compile leaves nothing at ``out``: everything is written into a hidden staging
directory beside it and renamed into place only once complete. An existing ``out`` is replaced
only if it is an edgec artifact (or empty); anything else is refused. ``edgec calibrate`` writes
its cache the same way, replacing only a calibration cache (``replaceable``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from edgec.errors import UserError
from edgec.report_chart import LAYER_CHART

__all__ = ["FORMAT", "MANIFEST", "staged_output", "read_manifest", "is_artifact",
           "check_contained", "contained_path", "file_hashes", "file_sha256", "verify_files",
           "versions", "write_json"]

FORMAT = "edgec-artifact/1"
MANIFEST = "manifest.json"


def is_artifact(path: Path) -> bool:
    try:
        return json.loads((path / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _check_destination(out: Path, replaceable: Callable[[Path], bool] = is_artifact,
                       what: str = "an edgec artifact") -> None:
    """Refuse an output path that is a file or someone else's directory (non-empty and not
    ``replaceable``: not ``what`` this command writes), or where nothing can be written (a
    read-only mount, a path under a file): checked before the export, where a read-only parent
    was an internal error after it. A symbolic link is refused too: a dangling one failed the
    final rename after the whole export, and one to an artifact was renamed aside, not replaced,
    and left behind as a hidden ``.out.edgec-old-*`` link."""
    if out.is_symlink():
        raise UserError(f"{out}: is a symbolic link; give the directory it points to, or another "
                        "-o")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory; choose another -o")
    if out.is_dir() and any(out.iterdir()) and not replaceable(out):
        raise UserError(f"{out}: exists and is not {what}; refusing to overwrite it, "
                        "choose another -o or remove it")
    parent = next((p for p in out.parents if p.exists()), None)
    if parent is None or not parent.is_dir():
        raise UserError(f"{out}: {parent} is not a directory, so nothing can be written there; "
                        "choose another -o")
    try:  # a probe, removed at once (os.access passes a read-only mount, and root everywhere)
        os.rmdir(tempfile.mkdtemp(prefix=".edgec-probe-", dir=parent))
    except OSError as e:
        raise UserError(f"{out}: cannot write in {parent} ({e.strerror}); choose another -o"
                        ) from None


@contextlib.contextmanager
def staged_output(out: str | os.PathLike, replaceable: Callable[[Path], bool] = is_artifact,
                  what: str = "an edgec artifact") -> Iterator[Path]:
    """Yield a staging directory; on success it replaces ``out`` atomically, on error it goes.
    ``out`` may be absent, empty or ``replaceable`` (``what`` names it in the refusal)."""
    out = Path(out).absolute()
    _check_destination(out, replaceable, what)
    staging = out.parent / f".{out.name}.edgec-staging-{uuid.uuid4().hex[:8]}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
    except OSError as e:  # a read-only file system passes os.access
        raise UserError(f"{out}: cannot write there ({e.strerror}); choose another -o") from None
    try:
        yield staging
        _check_destination(out, replaceable, what)  # something may have appeared meanwhile
        trash = None
        if out.exists():
            trash = out.parent / f".{out.name}.edgec-old-{uuid.uuid4().hex[:8]}"
            out.rename(trash)
        staging.rename(out)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    d = Path(path)
    if not d.exists():
        raise UserError(f"{d}: no such artifact directory; compile one with `edgec compile`")
    if not d.is_dir():
        raise UserError(f"{d}: is not a directory; give an artifact directory from `edgec compile`")
    check_contained(d)
    try:
        manifest = json.loads((d / MANIFEST).read_text())
    except FileNotFoundError:
        raise UserError(f"{d}: has no {MANIFEST}; not an edgec artifact") from None
    except ValueError:
        raise UserError(f"{d / MANIFEST}: is not valid JSON; recompile the artifact") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{d / MANIFEST}: not an {FORMAT} manifest; recompile the artifact")
    # every compile writes these; a deleted or retyped one was a KeyError (exit 1) in run/inspect
    bad = next((k for k, kind in _REQUIRED.items() if not isinstance(manifest.get(k), kind)), None)
    if bad is not None:
        what = "has no" if bad not in manifest else f"has a {type(manifest[bad]).__name__} for"
        raise UserError(f"{d / MANIFEST}: damaged artifact: the manifest {what} its {bad!r} "
                        "entry; recompile or restore it")
    return manifest


_REQUIRED = {"source": dict, "target": dict, "recipe": dict, "inputs": list, "outputs": list,
             "runtime": dict, "hashes": dict}


def check_contained(root: Path) -> None:
    """Refuse an artifact holding a symbolic link that leaves it (a ``target/model.bin`` pointed
    at weights elsewhere): no runtime may read a file outside the artifact. A compile writes no
    links, so one is an edit; a link that stays inside the artifact is allowed. Artifacts hold
    few files: one walk, before the manifest is read (it could be such a link too)."""
    top = root.resolve()
    for dirpath, dirnames, filenames in os.walk(root):  # does not descend into linked dirs
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            if not p.is_symlink():
                continue
            rel = p.relative_to(root).as_posix()
            try:
                target = p.resolve(strict=True)
            except (OSError, RuntimeError):  # dangling, or a loop
                raise UserError(f"{root}: {rel} is a symbolic link that does not resolve; the "
                                "artifact was edited, recompile or restore it") from None
            if not target.is_relative_to(top):
                raise UserError(f"{root}: {rel} is a symbolic link to {target}, outside the "
                                "artifact; refusing to follow it (the artifact was edited, "
                                "recompile or restore it)")


def contained_path(root: Path, rel: Any, key: str) -> Path:
    """``root / rel`` for a file or folder the manifest's ``key`` names, refused unless it lies
    inside the artifact: a compile writes relative paths within it, so an absolute path, a '..'
    that leaves it or a link out of it is an edit (``lora.adapters.a`` set to ``../b`` ran
    another adapter, and ``inspect --verify`` hashed nothing amiss)."""
    if not isinstance(rel, str):
        raise UserError(f"{root}: damaged or edited artifact: {key} is {rel!r}, not a path; "
                        "recompile or restore it")
    path = Path(root) / rel
    if Path(rel).is_absolute() or not path.resolve().is_relative_to(Path(root).resolve()):
        raise UserError(f"{root}: damaged or edited artifact: {key} points outside it ({rel!r}); "
                        "recompile or restore it")
    return path


def file_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (relative POSIX paths), manifest and reports excluded."""
    hashes = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel not in (MANIFEST, "report.json", "report.md", LAYER_CHART):
            hashes[rel] = file_sha256(p)
    return hashes


def file_sha256(path: Path) -> str:
    """The file's sha256 (read in blocks: an artifact's weights or a data file may be large)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def verify_files(root: Path, manifest: dict[str, Any]) -> dict[str, str]:
    """Each file the manifest hashed whose bytes no longer match (``changed``) or that is gone
    (``missing``), and files added since (``added``): {path: what}."""
    recorded = manifest.get("hashes") or {}
    found = file_hashes(root)
    out = {rel: "missing" for rel in recorded if rel not in found}
    out.update({rel: "changed" for rel, h in found.items() if rel in recorded
                and recorded[rel] != h})
    out.update({rel: "added" for rel in found if rel not in recorded})
    order = {"changed": 0, "missing": 1, "added": 2}  # what breaks the artifact first
    return dict(sorted(out.items(), key=lambda kv: (order[kv[1]], kv[0])))


def versions() -> dict[str, str]:
    out = {}
    for dist in ("edgec", "torch", "onnx", "onnx-ir", "onnxscript", "onnxruntime", "openvino",
                 "numpy"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[dist] = metadata.version(dist)
    return out


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=_jsonable) + "\n")


def _jsonable(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return o.as_posix()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")
