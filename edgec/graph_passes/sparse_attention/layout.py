"""Token layout for block-sparse attention: 3D tiles, permutation, sink blocks, static patterns.

Everything here is numpy and static (computed at compile time from the video grid); the graph
only Gathers with the resulting index tables. ``reference_block_selection`` is the numpy twin of
the block selection the rewritten graph computes (tests and quality metrics use it).
"""

from __future__ import annotations

import itertools
import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from edgec.graph_passes.sparse_attention.config import SparseAttentionConfig

__all__ = ["choose_tile", "tile_permutation", "sink_blocks", "static_pattern",
           "query_block_pattern", "reference_block_selection", "kept_blocks"]

FORCE = 1e9  # added to forced (sink) block scores so TopK always takes them


def choose_tile(grid: tuple[int, int, int], block: int, frame_aligned: bool
                ) -> tuple[int, int, int] | None:
    """The most compact (tt, th, tw) tile of ``block`` tokens that divides ``grid``.

    ``frame_aligned`` forces tt = 1 so each block lies in one frame (needed for a first-frame
    sink that costs only one frame of blocks). None if no tile divides the grid.
    """
    t, h, w = grid
    best = None
    for tt, th in itertools.product(range(1, t + 1), range(1, h + 1)):
        if block % (tt * th) or (frame_aligned and tt != 1):
            continue
        tw = block // (tt * th)
        if t % tt or h % th or w % tw:
            continue
        spread = max(tt, th, tw) / min(tt, th, tw)
        if best is None or spread < best[0]:
            best = (spread, (tt, th, tw))
    return best[1] if best else None


def tile_permutation(grid: tuple[int, int, int], tile: tuple[int, int, int]) -> np.ndarray:
    """perm such that ``tokens[perm]`` lists tokens tile by tile (raster order inside tiles)."""
    t, h, w = grid
    tt, th, tw = tile
    idx = np.arange(t * h * w).reshape(t // tt, tt, h // th, th, w // tw, tw)
    return idx.transpose(0, 2, 4, 1, 3, 5).reshape(-1).astype(np.int64)


def _block_coords(grid, tile) -> np.ndarray:
    """(frame-tile, row-tile, col-tile) coordinates of each block in tile order."""
    t, h, w = grid
    tt, th, tw = tile
    return np.stack(np.meshgrid(np.arange(t // tt), np.arange(h // th), np.arange(w // tw),
                                indexing="ij"), -1).reshape(-1, 3)


def sink_blocks(grid, tile) -> np.ndarray:
    """Blocks holding first-frame tokens (tile order)."""
    return np.flatnonzero(_block_coords(grid, tile)[:, 0] == 0).astype(np.int64)


def _pattern_cost(grid, tile, kind: str, forced=()) -> np.ndarray:
    """[n_blocks, n_blocks] distance of each key block from each query tile (forced: -1)."""
    c = _block_coords(grid, tile).astype(np.float64)
    dt = np.abs(c[:, None, 0] - c[None, :, 0])
    ds = np.hypot(c[:, None, 1] - c[None, :, 1], c[:, None, 2] - c[None, :, 2])
    big = 1e6
    cost = dt * big + ds if kind == "spatial" else ds * big + dt
    cost[:, np.asarray(forced, dtype=np.int64)] = -1.0
    return cost


def static_pattern(grid, tile, k: int, kind: str, forced=()) -> np.ndarray:
    """[n_blocks, k] key blocks of RainFusion's static heads: forced blocks, then nearest.

    ``spatial``: same frame first (a band around the query block), then neighbouring frames;
    ``temporal``: same spatial tile across frames first, then spatial neighbours.
    """
    cost = _pattern_cost(grid, tile, kind, forced)
    return np.argsort(cost, axis=1, kind="stable")[:, :k].astype(np.int64)


def query_block_pattern(grid, tile, k: int, kind: str, ratio: int, forced=()) -> np.ndarray:
    """[n_query_blocks, k] static key blocks for query blocks of ``ratio`` tiles each.

    ``static_pattern`` for the query block as a whole: forced blocks, its own tiles, then the
    blocks nearest to any of its tiles (ties: nearest its centre tile), so each tile's temporal
    column or frame band is in. Taking the first tile's row left the other tiles without their
    own block (7 of 8 at qblock = 8 × block); keeping the blocks most tiles' rows share lost
    the tiles' own temporal partners to shared spatial neighbours.
    """
    cost = _pattern_cost(grid, tile, kind, forced)
    rows = []
    for lo in range(0, len(cost), ratio):
        own = np.arange(lo, min(lo + ratio, len(cost)))
        rows.append(np.lexsort((cost[own[len(own) // 2]], cost[own].min(0)))[:k])
    return np.stack(rows).astype(np.int64)


def kept_blocks(n_blocks: int, keep: float, n_forced: int) -> int:
    return min(n_blocks, math.ceil(keep * n_blocks) + n_forced)


def reference_block_selection(q: np.ndarray, k: np.ndarray, cfg: SparseAttentionConfig
                              ) -> np.ndarray:
    """Selected key blocks [B, H, n_query_blocks, k_sel] for the video tokens (rf2).

    ``q``, ``k``: [B, H, N, d], already scaled, prefix included; mirrors the graph: permute,
    zero-pad to whole blocks, block means over real tokens, scores, forced sinks, top-k.
    """
    p = cfg.prefix
    qv, kv = q[:, :, p:], k[:, :, p:]
    layout = cfg.layout()
    if layout.perm is not None:
        qv, kv = qv[:, :, layout.perm], kv[:, :, layout.perm]
    n, bs, qbs = qv.shape[2], cfg.block, cfg.query_block

    def means(x, size):
        nblk = -(-n // size)
        counts = np.minimum(size, n - np.arange(nblk) * size).astype(x.dtype)[:, None]
        x = np.pad(x, ((0, 0), (0, 0), (0, nblk * size - n), (0, 0)))
        return x.reshape(*x.shape[:2], nblk, size, -1).sum(3) / counts

    scores = means(qv, qbs) @ np.swapaxes(means(kv, bs), -1, -2)
    forced = layout.sink
    scores[..., forced] += FORCE
    k_sel = kept_blocks(scores.shape[-1], cfg.keep, len(forced))
    return np.argsort(-scores, axis=-1, kind="stable")[..., :k_sel]
