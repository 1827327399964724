"""Sparse-attention prefill benchmark: time to first token of a generation artifact compiled
with ``--generate --sparse-attention`` against its dense decoder, and what the sparsity costs.

Model: ``llama small`` (4 layers, 8 heads, 2 KV heads, head_dim 64, 512 wide) with q_proj ×
``--alpha`` (random weights attend almost uniformly; a larger query scale sharpens attention, as
``benchmarks/freekv.py`` does), saved as a Hugging Face LLaMA checkpoint and compiled from
there (the checkpoint path through edgec). The prompt is one random segment of ``--segment``
tokens repeated, so queries find their earlier copies: attention is not uniform.

Systems, per target (ort-cpu, openvino-cpu), all from ``Session.generate`` with one new token
(time to first token = prefill; edgec's ``last_generation["prefill_ms"]``):
- ``dense``: the artifact's dense decoder (``sparse_prefill=False``; on openvino-cpu the paged
  model, which also computes only the last token's logits);
- ``keep=K``: the sparse prefill graph at keep K (block 64, query block 512, sink + local
  band forced), the cache it fills loaded into the decoder's.

Timing: one warm-up each, then ``--rounds`` rounds over the systems, the order reversed every
other round; medians, and ``paired`` speed-ups = median over rounds of dense / sparse.

Fidelity (per target, once): last-token logits cosine and top-1 of the sparse prefill vs the
dense decoder, and greedy agreement over ``--new`` tokens (sparse prefill then dense decode,
vs dense throughout: the first position where they differ, and the fraction equal).

    python benchmarks/sparse_prefill.py [--quick] [--contexts 1024,4096,8192]

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
FK = _load("freekv", "edgec_bench_freekv")  # sharpened(), prompt(), cpu_flags()


def log(msg: str) -> None:
    print(f"[sparse-prefill-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr,
          flush=True)


def checkpoint(root: Path, config: str, alpha: float, positions: int) -> Path:
    """The sharpened ``llama`` as a transformers LLaMA checkpoint directory."""
    import torch
    import transformers

    model = FK.sharpened(config, alpha)
    c = model.cfg
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=c.vocab, hidden_size=c.dim, intermediate_size=c.ffn,
        num_hidden_layers=c.layers, num_attention_heads=c.heads, num_key_value_heads=c.kv_heads,
        rope_theta=c.rope_theta, rms_norm_eps=c.eps, max_position_embeddings=positions,
        bos_token_id=1, eos_token_id=2, pad_token_id=0)).eval()
    state = {k if k == "lm_head.weight" else f"model.{k}": v
             for k, v in model.state_dict().items()}
    with torch.no_grad():
        hf.load_state_dict(state, strict=True)
    path = root / "checkpoint"
    hf.save_pretrained(path)
    return path


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


def first_token(session, ids, sparse: bool) -> tuple[float, str]:
    session.generate(ids, max_new_tokens=1, sparse_prefill=sparse)
    g = session.last_generation
    return g["prefill_ms"], g["prefill_graph"]


def timing(systems: dict, ids, rounds: int) -> dict:
    names = list(systems)
    for name in names:  # warm-up (and the sparse prefill session opened)
        first_token(systems[name][0], ids, systems[name][1])
    times: dict[str, list[float]] = {n: [] for n in names}
    ran: dict[str, str] = {}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            ms, graph = first_token(systems[name][0], ids, systems[name][1])
            times[name].append(ms)
            ran[name] = graph
    out = {n: {"prefill_ms": round(statistics.median(t), 2), "graph": ran[n],
               "runs_ms": [round(x, 2) for x in t]} for n, t in times.items()}
    for n in names[1:]:
        out[n]["speedup_vs_dense"] = round(statistics.median(
            d / s for d, s in zip(times[names[0]], times[n])), 3)
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny model, short prompts, no file")
    p.add_argument("--contexts", default="1024,4096,8192")
    p.add_argument("--targets", default="ort-cpu,openvino-cpu")
    p.add_argument("--keeps", default="0.25,0.1")
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--qblock", type=int, default=512)
    p.add_argument("--alpha", type=float, default=4.0)
    p.add_argument("--segment", type=int, default=509)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    config = "tiny" if args.quick else "small"
    contexts = [256, 512] if args.quick else [int(c) for c in args.contexts.split(",")]
    if args.quick:
        args.block, args.qblock, args.rounds, args.segment = 16, 64, 2, 61
    keeps = [1.0, *[float(k) for k in args.keeps.split(",")]]
    doc = {"benchmark": "sparse_prefill", "machine": QB.machine(), "cpu_flags": FK.cpu_flags(),
           "git": QB.git_state(), "loadavg_start": QB.loadavg(),
           "model": {"config": config, "alpha": args.alpha, "segment": args.segment,
                     "source": "llama reference saved as a transformers LLaMA checkpoint"},
           "sparse_attention": {"block": args.block, "query_block": args.qblock,
                                "keeps": keeps[1:], "min_seq": 256},
           "rounds": args.rounds, "targets": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ckpt = checkpoint(root, config, args.alpha, max(contexts) + args.new + 8)
        for target in args.targets.split(","):
            arts = compile_artifacts(ckpt, root, target, keeps, args.block, args.qblock)
            sessions = {k: a.load() for k, a in arts.items()}
            base = sessions[1.0]
            per_target = {"contexts": {}}
            for ctx in contexts:
                ids = FK.prompt(4096 if not args.quick else 256, ctx, args.segment)
                log(f"{target} {ctx} tokens")
                systems = {"dense": (base, False), "keep=1.0": (base, True),
                           **{f"keep={k}": (sessions[k], True) for k in keeps[1:]}}
                entry = {"timing": timing(systems, ids, args.rounds),
                         "fidelity": {f"keep={k}": fidelity(base, sessions[k], ids, args.new)
                                      for k in keeps[1:]}}
                per_target["contexts"][str(ctx)] = entry
                log(f"  {({n: v['prefill_ms'] for n, v in entry['timing'].items()})}")
            doc["targets"][target] = per_target
            del sessions, base
    doc["loadavg_end"] = QB.loadavg()
    QB.emit(doc, args.out or (None if args.quick else DEFAULT_OUT))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
