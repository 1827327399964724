"""The anchors of benchmarks/generation.py: the same LLaMA checkpoint run by other tools.

- ``make_checkpoint``: a Hugging Face ``LlamaForCausalLM`` the size of edgec's ``llama small``
  (random weights, safetensors) and a tiny word-level ``tokenizer.json`` made with ``tokenizers``.
- runners, each ``setup()`` once then ``generate(ids, new_tokens) -> timing``:
  ``OptimumOrt`` (optimum-onnx's exporter, task text-generation-with-past, then
  ``ORTModelForCausalLM`` on ONNX Runtime CPU driven by transformers' ``generate()``),
  ``OvGenai`` (optimum-intel's ``optimum-cli export openvino``, then OpenVINO GenAI's
  ``LLMPipeline`` on CPU, fed token ids), ``OrtGenai`` (ONNX Runtime GenAI's model builder and
  its own generation loop).
- a worker (``python _anchors_generation.py --worker``): a runner in another Python environment,
  driven over stdin/stdout one JSON line per request. optimum-onnx cannot be installed beside
  optimum-intel and transformers 5 (see ``OPTIMUM_ONNX_CONFLICT``), so it runs in its own
  environment, in a process the benchmark keeps for the whole run (its calls are interleaved with
  the others exactly like the in-process runners'; the benchmark process waits, idle, meanwhile).

Timing, the same for all: ``ttft_ms`` = wall time from the call until the first new token is
known (prefill + the first sampling step), ``total_ms`` = the whole call. Where the tool hands
new tokens to a streamer, the streamer's first call marks the first token.

Imports of the tools happen inside the runners: this module imports with numpy alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

# Hugging Face LlamaConfig fields matching edgec's ``llama small`` (edgec.models.llama.CONFIGS).
LLAMA_SMALL_HF = {"vocab_size": 4096, "hidden_size": 512, "num_hidden_layers": 4,
                  "num_attention_heads": 8, "num_key_value_heads": 2,
                  "intermediate_size": 1376, "rms_norm_eps": 1e-5, "hidden_act": "silu",
                  "tie_word_embeddings": False}
PAD, BOS, EOS, UNK = 0, 1, 2, 3
FIRST_WORD = 4  # prompts draw token ids from [FIRST_WORD, vocab)

OPTIMUM_ONNX_CONFLICT = (
    "optimum-onnx (ORTModelForCausalLM and the ONNX exporter; optimum 2.x itself has neither) "
    "cannot be installed beside optimum-intel or beside transformers 5: every release on PyPI "
    "pins optimum and transformers<4.58 (0.1.0: 'optimum~=2.1.0', 'transformers<4.58.0,>=4.36'; "
    "0.0.3: 'optimum~=2.0.0', 'transformers<4.56.0'), while optimum-intel 2.2.0 needs "
    "'optimum~=2.3.0' and 'transformers<5.6,>=4.51'. pip: \"ERROR: Cannot install "
    "optimum-intel==2.2.0 and optimum-onnx[onnxruntime]==0.1.0 because these package versions "
    "have conflicting dependencies. The conflict is caused by: optimum-onnx[onnxruntime] 0.1.0 "
    "depends on optimum~=2.1.0; optimum-intel 2.2.0 depends on optimum~=2.3.0\"")


def log(msg: str) -> None:
    print(f"[gen-anchors {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def dist_versions(names) -> dict:
    from importlib import metadata

    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


# ------------------------------------------------------------------------------ model --

def make_checkpoint(path: Path, max_positions: int = 8192, seed: int = 0,
                    q_scale: float = 1.0) -> Path:
    """A random-weight ``LlamaForCausalLM`` (safetensors) and a word-level tokenizer in ``path``.
    ``q_scale`` multiplies every q_proj weight (random weights attend almost uniformly; a larger
    query scale sharpens attention, for the sparse-attention benchmarks).

    lm_head's row for EOS is zeroed, so its logit is exactly 0 while the maximum of the 4095
    others (random, zero-mean) is positive: greedy decoding never emits EOS and every system
    generates the full ``new_tokens`` whatever its stopping rule (each run checks the count).
    """
    import tokenizers
    import torch
    import transformers

    path.mkdir(parents=True, exist_ok=True)
    cfg = transformers.LlamaConfig(**LLAMA_SMALL_HF, max_position_embeddings=max_positions,
                                   bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight[EOS].zero_()
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(q_scale)
    model.generation_config.pad_token_id = PAD
    model.save_pretrained(path, safe_serialization=True)

    vocab = {"<pad>": PAD, "<s>": BOS, "</s>": EOS, "<unk>": UNK}
    vocab.update({f"w{i}": i for i in range(FIRST_WORD, cfg.vocab_size)})
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.decoder = tokenizers.decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.add_special_tokens(["<pad>", "<s>", "</s>", "<unk>"])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>",
                                                eos_token="</s>", unk_token="<unk>",
                                                pad_token="<pad>")
    fast.save_pretrained(path)
    return path


def prompt_ids(length: int, vocab: int = 4096, seed: int = 0) -> np.ndarray:
    """[1, length] int64 token ids, no special tokens."""
    rng = np.random.default_rng(seed + length)
    return rng.integers(FIRST_WORD, vocab, size=(1, length), dtype=np.int64)


def timing(t0: float, t_first: float | None, t_end: float, new_tokens: int) -> dict:
    return {"ttft_ms": (t_first - t0) * 1e3 if t_first is not None else None,
            "total_ms": (t_end - t0) * 1e3, "new_tokens": int(new_tokens)}


# ------------------------------------------------------------------------------ runners --

class OptimumOrt:
    """optimum-onnx: ``main_export(task="text-generation-with-past")`` then
    ``ORTModelForCausalLM`` (ONNX Runtime CPU, its default session options) under
    ``generate()``; TTFT from a streamer (its first call after the prompt's)."""

    name = "optimum_ort"
    runtime = "ort-cpu"

    def __init__(self, ckpt: str, work: str) -> None:
        self.ckpt, self.out = Path(ckpt), Path(work) / "optimum-onnx"
        self.model = None

    def setup(self) -> dict:
        import torch
        from optimum.exporters.onnx import main_export
        from optimum.onnxruntime import ORTModelForCausalLM

        t0 = time.perf_counter()
        main_export(str(self.ckpt), output=str(self.out), task="text-generation-with-past",
                    device="cpu", no_post_process=False)
        export_s = time.perf_counter() - t0
        self.model = ORTModelForCausalLM.from_pretrained(self.out, provider="CPUExecutionProvider")
        self.torch = torch
        so = self.model.model.get_session_options()
        return {"export_s": round(export_s, 2),
                "files": sorted(p.name for p in self.out.iterdir() if p.suffix == ".onnx"),
                "session": {"intra_op_num_threads": so.intra_op_num_threads,
                            "inter_op_num_threads": so.inter_op_num_threads,
                            "torch_num_threads": torch.get_num_threads(),
                            "use_io_binding": bool(getattr(self.model, "use_io_binding", False))},
                "versions": dist_versions(["optimum-onnx", "optimum", "transformers",
                                           "onnxruntime", "torch"]),
                "python": sys.executable}

    def generate(self, ids: np.ndarray, new_tokens: int) -> dict:
        torch = self.torch
        marks: list[float] = []

        class Streamer:  # transformers' streamer protocol: put(prompt), put(token)..., end()
            def put(self, value):
                marks.append(time.perf_counter())

            def end(self):
                pass

        x = torch.from_numpy(ids)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(input_ids=x, attention_mask=torch.ones_like(x),
                                      max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                      do_sample=False, pad_token_id=PAD, streamer=Streamer())
        t1 = time.perf_counter()
        n = out.shape[1] - ids.shape[1]
        return timing(t0, marks[1] if len(marks) > 1 else None, t1, n) | {
            "tokens": out[0, ids.shape[1]:].tolist()}


class OvGenai:
    """optimum-intel's ``optimum-cli export openvino --task text-generation-with-past
    --weight-format {fp32|int8}`` (stateful model + converted tokenizer), then
    ``openvino_genai.LLMPipeline(dir, "CPU", **properties)`` fed ``TokenizedInputs``; TTFT
    from a ``StreamerBase`` (its first ``write``). int8 here is optimum-intel's weight-only
    compression (per-channel int8 weights, fp activations), not w8a8. ``f32=True`` pins
    ``INFERENCE_PRECISION_HINT`` and ``KV_CACHE_PRECISION`` to f32 (edgec's openvino-cpu
    precision); without it the CPU plugin's defaults apply (bf16 compute and a u8 KV cache on a
    CPU with avx512_bf16), and the export of the same weight format is reused."""

    runtime = "openvino-cpu"

    def __init__(self, ckpt: str, work: str, weight_format: str = "fp32",
                 f32: bool = False, sparse: str | None = None) -> None:
        self.ckpt, self.weight_format, self.f32 = Path(ckpt), weight_format, f32
        self.sparse = sparse  # OpenVINO GenAI's sparse prefill: "xattention" or "trishape"
        self.out = Path(work) / f"optimum-intel-{weight_format}"
        self.name = "ov_genai" if weight_format == "fp32" else f"ov_genai_{weight_format}_wo"
        self.name += "_f32" if f32 else ""
        self.name += f"_{sparse}" if sparse else ""
        self.properties = ({"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32"}
                           if f32 else {})

    def setup(self) -> dict:
        import openvino as ov
        import openvino_genai as ov_genai

        cli = Path(sys.executable).parent / "optimum-cli"
        cmd = [str(cli), "export", "openvino", "-m", str(self.ckpt), "--task",
               "text-generation-with-past", "--weight-format", self.weight_format, str(self.out)]
        t0 = time.perf_counter()
        export_s = None  # None: reused
        if not (self.out / "openvino_model.xml").is_file():
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False,
                                  env={**os.environ, "CI": "true"})
            export_s = round(time.perf_counter() - t0, 2)
            if proc.returncode:
                raise RuntimeError(f"{' '.join(cmd[1:4])} failed: {proc.stderr.strip()[-1500:]}")
        self.ov, self.ov_genai = ov, ov_genai
        extra = {}
        if self.sparse:  # its defaults: the mode's own thresholds, block sizes and windows
            sc = ov_genai.SchedulerConfig()
            sc.use_sparse_attention = True
            sc.sparse_attention_config.mode = getattr(ov_genai.SparseAttentionMode,
                                                      self.sparse.upper())
            extra["scheduler_config"] = sc
            self.sparse_config = sc.sparse_attention_config.to_string()
        self.pipe = ov_genai.LLMPipeline(str(self.out), "CPU", **self.properties, **extra)
        self.cfg = ov_genai.GenerationConfig()
        self.cfg.do_sample = False
        self.cfg.ignore_eos = True
        xml = self.out / "openvino_model.xml"
        model = ov.Core().read_model(xml)
        stateful = bool(model.get_sinks())
        defaults = {k: str(ov.Core().get_property("CPU", k))
                    for k in ("INFERENCE_PRECISION_HINT", "KV_CACHE_PRECISION")}
        return {"export_s": export_s, "command": " ".join(["optimum-cli", *cmd[1:]]),
                "stateful": stateful,
                "pipeline_properties": self.properties or f"none: CPU defaults {defaults}",
                "tokenizer_converted": (self.out / "openvino_tokenizer.xml").is_file(),
                **({"sparse_attention": self.sparse_config} if self.sparse else {}),
                "pipeline": "LLMPipeline(dir, 'CPU'), default properties (ATTENTION_BACKEND "
                            "default: PA = continuous batching + paged attention on CPU)",
                "versions": dist_versions(["optimum-intel", "optimum", "openvino",
                                           "openvino-genai", "openvino-tokenizers", "nncf",
                                           "transformers"])}

    def generate(self, ids: np.ndarray, new_tokens: int) -> dict:
        ov_genai = self.ov_genai
        marks: list[float] = []
        got: list[int] = []

        class Streamer(ov_genai.StreamerBase):
            def write(self, token):
                marks.append(time.perf_counter())
                got.extend(token if isinstance(token, list) else [token])
                return ov_genai.StreamingStatus.RUNNING

            def end(self):
                pass

        self.cfg.max_new_tokens = new_tokens
        self.cfg.min_new_tokens = new_tokens
        inp = ov_genai.TokenizedInputs(self.ov.Tensor(ids), self.ov.Tensor(np.ones_like(ids)))
        t0 = time.perf_counter()
        res = self.pipe.generate(inp, self.cfg, Streamer())
        t1 = time.perf_counter()
        tokens = list(res.tokens[0])
        pm = res.perf_metrics
        return timing(t0, marks[0] if marks else None, t1, len(tokens)) | {
            "tokens": tokens, "own_ttft_ms": float(pm.get_ttft().mean),
            "own_tpot_ms": float(pm.get_tpot().mean)}


class OrtGenai:
    """ONNX Runtime GenAI: ``python -m onnxruntime_genai.models.builder -p fp32 -e cpu``
    (GroupQueryAttention, past/present buffer sharing) and its loop
    (``append_tokens``, ``generate_next_token``); TTFT = until the first new token is read."""

    runtime = "ort-cpu"

    def __init__(self, ckpt: str, work: str, precision: str = "fp32") -> None:
        self.ckpt, self.precision = Path(ckpt), precision
        self.out = Path(work) / f"ort-genai-{precision}"
        self.name = "ort_genai" if precision == "fp32" else f"ort_genai_{precision}_wo"

    def setup(self) -> dict:
        import onnxruntime_genai as og

        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(self.ckpt),
               "-o", str(self.out), "-p", self.precision, "-e", "cpu",
               "-c", str(self.out.parent / "ort-genai-cache")]
        t0 = time.perf_counter()
        # cwd: the builder imports a top-level module named ``quantization``, which the
        # benchmarks folder (on sys.path when run from there) would shadow
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False,
                              cwd=self.out.parent)
        export_s = time.perf_counter() - t0
        if proc.returncode:
            raise RuntimeError(f"onnxruntime_genai builder failed: "
                               f"{(proc.stderr or proc.stdout).strip()[-1500:]}")
        self.og = og
        self.model = og.Model(str(self.out))
        genai_cfg = json.loads((self.out / "genai_config.json").read_text())
        return {"export_s": round(export_s, 2), "command": " ".join(["python", *cmd[1:11]]),
                "past_present_share_buffer":
                    genai_cfg.get("search", {}).get("past_present_share_buffer"),
                "versions": dist_versions(["onnxruntime-genai", "onnxruntime"])}

    def generate(self, ids: np.ndarray, new_tokens: int) -> dict:
        og = self.og
        total = ids.shape[1] + new_tokens
        t0 = time.perf_counter()
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=total, min_length=total, do_sample=False)
        gen = og.Generator(self.model, params)
        gen.append_tokens(ids)
        tokens: list[int] = []
        t_first = None
        while not gen.is_done() and len(tokens) < new_tokens:
            gen.generate_next_token()
            tokens.append(int(gen.get_next_tokens()[0]))
            if t_first is None:
                t_first = time.perf_counter()
        t1 = time.perf_counter()
        return timing(t0, t_first, t1, len(tokens)) | {"tokens": tokens}


RUNNERS = {"optimum_ort": OptimumOrt, "ov_genai": OvGenai, "ort_genai": OrtGenai}


def make_runner(kind: str, ckpt: str, work: str, **kw):
    return RUNNERS[kind](ckpt, work, **kw)


# ------------------------------------------------------------------------------ worker --

class WorkerRunner:
    """A runner living in another Python (``python``): same ``setup``/``generate`` interface."""

    def __init__(self, python: str, kind: str, ckpt: str, work: str, **kw) -> None:
        self.kind, self.python = kind, python
        self.name = RUNNERS[kind].name if hasattr(RUNNERS[kind], "name") else kind
        self.runtime = RUNNERS[kind].runtime
        env = {**os.environ, "CI": "true", "HF_HUB_OFFLINE": "1"}
        for var in ("VIRTUAL_ENV", "PYTHONPATH"):
            env.pop(var, None)
        self.proc = subprocess.Popen([python, "-u", __file__, "--worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)
        self._init = {"op": "init", "kind": kind, "ckpt": ckpt, "work": work, "kw": kw}

    def _call(self, req: dict) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.python} exited ({self.proc.wait()})")
        rep = json.loads(line)
        if "error" in rep:
            raise RuntimeError(rep["error"])
        return rep

    def setup(self) -> dict:
        self._call(self._init)
        return self._call({"op": "setup"})["result"]

    def generate(self, ids: np.ndarray, new_tokens: int) -> dict:
        return self._call({"op": "generate", "ids": ids.tolist(), "n": new_tokens})["result"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


def worker() -> int:
    """Serve one runner: JSON requests on stdin, one JSON reply line each on stdout (the
    tools' own prints go to stderr)."""
    reply = sys.stdout
    sys.stdout = sys.stderr
    runner = None
    for line in sys.stdin:
        req = json.loads(line)
        try:
            if req["op"] == "init":
                runner = make_runner(req["kind"], req["ckpt"], req["work"], **req["kw"])
                out = {"ok": True}
            elif req["op"] == "setup":
                out = {"result": runner.setup()}
            else:
                ids = np.asarray(req["ids"], dtype=np.int64)
                out = {"result": runner.generate(ids, int(req["n"]))}
        except Exception as e:  # noqa: BLE001 - reported to the benchmark, which records it
            out = {"error": f"{type(e).__name__}: {e}"}
        reply.write(json.dumps(out) + "\n")
        reply.flush()
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        os.environ["CI"] = "true"
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        raise SystemExit(worker())
    raise SystemExit("usage: python _anchors_generation.py --worker (started by generation.py)")
