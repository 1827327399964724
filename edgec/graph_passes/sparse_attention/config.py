"""Sparse attention options (``--sparse-attention k=v,...``) and the token layout they imply."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from edgec.errors import UserError
from edgec.graph_passes.sparse_attention import layout as layout_lib
from edgec.options import convert_items, split_spec

__all__ = ["SparseAttentionConfig", "Layout", "config_for_source"]


@dataclasses.dataclass(frozen=True)
class Layout:
    grid: tuple[int, int, int] | None
    tile: tuple[int, int, int] | None
    perm: np.ndarray | None
    inverse: np.ndarray | None
    sink: np.ndarray
    n_video: int | None


@dataclasses.dataclass(frozen=True)
class SparseAttentionConfig:
    """Options of ``--sparse-attention k=v,...`` (names as in the CLI).

    keep: fraction of key blocks each query block keeps (0 < keep ≤ 1).
    block: tokens per key block (and per permutation tile).
    qblock: query tokens sharing one selection (a multiple of block; 0 = 8 × block). Larger
        query blocks gather K/V fewer times and feed MatMul bigger tiles (measured on N=8192,
        keep=0.2: OpenVINO 1.9× at qblock=64, 3.7× at 256, 4.3× at 512 vs dense).
    prefix: leading dense tokens (text in joint attention).
    tail: trailing tokens after the grid (motion tokens in video+motion joint attention).
    tail_mode: ``dense`` (tail rows attend to every key and every query keeps the tail's key
        blocks, as the prefix) or ``blocks`` (tail tokens are ordinary key/query blocks after
        the permuted grid, selected like the video's).
    sink: ``none`` or ``frame`` (first-frame blocks always kept; needs grid).
    grid: TxHxW video token grid after the prefix; enables the tile permutation.
    mode: ``rf2``, ``rainfusion`` (per-head patterns; needs grid) or ``mask`` (only the exact
        rewrite of sites whose mask is known at compile time; applied in every mode).
    min_seq: sites with a static sequence shorter than this stay dense.
    tile: TtxThxTw tokens per block tile (default: most compact tile dividing the grid).
    samples: query rows sampled by the rainfusion pattern test.
    chunk_mb: memory budget for gathered K/V and scores per chunk of query blocks.
    share: ``batch`` computes the block selection from batch element 0 only and uses it for
        every element (RainFusion2.0 does: a guidance pair run as one batch shares one mask);
        ``none`` selects per element.
    dense_steps: diffusion sampling steps that run dense attention before the sparse graph takes
        over (RainFusion keeps early steps dense); > 0 also builds the dense graph beside the
        sparse one (``dense.onnx``), and ``Session.sample`` switches between them.
    """

    keep: float = 0.2
    block: int = 64
    qblock: int = 0
    prefix: int = 0
    tail: int = 0
    tail_mode: str = "dense"
    sink: str = "none"
    grid: tuple[int, int, int] | None = dataclasses.field(default=None,
                                                          metadata={"format": "TxHxW"})
    mode: str = "rf2"
    min_seq: int = 256
    tile: tuple[int, int, int] | None = dataclasses.field(default=None,
                                                          metadata={"format": "TxHxW"})
    samples: int = 32
    chunk_mb: int = 256
    dense_steps: int = 0
    share: str = "none"

    def __post_init__(self):
        if not 0 < self.keep <= 1:
            raise UserError(f"sparse attention keep={self.keep} must be in (0, 1]")
        if (self.block < 1 or self.prefix < 0 or self.min_seq < 0 or self.chunk_mb < 1
                or self.dense_steps < 0):
            raise UserError("sparse attention block, chunk_mb must be ≥ 1 and prefix, "
                            "min_seq, dense_steps ≥ 0")
        if self.qblock < 0 or (self.qblock and self.qblock % self.block):
            raise UserError(f"sparse attention qblock={self.qblock} must be a multiple of "
                            f"block={self.block}")
        if self.tail < 0 or self.tail_mode not in ("dense", "blocks"):
            raise UserError(f"sparse attention tail={self.tail} must be ≥ 0 and "
                            f"tail_mode={self.tail_mode!r} dense or blocks")
        if self.tail and self.tail_mode == "blocks" and self.mode == "rainfusion":
            raise UserError("sparse attention mode=rainfusion has static grid patterns only; "
                            "use tail_mode=dense")
        if self.share not in ("none", "batch"):
            raise UserError(f"sparse attention share={self.share!r}: use none or batch")
        if self.sink not in ("none", "frame"):
            raise UserError(f"sparse attention sink={self.sink!r}: use none or frame")
        if self.mode not in ("rf2", "rainfusion", "mask"):
            raise UserError(f"sparse attention mode={self.mode!r}: use rf2, rainfusion or mask")
        if any(min(dims) < 1 for dims in (self.grid, self.tile) if dims is not None):
            raise UserError("sparse attention grid and tile dims must be ≥ 1 (TxHxW)")
        if self.grid is None and (self.sink == "frame" or self.mode == "rainfusion"):
            raise UserError("sparse attention sink=frame and mode=rainfusion need grid=TxHxW")

    @classmethod
    def parse(cls, text: str | dict | SparseAttentionConfig | None) -> SparseAttentionConfig:
        """From ``"keep=0.2,block=64,grid=8x32x32"``, a dict, or a config."""
        if isinstance(text, cls):
            return text
        return cls(**cls.parse_items(text or {}))

    @classmethod
    def parse_items(cls, text: str | dict) -> dict[str, Any]:
        """Validated, converted ``{option: value}`` of only the options given."""
        items = text if isinstance(text, dict) else split_spec(text, "sparse attention")[1]
        return convert_items(cls, items, "sparse attention")

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}

    @property
    def query_block(self) -> int:
        return self.qblock or 8 * self.block

    def layout(self) -> Layout:
        if self.grid is None:
            return Layout(None, None, None, None, np.zeros(0, np.int64), None)
        tile = self.tile or layout_lib.choose_tile(self.grid, self.block, self.sink == "frame")
        if tile is None or math.prod(tile) != self.block or any(
                g % t for g, t in zip(self.grid, tile)):
            raise UserError(f"no tile of block={self.block} tokens divides grid "
                            f"{'x'.join(map(str, self.grid))}; pick another block or tile")
        perm = layout_lib.tile_permutation(self.grid, tile)
        sink = (layout_lib.sink_blocks(self.grid, tile) if self.sink == "frame"
                else np.zeros(0, np.int64))
        n = math.prod(self.grid)
        if self.tail and self.tail_mode == "blocks":  # tail tokens follow the tiles, in order
            perm = np.concatenate([perm, np.arange(n, n + self.tail)])
            n += self.tail
        return Layout(self.grid, tile, perm, np.argsort(perm), sink, n)


def config_for_source(options: dict[str, Any] | SparseAttentionConfig,
                      source_info: dict[str, Any]) -> SparseAttentionConfig:
    """Fill ``grid`` and ``prefix`` from a reference model's hyper-parameters unless given."""
    if isinstance(options, SparseAttentionConfig):
        return options
    hp = source_info.get("hyperparameters") or {}
    defaults: dict[str, Any] = {}
    if "grid" in hp and "grid" not in options:
        defaults["grid"] = tuple(hp["grid"])
        defaults["prefix"] = int(hp.get("text_tokens", 0))
        defaults["tail"] = int(hp.get("motion_tokens", 0))  # joint video+motion attention
    return SparseAttentionConfig(**{**defaults, **options})
