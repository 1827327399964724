"""FreeKV benchmark: decode ms/token against full attention at long contexts, and fidelity.

Model: ``llama small`` (4 layers, 8 heads, 2 KV heads, head_dim 64) with its q_proj weights
scaled by ``--alpha`` (random weights attend almost uniformly; a larger query scale sharpens
attention: the JSON reports the attention entropy obtained) on a prompt of one random segment
repeated (``--segment`` tokens). The RoPE of the reference model works at any position.

Cache fill: PyTorch ``Llama.forward_cached`` (the reference the exported decoder is verified
against) over the prompt in chunks of ``--chunk`` tokens; the same key/value arrays are then
loaded into every system, so all decode from the identical cache. (Prefill of 16k tokens
through the ONNX graph in one call would need ~8 GB of attention scores.)

Systems per runtime (ONNX Runtime with ort-cpu's session options; OpenVINO with openvino-cpu's):
- ``standard``: the artifact's KV-cache decoder (grow-by-concat past → present, what edgec
  ships; on OpenVINO the stateful model, the cache inside the runtime);
- ``dense_buffers``: the fixed-buffer decode graph attending to every valid slot (no per-step
  copy of the cache: the fair baseline);
- ``freekv``: the FreeKV decode graph (``--budget/--page/--sink/--recent``, tau 0.8).

Timing: one warm-up step each, then ``--rounds`` rounds; in a round each system decodes
``--block`` teacher-forced tokens (each step timed), the order reversed every other round.
Medians per system; ``paired`` speed-ups are the median over rounds of the ratio of the two
systems' block medians (the blocks of a round are close in time: load on the shared machine
largely cancels). Goal (issue 11): at 16k with budget 2048, FreeKV faster per token than full
attention on the same runtime (both baselines).

Fidelity (ONNX Runtime): ``dense_buffers`` decodes ``--steps`` greedy tokens; FreeKV at tau 0.8
and 0.9 (and -1: speculation only, never corrected) is teacher-forced along them: top-1
agreement, logits cosine (mean/min), correction rate (KV heads re-selecting / heads, after the
first step), the query cosine it compares with tau, pages retrieved. Attention statistics
per layer from FreeKV's query outputs against the full cache: entropy / log(context) and the
attention mass of the best ``budget`` tokens (what any budget-sized selection can reach at most).
Exactness: at a context below the budget, FreeKV vs dense_buffers vs standard (max |Δ logits|).

Query continuity: random weights make consecutive queries unrelated (cosine ~0), so every head
is corrected at tau 0.8 or 0.9. ``query_continuity`` repeats the fidelity runs on
``small+outliers`` with q_proj's columns that read the constant residual channels scaled by
``--continuity`` (q_proj otherwise unscaled): each query then carries a large
token-independent part and consecutive queries have cosine ~0.8, as FreeKV reports for trained
LLMs, so speculation and correction both occur.

    python benchmarks/freekv.py [--quick] [--contexts 4096,16384] [--runtimes ort,openvino]

Without ``--quick`` the JSON also goes to benchmarks/results/freekv.json (unless ``--out``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ["CI"] = "true"  # OpenVINO telemetry asks for consent on import otherwise

import numpy as np
from _sibling import load_sibling as _load  # benchmarks/ is on sys.path when run

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results" / "freekv.json"
TAUS = (0.8, 0.9, -1.0)  # the two thresholds, and speculation alone (never corrected)


QB = _load("quantization", "edgec_bench_quantization")  # machine(), loadavg(), git_state(), emit()


def log(msg: str) -> None:
    print(f"[freekv-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def cpu_flags() -> list[str]:
    """The ISA flags that matter for these kernels, as /proc/cpuinfo lists them."""
    try:
        line = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("flags"))
    except (OSError, StopIteration):
        return []
    flags = set(line.split(":", 1)[1].split())
    return sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "f16c", "sse4")))


# ------------------------------------------------------------------------------ build --

def sharpened(config: str, alpha: float, shared: float = 1.0):
    """``llama`` with q_proj × ``alpha``; with ``+outliers``, q_proj's columns reading the
    constant residual channels × ``shared`` more: every query gets a large token-independent
    part, so consecutive queries are similar (cosine ~0.8 at 25, as the paper reports for
    trained LLMs; random weights give ~0)."""
    import torch

    from edgec.models import registry
    from edgec.models.llama import outlier_channels

    model = registry.get("llama").build(config)
    with torch.no_grad():
        for layer in model.layers:
            layer.self_attn.q_proj.weight.mul_(alpha)
            if shared != 1.0:
                layer.self_attn.q_proj.weight[:, outlier_channels(model.cfg)] *= shared
    return model


def build(config: str, alpha: float, fkv, root: Path, shared: float = 1.0,
          standard: bool = True):
    """The sharpened model, its standard decoder .onnx, the FreeKV and dense graphs."""
    from edgec.exporters.decoder import (
        decoder_dynamic_shapes,
        example_inputs,
        input_names,
        output_names,
        reference_decoder,
    )
    from edgec.exporters.freekv_decoder import build_dense_graph, build_freekv_graph
    from edgec.exporters.torch_export import export_module
    from edgec.onnx_io import save_model

    model = sharpened(config, alpha, shared)
    module, info = reference_decoder(model, "llama")
    times = {}
    if standard:
        t0 = time.perf_counter()
        res = export_module(module, example_inputs(info, 1, 8), decoder_dynamic_shapes(info),
                            output_names(info), input_names(info))
        save_model(res.model, root / "model.onnx")
        times["standard_export_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    build_freekv_graph(model, info, fkv, root)
    times["freekv_export_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    build_dense_graph(model, info, root)
    times["dense_export_s"] = time.perf_counter() - t0
    return model, info, times


def sessions(runtime: str, root: Path):
    """The standard decoder session on ``runtime`` and that runtime's session options."""
    from edgec.targets import TARGETS

    if runtime == "ort":
        from edgec.runtimes.ort import OrtSession

        cfg = dict(TARGETS["ort-cpu"].runtime_config)
        return OrtSession(root / "model.onnx", config=cfg), cfg
    from edgec.runtimes.openvino import OpenVINOSession

    tgt = TARGETS["openvino-cpu"]
    built = tgt.build(tgt, root / "model.onnx", root / "target")
    return OpenVINOSession.from_artifact(root, built.runtime), dict(tgt.runtime_config)


# ------------------------------------------------------------------------------ caches --

class Standard:
    """The shipped decoder from a preloaded cache: arrays in and out (ONNX Runtime), or the
    stateful model's variables set once by the first step (OpenVINO)."""

    def __init__(self, session, info, pairs):
        from edgec.runtimes.generation import ArrayCache

        self.session, self.info = session, info
        self.past = {n: a for n, a in zip(info.past_names, [t for kv in pairs for t in kv])}
        self.stateful = bool(getattr(session, "_pairs", None))
        if self.stateful:
            session._request.reset_state()
            self.first = True
        else:
            self.cache = ArrayCache(session, info, 1)
            self.cache.past = self.past

    def step(self, ids, mask, positions):
        if not self.stateful:
            return self.cache.step(ids, mask, positions)
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        if self.first:  # sets the variables from the arrays (untimed warm-up step)
            self.first = False
            return self.session._run({**feeds, **self.past})["logits"]
        return self.session._step(feeds)["logits"]


def make(kind: str, session, info, root: Path, pairs, capacity: int, runtime_config,
         tau: float = 0.8, runtime: str | None = None):
    from edgec.runtimes.freekv import DENSE_FILE, GRAPH_FILE, FixedBufferCache, FreeKVCache

    if kind == "standard":
        return Standard(session, info, pairs)
    if kind == "dense_buffers":
        cache = FixedBufferCache(session, root / DENSE_FILE, info, 1, capacity=capacity,
                                 runtime_config=runtime_config, runtime=runtime)
    else:
        cache = FreeKVCache(session, root / GRAPH_FILE, info, None, 1, capacity=capacity,
                            runtime_config=runtime_config, runtime=runtime)
        cache.set_tau(tau)
    cache.load(pairs)
    return cache


class Decoder:
    """Feeds one system the trajectory's tokens one step at a time."""

    def __init__(self, cache, context: int, tokens):
        self.cache, self.pos, self.tokens, self.i = cache, context, tokens, 0

    def step(self) -> np.ndarray:
        ids = np.array([[self.tokens[self.i]]], np.int64)
        mask = np.ones((1, self.pos + 1), np.int64)
        out = self.cache.step(ids, mask, np.array([[self.pos]], np.int64))[:, -1]
        self.pos, self.i = self.pos + 1, self.i + 1
        return out[0]


# ------------------------------------------------------------------------------ prefill --

def prompt(vocab: int, context: int, segment: int, seed: int = 0) -> np.ndarray:
    seg = np.random.default_rng(seed).integers(0, vocab, segment)
    return np.tile(seg, -(-context // segment))[:context][None].astype(np.int64)


def torch_prefill(model, ids: np.ndarray, chunk: int):
    """Keys/values [1, kv_heads, L, head_dim] per layer and the last logits, chunk by chunk."""
    import torch

    cfg = model.cfg
    past = [(torch.zeros(1, cfg.kv_heads, 0, cfg.head_dim),) * 2 for _ in range(cfg.layers)]
    x = torch.from_numpy(ids)
    with torch.no_grad():
        for lo in range(0, x.shape[1], chunk):
            hi = min(lo + chunk, x.shape[1])
            logits, past = model.forward_cached(
                x[:, lo:hi], torch.ones(1, hi, dtype=torch.int64),
                torch.arange(lo, hi)[None], past)
    return [(k.numpy(), v.numpy()) for k, v in past], logits[0, -1].numpy()


# ------------------------------------------------------------------------------ measures --

def cosine(a, b) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _bound(q, lo, hi):
    """Σ_d max(q_d·hi_d, q_d·lo_d) per page, mean over the group: [kv_heads, pages]."""
    return (np.einsum("hgd,hnd->hgn", np.maximum(q, 0), hi)
            + np.einsum("hgd,hnd->hgn", np.minimum(q, 0), lo)).mean(1)


def _picked(pages, scores, count: int) -> np.ndarray:
    """Attention mass of the ``count`` pages ranked first by ``scores`` [kv_heads, pages]."""
    count = min(count, scores.shape[1])
    top = np.argpartition(-scores, count - 1, axis=1)[:, :count]
    return np.take_along_axis(pages, top, 1).sum(-1)


def attention_stats(cache, budget: int) -> list[dict]:
    """Per layer, for the last step's queries over the whole cache (new token included):
    entropy / log(n); the attention mass of the best ``budget`` tokens (what any selection of
    that size reaches at most); ``recall``: the mass on the tokens FreeKV attended (sink, its
    pages, window, new token; group-mean per KV head); the same with other page picks: the
    Quest bound from this step's query (what correction gives), ArkVale/FreeKV-code-style
    centered digests (center ± mean |k - center|, not a bound), and the pages of most mass
    (oracle)."""
    out = []
    info, cfg = cache.info, cache.config
    n, group, p = cache.length, info.heads // info.kv_heads, cfg.page
    past = n - 1
    last = past // p - cfg.recent_pages  # last candidate page of the step
    slots = np.arange(n)
    fixed = ((slots < min(cfg.sink, past)) | (slots == past)
             | ((slots >= max((last + 1) * p, cfg.sink)) & (slots < past)))
    for i in range(info.layers):
        q = cache.prev_query[i][0].reshape(info.kv_heads, group, -1)
        keys = cache.keys[i][0, :, :n]
        s = np.einsum("hgd,htd->hgt", q, keys) / np.sqrt(q.shape[-1])
        w = np.exp(s - s.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        ent = -(w * np.log(np.maximum(w, 1e-30))).sum(-1) / np.log(n)
        top = np.sort(w, -1)[..., -budget:].sum(-1)
        row = {"entropy": float(ent.mean()), "top_budget_mass": float(top.mean())}
        if last >= cfg.sink_pages:
            mass = w.mean(1)  # [kv_heads, n]: what a KV head's selection serves
            base = mass[:, fixed].sum(-1)
            pages = mass[:, cfg.sink:(last + 1) * p].reshape(info.kv_heads, -1, p).sum(-1)
            used = cache.last_pages[i][0]
            ok = (used >= cfg.sink_pages) & (used <= last)
            got = np.where(ok, np.take_along_axis(
                pages, np.clip(used - cfg.sink_pages, 0, pages.shape[1] - 1), 1), 0).sum(-1)
            cand = keys[:, cfg.sink:(last + 1) * p].reshape(info.kv_heads, -1, p, q.shape[-1])
            lo, hi = cand.min(2), cand.max(2)
            center = (lo + hi) / 2
            spread = np.abs(cand - center[:, :, None]).mean(2)
            k = cfg.top_pages
            row.update({
                "recall": float((base + got).mean()),
                "recall_quest_current_query": float((base + _picked(
                    pages, _bound(q, lo, hi), k)).mean()),
                "recall_centered_digest": float((base + _picked(
                    pages, _bound(q, center - spread, center + spread), k)).mean()),
                "recall_oracle_pages": float((base + _picked(pages, pages, k)).mean())})
        out.append(row)
    return out


def fidelity(info, root, session, cfg, pairs, context, first, steps, taus, budget,
             runtime=None):
    dense = Decoder(make("dense_buffers", session, info, root, pairs, context + steps + 8, cfg,
                         runtime=runtime), context, [first])
    ref = []
    for _ in range(steps):
        ref.append(dense.step())
        dense.tokens.append(int(ref[-1].argmax()))
    tokens = dense.tokens
    result = {"steps": steps}
    for tau in taus:
        cache = make("freekv", session, info, root, pairs, context + steps + 8, cfg, tau,
                     runtime)
        dec = Decoder(cache, context, tokens)
        got, att = [], []
        for _ in range(steps):
            got.append(dec.step())
            if tau == taus[0]:
                att.append(attention_stats(cache, budget))
        cos = [cosine(a, b) for a, b in zip(ref, got)]
        result[f"tau_{tau}"] = {
            "top1_agreement": float(np.mean([a.argmax() == b.argmax()
                                             for a, b in zip(ref, got)])),
            "logits_cosine_mean": float(np.mean(cos)), "logits_cosine_min": float(np.min(cos)),
            "correction_rate": cache.stats["correction_rate"],
            "query_cosine_mean": cache.stats["query_cosine_mean"],
            "retrieved_pages_mean": cache.stats["retrieved_pages_mean"],
            "pages_per_head": cache.stats["pages_per_head"],
            "attended_tokens_mean": cache.stats["attended_mean"]}
        if att:
            result["attention"] = [
                {k: float(np.mean([a[layer][k] for a in att])) for k in att[0][layer]}
                for layer in range(info.layers)]
    return result


def timing(systems: dict, rounds: int, block: int) -> dict:
    names = list(systems)
    for dec in systems.values():
        dec.step()  # warm-up (OpenVINO's stateful model: sets its variables)
    times = {k: [] for k in names}
    blocks = {k: [] for k in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            ts = []
            for _ in range(block):
                t0 = time.perf_counter()
                systems[name].step()
                ts.append(time.perf_counter() - t0)
            time.sleep(0.02)
            times[name] += ts
            blocks[name].append(float(np.median(ts)))
    out = {k: {"median_ms": 1e3 * float(np.median(v)), "p90_ms": 1e3 * float(
        np.percentile(v, 90)), "min_ms": 1e3 * float(np.min(v)), "steps": len(v)}
        for k, v in times.items()}
    for base in ("standard", "dense_buffers"):
        out[f"freekv_speedup_vs_{base}"] = {
            "ratio_of_medians": out[base]["median_ms"] / out["freekv"]["median_ms"],
            "paired": float(np.median(np.array(blocks[base]) / np.array(blocks["freekv"])))}
    return out


def exactness(model, info, root, runtime_sessions, context: int, steps: int) -> dict:
    """Below the budget FreeKV must equal full attention (max |Δ| / max |logits|)."""
    ids = prompt(info.vocab, context, 97, seed=1)
    pairs, last = torch_prefill(model, ids, 1024)
    tokens = [int(last.argmax())] + list(np.random.default_rng(2).integers(0, info.vocab, steps))
    out = {"context": context, "steps": steps}
    for runtime, (session, cfg) in runtime_sessions.items():
        logits = {}
        for kind in ("standard", "dense_buffers", "freekv"):
            dec = Decoder(make(kind, session, info, root, pairs, context + steps + 8, cfg),
                          context, tokens)
            logits[kind] = np.stack([dec.step() for _ in range(steps)])
        scale = float(np.abs(logits["standard"]).max())
        out[runtime] = {f"{a}_vs_{b}": float(np.abs(logits[a] - logits[b]).max()) / scale
                        for a, b in (("freekv", "dense_buffers"), ("freekv", "standard"),
                                     ("dense_buffers", "standard"))}
    return out


def continuity(args, fkv, contexts, root: Path, ort_config) -> dict:
    """Fidelity and correction rates on a model whose consecutive queries are similar."""
    config = args.config.split("+")[0] + "+outliers"
    root.mkdir()
    log(f"query continuity: exporting {config} (outlier q columns × {args.continuity})")
    model, info, _ = build(config, 1.0, fkv, root, args.continuity, standard=False)
    out = {"model": {"config": config, "q_proj_scale": 1.0,
                     "q_proj_outlier_columns_scale": args.continuity}, "contexts": {}}
    for context in contexts:
        log(f"query continuity: context {context}")
        pairs, last = torch_prefill(model, prompt(info.vocab, context, args.segment),
                                    args.chunk)
        out["contexts"][str(context)] = fidelity(
            info, root, None, ort_config, pairs, context, int(last.argmax()), args.steps, TAUS,
            fkv.budget, runtime="ort")
    return out


# ------------------------------------------------------------------------------ main --

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small contexts and budget: a smoke test")
    ap.add_argument("--config", default="small")
    ap.add_argument("--contexts", default="4096,16384")
    ap.add_argument("--runtimes", default="ort,openvino")
    ap.add_argument("--budget", type=int, default=2048)
    ap.add_argument("--page", type=int, default=32)
    ap.add_argument("--sink", type=int, default=64)
    ap.add_argument("--recent", type=int, default=256)
    ap.add_argument("--alpha", type=float, default=3.0)
    ap.add_argument("--segment", type=int, default=256)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--block", type=int, default=4)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--continuity", type=float, default=25.0,
                    help="fidelity also on small+outliers with q_proj's outlier columns × this "
                         "(similar consecutive queries); 0 skips it")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.contexts, args.budget, args.page, args.sink, args.recent = "512,1024", 256, 16, 32, 64
        args.steps, args.rounds, args.block = 8, 3, 2
    out = args.out or (None if args.quick else DEFAULT_OUT)

    from edgec.artifact import versions
    from edgec.models import registry
    from edgec.runtimes.freekv import FreeKVConfig

    fkv = FreeKVConfig(budget=args.budget, page=args.page, sink=args.sink, recent=args.recent)
    contexts = [int(c) for c in args.contexts.split(",")]
    doc = {"benchmark": "freekv", "machine": {**QB.machine(), "isa_flags": cpu_flags()},
           "versions": versions(), "git": QB.git_state(), "loadavg_start": QB.loadavg(),
           "model": {"name": "llama", "config": args.config,
                     **registry.get("llama").hyperparameters(args.config),
                     "q_proj_scale": args.alpha, "prompt": f"one random {args.segment}-token "
                     "segment repeated"},
           "freekv": fkv.to_json(), "args": {k: str(v) for k, v in vars(args).items()},
           "cache_fill": f"PyTorch Llama.forward_cached in chunks of {args.chunk} tokens; the "
                         "same arrays loaded into every system"}
    with tempfile.TemporaryDirectory(prefix="edgec-freekv-") as tmp:
        root = Path(tmp)
        log("exporting the standard, FreeKV and dense decode graphs")
        model, info, doc["export"] = build(args.config, args.alpha, fkv, root)
        runtimes = {}
        for rt in args.runtimes.split(","):
            runtimes[rt] = sessions(rt, root)
        log("exactness below the budget")
        doc["exact_below_budget"] = exactness(model, info, root, runtimes, fkv.budget // 2, 4)
        doc["contexts"] = {}
        for context in contexts:
            log(f"context {context}: filling the cache")
            t0 = time.perf_counter()
            pairs, last = torch_prefill(model, prompt(info.vocab, context, args.segment),
                                        args.chunk)
            entry = {"cache_fill_s": time.perf_counter() - t0}
            first = int(last.argmax())
            log(f"context {context}: fidelity")
            session, cfg = runtimes.get("ort", next(iter(runtimes.values())))
            entry["fidelity"] = fidelity(info, root, session, cfg, pairs, context, first,
                                         args.steps, TAUS, fkv.budget)
            tokens = [first] + list(np.random.default_rng(3).integers(
                0, info.vocab, args.rounds * args.block + 1))
            entry["decode"] = {}
            for rt, (session, cfg) in runtimes.items():
                log(f"context {context}: timing on {rt}")
                capacity = context + len(tokens) + 8
                systems = {kind: Decoder(make(kind, session, info, root, pairs, capacity, cfg),
                                         context, tokens)
                           for kind in ("standard", "dense_buffers", "freekv")}
                entry["decode"][rt] = timing(systems, args.rounds, args.block)
                del systems
            doc["contexts"][str(context)] = entry
        ort_config = runtimes.get("ort", (None, None))[1]
        del runtimes
        if args.continuity:
            doc["query_continuity"] = continuity(args, fkv, contexts, root / "continuity",
                                                 ort_config)
    goal_ctx = str(max(contexts))
    doc["goal"] = {
        "statement": f"at {goal_ctx} tokens with budget {fkv.budget}, FreeKV decodes faster per "
                     "token than full attention on the same runtime (both baselines, paired)",
        "met": {rt: all(d[f"freekv_speedup_vs_{b}"]["paired"] > 1.0
                        for b in ("standard", "dense_buffers"))
                for rt, d in doc["contexts"][goal_ctx]["decode"].items()}}
    doc["loadavg_end"] = QB.loadavg()
    QB.emit(doc, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
