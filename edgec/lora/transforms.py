"""The transforms a rotation leaves on swappable-LoRA sites, kept as the factors it applied.

A rotation edits a base weight on its input side (W ← M·W) and its output side (W ← W·M); a site's
branch then needs A_in = M_a·Aᵀ and B_in = w·s·Bᵀ·M_b (``edgec.lora.binding.site_feeds``). M_a is
what the pass did on the input side, in order: a norm's scale diag(γ), R1ᵀ, R2ᵀ per query head;
M_b the output side: LayerNorm centering C, R1, R2 per kv head. Composed into one dense [n, n]
matrix per site they were distinct per layer (each layer's γ differs): on a decoder of hidden
4096 and 32 layers about 64 float32 matrices of 64 MB in the artifact, and float64 copies of
each per site while the pass ran. As factors, the stream's R1 is stored once, γ as its vector,
R2 as its head blocks and C as its size.

File (``adapters/transforms.safetensors``, metadata ``edgec.transforms: factors``): one entry per
distinct factor, named ``<kind>.<i>`` (``blocks`` entries have ``<name>.starts`` beside them); a
site's ``a_transform`` / ``b_transform`` lists its factor names in the order they apply. A file
without that metadata (artifacts compiled before) holds one dense matrix per name, and a site
names it as a plain string.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from edgec.errors import UserError

__all__ = ["Factor", "apply_left", "apply_right", "factor_names", "save_factors",
           "load_factors"]

FORMAT_KEY, FORMAT = "edgec.transforms", "factors"
KINDS = ("dense", "diag", "blocks", "center")


@dataclasses.dataclass(frozen=True, eq=False)
class Factor:
    """One [n, n] factor: ``dense`` (``data`` the matrix), ``diag`` (``data`` the diagonal),
    ``blocks`` (identity but ``data[i]`` [d, d] at rows/columns ``starts[i]``), ``center``
    (I − 11ᵀ/n; ``data`` is [n])."""

    kind: str
    data: np.ndarray
    starts: tuple[int, ...] = ()

    @classmethod
    def dense(cls, m: np.ndarray) -> Factor:
        return cls("dense", np.asarray(m))

    @classmethod
    def diag(cls, g: np.ndarray) -> Factor:
        return cls("diag", np.asarray(g).reshape(-1))

    @classmethod
    def blocks(cls, starts: Sequence[int], blocks: Iterable[np.ndarray]) -> Factor:
        return cls("blocks", np.stack([np.asarray(b) for b in blocks]),
                   tuple(int(s) for s in starts))

    @classmethod
    def center(cls, n: int) -> Factor:
        return cls("center", np.asarray([n], np.int64))

    def left(self, a: np.ndarray) -> np.ndarray:
        """``self @ a``."""
        if self.kind == "dense":
            return self.data @ a
        if self.kind == "diag":
            return self.data[:, None] * a
        if self.kind == "center":
            return a - a.mean(axis=0, keepdims=True)
        k, d = len(self.data), self.data.shape[-1]
        if self._tiles(len(a)):  # the heads side by side: one batched product
            return np.matmul(self.data, a.reshape(k, d, -1)).reshape(a.shape)
        out = a.copy()
        for s, block in zip(self.starts, self.data):
            out[s:s + len(block)] = block @ a[s:s + len(block)]
        return out

    def right(self, b: np.ndarray) -> np.ndarray:
        """``b @ self``."""
        if self.kind == "dense":
            return b @ self.data
        if self.kind == "diag":
            return b * self.data[None, :]
        if self.kind == "center":
            return b - b.mean(axis=1, keepdims=True)
        k, d = len(self.data), self.data.shape[-1]
        if self._tiles(b.shape[1]):
            return np.matmul(b.T.reshape(k, d, -1).transpose(0, 2, 1), self.data
                             ).transpose(1, 0, 2).reshape(b.shape)
        out = b.copy()
        for s, block in zip(self.starts, self.data):
            out[:, s:s + len(block)] = b[:, s:s + len(block)] @ block
        return out

    def _tiles(self, n: int) -> bool:
        """Whether the blocks cover [0, n) one after another."""
        d = self.data.shape[-1]
        return len(self.data) * d == n and self.starts == tuple(range(0, n, d))

    def matrix(self, n: int | None = None) -> np.ndarray:
        """The dense [n, n] matrix (``n``: needed for ``blocks``, whose size the data omit)."""
        if self.kind == "blocks" and n is None:
            raise ValueError("a blocks factor needs its size")
        size = {"dense": lambda: len(self.data), "diag": lambda: len(self.data),
                "center": lambda: int(self.data[0])}.get(self.kind, lambda: n)()
        return self.left(np.eye(size))

    def as_float32(self) -> Factor:
        if self.kind == "center":
            return self
        return dataclasses.replace(self, data=np.ascontiguousarray(self.data, np.float32))

    def digest(self) -> str:
        data = np.ascontiguousarray(self.data)
        return hashlib.sha1(repr((self.kind, data.shape, str(data.dtype), self.starts)).encode()
                            + data.tobytes()).hexdigest()


def apply_left(factors: Sequence[Factor], a: np.ndarray) -> np.ndarray:
    """M·a where M is ``factors`` applied in order (the first applied first: M = fₖ···f₁)."""
    for f in factors:
        a = f.left(a)
    return a


def apply_right(b: np.ndarray, factors: Sequence[Factor]) -> np.ndarray:
    """b·M where M = f₁···fₖ (``factors`` in the order the pass applied them)."""
    for f in factors:
        b = f.right(b)
    return b


def factor_names(value: str | Sequence[str] | None) -> list[str]:
    """A site's ``a_transform`` / ``b_transform`` as factor names (a string: the older single
    dense matrix)."""
    if not value:
        return []
    return [value] if isinstance(value, str) else list(value)


def save_factors(factors: Mapping[str, Factor], path: Path) -> None:
    from safetensors.numpy import save_file

    tensors = {}
    for name, f in factors.items():
        if f.kind not in KINDS or not name.startswith(f"{f.kind}."):
            raise ValueError(f"factor {name!r} must be named <kind>.<i> with kind in {KINDS}")
        tensors[name] = np.ascontiguousarray(f.as_float32().data)
        if f.kind == "blocks":
            tensors[f"{name}.starts"] = np.asarray(f.starts, np.int64)
    save_file(tensors, str(path), metadata={FORMAT_KEY: FORMAT})


def load_factors(path: Path) -> dict[str, Factor]:
    """The factors of a transforms file (float64: binding multiplies in float64, and converting
    a float32 factor on every product doubled its time); an older file's matrices as ``dense``
    factors."""
    from safetensors import SafetensorError, safe_open

    try:  # a damaged file was "internal error: SafetensorError" (exit 1)
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (no iter)
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable safetensors ({e}); the artifact is damaged, "
                        "recompile or restore it") from None
    tensors = {k: v.astype(np.float64) if v.dtype.kind == "f" else v for k, v in tensors.items()}
    if meta.get(FORMAT_KEY) != FORMAT:
        return {k: Factor.dense(v) for k, v in tensors.items()}
    out = {}
    for name, data in tensors.items():
        kind = name.split(".", 1)[0]
        if name.endswith(".starts") and kind == "blocks":
            continue
        if kind not in KINDS:
            raise UserError(f"{path}: transform {name!r} is of no known kind ({', '.join(KINDS)}); "
                            "the artifact is damaged or from a newer edgec: recompile it")
        starts = tuple(int(s) for s in tensors[f"{name}.starts"]) if kind == "blocks" else ()
        out[name] = Factor(kind, data, starts)
    return out
