"""Vision-token pruning benchmark: time to first token and decode speed of a VLM generation
artifact compiled with ``--prune-vision-tokens`` against the same model unpruned, and what the
pruning costs in fidelity.

Model: edgec's reference ``vlm`` at ``--config`` (default ``small+sharp``: a 224-px image in
14-px patches, 256 image tokens, a 4-layer ViT of width 256 and a two-layer projector in front
of an 8-layer llama-style decoder of width 512, 8 heads, 2 KV heads; ``+sharp`` multiplies the
language model's q_proj by 4 so that its attention is peaked, as a trained model's is, instead of
the near-uniform attention of random weights). Random weights: nothing here measures accuracy on
a task. The prompt is [one token, the image's placeholders, ``--text`` text tokens]
(``edgec.models.vlm.example_prompt``, batch 1) with random pixels in [-1, 1], fixed seeds.

Systems, per target (ort-cpu, openvino-cpu), each an artifact compiled with ``generate=True``:
- ``unpruned``: every image token through every decoder layer;
- ``keep=K``: ``--prune-vision-tokens keep=K,layer=--layer,score=--score`` (training-free,
  FastV / Dynamic-LLaVA style): the first ``layer`` decoder layers run the whole prompt, the
  last prompt token's attention in layer ``layer - 1`` scores the image tokens, and the
  remaining layers (and the KV cache every decode step reads) hold ceil(K · image tokens) of
  them plus every text token.

With ``--text-keep T`` < 1 (default 0.5) a third system adds decode-time sparsification to the
first keep: beyond the ``--recent`` newest generated tokens, ceil(T · their number) stay in the
cache (those that received the most attention); ``cache_tokens_at_end`` shows what it holds
after the last step (the others: kept prompt + new tokens).

Timing, all from ``Session.generate(ids, image=pixels, max_new_tokens=--new, eos disabled)``:
``prefill_ms`` = edgec's time to first token (image encoder + prefill graph + first token),
``decode_tokens_per_s`` over the remaining new tokens (the pruned cache is shorter). Besides,
``lm_prefill_ms``: the prefill graph alone (embedding merge + language model over the prompt,
image features computed beforehand), since the image encoder is common to both systems and is
not pruned; and ``image_encoder_ms``: the image encoder alone. One warm-up each, then
``--rounds`` rounds over every (system, measurement) pair, the order reversed every other round;
medians, and ``paired`` ratios = median over rounds of unpruned / pruned.

Fidelity (per target, once, over ``--fidelity-seeds`` prompts and images): the last prompt
token's logits from the pruned prefill graph vs the unpruned one (cosine, top-1 equal), and
greedy generation of ``--new`` tokens pruned vs unpruned (the fraction of equal positions, and
the first position where they differ, None when none does); means over the seeds and each seed.

FLOPs: the artifact's ``report.json`` ``vision_pruning`` (edgec's analytic count of the language
model's prefill on the compile-time example prompt), the same count for the timed prompt, and an
analytic count of the image encoder (not pruned) for the share of the whole first token's work.
``published`` quotes the papers' numbers for context; they are not measured here.

    python benchmarks/vlm.py [--quick] [--config small+sharp] [--keeps 0.25] [--rounds 7]
        [--text-keep 0.5 --recent 16] [--new 32] [--anchors-python /path/to/bin/python]

Anchor (``--anchors-python``, an environment with openvino-genai and optimum-intel, the
``bench-generation`` extra): a LLaVA checkpoint of the same size (``_anchors_vlm``: CLIP vision
tower, LLaMA language model, word-level tokenizer, CLIP processor) run on openvino-cpu by edgec
(unpruned and at the first keep) and by OpenVINO GenAI's ``VLMPipeline`` (optimum-intel's fp32
export, f32 inference; without and with its visual-token pruning asked for), the same PNG and
prompt, interleaved rounds; time to first token and decode tokens/s as each system reports them.

Without ``--quick`` the JSON also goes to benchmarks/results/vlm.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ["CI"] = "true"  # OpenVINO telemetry asks for consent on import otherwise

import numpy as np
from _sibling import load_sibling as _load  # benchmarks/ is on sys.path when run

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results" / "vlm.json"
QB = _load("quantization", "edgec_bench_quantization")  # machine(), loadavg(), git_state(), emit()
FK = _load("freekv", "edgec_bench_freekv")  # cpu_flags()

PUBLISHED = {
    "note": "the papers' own numbers on 7B/13B LLaVA-1.5 models (576 image tokens from a 336-px "
            "image, 32/40 decoder layers), not measured here; the model here is far smaller "
            "(256 image tokens, 8 layers, width 512), so its FLOPs cut at the same keep differs",
    "dynamic_llava": {
        "paper": "Dynamic-LLaVA (arXiv 2412.00876)",
        "model": "LLaVA-1.5-7B (32 layers, 576 image tokens)",
        "setting": "trained token predictors; keeps about 0.2 of the image tokens after layer 2",
        "prefill_compute_cut": "about 75%"},
    "fastv": {
        "paper": "FastV (arXiv 2403.06764)",
        "model": "LLaVA-1.5-13B (40 layers, 576 image tokens)",
        "setting": "training-free; K=2 (prune after layer 2), R=50% of the image tokens dropped "
                   "by the attention they receive",
        "flops_cut": "about 45%"},
}


def log(msg: str) -> None:
    print(f"[vlm-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def vision_flops(cfg) -> int:
    """Multiply-accumulates ×2 of the reference image encoder (patch embedding, ViT blocks,
    projector) on one image; norms, GELU and softmax left out, as ``prefill_flops`` does."""
    n, vd, d = cfg.image_tokens, cfg.vision_dim, cfg.text.dim
    patch = 2 * n * 3 * cfg.patch * cfg.patch * vd
    block = 2 * n * (3 * vd * vd + vd * vd + 2 * vd * cfg.vision_ffn) + 2 * 2 * n * n * vd
    return int(patch + cfg.vision_layers * block + 2 * n * (vd * d + d * d))


def inputs(cfg, text_tokens: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(pixel values [1, 3, H, W] in [-1, 1], prompt ids [1, 1 + image tokens + text])."""
    import torch

    from edgec.models.vlm import example_prompt

    g = torch.Generator().manual_seed(1000 + seed)
    pixels = torch.rand(1, 3, cfg.image, cfg.image, generator=g) * 2 - 1
    return pixels.numpy(), example_prompt(cfg, 1, text_tokens, seed).numpy()


def compile_artifacts(root: Path, target: str, config: str, prunings: dict[str, str | None]
                      ) -> dict[str, object]:
    import edgec

    arts = {}
    for name, prune in prunings.items():
        t0 = time.perf_counter()
        arts[name] = edgec.compile("vlm", target, root / f"{target}-{name}", config=config,
                                   generate=True, prune_vision_tokens=prune)
        log(f"compiled {target} {name} in {time.perf_counter() - t0:.1f} s")
    return arts


def prefill_feeds(session, pixels: np.ndarray, ids: np.ndarray) -> dict[str, np.ndarray]:
    """The prefill graph's inputs, the image features computed by the artifact's encoder."""
    _, vision = session._vision_sessions()
    features = vision._run({"pixel_values": pixels})["image_features"]
    return {"input_ids": ids, "image_features": features, "attention_mask": np.ones_like(ids),
            "position_ids": np.arange(ids.shape[1], dtype=np.int64)[None]}


def measure(session, kind: str, pixels, ids, feeds, new: int) -> dict[str, float]:
    if kind == "generate":
        session.generate(ids, image=pixels, max_new_tokens=new, eos_token_id=[])
        g = session.last_generation
        return {"prefill_ms": g["prefill_ms"], "decode_tokens_per_s": g["decode_tokens_per_s"],
                "prompt_tokens_kept": g["prompt_tokens_kept"],
                "cache_tokens": g.get("cache_tokens", g["prompt_tokens_kept"] + new - 1)}
    prefill, vision = session._vision_sessions()
    t0 = time.perf_counter()
    if kind == "lm_prefill":
        prefill._run(feeds)
    else:  # image encoder alone
        vision._run({"pixel_values": pixels})
    return {f"{kind}_ms": (time.perf_counter() - t0) * 1e3}


def timing(sessions: dict, pixels, ids, new: int, rounds: int) -> dict:
    names = list(sessions)
    feeds = {n: prefill_feeds(s, pixels, ids) for n, s in sessions.items()}
    order = [(n, k) for k in ("generate", "lm_prefill", "image_encoder") for n in names]
    for n, k in order:  # warm-up
        measure(sessions[n], k, pixels, ids, feeds[n], new)
    runs: dict[str, dict[str, list]] = {n: {} for n in names}
    for r in range(rounds):
        for n, k in (order if r % 2 == 0 else order[::-1]):
            for key, v in measure(sessions[n], k, pixels, ids, feeds[n], new).items():
                runs[n].setdefault(key, []).append(v)
    out = {}
    for n in names:
        m = runs[n]
        out[n] = {"prefill_ms": round(statistics.median(m["prefill_ms"]), 2),
                  "lm_prefill_ms": round(statistics.median(m["lm_prefill_ms"]), 2),
                  "image_encoder_ms": round(statistics.median(m["image_encoder_ms"]), 2),
                  "decode_tokens_per_s": round(statistics.median(m["decode_tokens_per_s"]), 1),
                  "prompt_tokens": int(ids.shape[1]),
                  "prompt_tokens_kept": m["prompt_tokens_kept"][-1],
                  "cache_tokens_at_end": m["cache_tokens"][-1],
                  "runs": {k: [round(x, 2) for x in v] for k, v in m.items()
                           if k not in ("prompt_tokens_kept", "cache_tokens")}}
    base = runs[names[0]]
    for n in names[1:]:
        out[n]["paired_vs_unpruned"] = {
            "prefill_speedup": _paired(base["prefill_ms"], runs[n]["prefill_ms"]),
            "lm_prefill_speedup": _paired(base["lm_prefill_ms"], runs[n]["lm_prefill_ms"]),
            "decode_speedup": _paired(runs[n]["decode_tokens_per_s"],
                                      base["decode_tokens_per_s"])}
    return out


def _paired(num: list[float], den: list[float]) -> float:
    """Median over rounds of num / den (a ratio per round: drift affects both alike)."""
    return round(statistics.median(a / b for a, b in zip(num, den)), 3)


def fidelity(base, pruned, cfg, text_tokens: int, new: int, seeds: int) -> dict:
    per_seed = []
    for seed in range(seeds):
        pixels, ids = inputs(cfg, text_tokens, seed)
        a = base._vision_sessions()[0]._run(prefill_feeds(base, pixels, ids))["logits"][0, -1]
        b = pruned._vision_sessions()[0]._run(prefill_feeds(pruned, pixels, ids))["logits"][0, -1]
        ga = base.generate(ids, image=pixels, max_new_tokens=new, eos_token_id=[])[0, -new:]
        gb = pruned.generate(ids, image=pixels, max_new_tokens=new, eos_token_id=[])[0, -new:]
        differ = np.flatnonzero(ga != gb)
        per_seed.append({
            "seed": seed,
            "logits_cosine": round(float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)), 6),
            "top1_equal": bool(a.argmax() == b.argmax()),
            "greedy_agreement": round(float((ga == gb).mean()), 4),
            "first_divergence": int(differ[0]) if len(differ) else None})
    firsts = [s["first_divergence"] for s in per_seed]
    return {"seeds": seeds, "new_tokens": new,
            "logits_cosine_mean": round(float(np.mean([s["logits_cosine"] for s in per_seed])), 6),
            "top1_equal_fraction": float(np.mean([s["top1_equal"] for s in per_seed])),
            "greedy_agreement_mean": round(float(np.mean([s["greedy_agreement"]
                                                          for s in per_seed])), 4),
            "first_divergence_mean": (round(float(np.mean([new if f is None else f
                                                           for f in firsts])), 2)),
            "first_divergence_note": "a seed without a difference counts as new_tokens",
            "per_seed": per_seed}


def flops(art, cfg, pruning: dict, prompt_tokens: int) -> dict:
    from edgec.exporters.vision_prune import prefill_flops

    report = art.report.get("vision_pruning") or {}
    kept = pruning["kept_image_tokens"]
    full = prefill_flops(cfg.text, prompt_tokens)
    cut = prefill_flops(cfg.text, prompt_tokens, prompt_tokens - cfg.image_tokens + kept,
                        pruning["layer"])
    enc = vision_flops(cfg)
    return {"report_json": {k: report.get(k) for k in (
                "prompt_tokens", "image_tokens", "kept_image_tokens", "prefill_flops",
                "prefill_flops_pruned", "prefill_flops_cut", "example_logits_cosine_vs_unpruned",
                "example_argmax_agreement")},
            "timed_prompt": {"prompt_tokens": prompt_tokens, "prefill_flops": full,
                             "prefill_flops_pruned": cut,
                             "prefill_flops_cut": round(1 - cut / full, 4)},
            "with_image_encoder": {"image_encoder_flops": enc,
                                   "first_token_flops_cut": round(1 - (cut + enc) / (full + enc),
                                                                  4)}}


def run_target(args, target: str, cfg, root: Path, keeps: list[float]) -> dict:
    """Compile, time and compare on one target; its sessions are freed on return."""
    prunings = {"unpruned": None, **{f"keep={k}": f"keep={k},layer={args.layer},score={args.score}"
                                     for k in keeps}}
    if args.text_keep < 1:  # decode-time sparsification on top of the first keep
        prunings[f"keep={keeps[0]},text_keep={args.text_keep}"] = (
            f"{prunings[f'keep={keeps[0]}']},text_keep={args.text_keep},recent={args.recent}")
    arts = compile_artifacts(root, target, args.config, prunings)
    sessions = {n: a.load() for n, a in arts.items()}
    pixels, ids = inputs(cfg, args.text, seed=0)
    log(f"{target}: timing, {args.rounds} rounds, prompt {ids.shape[1]} tokens")
    entry: dict = {"timing": timing(sessions, pixels, ids, args.new, args.rounds)}
    log(f"  {({n: (v['prefill_ms'], v['lm_prefill_ms']) for n, v in entry['timing'].items()})}")
    entry["fidelity"], entry["flops"] = {}, {}
    for n in list(sessions)[1:]:
        entry["fidelity"][n] = fidelity(sessions["unpruned"], sessions[n], cfg, args.text,
                                        args.new, args.fidelity_seeds)
        pruning = arts[n].report["vision_pruning"]
        entry["flops"][n] = flops(arts[n], cfg, pruning, int(ids.shape[1]))
        log(f"  {n}: cosine {entry['fidelity'][n]['logits_cosine_mean']}, greedy "
            f"{entry['fidelity'][n]['greedy_agreement_mean']}")
    return entry


def run_anchors(args, root: Path) -> dict:
    """edgec beside OpenVINO GenAI's ``VLMPipeline`` on one LLaVA checkpoint (``_anchors_vlm``),
    openvino-cpu, the same PNG and prompt: edgec unpruned and at the first keep, OpenVINO GenAI
    without and with its visual-token pruning asked for (``pruning_ratio`` 75)."""
    import edgec

    av = _load("_anchors_vlm", "edgec_bench_anchors_vlm")
    size = "tiny" if args.quick else "small"
    ckpt = av.make_llava_checkpoint(root / "llava", size=size)
    side = 112 if size == "tiny" else 224
    png = av.write_png(root / "image.png", side=side)
    prompt = av.make_prompt(args.text)
    ids = av.prompt_ids(ckpt, prompt)
    keep = float(args.keeps.split(",")[0])
    arts = {"edgec unpruned": None, f"edgec keep={keep}": f"keep={keep},layer={args.layer}"}
    sessions = {}
    for name, prune in arts.items():
        art = edgec.compile(str(ckpt), "openvino-cpu", root / name.replace(" ", "-"),
                            generate=True, prune_vision_tokens=prune)
        sessions[name] = art.load()

    def edgec_run(session):
        def run():
            out = session.generate(ids, image=png, max_new_tokens=args.new, eos_token_id=[])
            g = session.last_generation
            return {"ttft_ms": g["prefill_ms"], "decode_tokens_per_s": g["decode_tokens_per_s"],
                    "prompt_tokens": g["prompt_tokens_kept"],
                    "tokens": out[0, -args.new:].tolist()}
        return run

    with av.VlmAnchor(args.anchors_python, ckpt, root / "ov-genai") as anchor:
        info = anchor.setup()

        def genai(prune):
            def run():
                r = anchor.run(png, prompt, args.new, prune)
                return {**r, "tokens": av.text_ids(r.get("text", ""))}
            return run

        systems = {**{n: edgec_run(s) for n, s in sessions.items()},
                   "ov-genai": genai(False), "ov-genai pruning_ratio=75": genai(True)}
        runs: dict[str, list[dict]] = {n: [] for n in systems}
        for run in systems.values():  # warm-up
            run()
        names = list(systems)
        for r in range(args.rounds):
            for n in (names if r % 2 == 0 else names[::-1]):
                runs[n].append(systems[n]())
    out = {"checkpoint": {"size": size, "image_tokens": av.image_tokens(size),
                          "prompt": "[BOS, <image> (expanded), words]",
                          "prompt_tokens": int(ids.shape[1]) - 1 + av.image_tokens(size)},
           "ov_genai": info, "systems": {}}
    base = runs["ov-genai"]
    for n, rs in runs.items():
        out["systems"][n] = {
            "ttft_ms": round(statistics.median(x["ttft_ms"] for x in rs), 2),
            "decode_tokens_per_s": round(statistics.median(x["decode_tokens_per_s"]
                                                           for x in rs), 1),
            "prompt_tokens_in_language_model": rs[-1].get("prompt_tokens"),
            "ttft_speedup_vs_ov_genai_paired": _paired([x["ttft_ms"] for x in base],
                                                       [x["ttft_ms"] for x in rs]),
            "greedy_agreement_vs_ov_genai": round(float(np.mean(
                [a == b for a, b in zip(rs[-1]["tokens"], base[-1]["tokens"])])), 4)
            if rs[-1]["tokens"] and base[-1]["tokens"] else None}
    out["note"] = ("OpenVINO GenAI 2026.4 runs its visual-token pruner (CDPruner, "
                   "GenerationConfig.pruning_ratio) for Qwen-VL models only: on LLaVA the knob "
                   "is accepted and ignored (prompt_tokens_in_language_model shows it)")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="tiny+sharp, 8 text and 8 new tokens, 2 rounds, 2 seeds, no file")
    p.add_argument("--config", default="small+sharp")
    p.add_argument("--targets", default="ort-cpu,openvino-cpu")
    p.add_argument("--keeps", default="0.25")
    p.add_argument("--layer", type=int, default=2)
    p.add_argument("--score", default="attention", choices=("attention", "norm"))
    p.add_argument("--text-keep", type=float, default=0.5,
                   help="also a system with decode-time sparsification (1: none)")
    p.add_argument("--recent", type=int, default=16)
    p.add_argument("--text", type=int, default=32, help="text tokens after the image")
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--fidelity-seeds", type=int, default=4)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--anchors-python", default=None,
                   help="a Python with openvino-genai and optimum-intel: OpenVINO GenAI's "
                        "VLMPipeline beside edgec on a LLaVA checkpoint (openvino-cpu)")
    args = p.parse_args(argv)
    if args.quick:
        args.config, args.text, args.new, args.rounds, args.fidelity_seeds = (
            "tiny+sharp", 8, 8, 2, 2)
    keeps = [float(k) for k in args.keeps.split(",")]
    from edgec.models import registry
    from edgec.models.vlm import CONFIGS

    cfg = CONFIGS[args.config.partition("+")[0]]
    doc = {"benchmark": "vlm", "machine": QB.machine(), "cpu_flags": FK.cpu_flags(),
           "git": QB.git_state(), "loadavg_start": QB.loadavg(),
           "model": {"source": "edgec reference vlm, random weights", "config": args.config,
                     "hyperparameters": registry.get("vlm").hyperparameters(args.config)},
           "prompt": {"layout": "[1 token, image placeholders, text tokens]", "batch": 1,
                      "image_tokens": cfg.image_tokens, "text_tokens": args.text,
                      "prompt_tokens": 1 + cfg.image_tokens + args.text,
                      "new_tokens": args.new, "eos": "disabled"},
           "vision_pruning": {"keeps": keeps, "layer": args.layer, "score": args.score,
                              "kept_image_tokens": {f"keep={k}": max(1, int(np.ceil(
                                  k * cfg.image_tokens - 1e-9))) for k in keeps}},
           "rounds": args.rounds, "targets": {}, "published": PUBLISHED}
    with tempfile.TemporaryDirectory() as tmp:
        for target in args.targets.split(","):  # one function per target: its sessions
            doc["targets"][target] = run_target(args, target, cfg, Path(tmp), keeps)
        if args.anchors_python:
            log("anchors: edgec and OpenVINO GenAI on a LLaVA checkpoint")
            doc["anchors"] = run_anchors(args, Path(tmp))
    doc["loadavg_end"] = QB.loadavg()
    QB.emit(doc, args.out or (None if args.quick else DEFAULT_OUT))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
