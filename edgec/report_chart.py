"""report_layers.png: the mixed-precision search's per-layer end-to-end effect as a bar chart.

matplotlib is optional (``pip install edgec[plot]``): without it no chart is drawn, and a chart
that fails to draw is logged, never a failed compile.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

__all__ = ["LAYER_CHART", "INSTALL_LINE", "write_layer_chart", "floor_text",
           "floor_label"]

logger = logging.getLogger(__name__)

LAYER_CHART = "report_layers.png"
INSTALL_LINE = "per-layer chart: install edgec[plot] (matplotlib)"
_KEPT, _QUANTIZED = "#d62728", "#1f77b4"


def floor_text(mp: dict[str, Any]) -> str:
    """``min_cos 0.98 and max_kld 0.05``: the floor a ``mixed_precision`` entry held."""
    return " and ".join(f"{k} {mp[k]:g}" for k in ("min_cos", "max_kld") if mp.get(k) is not None)


def floor_label(mp: dict[str, Any], default: str = "default") -> str:
    """``floor_text`` and whose floor it is: ``(default)``, or a given floor with the default
    bounds it replaced (``min_cos=0.99`` alone held no KL bound, and the report did not say)."""
    dropped = mp.get("default_dropped")
    if mp.get("default"):
        return f"{floor_text(mp)} ({default})"
    if not dropped:
        return floor_text(mp)
    add = " ".join(f"{k}={v:g}" for k, v in dropped.items())
    return (f"{floor_text(mp)} (given, in place of the default floor: no {' or '.join(dropped)} "
            f"bound; add {add} to hold it too)")


def write_layer_chart(mixed: dict[str, Any], path: Path, limit: int = 40) -> dict[str, Any]:
    """Draw one bar per candidate layer of ``mixed`` (the quantize pass's ``mixed_precision``
    stats), worst end-to-end effect first, the ``limit`` worst at most; layers kept in high
    precision in another color. Returns what report.md says of it: ``{"file", "layers",
    "shown"}``, ``{"missing": "matplotlib"}`` without it, or ``{"error": ...}``."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return {"missing": "matplotlib"}
    try:
        return _draw(mixed, Path(path), limit)
    except Exception as e:  # noqa: BLE001 — a report chart never fails the compile
        logger.warning("per-layer chart not drawn: %s", e)
        return {"error": f"{type(e).__name__}: {e}"}


def _draw(mixed: dict[str, Any], path: Path, limit: int) -> dict[str, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: headless, no state
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    # a KL bound's search ranks by the logits' KL divergence: plot what it ranked by
    key = "end_to_end_kld" if mixed["layer_errors"][0].get("end_to_end_kld") is not None else (
        "end_to_end")
    layers = sorted(mixed["layer_errors"], key=lambda e: -e[key])
    shown = layers[:limit]
    kept = {e["node"] for e in mixed["kept"]}
    values = [e[key] for e in shown]
    fig = Figure(figsize=(max(6.0, 2.0 + 0.28 * len(shown)), 5.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colors = [_KEPT if e["node"] in kept else _QUANTIZED for e in shown]
    ax.bar(range(len(shown)), values, color=colors)
    ax.set_xticks(range(len(shown)), [e["node"] for e in shown], rotation=90, fontsize=7,
                  parse_math=False)
    positive = [v for v in values if v > 0]
    if positive and max(positive) / min(positive) >= 100:  # spans decades
        ax.set_yscale("log")
    ax.set_ylabel("end-to-end effect (1 − worst output cosine)" if key == "end_to_end" else
                  "end-to-end effect (worst logits KL divergence, nats/token)")
    ax.set_title(f"Each layer's quantization error alone, end to end ({floor_text(mixed)}: "
                 f"cosine {mixed['achieved']:.4f} with {len(kept)} of "
                 f"{len(layers)} kept in {mixed['precision']})", fontsize=9, parse_math=False)
    ax.legend(handles=[Patch(color=_KEPT, label=f"kept in {mixed['precision']}"),
                       Patch(color=_QUANTIZED, label="quantized")], fontsize=8)
    if len(layers) > len(shown):
        ax.set_xlabel(f"the {len(shown)} worst of {len(layers)} layers; "
                      f"{len(layers) - len(shown)} with smaller effect not shown", fontsize=8)
    fig.savefig(path, format="png", dpi=100)
    return {"file": path.name, "layers": len(layers), "shown": len(shown)}
