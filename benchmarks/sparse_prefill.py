"""Sparse-attention prefill benchmark: time to first token of a generation artifact compiled
with ``--generate --sparse-attention`` against its dense decoder, and what the sparsity costs.

Model: a Hugging Face LLaMA checkpoint the size of ``llama small`` (4 layers, 8 heads, 2 KV
heads, head_dim 64, 512 wide; ``_anchors_generation.make_checkpoint``) with q_proj × ``--alpha``
(random weights attend almost uniformly; a larger query scale sharpens attention, as
``benchmarks/freekv.py`` does). The prompt is one random segment of ``--segment`` tokens
repeated, so queries find their earlier copies: attention is not uniform.

Systems, per target (ort-cpu, openvino-cpu), all from ``Session.generate`` with one new token
(time to first token = prefill; edgec's ``last_generation["prefill_ms"]``):
- ``dense``: the artifact's dense decoder (``sparse_prefill=False``; on openvino-cpu the paged
  model, which also computes only the last token's logits);
- ``keep=K``: the sparse prefill graph at keep K (block 64, query block 64: the sink, the
  previous and the own key block forced on top of ceil(K · blocks)), the cache it fills loaded
  into the decoder's; ``keep=1.0`` is exact (the overhead of the gathered-block form).

Anchor (openvino-cpu, with ``--anchors-python``, an environment with openvino-genai and
optimum-intel): OpenVINO GenAI's ``LLMPipeline`` on the same checkpoint exported by
optimum-intel, f32, dense and with its own sparse prefill (``SchedulerConfig.use_sparse_attention``,
modes XATTENTION and TRISHAPE at their defaults), timed in the same rounds; its sparse modes'
greedy agreement with its dense run is reported the same way.

Timing: one warm-up each, then ``--rounds`` rounds over the systems (a new prompt each round,
the same for every system: OpenVINO GenAI's prefix cache answers a repeated prompt), the order
reversed every other round; medians, and ``paired`` speed-ups = median over rounds of
dense / sparse.

Fidelity (per target, once): last-token logits cosine and top-1 of the sparse prefill vs the
dense decoder, and greedy agreement over ``--new`` tokens (sparse prefill then dense decode,
vs dense throughout: the first position where they differ, and the fraction equal).

    python benchmarks/sparse_prefill.py [--quick] [--contexts 1024,4096,8192,16384]
        [--anchors-python /path/to/benchgen-venv/bin/python]

Without ``--quick`` the JSON also goes to benchmarks/results/sparse_prefill.json.
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
DEFAULT_OUT = REPO / "benchmarks" / "results" / "sparse_prefill.json"
QB = _load("quantization", "edgec_bench_quantization")  # machine(), loadavg(), git_state(), emit()
FK = _load("freekv", "edgec_bench_freekv")  # prompt(), cpu_flags()
AG = _load("_anchors_generation", "edgec_bench_anchors")  # make_checkpoint(), WorkerRunner


def log(msg: str) -> None:
    print(f"[sparse-prefill-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr,
          flush=True)


def compile_artifacts(ckpt: Path, root: Path, target: str, keeps: list[float], block: int,
                      qblock: int) -> dict[float, object]:
    import edgec

    arts = {}
    for keep in keeps:
        t0 = time.perf_counter()
        arts[keep] = edgec.compile(
            str(ckpt), target=target, generate=True, config="batch=1,seq=8",
            sparse_attention=f"keep={keep},block={block},qblock={qblock},min_seq=256",
            output_dir=root / f"{target}-keep{keep}")
        log(f"compiled {target} keep={keep} in {time.perf_counter() - t0:.1f} s")
    return arts


def first_token(session, ids, sparse: bool | None) -> tuple[float, str]:
    """(prefill ms, which graph ran): an edgec session, or an anchor runner (``sparse`` None)."""
    if sparse is None:
        return session.generate(ids, 1)["ttft_ms"], session.name
    session.generate(ids, max_new_tokens=1, sparse_prefill=sparse)
    g = session.last_generation
    return g["prefill_ms"], g["prefill_graph"]


def timing(systems: dict, prompts: list, rounds: int) -> dict:
    """``prompts[0]`` warms up; round r runs ``prompts[r + 1]`` on every system (a new prompt
    each round: OpenVINO GenAI's prefix cache would otherwise answer a repeated prompt)."""
    names = list(systems)
    for name in names:  # warm-up (and the sparse prefill session opened)
        first_token(systems[name][0], prompts[0], systems[name][1])
    times: dict[str, list[float]] = {n: [] for n in names}
    ran: dict[str, str] = {}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            ms, graph = first_token(systems[name][0], prompts[r + 1], systems[name][1])
            times[name].append(ms)
            ran[name] = graph
    out = {n: {"prefill_ms": round(statistics.median(t), 2), "graph": ran[n],
               "runs_ms": [round(x, 2) for x in t]} for n, t in times.items()}
    for n in names[1:]:
        base = "ov_genai_f32" if n.startswith("ov_genai_f32_") else names[0]
        out[n]["speedup_vs_dense" if base == names[0] else "speedup_vs_ov_genai_dense"] = round(
            statistics.median(d / s for d, s in zip(times[base], times[n])), 3)
    return out


def anchor_agreement(runners: dict, ids, new: int) -> dict:
    """Greedy agreement of OpenVINO GenAI's sparse modes with its dense run."""
    dense = np.array(runners["ov_genai_f32"].generate(ids, new)["tokens"])
    out = {}
    for name, runner in runners.items():
        if name != "ov_genai_f32":
            got = np.array(runner.generate(ids, new)["tokens"])
            differ = np.flatnonzero(got != dense)
            out[name] = {"greedy_agreement": round(float((got == dense).mean()), 4),
                         "first_divergence": int(differ[0]) if len(differ) else None}
    return out


def fidelity(dense_session, sparse_session, ids, new: int) -> dict:
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids),
             "position_ids": np.arange(ids.shape[1])[None]}
    info = dense_session.decoder_info
    empty = np.zeros((1, info.kv_heads, 0, info.head_dim), np.float32)
    dense = dense_session.run({**feeds, **dict.fromkeys(info.past_names, empty)})["logits"][0, -1]
    sparse_session.generate(ids, max_new_tokens=1)  # opens the prefill session
    sparse = sparse_session.prefill_session.run(feeds)["logits"][0, -1]
    a = dense_session.generate(ids, max_new_tokens=new, sparse_prefill=False)[0, -new:]
    b = sparse_session.generate(ids, max_new_tokens=new)[0, -new:]
    differ = np.flatnonzero(a != b)
    return {"logits_cosine": round(float(sparse @ dense / np.linalg.norm(sparse)
                                         / np.linalg.norm(dense)), 6),
            "top1_equal": bool(sparse.argmax() == dense.argmax()),
            "greedy_agreement": round(float((a == b).mean()), 4),
            "first_divergence": int(differ[0]) if len(differ) else None, "new_tokens": new}


def run_target(args, target: str, ckpt: Path, root: Path, keeps: list[float],
               contexts: list[int]) -> dict:
    """Compile, time and compare on one target; its sessions are freed on return (ONNX
    Runtime's arena keeps an 8k prompt's attention buffers otherwise: the next target ran out
    of memory)."""
    arts = compile_artifacts(ckpt, root, target, keeps, args.block, args.qblock)
    sessions = {k: a.load() for k, a in arts.items()}
    base = sessions[1.0]
    per_target: dict = {"contexts": {}}
    anchors = {}
    if target == "openvino-cpu" and args.anchors_python:
        for sparse in (None, "xattention", "trishape"):
            name = f"ov_genai_f32{'_' + sparse if sparse else ''}"
            anchors[name] = AG.WorkerRunner(args.anchors_python, "ov_genai", str(ckpt),
                                            str(root), f32=True, sparse=sparse)
            per_target.setdefault("anchor_setup", {})[name] = anchors[name].setup()
    try:
        for ctx in contexts:
            if target == "ort-cpu" and ctx > args.ort_max_context:
                per_target["contexts"][str(ctx)] = {
                    "skipped": f"> --ort-max-context {args.ort_max_context}: the dense "
                               "decoder's attention scores would not fit in memory"}
                continue
            prompts = [FK.prompt(AG.LLAMA_SMALL_HF["vocab_size"], ctx, args.segment, seed=r)
                       for r in range(args.rounds + 2)]
            log(f"{target} {ctx} tokens")
            systems = {"dense": (base, False),
                       **({"keep=1.0": (base, True)} if ctx <= args.exact_max_context else {}),
                       **{f"keep={k}": (sessions[k], True) for k in keeps[1:]},
                       **{name: (runner, None) for name, runner in anchors.items()}}
            entry = {"timing": timing(systems, prompts, args.rounds),
                     "fidelity": {f"keep={k}": fidelity(base, sessions[k], prompts[-1],
                                                        args.new) for k in keeps[1:]}}
            if anchors:
                entry["anchor_fidelity"] = anchor_agreement(anchors, prompts[-1], args.new)
            per_target["contexts"][str(ctx)] = entry
            log(f"  {({n: v['prefill_ms'] for n, v in entry['timing'].items()})}")
    finally:
        for runner in anchors.values():
            runner.close()
    return per_target


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="short prompts, 2 rounds, no file")
    p.add_argument("--contexts", default="1024,4096,8192,16384")
    p.add_argument("--ort-max-context", type=int, default=8192,
                   help="ort-cpu's dense decoder holds [heads, S, S] scores per layer (16k: "
                        "8.6 GB): longer prompts are skipped there")
    p.add_argument("--targets", default="openvino-cpu,ort-cpu")
    p.add_argument("--keeps", default="0.25,0.1")
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--qblock", type=int, default=0, help="0: edgec's causal default (block)")
    p.add_argument("--alpha", type=float, default=4.0)
    p.add_argument("--segment", type=int, default=509)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--exact-max-context", type=int, default=8192,
                   help="keep=1.0 gathers every key block for every query block (twice the "
                        "causal work, [nq, S] scores per head): timed up to here only")
    p.add_argument("--anchors-python", default=None,
                   help="a Python with openvino-genai and optimum-intel (OpenVINO GenAI rows)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    contexts = [512, 1024] if args.quick else [int(c) for c in args.contexts.split(",")]
    if args.quick:
        args.rounds = 2
    keeps = [1.0, *[float(k) for k in args.keeps.split(",")]]
    doc = {"benchmark": "sparse_prefill", "machine": QB.machine(), "cpu_flags": FK.cpu_flags(),
           "git": QB.git_state(), "loadavg_start": QB.loadavg(),
           "model": {"hf_config": AG.LLAMA_SMALL_HF, "q_scale": args.alpha,
                     "segment": args.segment,
                     "source": "random-weight transformers LLaMA checkpoint, q_proj scaled"},
           "sparse_attention": {"block": args.block, "query_block": args.qblock,
                                "keeps": keeps[1:], "min_seq": 256},
           "rounds": args.rounds, "targets": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ckpt = AG.make_checkpoint(root / "checkpoint", max(contexts) + args.new + 8,
                                  q_scale=args.alpha)
        for target in args.targets.split(","):  # one function per target: its sessions
            doc["targets"][target] = run_target(args, target, ckpt, root, keeps, contexts)
    doc["loadavg_end"] = QB.loadavg()
    QB.emit(doc, args.out or (None if args.quick else DEFAULT_OUT))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
