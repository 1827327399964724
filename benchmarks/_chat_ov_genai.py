"""OpenVINO GenAI's own multi-turn chat, for ``benchmarks/chat.py``: a worker run by the Python of
an environment with ``openvino-genai`` (and optimum-intel for the export; the ``bench-generation``
extra cannot share edgec's dev environment: optimum-intel 2.2 caps transformers below 5.6).

``python _chat_ov_genai.py MODEL_DIR NEW_TOKENS QUESTIONS_JSON``: one ``LLMPipeline`` (CPU, f32
compute and KV cache, as edgec's fp32 artifact) on optimum-intel's export, then for each line
``go`` on stdin one conversation: ``start_chat()``, each question through ``generate(text)``
(its tokenizer and the checkpoint's chat template; greedy, at most NEW_TOKENS), ``finish_chat()``;
one JSON line back: per turn the time to the first streamed text (prefill ms), the total ms and
the answer. The pipeline keeps the conversation's KV cache between turns (its chat mode)."""

from __future__ import annotations

import json
import sys
import time


def main() -> None:
    import openvino_genai as og

    model, new, questions = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    pipe = og.LLMPipeline(model, "CPU", INFERENCE_PRECISION_HINT="f32", KV_CACHE_PRECISION="f32")
    config = pipe.get_generation_config()
    config.max_new_tokens, config.do_sample = new, False
    print(json.dumps({"ready": og.__version__}), flush=True)
    for line in sys.stdin:
        if line.strip() != "go":
            break
        turns = []
        pipe.start_chat()
        for q in questions:
            first = []

            def streamer(_text, first=first):
                first.append(first[0] if first else time.perf_counter())
                return og.StreamingStatus.RUNNING

            t0 = time.perf_counter()
            answer = str(pipe.generate(q, config, streamer))
            t1 = time.perf_counter()
            turns.append({"prefill_ms": ((first[0] if first else t1) - t0) * 1e3,
                          "total_ms": (t1 - t0) * 1e3, "answer": answer})
        pipe.finish_chat()
        print(json.dumps(turns), flush=True)


if __name__ == "__main__":
    import warnings

    warnings.simplefilter("ignore", DeprecationWarning)  # start_chat(): still its chat mode
    main()
