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
        self.check_values(dataclasses.asdict(self))
        if self.grid is None and (self.sink == "frame" or self.mode == "rainfusion"):
            raise UserError("sparse attention sink=frame and mode=rainfusion need grid=TxHxW")

    @classmethod
    def check_values(cls, items: dict[str, Any]) -> None:
        """Refuse option values that are wrong whatever the model (``items``: converted options,
        the others at their defaults). The recipe runs this when it parses ``--sparse-attention``,
        before anything is exported; the grid a model supplies is checked later
        (``config_for_source``, the pass)."""
        v = {f.name: f.default for f in dataclasses.fields(cls)} | dict(items)
        try:
            _check_values(v)
        except TypeError:  # a Python value of the wrong type (a str keep, a None block...)
            bad = next((k for k, x in items.items() if not _plain_type(cls, k, x)), None)
            if bad is None:
                raise
            raise UserError(f"sparse attention {bad}={items[bad]!r} is not valid (expected "
                            f"{_type_name(cls, bad)})") from None

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

    @property
    def grid_tokens(self) -> int | None:
        """Tokens in the tiled blocks (the layout's ``n_video``) without planning the tile: the
        grid, plus the tail with ``tail_mode=blocks``; None without a grid."""
        if self.grid is None:
            return None
        return math.prod(self.grid) + (self.tail if self.tail_mode == "blocks" else 0)

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
        return Layout(self.grid, tile, perm, np.argsort(perm), sink, self.grid_tokens)


def _check_values(v: dict[str, Any]) -> None:
    if not 0 < v["keep"] <= 1:
        raise UserError(f"sparse attention keep={v['keep']} must be in (0, 1]")
    for name in ("block", "chunk_mb", "samples"):
        if v[name] < 1:
            raise UserError(f"sparse attention {name}={v[name]} must be ≥ 1")
    for name in ("prefix", "tail", "min_seq", "dense_steps"):
        if v[name] < 0:
            raise UserError(f"sparse attention {name}={v[name]} must be ≥ 0")
    if v["qblock"] < 0 or (v["qblock"] and v["qblock"] % v["block"]):
        raise UserError(f"sparse attention qblock={v['qblock']} must be a multiple of "
                        f"block={v['block']} (or 0: 8 × block)")
    choices = {"tail_mode": ("dense", "blocks"), "share": ("none", "batch"),
               "sink": ("none", "frame"), "mode": ("rf2", "rainfusion", "mask")}
    for name, allowed in choices.items():
        if v[name] not in allowed:
            raise UserError(f"sparse attention {name}={v[name]!r}: use "
                            f"{', '.join(allowed[:-1])} or {allowed[-1]}")
    if v["tail"] and v["tail_mode"] == "blocks" and v["mode"] == "rainfusion":
        raise UserError("sparse attention mode=rainfusion has static grid patterns only; "
                        "use tail_mode=dense")
    if any(len(dims) != 3 or min(dims) < 1 for dims in (v["grid"], v["tile"])
           if dims is not None):
        raise UserError("sparse attention grid and tile take three dims ≥ 1 (TxHxW)")
    _refuse_sink_everywhere(v["sink"], v["grid"], v["tile"])


def _refuse_sink_everywhere(sink: str, grid, tile) -> None:
    """sink=frame keeps every block holding first-frame tokens: with one frame, or a tile as
    deep as the grid, that is every block, and the "sparse" graph was silently dense."""
    if sink != "frame" or grid is None or not (grid[0] == 1 or (tile and tile[0] == grid[0])):
        return
    fix = ("drop sink=frame (the grid has one frame)" if grid[0] == 1 else
           "give a tile one frame deep (tile=1xHxW, as the default one is) or drop sink=frame")
    where = "" if grid[0] == 1 else f" with tile={'x'.join(map(str, tile))}"
    raise UserError(f"sparse attention sink=frame on grid {'x'.join(map(str, grid))}{where} "
                    f"makes every block a first-frame sink, so nothing is sparse; {fix}")


def _plain_type(cls, key: str, value: Any) -> bool:
    default = next(f.default for f in dataclasses.fields(cls) if f.name == key)
    if default is None:  # grid, tile: a tuple of ints
        return isinstance(value, tuple) and all(isinstance(x, int) for x in value)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, type(default)) and not (
        isinstance(value, bool) and not isinstance(default, bool))


def _type_name(cls, key: str) -> str:
    default = next(f.default for f in dataclasses.fields(cls) if f.name == key)
    return "TxHxW" if default is None else type(default).__name__


def config_for_source(options: dict[str, Any] | SparseAttentionConfig,
                      source_info: dict[str, Any]) -> SparseAttentionConfig:
    """Fill ``grid``, ``prefix`` and ``tail`` from a reference model's hyper-parameters unless
    given; refuse what the model cannot take: a grid, prefix or tail other than the model's
    (its attention sequence is prefix + grid + tail tokens) and ``dense_steps`` without a
    sampler."""
    if isinstance(options, SparseAttentionConfig):
        return options
    name = source_info.get("name") or "this model"
    if options.get("dense_steps") and not source_info.get("sampling"):
        raise UserError(f"sparse attention dense_steps={options['dense_steps']} needs a "
                        f"diffusion model with a sampler; {name} has none: drop dense_steps")
    hp = source_info.get("hyperparameters") or {}
    defaults: dict[str, Any] = {}
    if "grid" in hp:
        model = {"grid": tuple(hp["grid"]), "prefix": int(hp.get("text_tokens", 0)),
                 "tail": int(hp.get("motion_tokens", 0))}  # tail: joint video+motion attention
        wrong = [k for k in model if k in options and _tuple_or_int(options[k]) != model[k]]
        if wrong:
            given = ", ".join(f"{k}={_show(options[k])}" for k in wrong)
            config = f" {source_info['config']}" if source_info.get("config") else ""
            raise UserError(
                f"sparse attention {given} does not match {name}{config}, whose attention "
                f"sequence is {model['prefix']} text tokens, a {_show(model['grid'])} token grid "
                f"and {model['tail']} tail tokens; drop {' and '.join(f'{k}=' for k in wrong)} "
                f"({'they default' if len(wrong) > 1 else 'it defaults'} from the model)")
        defaults = model
    return SparseAttentionConfig(**{**defaults, **options})


def _tuple_or_int(value: Any) -> Any:
    return tuple(value) if isinstance(value, (list, tuple)) else value


def _show(value: Any) -> str:
    return "x".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
