"""A transformers LLaMA-family causal LM seen as the ``llama`` reference decoder.

The fixed-buffer decode graphs (dense and FreeKV, ``exporters/freekv_decoder.py``) are written
against the reference model's layout: ``embed_tokens``, ``layers[i].self_attn.{q,k,v,o}_proj``,
``input_layernorm``, ``post_attention_layernorm``, ``mlp``, ``norm``, ``lm_head``, rotate-half
RoPE from ``inv_freq``. LLaMA, Qwen2 (q/k/v biases ride in the Linear layers) and Mistral
checkpoints have exactly these modules; this view exposes them with the reference's ``cfg``
and RoPE frequencies, without copying a weight. Anything else (other attention layouts, RoPE
variants the view cannot express) is refused with what is missing.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from edgec.errors import UserError

__all__ = ["HFDecoderView", "view_hf_decoder"]

_LAYER_PARTS = ("self_attn", "input_layernorm", "post_attention_layernorm", "mlp")
_ATTN_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclasses.dataclass(frozen=True)
class _Config:
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int


class HFDecoderView(nn.Module):
    """The reference-decoder interface over a transformers ``*ForCausalLM`` (see module doc)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        base = getattr(model, "model", None)
        cfg = model.config
        missing = [n for n in ("embed_tokens", "layers", "norm", "rotary_emb")
                   if not hasattr(base, n)] + [n for n in ("lm_head",) if not hasattr(model, n)]
        if not missing:
            layer = base.layers[0]
            missing = [f"layers.0.{n}" for n in _LAYER_PARTS if not hasattr(layer, n)]
            missing += [f"self_attn.{n}" for n in _ATTN_PARTS
                        if not hasattr(getattr(layer, "self_attn", None), n)]
        rope = (getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None)
                or {})  # transformers 5 / 4 spelling
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if missing or rope_type not in ("default", "linear", "llama3"):
            what = f"no {', '.join(missing)}" if missing else f"RoPE type {rope_type!r}"
            raise UserError(f"{type(model).__name__} is not laid out as a LLaMA-family decoder "
                            f"({what}); FreeKV retrieval supports LLaMA, Qwen2 and Mistral "
                            "checkpoints and the `llama` reference model")
        heads = int(cfg.num_attention_heads)
        self.cfg = _Config(layers=int(cfg.num_hidden_layers), heads=heads,
                           kv_heads=int(getattr(cfg, "num_key_value_heads", None) or heads),
                           head_dim=int(getattr(cfg, "head_dim", None)
                                        or cfg.hidden_size // heads),
                           vocab=int(cfg.vocab_size))
        self.embed_tokens, self.layers, self.norm = base.embed_tokens, base.layers, base.norm
        self.lm_head = model.lm_head
        # the frequencies transformers itself uses (scaled per rope_type) and its cos/sin factor
        self.register_buffer("inv_freq", base.rotary_emb.inv_freq.detach().clone(),
                             persistent=False)
        self.rope_scale = float(getattr(base.rotary_emb, "attention_scaling", 1.0))

        object.__setattr__(self, "_causal_lm", model)  # not a submodule: no second weight names

    def forward_cached(self, input_ids, attention_mask, position_ids, past):
        """The checkpoint's own forward (transformers), as the reference's: (logits, [(key,
        value) per layer]); what the compile checks the FreeKV graph against."""
        from edgec.exporters.decoder import _HFDecoder

        out = _HFDecoder(self._causal_lm, self.cfg.layers)(
            input_ids, attention_mask, position_ids, tuple(t for kv in past for t in kv))
        return out[0], list(zip(out[1::2], out[2::2]))


def view_hf_decoder(path) -> HFDecoderView:
    """Load a checkpoint directory (offline, safetensors) as an ``HFDecoderView``."""
    from pathlib import Path

    from edgec.exporters.hf import load_hf_model

    model, _, _ = load_hf_model(Path(path))
    return HFDecoderView(model).eval()
