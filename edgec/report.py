"""The artifact's manifest.json and report.json, report.md (tables a person reads) and the
terminal summary."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from edgec import artifact
from edgec.fp32_speed import speed_line
from edgec.report_chart import INSTALL_LINE, floor_label

__all__ = ["manifest", "report", "quantization_entry", "mixed_precision_stats", "render_markdown",
           "rotation_line", "summary_rows", "scheme_line", "vision_pruning_line",
           "calibration_line", "floor_line", "prefill_check_line", "kv_retrieval_line",
           "kv_cache_line"]


def _io(model) -> dict[str, list[dict[str, Any]]]:
    """Inputs/outputs as the ONNX graph declares them (named dynamic dims kept)."""

    def spec(v) -> dict[str, Any]:
        from edgec.onnx_io import dim_label

        dims = [dim_label(d) for d in (v.shape.dims if v.shape is not None else ())]
        return {"name": v.name, "shape": dims, "dtype": v.dtype.numpy().name}

    from edgec.exporters.dim_ranges import merge_ranges, stored_ranges, table_ranges
    from edgec.exporters.index_inputs import index_bounds

    # the traced ranges, and the dims positions index a table by (any source, after passes)
    bounds, ranges = index_bounds(model), merge_ranges(stored_ranges(model), table_ranges(model))

    def input_spec(v) -> dict[str, Any]:
        out = {**spec(v), **bounds.get(v.name, {})}
        dims = {d: ranges[d] for d in out["shape"] if isinstance(d, str) and d in ranges}
        if dims:  # the sizes its graph is good for (edgec/exporters/dim_ranges.py)
            out["dim_ranges"] = dims
        return out

    return {"inputs": [input_spec(v) for v in model.graph.inputs],
            # a value listed twice as a graph output (a hand-written .onnx) is one output
            "outputs": [spec(v) for v in dict.fromkeys(model.graph.outputs)]}


def manifest(src, recipe, built, records, model, stage: Path) -> dict[str, Any]:
    tgt = recipe.target
    return {
        "format": artifact.FORMAT,
        "source": src.info,
        "target": {"name": tgt.name, "precision": tgt.precision,
                   "static_shapes": tgt.static_shapes},
        "recipe": {**recipe.to_json(), "passes": [r.name for r in records],
                   "options": {r.name: r.stats.get("config") for r in records
                               if r.stats.get("config")}},
        "passes": [r.to_json() for r in records],
        **_io(model),
        "runtime": built.runtime,
        **_int8_weights(tgt, model),
        "parameter_map": src.parameter_map,
        "versions": artifact.versions(),
        "hashes": artifact.file_hashes(stage),
    }


def _int8_weights(tgt, model) -> dict[str, Any]:
    """A CPU target's 8-bit weight forms (``unsigned_weights.weight_forms``): whether the
    artifact's int8 weights saturate a host without VNNI, which loading checks."""
    if tgt.runtime not in ("ort", "openvino"):
        return {}
    from edgec.graph_passes.quantization.unsigned_weights import weight_forms

    forms = weight_forms(model)
    return {"int8_weights": forms} if forms else {}


def _graph_summary(model) -> dict[str, Any]:
    ops = Counter(n.op_type for n in model.graph)
    params = sum(v.const_value.size for v in model.graph.initializers.values()
                 if v.const_value is not None)
    return {"nodes": len(model.graph), "parameters": int(params),
            "ops": dict(ops.most_common())}


def report(src, tgt, records, model, fidelity, latency, times, stage: Path) -> dict[str, Any]:
    sizes = {p.relative_to(stage).as_posix(): p.stat().st_size
             for p in sorted(stage.rglob("*")) if p.is_file()}
    return {
        "source": src.info,
        "target": tgt.name,
        "fidelity": {"export_vs_pytorch": src.export_fidelity, "target_vs_source": fidelity},
        "latency": latency,
        "size_bytes": sizes,
        "graph": _graph_summary(model),
        "passes": [r.to_json() for r in records],
        "timings_s": times,
    }


def quantization_entry(records) -> dict[str, Any] | None:
    """What the quantize stage did (scheme, exclusions, calibration), from its record."""
    rec = next((r for r in records if r.name == "quantize"), None)
    if rec is None:
        return None
    entry = {"scheme": rec.stats["scheme"], "exclude": rec.stats["config"]["exclude"]}
    for key in ("weights_int8", "embeddings_int8"):  # a weight-only scheme's 8-bit backups
        if rec.stats.get(key):
            entry[key] = rec.stats[key]
    if rec.stats.get("skipped"):  # weights a weight-only scheme left float: node → why
        entry["weights_float"] = rec.stats["skipped"]
    if "calibration" in rec.stats:
        entry["calibration"] = rec.stats["calibration"]
    return entry


def mixed_precision_stats(report: dict[str, Any]) -> dict[str, Any] | None:
    """The quantize pass's ``min_cos`` search (per-layer effects, kept layers), if it ran."""
    return next((p["stats"]["mixed_precision"] for p in report["passes"]
                 if p["name"] == "quantize" and "mixed_precision" in p["stats"]), None)


_HELD_OUT_FROM = {  # where the floor's held-out samples came from, said where it is not obvious
    "data": " (the held-out samples are the last {n} of the given calibration data, kept out of "
            "the calibration)",
    "text": " (the held-out samples are {n} more windows of edgec's English passages, "
            "tokenized by the checkpoint's tokenizer: real text, not necessarily your domain; "
            "--calib FILE.npz measures on yours)",
    "calibration": " (the held-out samples are the last {n} of the given calibration data, "
                   "which calibration saw too: an optimistic measure; a file with more samples, "
                   "or a smaller samples=, keeps them out)",
}


def _mixed_precision_section(report: dict[str, Any]) -> list[str]:
    mp = mixed_precision_stats(report)
    if not mp:
        return []
    floor = floor_label(mp, "the default floor")
    # a sample's whole output (all its tokens' logits at once), not each token's
    held = f"worst held-out sample's output cosine {mp['achieved']:.4f}" + (
        f", logits KL divergence {mp['achieved_kld']:.4f}" if "achieved_kld" in mp else "") + (
        _HELD_OUT_FROM.get(mp.get("held_out_source"), "").format(n=mp["held_out"])) + (
        f" with each of the adapters {', '.join(mp['adapters'])} bound"
        f"{_missed_by(mp, mp['adapters'])}" if mp.get("adapters") else "")
    on, itself = mp.get("on_target") or {}, ""
    if "reached" in on:  # the same samples on the artifact's own runtime
        itself = (f" On {on['runtime']} itself, the same samples: cosine {on['cosine']:.4f}"
                  + (f", KL divergence {on['kld']:.4f}" if "kld" in on else "")
                  + ("." if on["reached"] else ", which misses the floor")
                  + ("" if on["reached"] else _missed_by(mp, on.get("adapters")) + ".")
                  + (f" A floor of {on['floor_with_room']} leaves room for the difference."
                     if on.get("floor_with_room") else ""))
    elif "skipped" in on:  # the artifact's runtime could not take the held-out samples
        itself = f" Not measured on {on['runtime']} itself: {on['skipped']}."
    if mp.get("searched_again"):
        itself += f" {searched_again(mp)[0].upper()}{searched_again(mp)[1:]}."
    if mp.get("vs_source"):  # held out, yet below the floor against the source
        vs = _vs_source(mp)
        itself += f" {vs[0].upper()}{vs[1:]}, below the floor."
    if mp.get("sample"):
        line = sample_line(mp)
        itself += f" {line[0].upper()}{line[1:]}."
    if not mp["layer_errors"]:  # held as quantized: the per-layer analysis did not run
        return ["## Mixed precision", "",
                f"{floor} {'reached' if mp['reached'] else 'not reached'} as quantized: "
                f"{held}, no layer kept in {mp['precision']}.{itself}", ""]
    parts = ["## Mixed precision", "",
             f"{floor} {'reached' if mp['reached'] else 'not reached'}: {held} with "
             f"{len(mp['kept'])} of {mp['candidates']} layers kept in {mp['precision']}."
             f"{itself}", ""]
    if mp["kept"]:
        kld = [e.get("end_to_end_kld") for e in mp["kept"]]  # measured for a KL bound
        parts += [_table(["kept layer", "op", "end-to-end effect"]
                         + (["KL divergence alone"] if kld[0] is not None else []) + ["own error"],
                         [[e["node"], e["op"], _fmt(e["end_to_end"])]
                          + ([_fmt(k)] if k is not None else []) + [_fmt(e["error"])]
                          for e, k in zip(mp["kept"], kld)]), ""]
    chart = report.get("layer_chart") or {}
    if "file" in chart:
        parts += [f"![per-layer quantization error]({chart['file']})", ""]
        if chart["shown"] < chart["layers"]:
            parts += [f"The chart shows the {chart['shown']} worst of {chart['layers']} layers.",
                      ""]
    elif "error" in chart:
        parts += [f"per-layer chart: not drawn ({chart['error']})", ""]
    elif "missing" in chart:
        parts += [INSTALL_LINE, ""]
    return parts


def _fmt(x: float) -> str:
    return f"{x:.3g}" if isinstance(x, float) else str(x)


def _fidelity_rows(fid: dict[str, Any] | None) -> list[list[str]]:
    if not fid:
        return []
    tol = "approximate (reported)" if fid.get("rtol") is None else _fmt(fid["rtol"])
    return [[name, _fmt(e["max_abs"]), _fmt(e["max_rel"]), f"{e['cosine']:.7f}", tol]
            for name, e in fid["outputs"].items()]


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def summary_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value) pairs for a terminal summary."""
    fid = report["fidelity"]
    rows = [("source", _source_line(report["source"])), ("target", report["target"])]
    tvs = fid["target_vs_source"]
    measured = tvs.get("runtime", report["target"])  # what ran it: ORT for tensorrt here
    companions = [(f"{_graph_name(key)} graph: "
                   f"{fid[key].get('runtime', measured)} vs "
                   f"{fid[key].get('reference', tvs['reference'])}", key)
                  for key in _companions(fid)]
    for label, key in (("export vs PyTorch", "export_vs_pytorch"),
                       (f"{measured} vs {tvs['reference']}", "target_vs_source"), *companions):
        if fid.get(key):
            worst = max(fid[key]["outputs"].values(), key=lambda e: e["max_rel"])
            tol = ("approximate recipe" if fid[key].get("rtol") is None
                   else f"tolerance {fid[key]['rtol']:.3g}")
            check = _check_line(fid[key])
            if fid[key].get("fp32_noise"):
                worst_noise = max(fid[key]["fp32_noise"]["outputs"].values())
                tol += (f": {fid[key]['fp32_noise']['multiple']:g}x this input's fp32 error, "
                        f"{worst_noise:.2e} from float64")
            rows.append((label, f"max rel {worst['max_rel']:.2e}, rel L2 {worst['rel_l2']:.2e}, "
                                f"cosine {worst['cosine']:.7f} ({tol})"
                                + (f"; {check}" if check else "")))
    for p in report["passes"]:
        if p["name"] == "rotate":
            rows.append(("rotate", rotation_line(p["stats"])))
        if p["name"] == "qnn-soc":
            st = p["stats"]
            rows.append(("device", f"{st['device']} ({st['soc']}): soc_model {st['soc_model']}, "
                                   f"HTP v{st['htp_arch']}"))
        if "sites_rewritten" in p["stats"]:
            rows.append((p["name"], _sites_line(p["stats"])))
        if p["name"] == "prune":
            st = p["stats"]
            rows.append(("prune", f"{st['config']}: {st['weights_pruned']} weights, sparsity "
                                  f"{st['sparsity_before']:.1%} → {st['sparsity_after']:.1%}"))
    if report.get("sparse_prefill"):
        st, cfg = report["sparse_prefill"], report["sparse_prefill"].get("config", {})
        keep = cfg.get("keep")
        # at keep=1.0 every causally visible block is kept: nothing is forced on top
        kept = (f"keep {keep}: every causally visible {cfg.get('block')}-token key block (exact)"
                if keep is not None and keep >= 1.0 else
                f"keep {keep} of {cfg.get('block')}-token key blocks "
                f"(+{st.get('forced_blocks', 0)} forced: the sink and the band)")
        line = (f"prefill graph: {_sites_line(st)}; causal, {kept}, "
                f"prompts ≥ {cfg.get('min_seq')} tokens")
        rows.append(("sparse prefill", line))
    if fid.get("kv_cache"):
        rows.append(("kv cache", kv_cache_line(fid["kv_cache"])))
    if report.get("kv_retrieval"):
        rows.append(("kv retrieval", kv_retrieval_line(report["kv_retrieval"])))
    if (report.get("vision_pruning") or {}).get("keep") is not None:  # asked for, not counts
        rows.append(("vision pruning", vision_pruning_line(report["vision_pruning"])))
    q = report.get("quantization")
    if q:
        line = scheme_line(q)
        if q.get("calibration"):
            line += f"; calibration {calibration_line(q['calibration'])}"
        if q.get("decode_calibration"):  # a static-cache decoder's one-token graph
            line += f"; decode graph {calibration_line(q['decode_calibration'])}"
        rows.append(("quantization", line))
    mp = mixed_precision_stats(report)
    if mp:
        rows.append(("accuracy floor", floor_line(mp)))
    lat = report["latency"]
    if "p50_ms" in lat:
        rows.append(("latency", f"p50 {lat['p50_ms']:.2f} ms, p90 {lat['p90_ms']:.2f} ms "
                                f"({lat['iterations']} runs)"
                     + (f"; {speed_line(lat['vs_fp32'])}" if "vs_fp32" in lat else "")))
    else:
        once = (f" (one run there: {lat['emulator_run_ms']:.0f} ms)"
                if "emulator_run_ms" in lat else "")
        rows.append(("latency", f"not measured: {lat.get('skipped', 'no runtime')}{once}"))
    rows.append(("graph", f"{report['graph']['nodes']} nodes, "
                          f"{report['graph']['parameters']:,} parameters"))
    rows.append(("size", f"{sum(report['size_bytes'].values()) / 2**20:.1f} MiB"))
    t = report["timings_s"]
    rows.append(("time", f"total {t['total_s']:.1f} s (export {t['export_s']:.1f} s, "
                         f"build {t['build_s']:.1f} s)"))
    return rows


def prefill_check_line(g: dict[str, Any]) -> str:
    """The sparse prefill graph's check prompt and whether the sparsity acted on it: below the
    length where the last query block skips a key block the graph is dense attention, and a
    cosine of 1 there says nothing of keep < 1."""
    n, skips = g.get("prompt_tokens"), g.get("skips_blocks_from")
    if n is None:
        return ""
    if skips is None:
        return f"checked on a {n}-token prompt"
    if n >= skips:
        return f"checked on a {n}-token prompt, key blocks skipped"
    return (f"exact at {n} tokens: every key block kept there; blocks are skipped from {skips} "
            "tokens, which the compile did not check")


def _check_line(g: dict[str, Any]) -> str:
    """What a companion graph's check ran on, where its entry says (prefill, FreeKV)."""
    return prefill_check_line(g) or g.get("check", "")


def _graph_name(key: str) -> str:
    name = key.removesuffix("_graph_vs_source")
    return "FreeKV" if name == "freekv" else name


def kv_retrieval_line(e: dict[str, Any]) -> str:
    """The manifest's ``kv_retrieval`` entry in one line: what a decode step attends. The
    recent window is whole pages ending with the one being filled, so it holds recent − page to
    recent − 1 cached tokens (it read "recent 32" where a step attends 16–31 of them)."""
    page, recent = e["page"], e["recent"]
    top, pages = (e["budget"] - e["sink"] - recent) // page, recent // page
    before = f" and the {pages - 1} before it" if pages > 1 else ""
    return (f"FreeKV ({e['model']}): per KV head and step {e['budget']} tokens at most: "
            f"sink {e['sink']} + {top} retrieved pages of {page} + the last {pages} page(s) "
            f"({recent - page}–{recent - 1} cached tokens: the page being filled{before}) + the "
            f"new token; tau {e['tau']} (a head re-selects its pages when its query's cosine "
            "to the last one falls below it)")


def kv_cache_line(e: dict[str, Any]) -> str:
    """"u8: logits cosine 0.9999996 (max rel 1.0e-03) against an fp32 cache; 32 tokens
    prefilled, then 32 more reading them from the cache (floor 0.99)"."""
    logits = e["outputs"]["logits"]
    return (f"{e['precision']}: logits cosine {logits['cosine']:.7f} (max rel "
            f"{logits['max_rel']:.1e}) against an fp32 cache; {e['probe']} (floor "
            f"{e['min_cosine']})")


def _companions(fid: dict[str, Any]) -> list[str]:
    """The fidelity keys of the graphs beside model.onnx (decode, dense, prefill, vision)."""
    return [k for k in fid if k.endswith("_graph_vs_source") and fid[k]]


def vision_pruning_line(st: dict[str, Any]) -> str:
    """"keep=0.25, layer=2 (attention score): 4/16 image tokens kept; prefill FLOPs 8.65M →
    6.37M (-26.4%); example-prompt logits cosine 0.9942 to unpruned (argmax agreement 50%)"."""
    line = (f"keep={st.get('keep')}, layer={st.get('layer')} ({st.get('score', '?')} score): "
            f"{st.get('kept_image_tokens')}/{st.get('image_tokens')} image tokens kept")
    if st.get("prefill_flops") and st.get("prefill_flops_pruned") is not None:
        line += (f"; prefill FLOPs {st['prefill_flops'] / 1e6:.3g}M → "
                 f"{st['prefill_flops_pruned'] / 1e6:.3g}M "
                 f"(-{1 - st['prefill_flops_pruned'] / st['prefill_flops']:.1%})")
    if st.get("example_logits_cosine_vs_unpruned") is not None:
        line += (f"; example-prompt logits cosine {st['example_logits_cosine_vs_unpruned']:.4f} "
                 "to unpruned")
        if st.get("example_argmax_agreement") is not None:
            line += f" (argmax agreement {st['example_argmax_agreement']:.0%})"
    return line


def scheme_line(q: dict[str, Any]) -> str:
    """The quantization entry's scheme: "w8a8: int8 weights, uint8 activations"."""
    sc = q["scheme"]
    acts = f"{sc['activations']} activations" if sc["activations"] else "weight-only"
    eight = [f"{len(q[k])} {what}{'s' if len(q[k]) > 1 else ''}"
             for k, what in (("weights_int8", "last layer"), ("embeddings_int8", "embedding"))
             if q.get(k)]
    seven = " (7-bit, reduce_range)" if sc.get("reduce_range") else ""
    line = (f"{sc['name']}: {sc['weights']}{seven} weights, {acts}"
            + (f" (int8: {', '.join(eight)})" if eight else ""))
    if q.get("weights_float"):  # named, not only counted: a float weight under an int4 line
        left = q["weights_float"]
        line += (f"; {len(left)} weight{'s' if len(left) > 1 else ''} left float: "
                 + ", ".join(f"{n} ({why})" for n, why in left.items()))
    return line


def calibration_line(cal: dict[str, Any]) -> str:
    return f"{cal['how']}: {cal['samples']} samples, {cal['method']}, {cal['data']}"


def searched_again(mp: dict[str, Any]) -> str:
    """Why the compile ran twice: the first build's runtime missed the floor ONNX Runtime met."""
    again = mp["searched_again"]
    first = again["first"]
    measured = ", ".join(f"{'KL' if k == 'kld' else k} {first[k]:.4f}"
                         for k in ("cosine", "kld") if k in first)
    return (f"searched again at {again['searched_at']}: the first build, {first['kept']} "
            f"layers kept, measured {measured} on {again['runtime']}")


def floor_line(mp: dict[str, Any]) -> str:
    """The quantize pass's floor in one line: held or not, on the held-out samples (ONNX
    Runtime's run of the QDQ graph, then the artifact's own runtime), and what was kept."""
    def measured(d: dict[str, Any]) -> str:
        return f"cosine {d['cosine']:.4f}" + (f", KL {d['kld']:.4f}" if "kld" in d else "")

    searched = {"cosine": mp["achieved"],
                **({"kld": mp["achieved_kld"]} if "achieved_kld" in mp else {})}
    # a user's .npz too small to spare them: calibration saw the samples (an optimistic measure)
    held = ("on samples calibration saw" if mp.get("held_out_seen_by_calibration")
            else "held out")
    bound = f", each of {', '.join(mp['adapters'])} bound" if mp.get("adapters") else ""
    line = (f"{floor_label(mp)} "
            f"{'reached' if mp['reached'] else 'not reached'} ({held}{bound}, ONNX Runtime): "
            f"{measured(searched)}{_missed_by(mp, mp.get('adapters'))}")
    on = mp.get("on_target") or {}
    if "reached" in on:
        line += (f"; on {on['runtime']} {measured(on)}"
                 + ("" if on["reached"] else ", which misses it")
                 + _missed_by(mp, on.get("adapters"))
                 + (f" (ask for {on['floor_with_room']})" if on.get("floor_with_room") else ""))
    elif "skipped" in on:
        line += f"; not measured on {on['runtime']}"
    if mp.get("searched_again"):
        line += f"; {searched_again(mp)}"
    if mp.get("vs_source"):
        line += f"; {_vs_source(mp)}"
    if mp.get("candidates"):
        line += f"; {len(mp['kept'])} of {mp['candidates']} layers kept in {mp['precision']}"
    if mp.get("sample"):
        line += f"; {sample_line(mp)}"
    return line


def sample_line(mp: dict[str, Any]) -> str:
    """A denoiser's whole generation against the fp32 graph's (``sample_check``), with a word
    where it falls below the floor's cosine."""
    s = mp["sample"]
    below = mp.get("min_cos") is not None and s["cosine"] < mp["min_cos"]
    return (f"a whole {s['steps']}-step sample from held-out noise: cosine {s['cosine']:.4f}"
            + (" (below the floor: the sampler compounds each call's error)" if below else ""))


def rotation_line(st: dict[str, Any]) -> str:
    """What ``--rotate`` applied, what it skipped and why, and which DartQuant rotations shipped,
    in one line (only report.json's pass stats said that R1 was skipped on an AdaLN DiT)."""
    done = [f"R1 on {st['r1']} weights" if st.get("r1") else "",
            f"R2 in {st['r2']} attention layers" if st.get("r2") else "",
            f"R4 before {st['r4']} FFN down projections" if st.get("r4") else ""]
    line = f"{st['method']}: {', '.join(d for d in done if d) or 'nothing rotated'}"
    skipped: dict[str, list[dict[str, str]]] = {}
    for sk in st.get("skipped", []):
        skipped.setdefault(sk["rotation"], []).append(sk)
    for rot, items in skipped.items():
        first = items[0]
        at = "" if first["node"] == "-" else f" at {first['node']}"
        more = f" (and {len(items) - 1} more sites)" if len(items) > 1 else ""
        line += f"; {rot.upper()} skipped{at}{more}: {first['reason']}"
    if not st.get("r4") and "r4" not in skipped:
        line += "; no online R4 (r4=true adds it)"
    dq = st.get("dartquant") or {}
    kept = dq.get("kept") or {}
    if kept:
        learned = sorted(k for k, v in kept.items() if v == "learned")
        starts = sorted(set(kept) - set(learned))
        line += (f"; learned rotations shipped: {', '.join(learned)}" if learned
                 else "; learned rotations dropped, the Hadamard starts shipped")
        if learned and starts:
            line += f" (Hadamard starts: {', '.join(starts)})"
    e2e = dq.get("end_to_end")
    if e2e:
        line += (f" (end-to-end check: learned better on {e2e['learned_better_on']} of "
                 f"{e2e['held_out']} held-out samples, kept {e2e['kept']})")
    return line


def _vs_source(mp: dict[str, Any]) -> str:
    """``on the compile's example onnxruntime-qnn (HTP) vs pytorch: logits cosine 0.5506``: why
    a floor that held on its held-out samples is not reached (``fidelity.floor_against_source``)."""
    vs = mp["vs_source"]
    return (f"on the compile's example {vs['runtime']} vs {vs['reference']}: {vs['output']} "
            f"cosine {vs['cosine']:.4f}")


def _missed_by(mp: dict[str, Any], adapters: dict[str, dict[str, float]] | None) -> str:
    """`` (misses it: adapter a cosine 0.88)``: the swappable-LoRA adapters below the floor."""
    missed = [f"{name} cosine {m['cosine']:.4f}" + (f", KL {m['kld']:.4f}" if "kld" in m else "")
              for name, m in (adapters or {}).items()
              if (mp.get("min_cos") is not None and m["cosine"] < mp["min_cos"])
              or (mp.get("max_kld") is not None and m.get("kld", 0.0) > mp["max_kld"])]
    return f" (adapter {'; '.join(missed)} misses it)" if missed else ""


def _sites_line(st: dict[str, Any]) -> str:
    line = f"{st['sites_rewritten']}/{st['sites_found']} attention sites rewritten"
    if st.get("sites_exact") and st.get("graph") != "prefill":
        line += f" ({st['sites_exact']} exact, by their masks)"
    if "predicted_sparsity" in st:  # the video key blocks skipped, not the work cut: the
        # dense prefix rows and columns stay (video-dit tiny at keep=0.25,block=8: 75%, work −47%)
        line += f", key blocks skipped {st['predicted_sparsity']:.0%}"
        if st.get("attention_gflops_dense"):
            cut = 1 - st["attention_gflops_sparse"] / st["attention_gflops_dense"]
            line += f" (attention work −{cut:.0%})"
    if st.get("sites_keeping_every_block"):  # the budget covers every block: nothing skipped
        line += (f" ({st['sites_keeping_every_block']} keep every block: exact, nothing "
                 "skipped)")
    if "attention_gflops_dense" in st:
        line += (f", attention GFLOPs {st['attention_gflops_dense']:.3g} → "
                 f"{st['attention_gflops_sparse']:.3g}")
        if st.get("attention_gflops_at_sequence"):  # a dynamic sequence, fixed by the grid
            line += (f" (at the example inputs' sequence of "
                     f"{', '.join(map(str, st['attention_gflops_at_sequence']))} tokens)")
    if st.get("skipped_reasons"):
        line += "; skipped: " + ", ".join(f"{k} ×{v}" for k, v in st["skipped_reasons"].items())
    steps = (st.get("config") or {}).get("dense_steps")
    if steps and not st["sites_rewritten"]:  # the compile built no dense companion
        line += (f"; dense_steps={steps} has no effect: every step runs this dense graph (no "
                 "dense companion built)")
    return line


def _source_line(src: dict[str, Any]) -> str:
    if src["kind"] == "registry":
        return f"{src['name']} ({src['config']})"
    return src.get("path") or src.get("class", src["kind"])


def render_markdown(report: dict[str, Any]) -> str:
    parts = [f"# edgec report: {_source_line(report['source'])} → {report['target']}", ""]
    parts += [_table(["", ""], [[k, v] for k, v in summary_rows(report)]), ""]
    header = ["output", "max abs", "max rel", "cosine", "tolerance"]
    fid = report["fidelity"]
    if fid.get("export_vs_pytorch"):
        parts += ["## Export fidelity (ONNX in ORT vs PyTorch)", "",
                  _table(header, _fidelity_rows(fid["export_vs_pytorch"])), ""]
    tvs = fid["target_vs_source"]
    parts += [f"## Target fidelity ({tvs['runtime']} vs {tvs['reference']})", "",
              _table(header, _fidelity_rows(tvs)), ""]
    if tvs.get("other_batch"):
        b = tvs["other_batch"]
        parts += [f"Run again at batch {b['batch']} (the example's inputs repeated): max rel "
                  f"{b['max_rel']:.2e} against the example's batch, row for row.", ""]
    if tvs.get("vs_rewritten_onnx"):
        parts += [f"## {tvs['runtime']} vs ONNX Runtime on the rewritten model", "",
                  _table(header, _fidelity_rows(tvs["vs_rewritten_onnx"])), ""]
    for key in _companions(fid):  # the decoder's other graphs, each against its own source
        g = fid[key]
        name = _graph_name(key)
        parts += [f"## {name[0].upper() + name[1:]} graph fidelity "
                  f"({g.get('runtime', tvs['runtime'])} vs {g.get('reference', tvs['reference'])})",
                  "", _table(header, _fidelity_rows(g)), ""]
        check = _check_line(g)
        if check:
            parts += [check[0].upper() + check[1:] + ".", ""]
    lat = report["latency"]
    if "p50_ms" in lat:
        parts += ["## Latency", "", _table(["p50 ms", "p90 ms", "mean ms", "min ms", "runs"], [[
            f"{lat['p50_ms']:.3f}", f"{lat['p90_ms']:.3f}", f"{lat['mean_ms']:.3f}",
            f"{lat['min_ms']:.3f}", str(lat["iterations"])]]), ""]
        if "vs_fp32" in lat:
            parts += [f"Quantized: {speed_line(lat['vs_fp32'])}.", ""]
    for note in report.get("notes", []):
        parts += [f"> {note}", ""]
    parts += ["## Passes", "", _table(["pass", "modified", "seconds", "stats", "check"], [
        [p["name"], str(p["modified"]), f"{p['seconds']:.3f}",
         ", ".join(f"{k}={v}" for k, v in p["stats"].items()
                   if k != "config" and not isinstance(v, dict | list)) or "-",
         _check_cell(p.get("check"))] for p in report["passes"]]), ""]
    parts += _mixed_precision_section(report)
    sites = [s for p in report["passes"] if isinstance(p["stats"].get("sites"), list)
             for s in p["stats"]["sites"]]  # lora-swappable's "sites" is a count
    if sites:
        parts += ["## Attention sites", "", _table(
            ["site", "status", "how", "kept", "GFLOPs", "reason"],
            [[s["site"], s["status"], _site_how(s),
              f"{s['kept_fraction']:.0%} of tiles" if "kept_fraction" in s else "-",
              f"{s['gflops_dense']:.3g} → {s['gflops_sparse']:.3g}" if "gflops_dense" in s
              else "-", s.get("reason", "-")] for s in sites]), ""]
    ops = report["graph"]["ops"]
    parts += ["## Graph", "", _table(["op", "count"], [[k, str(v)] for k, v in ops.items()]), ""]
    parts += ["## Files", "", _table(["file", "bytes"], [
        [k, f"{v:,}"] for k, v in report["size_bytes"].items()]), ""]
    return "\n".join(parts)


def _site_how(site: dict[str, Any]) -> str:
    if site["status"] == "skipped":
        return "dense"
    if site.get("mode") == "mask":
        return (f"{site['mask']} mask, block {site['block']}, "
                f"{site['keys_per_query']:g} key blocks per query block")
    return f"{site.get('mode', 'rf2')}, {site.get('kept_blocks')}/{site.get('blocks')} blocks"


def _check_cell(check: dict[str, Any] | None) -> str:
    if not check:
        return "-"
    worst = max(check["outputs"].values(), key=lambda e: e["max_rel"])
    kind = f"≤ {check['rtol']:g}" if check["exact"] else "approx"
    return f"max rel {worst['max_rel']:.2e} ({kind})"
