"""A local Hugging Face checkpoint directory as a compile source (transformers, offline).

Only ``config.json`` + ``*.safetensors`` checkpoints are accepted (pickled ``pytorch_model.bin``
is refused: never ``torch.load`` untrusted files), nothing is fetched from a hub. The model is
wrapped as ``forward(input_ids, attention_mask) -> logits | last_hidden_state``; parameter names in
the map are the checkpoint's own (``model.layers.0.self_attn.q_proj.weight``), as PEFT uses them.
The example attention mask pads the last quarter of the tokens, so masking paths are exercised.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgec.errors import UserError
from edgec.options import parse_options

__all__ = ["is_hf_checkpoint", "load_hf", "load_hf_model", "example_shape", "hf_source_info",
           "hf_wrapper", "without_kv_cache", "WRAPPED"]

WRAPPED = "hf."  # the wrapper's attribute prefix, stripped from parameter names


def is_hf_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


@dataclasses.dataclass(frozen=True)
class ExampleShape:
    """``--config batch=N,seq=N``: the example inputs a checkpoint is exported and checked on."""

    batch: int = 1
    seq: int = 16

    def __post_init__(self):
        if not (isinstance(self.batch, int) and isinstance(self.seq, int)
                and self.batch >= 1 and self.seq >= 1):
            raise UserError(f"batch and seq must be integers ≥ 1, got {self}")


def _options(config: str | None) -> dict[str, int]:
    try:
        return dataclasses.asdict(parse_options(ExampleShape, config, "example"))
    except UserError as e:
        raise UserError(f"Hugging Face sources take --config batch=N,seq=N; {e}") from None


def load_hf_model(path: Path) -> tuple[Any, Any, str | None]:
    """(transformers model in eval mode, its config, its architecture name), offline, from
    safetensors only."""
    try:
        import transformers
    except ImportError:
        raise UserError(f"{path}: a Hugging Face checkpoint needs transformers; "
                        "pip install 'edgec[hf]'") from None
    if not any(path.glob("*.safetensors")):
        pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = f" (found {', '.join(pickles)}: pickles are never loaded)" if pickles else ""
        raise UserError(f"{path}: no .safetensors weights{hint}; save the model with "
                        "save_pretrained(safe_serialization=True)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # transformers' "Loading weights" bar: a second stderr line on every error after it
    transformers.utils.logging.disable_progress_bar()
    import torch

    verbosity = transformers.utils.logging.get_verbosity()
    # its multi-line load report goes to stderr as a warning; what matters is refused below
    transformers.utils.logging.set_verbosity_error()
    try:
        cfg = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        arch = (cfg.architectures or [None])[0]
        cls = getattr(transformers, arch, None) if arch else None
        cls = cls or transformers.AutoModel
        # float32 whatever the checkpoint's dtype (bf16 LLMs): edgec exports and checks in fp32
        model, info = cls.from_pretrained(
            path, local_files_only=True, use_safetensors=True, dtype=torch.float32,
            ignore_mismatched_sizes=True, output_loading_info=True)
    except (OSError, ValueError, KeyError, RuntimeError, AssertionError) as e:
        # AssertionError: torch's own checks of the config (config.json's pad_token_id past the
        # vocabulary: "Padding_idx must be within num_embeddings") were an internal error
        raise UserError(f"{path}: transformers cannot load this checkpoint: "
                        f"{(str(e).splitlines() or [type(e).__name__])[0]}") from None
    except Exception as e:  # safetensors' SafetensorError (a truncated file) is none of those
        if type(e).__name__ != "SafetensorError":
            raise
        bad = _unreadable_safetensors(path)
        raise UserError(f"{bad or path}: is not a readable safetensors file "
                        f"({str(e).splitlines()[0]}); the file is truncated or damaged, save "
                        "the checkpoint again") from None
    finally:
        transformers.utils.logging.set_verbosity(verbosity)
    _check_loaded(path, arch or type(model).__name__, info)
    return model.eval(), cfg, arch


def _unreadable_safetensors(path: Path) -> Path | None:
    """The first .safetensors file under ``path`` whose header or data cannot be read."""
    from safetensors import safe_open

    for f in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(f, "pt") as st:
                for key in st.keys():
                    st.get_tensor(key)
        except Exception:  # noqa: BLE001 — whatever safetensors says, this file is the bad one
            return f
    return None


def _check_loaded(path: Path, arch: str, info: dict) -> None:
    """Refuse a checkpoint whose weights do not all load: transformers initializes a missing
    or wrongly shaped weight at random, which would compile to a model that is not the one saved
    (and differs on every run)."""
    mismatched = [m[0] if isinstance(m, (tuple, list)) else m
                  for m in info.get("mismatched_keys") or ()]
    missing = sorted(info.get("missing_keys") or ())
    for what, keys in (("have a different shape in config.json than in the weights", mismatched),
                       ("are missing from the safetensors", missing)):
        if keys:
            names = ", ".join(sorted(keys)[:3]) + (f" (+{len(keys) - 3} more)"
                                                   if len(keys) > 3 else "")
            raise UserError(f"{path}: {len(keys)} weights of {arch} {what}: {names}; give the "
                            "checkpoint its own config.json (architectures, sizes) as "
                            "save_pretrained wrote it")


def example_shape(config: str | None) -> dict[str, int]:
    """The ``--config batch=N,seq=N`` of a checkpoint source."""
    return _options(config)


def hf_source_info(path: Path, cfg, arch: str | None, opts: dict[str, int]) -> dict[str, Any]:
    return {"kind": "hf", "path": str(path), "architecture": arch,
            "model_type": getattr(cfg, "model_type", None), "example": opts,
            "vocab_size": int(cfg.vocab_size)}


def load_hf(path: Path, config: str | None = None) -> tuple[Any, tuple, dict, list, dict]:
    """(module, example inputs, dynamic shapes, output names, source info) for a checkpoint."""
    import torch

    model, cfg, arch = load_hf_model(path)
    _check_text_model(path, model, arch)
    opts = _options(config)
    limit = max_positions(cfg, model)
    if limit is not None and opts["seq"] > limit:
        raise UserError(f"{path}: seq={opts['seq']} is longer than the model's {limit} positions "
                        f"(max_position_embeddings); give --config seq=N with N ≤ {limit}")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (opts["batch"], opts["seq"]), generator=g)
    mask = torch.ones_like(ids)
    mask[:, opts["seq"] - opts["seq"] // 4:] = 0
    output = "logits" if hasattr(model, "lm_head") or "For" in (arch or "") else "last_hidden_state"
    outputs = [output] if hasattr(model, "lm_head") else _output_names(path, model, arch, ids,
                                                                          mask, output)
    wrapper = hf_wrapper(model, outputs)
    dims = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}
    info = hf_source_info(path, cfg, arch, opts)
    if limit is not None:
        info["max_positions"] = limit
    return wrapper, (ids, mask), dims, outputs, info


def _output_names(path: Path, model, arch: str | None, ids, mask, output: str) -> list[str]:
    """``[output]`` when the model returns it, else every tensor field it returns (a head
    without ``logits``: BertForQuestionAnswering's start_logits and end_logits,
    BertForPreTraining's prediction_logits and seq_relationship_logits)."""
    import torch

    from edgec.exporters.outputs import output_keys

    kwargs = {"use_cache": False} if getattr(model.config, "use_cache", None) else {}
    with torch.no_grad():
        keys = output_keys(model(input_ids=ids, attention_mask=mask, return_dict=True, **kwargs))
    if keys and output in keys:
        return [output]
    if keys:
        return keys
    raise UserError(f"{path}: {arch or type(model).__name__} returns no tensors named like a "
                    f"model output ({output}); load it in Python and give "
                    "edgec.compile(module, example_inputs=...) instead")


def max_positions(cfg, model=None) -> int | None:
    """The longest sequence the checkpoint declares (GPT-2's n_positions is also its
    max_position_embeddings); past it PyTorch raises (a position table) or runs untrained
    positions. Recorded as the seq dim's most (dim_ranges) and checked on every run. A table
    whose positions start past its padding row (RoBERTa's family: padding_idx + 1 on) holds
    that many fewer (a RoBERTa with 66 positions takes 64 tokens; 65 was a raw Gather error)."""
    for key in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value - _position_offset(model)
    return None


def _position_offset(model) -> int:
    """How many rows of the position table come before the first position: padding_idx + 1
    where the position embedding has a padding row (RoBERTa, XLM-R, CamemBERT, MPNet, ...)."""
    import torch

    for module in model.modules() if model is not None else ():
        table = getattr(module, "position_embeddings", None)
        if isinstance(table, torch.nn.Embedding) and table.padding_idx is not None:
            return int(table.padding_idx) + 1
    return 0


def _check_text_model(path: Path, model, arch: str | None) -> None:
    """Refuse what ``hf_wrapper`` cannot wrap: models whose forward takes no ``input_ids`` and
    ``attention_mask`` (vision, audio) or that also need decoder inputs (encoder-decoders)."""
    import inspect

    args = inspect.signature(model.forward).parameters
    if type(model).__name__.endswith("ForMultipleChoice"):
        raise UserError(f"{path}: {arch or type(model).__name__} takes input_ids [batch, "
                        "choices, seq], not the [batch, seq] edgec gives a checkpoint directory; "
                        "load it in Python and give edgec.compile(module, example_inputs=...) "
                        "instead")
    if ({"input_ids", "attention_mask"} <= set(args) and "decoder_input_ids" not in args
            and isinstance(getattr(model.config, "vocab_size", None), int)):
        return
    towers = [k for k, v in vars(model.config).items()
              if k.endswith("_config") and hasattr(v, "to_dict")]
    if "decoder_input_ids" in args:
        what = "an encoder-decoder"
    elif not {"input_ids", "attention_mask"} <= set(args):
        what = f"a model taking {', '.join(list(args)[:2])}"
    elif towers:  # CLIP, SigLIP, ...: input_ids and attention_mask for one of the towers
        what = f"a model of several towers ({', '.join(towers)}), not one text model"
    else:
        what = "a text model without a vocab_size in its config.json"
    raise UserError(f"{path}: {arch or type(model).__name__} is {what}; edgec compiles Hugging "
                    "Face directories of text models taking input_ids/attention_mask only: load "
                    "it in Python and give edgec.compile(module, example_inputs=...) instead")


def hf_wrapper(model, output: str | list[str]):
    """``forward(input_ids, attention_mask) -> <output>`` around a transformers model (a tuple
    of those fields for several names)."""
    import torch

    class HFWrapper(torch.nn.Module):
        # a checkpoint's batch and seq are exported dynamic: the user declared neither
        fixed_dim_remedy = (f"{type(model).__name__} does not export with a dynamic batch and "
                            "sequence length, as edgec exports checkpoint directories; load it "
                            "in Python and give edgec.compile(model, example_inputs=..., "
                            "dynamic_shapes=...) with that dim left out")

        def __init__(self):
            super().__init__()
            self.hf = model  # parameter names: "hf." + the checkpoint's own

        def forward(self, input_ids, attention_mask):
            kwargs = {"use_cache": False} if getattr(model.config, "use_cache", None) else {}
            out = self.hf(input_ids=input_ids, attention_mask=attention_mask, return_dict=True,
                          **kwargs)
            if isinstance(output, str):
                return getattr(out, output)
            fields = tuple(getattr(out, name) for name in output)
            return fields[0] if len(fields) == 1 else fields

    return HFWrapper()


@contextlib.contextmanager
def without_kv_cache(module) -> Iterator[None]:
    """``use_cache`` off in every transformers config inside ``module`` (a ``PeftModel``'s base
    model too) while the block runs, restored after: a one-graph export has no cache inputs, and
    transformers' ``DynamicCache`` output is no tensor (the export failed on it, "forward
    returned DynamicCache"), as ``hf_wrapper`` passes ``use_cache=False`` for checkpoints."""
    configs = {id(c): c for m in module.modules()
               if getattr(c := getattr(m, "config", None), "use_cache", None) is True}
    for c in configs.values():
        c.use_cache = False
    try:
        yield
    finally:
        for c in configs.values():
            c.use_cache = True
