"""The anchor of the VLM benchmarks: a Hugging Face LLaVA checkpoint run by OpenVINO GenAI.

- ``make_llava_checkpoint`` (edgec's environment): a random-weight ``LlavaForConditionalGeneration``
  (CLIP vision tower, ``default`` feature selection at ``vision_feature_layer`` -2, a LLaMA
  language model the size of edgec's ``vlm small`` at ``size="small"``), its word-level tokenizer
  (``_anchors_generation``'s, with ``<image>`` at the config's ``image_token_id`` and BOS added
  by the tokenizer) and a ``LlavaProcessor`` (``CLIPImageProcessor``, 14-px patches,
  ``num_additional_image_tokens`` 1), the files optimum-intel exports from and OpenVINO GenAI's
  ``VLMPipeline`` reads. ``write_png``: a deterministic RGB test image of the model's side.
- a worker (``python _anchors_vlm.py worker``, in an environment with optimum-intel and
  openvino-genai): ``optimum-cli export openvino --task image-text-to-text --weight-format fp32``
  (no weight compression), then ``openvino_genai.VLMPipeline(dir, "CPU",
  INFERENCE_PRECISION_HINT="f32", KV_CACHE_PRECISION="f32", scheduler_config=...)``, serving
  timing requests, one JSON line each way on stdin/stdout.
- ``VlmAnchor`` (any environment): starts that worker with a given Python and drives it:
  ``setup()``, ``run(image_png, prompt, new_tokens, prune) -> dict``, ``close()``.

Pruning: OpenVINO GenAI's visual-token pruning (CDPruner) is set per request through
``GenerationConfig.pruning_ratio`` (an integer percentage of the image tokens to drop, 0 = off)
and ``GenerationConfig.relevance_weight`` (default 0.5); ``prune=True`` asks for
``PRUNE_PERCENT`` = 75 (keep 25%, edgec's ``keep=0.25``). In openvino-genai 2026.4 only the
Qwen2-VL / Qwen2.5-VL / Qwen3-VL inputs embedders run the pruner (``is_cdpruner_active`` /
``execute_pruning_pipeline`` are called from ``visual_language/qwen2vl/classes.cpp`` and
``qwen3_vl/classes.cpp`` only; the docs page "Visual Token Pruning (CDPruner)" says "The current
implementation supports Qwen-VL models only"): on LLaVA the knob is accepted and ignored (the
same prompt token count, the same text). The reply carries ``prompt_tokens`` (the pipeline's own
count of the language model's input tokens) so that a caller sees whether anything was pruned.

Prompt: ``PROMPT_FORMAT``: ``"<image>\\n"`` then space-separated words. The pipeline runs with
``apply_chat_template = False``, so it tokenizes that text itself, BOS first: its ``<image>``
expands to one ``<image>`` per image feature (256 at 224 px) plus a newline, which the
whitespace pre-tokenizer drops. ``prompt_ids`` gives edgec the same ids from the Hugging Face
tokenizer ([BOS, <image>, words...]); edgec's ``generate(image=...)`` expands the one
``<image>`` to the same placeholders, so both language models see 1 + 256 + words tokens.

Timing (the pipeline's own perf metrics, milliseconds): ``ttft_ms`` = ``get_ttft()`` (image
preprocessing and encoding, embedding merge, prefill, first token), ``tpot_ms`` =
``get_tpot()``, ``decode_tokens_per_s`` = ``get_throughput()``; ``wall_ms`` the whole call.
The pipeline's CPU default is continuous batching over a paged cache with a prefix cache; the
prefix cache is off here unless asked for (``prefix_caching``): a repeated prompt and image is
otherwise answered from the previous call's cache (TTFT ~25 ms instead of ~120 ms at ``small``).

This module imports with the standard library and numpy alone; the tools are imported where used.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from _sibling import load_sibling as _load  # benchmarks/ is on sys.path when run

AG = _load("_anchors_generation", "edgec_bench_anchors")  # PAD/BOS/EOS/UNK, dist_versions()

PAD, BOS, EOS, UNK = AG.PAD, AG.BOS, AG.EOS, AG.UNK
FIRST_WORD = AG.FIRST_WORD
IMAGE_TOKEN = "<image>"
PRUNE_PERCENT = 75  # OpenVINO GenAI's pruning_ratio for edgec's keep=0.25
PROMPT_FORMAT = "<image>\n{words}"
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
# a minimal chat template (the user turns' text, nothing added): the worker does not apply it,
# it is there for tools that insist on one
CHAT_TEMPLATE = ("{% for message in messages %}{% if message['content'] is string %}"
                 "{{ message['content'] }}{% else %}{% for part in message['content'] %}"
                 "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'text' %}"
                 "{{ part['text'] }}{% endif %}{% endfor %}{% endif %}{% endfor %}")

# image side / patch, CLIP vision tower, LLaMA text model (``small``: edgec's ``vlm small``)
SIZES = {
    "tiny": {"image": 112, "patch": 14,
             "vision": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                        "intermediate_size": 128},
             "text": {"vocab_size": 4096, "hidden_size": 128, "num_hidden_layers": 4,
                      "num_attention_heads": 4, "num_key_value_heads": 2,
                      "intermediate_size": 256}},
    "small": {"image": 224, "patch": 14,
              "vision": {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
                         "intermediate_size": 1024},
              "text": {"vocab_size": 4096, "hidden_size": 512, "num_hidden_layers": 8,
                       "num_attention_heads": 8, "num_key_value_heads": 2,
                       "intermediate_size": 1376}},
}


def image_tokens(size: str = "small") -> int:
    s = SIZES[size]
    return (s["image"] // s["patch"]) ** 2


# ------------------------------------------------------------------------------ model --

def _tokenizer(vocab_size: int, image_id: int):
    """``_anchors_generation.make_checkpoint``'s word-level tokenizer, with ``<image>`` (a
    special token, id ``image_id``) and BOS prepended by a template post-processor."""
    import tokenizers
    import transformers

    vocab = {"<pad>": PAD, "<s>": BOS, "</s>": EOS, "<unk>": UNK}
    vocab.update({f"w{i}": i for i in range(FIRST_WORD, vocab_size) if i != image_id})
    vocab[IMAGE_TOKEN] = image_id
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.decoder = tokenizers.decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.add_special_tokens(["<pad>", "<s>", "</s>", "<unk>", IMAGE_TOKEN])
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", BOS)])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", extra_special_tokens={"image_token": IMAGE_TOKEN})


def _init_weights(model, sharp: float, seed: int) -> None:
    """N(0, 1/fan_in) weights (transformers' own init is N(0, 0.02) whatever the width), zero
    biases, unit norms, N(0, 1) token embeddings, N(0, 0.5²) positions;
    the language model's q_proj × ``sharp`` (peaked attention); lm_head's rows of the special
    tokens and ``<image>`` zeroed, so greedy decoding emits words only (their logit is exactly
    0 while the largest of the thousands of random others is positive)."""
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, (nn.Linear, nn.Conv2d)):
                fan_in = math.prod(mod.weight.shape[1:])
                mod.weight.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=g)
                if mod.bias is not None:
                    mod.bias.zero_()
            elif isinstance(mod, nn.Embedding):
                std = 0.5 if "position" in name else 1.0
                mod.weight.normal_(0.0, std, generator=g)
            elif isinstance(mod, nn.LayerNorm):
                mod.weight.fill_(1.0)
                mod.bias.zero_()
            elif type(mod).__name__.endswith("RMSNorm"):
                mod.weight.fill_(1.0)
        for name, p in model.named_parameters():
            if name.endswith("class_embedding"):
                p.normal_(0.0, 1.0, generator=g)
            elif "q_proj" in name and "vision" not in name and name.endswith("weight"):
                p.mul_(sharp)
        head = model.lm_head.weight
        for row in (PAD, BOS, EOS, UNK, model.config.image_token_id):
            head[row].zero_()


def make_llava_checkpoint(path, size: str = "small", seed: int = 0, sharp: float = 4.0) -> Path:
    """A random-weight LLaVA checkpoint (safetensors) with its tokenizer and processor in
    ``path``; see the module docstring. ``size``: ``tiny`` (112-px image, 64 image tokens,
    4 layers of width 128) or ``small`` (224 px, 256 image tokens; CLIP 4 × 256 wide; LLaMA
    8 layers, width 512, 8 heads, 2 KV heads, ffn 1376)."""
    import torch
    import transformers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    s = SIZES[size]
    vocab = s["text"]["vocab_size"]
    image_id = vocab - 1  # edgec's vlm convention
    vision = transformers.CLIPVisionConfig(**s["vision"], image_size=s["image"],
                                           patch_size=s["patch"], hidden_act="quick_gelu",
                                           projection_dim=s["text"]["hidden_size"])
    text = transformers.LlamaConfig(**s["text"], max_position_embeddings=4096,
                                    rms_norm_eps=1e-5, hidden_act="silu",
                                    tie_word_embeddings=False, bos_token_id=BOS,
                                    eos_token_id=EOS, pad_token_id=PAD)
    cfg = transformers.LlavaConfig(vision_config=vision, text_config=text,
                                   image_token_index=image_id,
                                   image_seq_length=image_tokens(size),
                                   vision_feature_select_strategy="default",
                                   vision_feature_layer=-2, projector_hidden_act="gelu",
                                   tie_word_embeddings=False)
    cfg.pad_token_id = PAD
    torch.manual_seed(seed)
    model = transformers.LlavaForConditionalGeneration(cfg).eval()
    _init_weights(model, sharp, seed)
    model.generation_config.pad_token_id = PAD
    model.generation_config.bos_token_id = BOS
    model.generation_config.eos_token_id = EOS
    model.save_pretrained(path, safe_serialization=True)
    _portable_weight_names(path)

    tokenizer = _tokenizer(vocab, image_id)
    crop = {"height": s["image"], "width": s["image"]}
    image_processor = transformers.CLIPImageProcessor(
        size={"shortest_edge": s["image"]}, crop_size=crop, do_center_crop=True,
        do_resize=True, do_rescale=True, do_normalize=True, image_mean=CLIP_MEAN,
        image_std=CLIP_STD, do_convert_rgb=True)
    processor = transformers.LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=s["patch"],
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        image_token=IMAGE_TOKEN, chat_template=CHAT_TEMPLATE)
    processor.save_pretrained(path)
    image_processor.save_pretrained(path)  # preprocessor_config.json, which OpenVINO GenAI reads
    _portable_processor_files(path)
    return path


def _portable_weight_names(path: Path) -> None:
    """The original llava-hf key layout (``vision_tower.vision_model.*``) for the vision tower.
    transformers 5.24 (whose CLIPVisionModel has no ``vision_model`` level) saves
    ``vision_tower.encoder.*``, which transformers 5.5 (optimum-intel's) does not map: it
    reports those weights UNEXPECTED, initializes the tower afresh and the export silently
    holds another vision model. Both versions load the original layout."""
    from safetensors.numpy import load_file, save_file

    for f in sorted(path.glob("model*.safetensors")):
        state = load_file(f)
        renamed = {("vision_tower.vision_model." + k[len("vision_tower."):]
                    if k.startswith("vision_tower.")
                    and not k.startswith("vision_tower.vision_model.") else k): v
                   for k, v in state.items()}
        if renamed.keys() != state.keys():
            save_file(renamed, f, metadata={"format": "pt"})


def _portable_processor_files(path: Path) -> None:
    """transformers 5.x without torchvision saves the image processor as
    ``CLIPImageProcessorPil``; name it ``CLIPImageProcessor`` (the same settings), the class
    every transformers version (the worker's is older) resolves to its available backend."""
    for name in ("preprocessor_config.json", "processor_config.json"):
        f = path / name
        if not f.is_file():
            continue
        doc = json.loads(f.read_text())
        node = doc.get("image_processor", doc)
        if str(node.get("image_processor_type", "")).startswith("CLIPImageProcessor"):
            node["image_processor_type"] = "CLIPImageProcessor"
            f.write_text(json.dumps(doc, indent=2) + "\n")


def write_png(path, side: int = 224, seed: int = 0) -> Path:
    """A ``side``-px square RGB PNG: smooth colour gradients and a few blocks (an exact
    ``side`` square needs no resize or crop, so edgec's and the processor's preprocessing
    agree)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side] / max(side - 1, 1)
    img = np.stack([x, y, 0.5 + 0.5 * np.sin(6 * (x + y))], axis=-1)
    for _ in range(6):
        x0, y0 = rng.integers(0, side * 3 // 4, 2)
        w, h = rng.integers(side // 8, side // 3, 2)
        img[y0:y0 + h, x0:x0 + w] = rng.random(3)
    path = Path(path)
    Image.fromarray((img * 255).round().astype(np.uint8), "RGB").save(path)
    return path


def prompt_words(n: int, vocab: int = 4096, seed: int = 0) -> str:
    """``n`` random words ``w<id>`` (ids in [FIRST_WORD, vocab - 1): not ``<image>``)."""
    rng = np.random.default_rng(seed + n)
    return " ".join(f"w{i}" for i in rng.integers(FIRST_WORD, vocab - 1, size=n))


def make_prompt(n_words: int, vocab: int = 4096, seed: int = 0) -> str:
    """The prompt text both systems get (``PROMPT_FORMAT``)."""
    return PROMPT_FORMAT.format(words=prompt_words(n_words, vocab, seed))


def text_ids(text: str) -> list[int]:
    """Token ids of a generated text (the word-level vocabulary: ``w<id>`` words)."""
    return [int(w[1:]) for w in text.split() if w[:1] == "w" and w[1:].isdigit()]


def prompt_ids(ckpt, prompt: str) -> np.ndarray:
    """[1, S] ids of ``prompt`` from the checkpoint's Hugging Face tokenizer (BOS first, one
    ``<image>``): what edgec's ``generate(input_ids, image=...)`` takes."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(ckpt))
    return np.asarray([tok(prompt)["input_ids"]], dtype=np.int64)


# ------------------------------------------------------------------------------ worker side --

class OvGenaiVlm:
    """optimum-intel export (fp32 weights) and OpenVINO GenAI's ``VLMPipeline`` at f32."""

    def __init__(self, ckpt: str, work: str, relevance_weight: float | None = None,
                 backend: str = "PA", prefix_caching: bool = False) -> None:
        self.ckpt = Path(ckpt)
        self.out = Path(work) / "optimum-intel-vlm-fp32"
        self.relevance_weight = relevance_weight
        self.backend, self.prefix_caching = backend.upper(), prefix_caching
        if self.backend not in ("PA", "SDPA"):
            raise ValueError(f"backend must be PA or SDPA, not {backend!r}")
        self.properties = {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32"}

    def setup(self) -> dict:
        import openvino as ov
        import openvino_genai as ov_genai

        cli = Path(sys.executable).parent / "optimum-cli"
        cmd = [str(cli), "export", "openvino", "-m", str(self.ckpt), "--task",
               "image-text-to-text", "--weight-format", "fp32", str(self.out)]
        export_s = None  # None: reused
        if not (self.out / "openvino_language_model.xml").is_file():
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False,
                                  env={**os.environ, "CI": "true"})
            export_s = round(time.perf_counter() - t0, 2)
            if proc.returncode:
                raise RuntimeError(f"optimum-cli export failed: {proc.stderr.strip()[-2000:]}")
        preprocessor_written = self._preprocessor_config()
        self.ov, self.ov_genai = ov, ov_genai
        extra: dict = {}
        if self.backend == "PA":
            # the pipeline's own default on CPU (continuous batching, paged attention) with its
            # latency-oriented scheduler settings, but the prefix cache off unless asked for: it
            # would answer a repeated prompt and image from the previous call's cache
            sc = ov_genai.SchedulerConfig()
            sc.max_num_batched_tokens = 2**31 - 1
            sc.enable_prefix_caching = self.prefix_caching
            extra["scheduler_config"] = sc
        else:
            extra["ATTENTION_BACKEND"] = "SDPA"  # the stateful language model, no paging
        t0 = time.perf_counter()
        self.pipe = ov_genai.VLMPipeline(str(self.out), "CPU", **self.properties, **extra)
        load_s = round(time.perf_counter() - t0, 2)
        core = ov.Core()
        lm = core.read_model(self.out / "openvino_language_model.xml")
        weights = sorted({str(op.get_output_element_type(0)) for op in lm.get_ops()
                          if op.get_type_name() == "Constant"
                          and len(op.get_output_partial_shape(0)) == 2})
        return {"export_s": export_s, "load_s": load_s,
                "command": " ".join(["optimum-cli", *cmd[1:]]),
                "files": sorted(p.name for p in self.out.glob("*.xml")),
                "preprocessor_config_written": preprocessor_written,
                "language_model_stateful": bool(lm.get_sinks()),
                "language_model_2d_constant_types": weights,
                "pipeline": f"VLMPipeline(dir, 'CPU', {self.properties})",
                "attention_backend": self.backend,
                **({"scheduler_config": {"enable_prefix_caching": self.prefix_caching,
                                         "max_num_batched_tokens": 2**31 - 1}}
                   if self.backend == "PA" else {}),
                "pruning_api": "GenerationConfig.pruning_ratio (int %, 0 = off), "
                               "GenerationConfig.relevance_weight",
                "pruning_ratio_when_pruned": PRUNE_PERCENT,
                "relevance_weight": (self.relevance_weight if self.relevance_weight is not None
                                     else ov_genai.GenerationConfig().relevance_weight),
                "cpu_threads": core.get_property("CPU", "INFERENCE_NUM_THREADS"),
                "versions": AG.dist_versions(["openvino-genai", "openvino", "openvino-tokenizers",
                                              "optimum-intel", "optimum", "transformers",
                                              "torch"]),
                "python": sys.executable}

    def _preprocessor_config(self) -> str | None:
        """optimum-intel 2.2 under transformers 5 saves the image processor only inside
        ``processor_config.json`` (key ``image_processor``); ``VLMPipeline`` reads that file
        only when it holds both ``image_processor`` and ``video_processor``, else
        ``preprocessor_config.json``, and without either it silently takes its defaults (336-px
        crop), which the vision model's position embeddings then refuse. Write
        ``preprocessor_config.json`` (the checkpoint's, else the export's ``image_processor``)
        when the export lacks it; returns where it came from, None when nothing was written."""
        target = self.out / "preprocessor_config.json"
        if target.is_file():
            return None
        source = self.ckpt / "preprocessor_config.json"
        if source.is_file():
            target.write_text(source.read_text())
            return str(source)
        combined = self.out / "processor_config.json"
        if combined.is_file():
            doc = json.loads(combined.read_text())
            if "image_processor" in doc:
                target.write_text(json.dumps(doc["image_processor"], indent=2) + "\n")
                return f"{combined}: image_processor"
        return None

    def _image(self, png: str):
        from PIL import Image

        with Image.open(png) as im:
            rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
        return self.ov.Tensor(rgb[None])  # [1, H, W, 3] uint8, as the samples pass it

    def run(self, png: str, prompt: str, new_tokens: int, prune: bool) -> dict:
        ov_genai = self.ov_genai
        cfg = ov_genai.GenerationConfig()
        cfg.max_new_tokens = cfg.min_new_tokens = int(new_tokens)
        cfg.do_sample = False
        cfg.ignore_eos = True
        cfg.apply_chat_template = False
        cfg.pruning_ratio = PRUNE_PERCENT if prune else 0
        if self.relevance_weight is not None:
            cfg.relevance_weight = float(self.relevance_weight)
        image = self._image(png)
        t0 = time.perf_counter()
        res = self.pipe.generate(prompt, images=[image], generation_config=cfg)
        wall_ms = (time.perf_counter() - t0) * 1e3
        pm = res.perf_metrics
        out = {"ttft_ms": float(pm.get_ttft().mean), "tpot_ms": float(pm.get_tpot().mean),
               "decode_tokens_per_s": float(pm.get_throughput().mean),
               "wall_ms": wall_ms, "prompt_tokens": int(pm.get_num_input_tokens()),
               "new_tokens": int(pm.get_num_generated_tokens()),
               "pruning_ratio": int(cfg.pruning_ratio), "text": res.texts[0]}
        for key, getter in (("prepare_embeddings_ms", "get_prepare_embeddings_duration"),
                            ("generate_ms", "get_generate_duration")):
            if hasattr(pm, getter):
                out[key] = float(getattr(pm, getter)().mean)
        raw = getattr(pm, "vlm_raw_metrics", None)
        enc = getattr(raw, "vision_encoding_durations", None) if raw is not None else None
        if enc:
            out["vision_encoding_ms"] = float(sum(float(d) for d in enc)) / 1e3
        return out


def worker() -> int:
    """Serve one ``OvGenaiVlm``: JSON requests on stdin, one JSON reply line each on stdout
    (the tools' own prints go to stderr)."""
    reply = sys.stdout
    sys.stdout = sys.stderr
    runner = None
    for line in sys.stdin:
        req = json.loads(line)
        try:
            if req["op"] == "init":
                runner = OvGenaiVlm(req["ckpt"], req["work"], **req.get("kw", {}))
                out = {"ok": True}
            elif req["op"] == "setup":
                out = {"result": runner.setup()}
            elif req["op"] == "run":
                out = {"result": runner.run(req["image"], req["prompt"], int(req["n"]),
                                            bool(req["prune"]))}
            else:
                out = {"error": f"unknown op {req['op']!r}"}
        except Exception as e:  # noqa: BLE001 - reported to the driver, which raises it
            out = {"error": f"{type(e).__name__}: {e}"}
        reply.write(json.dumps(out) + "\n")
        reply.flush()
    return 0


# ------------------------------------------------------------------------------ driver --

class VlmAnchor:
    """OpenVINO GenAI's ``VLMPipeline`` on ``ckpt`` in a worker process run by ``python`` (an
    environment with openvino-genai and optimum-intel); the export goes under ``work``.
    ``backend``: ``PA`` (the pipeline's CPU default: continuous batching over a paged cache;
    its prefix cache stays off unless ``prefix_caching``) or ``SDPA`` (the stateful model).
    ``run`` sets the worker up on first use (or call ``setup()`` for its description)."""

    name = "ov_genai_vlm_f32"
    runtime = "openvino-cpu"

    def __init__(self, python: str, ckpt, work, relevance_weight: float | None = None,
                 backend: str = "PA", prefix_caching: bool = False) -> None:
        self.python = python
        env = {**os.environ, "CI": "true", "HF_HUB_OFFLINE": "1"}
        for var in ("VIRTUAL_ENV", "PYTHONPATH"):
            env.pop(var, None)
        self.proc = subprocess.Popen([python, "-u", str(Path(__file__).resolve()), "worker"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=env)
        kw = {"relevance_weight": relevance_weight, "backend": backend,
              "prefix_caching": prefix_caching}
        self._call({"op": "init", "ckpt": str(ckpt), "work": str(work), "kw": kw})
        self.info: dict | None = None

    _call = AG.WorkerRunner._call  # one JSON line each way, an error reply raised

    def setup(self) -> dict:
        if self.info is None:
            self.info = self._call({"op": "setup"})["result"]
        return self.info

    def run(self, image_png, prompt: str, new_tokens: int, prune: bool) -> dict:
        """One generation of ``new_tokens`` (greedy, EOS ignored) from ``prompt`` and the
        image; ``prune``: ``pruning_ratio`` = ``PRUNE_PERCENT``. Timings in the module
        docstring."""
        self.setup()
        return self._call({"op": "run", "image": str(image_png), "prompt": prompt,
                           "n": int(new_tokens), "prune": bool(prune)})["result"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> VlmAnchor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


if __name__ == "__main__":
    if sys.argv[1:] in (["worker"], ["--worker"]):
        os.environ["CI"] = "true"
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        raise SystemExit(worker())
    raise SystemExit("usage: python _anchors_vlm.py worker (started by VlmAnchor)")
