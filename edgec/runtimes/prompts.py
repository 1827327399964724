"""Text prompts to a video DiT's ``encoder_hidden_states``, as its diffusers pipeline makes them,
with a compiled text encoder (a T5 / UMT5 encoder checkpoint compiled by edgec, its tokenizer
shipped inside) instead of PyTorch:

- CogVideoX (``CogVideoXPipeline._get_t5_prompt_embeds``): tokens padded to the text length,
  truncated, the encoder run *without* an attention mask (every position, pads too);
- Wan (``WanPipeline._get_t5_prompt_embeds``): the prompt cleaned (HTML entities, whitespace),
  tokens padded and masked, the embeddings cut at the prompt's length and zero-padded.

The text length is the denoiser's (its ``encoder_hidden_states`` dim 1): the pipelines'
``max_sequence_length``. Wan's pipeline also runs ``ftfy.fix_text`` when ftfy is installed;
edgec does not (it changes only mis-encoded text).
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from edgec.errors import UserError

__all__ = ["STYLES", "encode_prompts", "prompt_conditions"]

TEXT_INPUT = "encoder_hidden_states"
STYLES = {"CogVideoXTransformer3DModel": "cogvideox", "WanTransformer3DModel": "wan"}


def _style(denoiser) -> str:
    source = (getattr(denoiser, "manifest", None) or {}).get("source") or {}
    style = STYLES.get(source.get("class"))
    if style is None:
        raise UserError("prompts need a diffusers CogVideoX or Wan artifact (their pipelines "
                        "say how a prompt becomes encoder_hidden_states); give the conditions "
                        "as --inputs FILE.npz instead")
    return style


def _text_shape(denoiser) -> tuple[int, int]:
    spec = next((i for i in denoiser.inputs if i.name == TEXT_INPUT), None)
    dims = tuple(spec.shape[1:]) if spec is not None else ()
    if len(dims) != 2 or not all(isinstance(d, int) for d in dims):
        raise UserError(f"the denoiser's {TEXT_INPUT} has no fixed [length, width] "
                        f"({list(dims)}); compile it with --config text_len=N")
    return dims


def _clean(text: str) -> str:
    """Wan's ``prompt_clean`` without ftfy: HTML entities unescaped twice, whitespace runs to
    one space, stripped."""
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text)).strip()).strip()


def encode_prompts(denoiser, text_encoder, prompts: Sequence[str]) -> np.ndarray:
    """[len(prompts), text length, width] embeddings for ``denoiser`` (a CogVideoX or Wan
    session) from ``text_encoder`` (a session of an encoder artifact with a tokenizer)."""
    from edgec.runtimes.tokenizer import Tokenizer

    style = _style(denoiser)
    length, width = _text_shape(denoiser)
    names = {i.name for i in text_encoder.inputs}
    if not {"input_ids", "attention_mask"} <= names or "last_hidden_state" not in {
            o.name for o in text_encoder.outputs}:
        raise UserError("--text-encoder must be a compiled text encoder checkpoint (inputs "
                        "input_ids, attention_mask; output last_hidden_state), e.g. `edgec "
                        "compile ./pipeline/text_encoder --target ort-cpu -o enc`")
    try:
        tok = Tokenizer(text_encoder.root, text_encoder.manifest)
    except UserError as e:  # its advice (--prompt-ids) is generate's, which sample lacks
        if "has no tokenizer" not in str(e):
            raise
        raise UserError(f"{text_encoder.root}: the text encoder artifact has no tokenizer; "
                        "compile the pipeline's text_encoder/ folder with its tokenizer/ folder "
                        "beside it") from None
    texts = [_clean(p) if style == "wan" else p for p in prompts]
    ids, mask = tok.encode_padded(texts, length)
    feeds = {"input_ids": ids,
             "attention_mask": mask if style == "wan" else np.ones_like(mask)}
    hidden = np.asarray(text_encoder.run(feeds)["last_hidden_state"], np.float32)
    if hidden.shape[-1] != width:
        raise UserError(f"the text encoder gives {hidden.shape[-1]}-wide embeddings, the "
                        f"denoiser takes {width}: give the pipeline's own text encoder")
    if style == "wan":  # cut at the prompt's tokens, zeros after
        hidden = hidden * (mask[..., None] > 0)
    return hidden


def prompt_conditions(denoiser, text_encoder, prompt: str | Sequence[str],
                      negative_prompt: str | Sequence[str] | None, guided: bool = True
                      ) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(conditions, negative conditions) for ``sample``: the prompts' embeddings and the
    negative prompts' (the pipelines' default negative prompt is the empty one); without
    guidance (``guided`` False) no negatives, as the pipelines encode none then."""
    if text_encoder is None:
        raise UserError("a prompt needs a compiled text encoder: text_encoder=edgec.load(DIR) "
                        "(CLI: --text-encoder DIR)")
    prompts = _texts(prompt, "prompt")
    if not prompts:
        raise UserError("prompt must be a string or a list of strings")
    if not guided and negative_prompt is None:
        return {TEXT_INPUT: encode_prompts(denoiser, text_encoder, prompts)}, None
    negatives = _texts(negative_prompt if negative_prompt is not None else "",
                       "negative_prompt", len(prompts))
    if len(negatives) != len(prompts):
        raise UserError(f"{len(negatives)} negative prompts for {len(prompts)} prompts; give "
                        "one each, or one string for all")
    both = encode_prompts(denoiser, text_encoder, [*prompts, *negatives])
    return {TEXT_INPUT: both[:len(prompts)]}, {TEXT_INPUT: both[len(prompts):]}


def _texts(value, what: str, repeat: int = 1) -> list[str]:
    """``value`` (a string, repeated ``repeat`` times, or a sequence of strings) as a list."""
    if isinstance(value, str):
        return [value] * repeat
    try:
        texts = list(value)
    except TypeError:  # list(5)
        texts = None
    if texts is None or not all(isinstance(v, str) for v in texts):
        raise UserError(f"{what} must be a string or a list of strings")
    return texts
