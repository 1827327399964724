"""A multi-turn chat on a real instruction-tuned decoder: what resuming the KV cache between turns
(``Session.chat()``) saves against prefilling the whole conversation each turn, beside ONNX
Runtime GenAI's own continuous decoding (one ``Generator`` kept across turns, each turn's new
tokens appended: how its chat examples keep the cache) on the same checkpoint, in one run.

Model: SmolLM2-135M-Instruct, all 30 layers (``_smollm2.py``), fp32, compiled with
``--generate`` for ort-cpu and openvino-cpu (its paged decoder); ONNX Runtime GenAI 0.18's
builder ``-p fp32 -e cpu``. The conversation: ``QUESTIONS``, one user message a turn through the
checkpoint's chat template (its default system message), greedy answers of at most ``--new``
tokens (EOS ends one); each system answers for itself, so the prompts stay the same length only
while the answers agree (each row records its prompt lengths and answers).

Systems, each running the whole conversation once a round, the order rotated round by round;
medians per turn over ``--rounds``:
- ``edgec_<target>``: ``session.chat()``: each turn prefills what its prompt does not share with
  the cache the last turn left;
- ``edgec_<target>_full``: the same with ``conversation.reuse = False`` (the whole conversation
  prefilled each turn);
- ``ort_genai``: one Generator for the conversation, ``append_tokens`` of each turn's new ids
  (the rendered conversation less what it holds);
- ``ort_genai_full``: a new Generator each turn, the whole rendered conversation appended.
- ``ov_genai`` (``--ov-genai-python``): OpenVINO GenAI's ``LLMPipeline`` in chat mode
  (``start_chat``; it keeps the conversation's cache) on optimum-intel's fp32 export, f32 compute
  and KV cache, in its own environment (``_chat_ov_genai.py``, a worker kept for the run); its
  prefill ms is the time to its first streamed text, which may be a token later than the first
  token.

Per turn: prefill ms (time to the first new token: prefill + its sampling), prompt tokens, new
tokens, total ms. Run (extra ``bench-generation``, or ``onnxruntime-genai`` alone):
``python benchmarks/chat.py [--rounds 5] [--new 48] [--ov-genai-python PY] [--out PATH]`` (results:
``benchmarks/results/chat.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _sibling import load_sibling as _load  # benchmarks/ is on sys.path when run

QB = _load("quantization", "edgec_bench_quantization")  # machine(), loadavg(), git_state()
SMOL = _load("_smollm2", "edgec_bench_smollm2")
ANCHORS = _load("_anchors_generation", "edgec_bench_anchors_generation")  # dist_versions
QUESTIONS = ["What is the capital of France?", "And of Italy?",
             "Write a short poem about both cities.", "Which one is bigger?",
             "Thanks! Now tell me a joke.", "Explain the joke.",
             "Give me three tips for sleeping better.", "Summarize our conversation."]


def log(msg: str) -> None:
    print(f"[chat {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Edgec:
    def __init__(self, artifact: Path, name: str, reuse: bool):
        import edgec

        self.session, self.name, self.reuse = edgec.load(artifact), name, reuse

    def conversation(self, new: int) -> list[dict]:
        chat = self.session.chat(max_new_tokens=new)
        chat.reuse = self.reuse
        turns = []
        for q in QUESTIONS:
            t0 = time.perf_counter()
            answer = chat.say(q)
            total = time.perf_counter() - t0
            g = self.session.last_generation
            turns.append({"prefill_ms": g["prefill_ms"], "total_ms": total * 1e3,
                          "prompt_tokens": g["prompt_tokens"],
                          "cached_tokens": g.get("cached_tokens", 0),
                          "new_tokens": g["new_tokens"], "answer": answer})
        return turns


class OrtGenai:
    def __init__(self, model, tokenizer, name: str, reuse: bool):
        self.model, self.tok, self.name, self.reuse = model, tokenizer, name, reuse

    def conversation(self, new: int) -> list[dict]:
        import onnxruntime_genai as og

        def generator():
            params = og.GeneratorParams(self.model)
            params.set_search_options(max_length=4096, do_sample=False)
            return og.Generator(self.model, params)

        messages, held, gen, turns = [], [], None, []
        for q in QUESTIONS:
            messages.append({"role": "user", "content": q})
            ids = self.tok.encode_chat(messages)
            t0 = time.perf_counter()
            if not self.reuse or gen is None or ids[:len(held)] != held:
                gen, held = generator(), []
            cached = len(held)
            gen.append_tokens(np.array([ids[cached:]], np.int32))
            out, first = [], None
            while not gen.is_done() and len(out) < new:
                gen.generate_next_token()
                out.append(int(gen.get_next_tokens()[0]))
                first = first or time.perf_counter()
                if out[-1] in EOS:
                    break
            total = time.perf_counter() - t0
            held = ids + out
            answer = self.tok.decode([t for t in out if t not in EOS])
            messages.append({"role": "assistant", "content": answer})
            turns.append({"prefill_ms": (first - t0) * 1e3, "total_ms": total * 1e3,
                          "prompt_tokens": len(ids), "cached_tokens": cached,
                          "new_tokens": len(out), "answer": answer})
        return turns


class OvGenai:
    """OpenVINO GenAI's chat mode (``_chat_ov_genai.py``) in the environment of ``python``:
    optimum-intel's fp32 export, then a worker process kept for the run."""

    name = "ov_genai"

    def __init__(self, python: str, ckpt: Path, work: Path, new: int, tokenizer):
        out = work / "ov-genai"
        cli = Path(python).parent / "optimum-cli"
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        env.pop("VIRTUAL_ENV", None)
        subprocess.run([str(cli), "export", "openvino", "-m", str(ckpt), "--task",
                        "text-generation-with-past", "--weight-format", "fp32", str(out)],
                       capture_output=True, check=True, env=env)
        self.proc = subprocess.Popen(
            [python, str(Path(__file__).parent / "_chat_ov_genai.py"), str(out), str(new),
             json.dumps(QUESTIONS)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env=env)
        self.version = json.loads(self.proc.stdout.readline())["ready"]
        self.tok = tokenizer

    def conversation(self, new: int) -> list[dict]:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        turns, messages = json.loads(self.proc.stdout.readline()), []
        for q, t in zip(QUESTIONS, turns):  # its prompts, as edgec's template renders them
            messages.append({"role": "user", "content": q})
            t.update(prompt_tokens=len(self.tok.encode_chat(messages)), cached_tokens=None,
                     new_tokens=None)
            messages.append({"role": "assistant", "content": t["answer"]})
        return turns


EOS: tuple[int, ...] = ()


def main() -> None:
    global EOS
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new", type=int, default=48)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "chat.json"))
    ap.add_argument("--ov-genai-python", default=None,
                    help="a Python with openvino-genai and optimum-intel (extra bench-generation, "
                         "in its own environment): OpenVINO GenAI's chat mode joins the run")
    args = ap.parse_args()
    import onnxruntime_genai as og

    import edgec

    ckpt = SMOL.checkpoint()
    work = Path(tempfile.mkdtemp(prefix="edgec-chat-"))
    systems = []
    for target in ("ort-cpu", "openvino-cpu"):
        log(f"compiling for {target}")
        art = edgec.compile(str(ckpt), target=target, output_dir=work / target, generate=True)
        short = target.split("-")[0]
        systems += [Edgec(art.path, f"edgec_{short}", True),
                    Edgec(art.path, f"edgec_{short}_full", False)]
    log("ONNX Runtime GenAI's builder, fp32")
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(ckpt), "-o",
           str(work / "ort-genai"), "-p", "fp32", "-e", "cpu", "-c", str(work / "og-cache")]
    subprocess.run(cmd, capture_output=True, check=True, cwd=work)
    model = og.Model(str(work / "ort-genai"))
    tok = systems[0].session.tokenizer
    EOS = tuple(systems[0].session.decoder_info.eos_token_ids)
    systems += [OrtGenai(model, tok, "ort_genai", True),
                OrtGenai(model, tok, "ort_genai_full", False)]
    if args.ov_genai_python:
        log("OpenVINO GenAI: optimum-intel's fp32 export, its LLMPipeline in chat mode")
        systems.append(OvGenai(args.ov_genai_python, ckpt, work, args.new, tok))
    for s in systems:  # warm-up: compiles OpenVINO's paged decoder, first-run allocations
        s.conversation(4)
    runs: dict[str, list[list[dict]]] = {s.name: [] for s in systems}
    load = []
    for r in range(args.rounds):
        order = systems[r % len(systems):] + systems[:r % len(systems)]
        for s in order:
            runs[s.name].append(s.conversation(args.new))
        load.append(QB.loadavg())
        log(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{n} {sum(t['prefill_ms'] for t in v[-1]):.0f} ms" for n, v in runs.items()))
    rows = {}
    for name, convs in runs.items():
        turns = []
        for i in range(len(QUESTIONS)):
            per = [c[i] for c in convs]
            turns.append({"prefill_ms": round(statistics.median(t["prefill_ms"] for t in per), 2),
                          "total_ms": round(statistics.median(t["total_ms"] for t in per), 2),
                          **{k: per[-1][k] for k in ("prompt_tokens", "cached_tokens",
                                                     "new_tokens", "answer")}})
        rows[name] = {"turns": turns,
                      "prefill_ms_sum": round(sum(t["prefill_ms"] for t in turns), 1),
                      "prefill_ms_after_first_turn": round(
                          sum(t["prefill_ms"] for t in turns[1:]), 1)}
    answers = {n: [t["answer"] for t in row["turns"]] for n, row in rows.items()}
    ov = [s for s in systems if isinstance(s, OvGenai)]
    ref = answers["edgec_ort_full"]
    out = {"benchmark": "chat", "model": "SmolLM2-135M-Instruct (30 layers, fp32)",
           "questions": QUESTIONS, "max_new_tokens": args.new, "rounds": args.rounds,
           "machine": QB.machine(), "loadavg": load, "git": QB.git_state(),
           "versions": {**ANCHORS.dist_versions(["onnxruntime", "onnxruntime-genai", "openvino"]),
                        **({"openvino-genai": ov[0].version} if ov else {})},
           "answers_equal_to_edgec_ort_full": {n: sum(a == b for a, b in zip(v, ref))
                                               for n, v in answers.items()},
           "systems": rows}
    Path(args.out).write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    for name, row in rows.items():
        print(f"{name:18s} prefill per turn (ms): "
              + " ".join(f"{t['prefill_ms']:.0f}" for t in row["turns"])
              + f" | prompts {row['turns'][0]['prompt_tokens']}→{row['turns'][-1]['prompt_tokens']}"
              f" | sum after turn 1: {row['prefill_ms_after_first_turn']:.0f} ms")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
