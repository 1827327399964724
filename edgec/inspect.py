"""Describe an .onnx file or an artifact directory as a JSON-able dict (``edgec inspect``)."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

from edgec.errors import UserError

__all__ = ["describe"]

logger = logging.getLogger(__name__)


def _value(v) -> dict[str, Any]:
    from edgec.onnx_io import dim_label

    dims = [dim_label(d) for d in (v.shape.dims if v.shape else ())]
    return {"name": v.name, "shape": dims, "dtype": v.dtype.numpy().name if v.dtype else "?"}


def describe_onnx(path: Path) -> dict[str, Any]:
    from edgec.exporters.export_file import stored_parameter_map
    from edgec.onnx_io import load_onnx

    model = load_onnx(path)
    inits = model.graph.initializers.values()
    tensors = [v.const_value for v in inits if v.const_value is not None]
    return {
        "file": str(path),
        "producer": " ".join(filter(None, (model.producer_name, model.producer_version)))
                    or None,  # none recorded: null, not the string "None"
        "opsets": {k or "ai.onnx": v for k, v in model.opset_imports.items()},
        "inputs": [_value(v) for v in model.graph.inputs],
        "outputs": [_value(v) for v in model.graph.outputs],
        "nodes": len(model.graph),
        "ops": dict(Counter(n.op_type for n in model.graph).most_common()),
        "initializers": len(tensors),
        "parameters": int(sum(t.size for t in tensors)),
        "weight_bytes": int(sum(t.nbytes for t in tensors)),
        "parameter_map_entries": len(stored_parameter_map(model)),
    }


def describe(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        from edgec.artifact import read_manifest

        manifest = read_manifest(p)
        info = {"artifact": str(p), "source": manifest["source"], "target": manifest["target"],
                "runtime": manifest["runtime"], "inputs": manifest["inputs"],
                "outputs": manifest["outputs"], "passes": manifest["recipe"].get("passes"),
                "files": manifest["hashes"]}
        # what the artifact does beyond run(): generate (and how), sample, swap adapters
        for key in ("generation", "kv_retrieval", "sampling", "tokenizer"):
            if manifest.get(key):
                info[key] = _brief(manifest[key])
        if manifest.get("quantization"):
            info["quantization"] = _quantization(manifest)
        report = p / "report.json"
        if report.is_file():
            import json

            # the compile's record, not needed to run: a damaged one (truncated, edited) was a
            # JSONDecodeError (exit 1); the rest is shown without it
            try:
                info.update(_from_report(json.loads(report.read_text())))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                logger.warning("%s: damaged artifact: report.json is unreadable (%s: %s); "
                               "showing the manifest without its latency and fidelity",
                               p, type(e).__name__, e)
        return info
    if not p.exists():
        raise UserError(f"{p}: no such file or directory")
    return describe_onnx(p)


def _from_report(r: dict[str, Any]) -> dict[str, Any]:
    info = {"latency_p50_ms": r["latency"].get("p50_ms")}  # None: not measured
    # entries with measured outputs (``lora`` records what the merge was held to): the worst
    # max_rel and, where measured, the worst cosine (a quantized artifact's max_rel alone says
    # little)
    info["fidelity"] = {k: _worst(v["outputs"]) for k, v in r["fidelity"].items()
                        if isinstance(v, dict) and isinstance(v.get("outputs"), dict)}
    if isinstance(r["fidelity"].get("lora"), dict):
        info["lora"] = r["fidelity"]["lora"]
    return info


def _worst(outputs: dict[str, Any]) -> dict[str, float]:
    entries = outputs.values()
    worst = {"max_rel": float(f"{max((e['max_rel'] for e in entries), default=0):.3g}")}
    cosines = [e["cosine"] for e in entries if e.get("cosine") is not None]
    if cosines:
        worst["cosine"] = round(min(cosines), 7)
    return worst


def _quantization(manifest: dict[str, Any]) -> dict[str, Any]:
    """Scheme, calibration, the accuracy floor and the layers kept in higher precision, as
    ``edgec compile`` prints them (manifest.json holds them; inspect showed none)."""
    from edgec.report import calibration_line, floor_line, mixed_precision_stats, scheme_line

    q = manifest["quantization"]
    out: dict[str, Any] = {"scheme": scheme_line(q)}
    if q.get("calibration"):
        out["calibration"] = calibration_line(q["calibration"])
    if q.get("exclude"):
        out["exclude"] = q["exclude"]
    mp = mixed_precision_stats(manifest)
    if mp:
        out["floor"] = floor_line(mp)
        if mp.get("kept"):
            out[f"kept_{mp.get('precision', 'high precision')}"] = [
                e["node"] if isinstance(e, dict) else e for e in mp["kept"]]
    return out


def _brief(entry: Any) -> Any:
    """A manifest entry without its long lists (names of every cache tensor)."""
    if not isinstance(entry, dict):
        return entry
    return {k: v for k, v in entry.items()
            if not (isinstance(v, list) and len(v) > 8) and not isinstance(v, dict)}
