"""Orthogonal matrices for rotations: Hadamard of every order the Sylvester and Paley constructions
reach, as Kronecker factors, with a seeded random orthogonal factor for what is left.

A normalized Hadamard matrix spreads one large channel evenly over all channels (every entry is
±1/√n), which is why QuaRot rotates with it. Real widths are often not powers of two (LLaMA-2's FFN
is 11008 = 2⁸·43): the largest divisor with a known Hadamard matrix (2ᵏ·{1, 12, 20, 28, 44, …})
gets one, the rest a random orthogonal factor (seeded), and the rotation is their Kronecker
product, so an online MatMul needs two small matrices instead of one n×n one.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

__all__ = ["hadamard", "orthogonal_factors", "kron", "random_hadamard", "random_orthogonal",
           "apply_left_transpose"]


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % p for p in range(2, int(q**0.5) + 1))


def _jacobsthal(q: int) -> np.ndarray:
    """Q[i, j] = χ(j − i), χ the quadratic character mod the prime q."""
    residues = {(x * x) % q for x in range(1, q)}
    chi = np.array([0] + [1 if a in residues else -1 for a in range(1, q)])
    idx = (np.arange(q)[None, :] - np.arange(q)[:, None]) % q
    return chi[idx]


def _paley1(q: int) -> np.ndarray:
    """Order q+1 for a prime q ≡ 3 (mod 4): H = I + [[0, 1ᵀ], [−1, Q]]."""
    s = np.zeros((q + 1, q + 1), dtype=np.int64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, _jacobsthal(q)
    return np.eye(q + 1, dtype=np.int64) + s


def _paley2(q: int) -> np.ndarray:
    """Order 2(q+1) for a prime q ≡ 1 (mod 4), from the symmetric conference matrix C."""
    c = np.zeros((q + 1, q + 1), dtype=np.int64)
    c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, _jacobsthal(q)
    return (np.kron(c, np.array([[1, 1], [1, -1]]))
            + np.kron(np.eye(q + 1, dtype=np.int64), np.array([[1, -1], [-1, -1]])))


def _paley_prime(n: int) -> tuple[int, int] | None:
    """(construction, q) of a Paley Hadamard matrix of order n, or None."""
    if n % 4:
        return None
    if _is_prime(n - 1) and (n - 1) % 4 == 3:
        return 1, n - 1
    if _is_prime(n // 2 - 1) and (n // 2 - 1) % 4 == 1:
        return 2, n // 2 - 1
    return None


@functools.lru_cache(maxsize=4096)
def _constructible(n: int) -> bool:
    return n == 1 or _paley_prime(n) is not None or (n % 2 == 0 and _constructible(n // 2))


@functools.lru_cache(maxsize=16)
def _hadamard(n: int) -> np.ndarray | None:
    if not _constructible(n):
        return None
    if n == 1:
        return np.ones((1, 1), dtype=np.int64)
    paley = _paley_prime(n)
    if paley is not None:
        return _paley1(paley[1]) if paley[0] == 1 else _paley2(paley[1])
    half = _hadamard(n // 2)  # Sylvester doubling
    return np.block([[half, half], [half, -half]])


def hadamard(n: int) -> np.ndarray | None:
    """A ±1 matrix H with H·Hᵀ = n·I, or None where neither construction reaches ``n``."""
    h = _hadamard(int(n))
    return None if h is None else h.copy()


def random_orthogonal(n: int, rng: np.random.Generator) -> np.ndarray:
    """Haar-random orthogonal n×n (QR of a Gaussian, signs fixed so the law is uniform)."""
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))[None, :]


def orthogonal_factors(n: int, seed: int = 0, max_factor: int = 256) -> list[np.ndarray]:
    """Orthogonal matrices whose Kronecker product is an n×n rotation: normalized Hadamard where
    one exists, otherwise a Hadamard factor ⊗ a seeded random orthogonal one.

    Hadamard factors stay ≤ ``max_factor`` where possible (Sylvester matrices are Kronecker
    closed, so 4096 = 64·64), so that an online rotation costs small MatMuls; among those choices
    the one leaving the smallest random factor wins (11008 → H₂₅₆ ⊗ Q₄₃).
    """
    if n < 1:
        raise ValueError(f"rotation size must be positive, got {n}")
    best: tuple | None = None
    for d in (k for k in range(1, n + 1) if n % k == 0 and _constructible(k)):
        parts = _hadamard_split(d, max_factor)
        key = (max(parts) > max_factor, n // d, max(parts))
        if best is None or key < best[0]:
            best = (key, parts, n // d)
    _, parts, rest = best
    factors = [_normalized(p) for p in parts if p > 1]
    if rest > 1:
        factors.append(random_orthogonal(rest, np.random.default_rng(seed)))
    return factors or [np.ones((1, 1))]


def _hadamard_split(d: int, max_factor: int) -> list[int]:
    """Sizes of Hadamard factors of order d: d itself, or 2ʲ·(d/2ʲ) as evenly as possible."""
    if d <= max_factor:
        return [d]
    splits = [(max(1 << j, d >> j), 1 << j) for j in range(1, d.bit_length())
              if d % (1 << j) == 0 and _constructible(d >> j)]
    if not splits:
        return [d]
    a = min(splits)[1]
    return [a, d // a]


def _normalized(n: int) -> np.ndarray:
    return _hadamard(n).astype(np.float64) / np.sqrt(n)


def kron(factors: Sequence[np.ndarray]) -> np.ndarray:
    out = np.ones((1, 1))
    for f in factors:
        out = np.kron(out, f)
    return out


def random_hadamard(n: int, seed: int = 0) -> np.ndarray:
    """diag(±1)·H: QuaRot's randomized Hadamard (dense, float64); random signs from ``seed``."""
    signs = np.random.default_rng(seed + 1).choice([-1.0, 1.0], size=n)
    return signs[:, None] * kron(orthogonal_factors(n, seed))


def apply_left_transpose(factors: Sequence[np.ndarray], w: np.ndarray) -> np.ndarray:
    """Mᵀ·W for M = F₁ ⊗ … ⊗ Fₖ without forming M (W is [n, …]; one tensordot per factor)."""
    sizes = [f.shape[0] for f in factors]
    x = w.reshape(*sizes, -1)
    for axis, f in enumerate(factors):
        x = np.moveaxis(np.tensordot(f, x, axes=([0], [axis])), 0, axis)
    return x.reshape(w.shape)
