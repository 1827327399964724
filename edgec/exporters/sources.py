"""Resolve a compile source (registry name, nn.Module, .onnx file, HF checkpoint directory) to
IR + feeds + reference.

For torch sources the model is exported here and checked against PyTorch on the example inputs
(fp32 tolerance ``EXPORT_RTOL``, DESIGN.md numerics policy); a mismatch is a VerificationError
naming the output. ONNX files have no PyTorch reference: the unmodified file run in ORT is the
reference instead.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgec.errors import InternalError, UserError
from edgec.exporters.param_map import strip_prefix

_log = logging.getLogger(__name__)

__all__ = ["Source", "resolve_source", "EXPORT_RTOL", "random_feeds", "names_reference_model"]

EXPORT_RTOL = 1e-5


@dataclasses.dataclass
class Source:
    kind: str  # "registry" | "module" | "onnx" | "hf"
    info: dict[str, Any]
    model: Any  # onnx_ir.Model
    parameter_map: dict[str, dict[str, str]]
    feeds: dict[str, np.ndarray]
    reference: dict[str, np.ndarray]  # outputs of the source itself on ``feeds``
    reference_kind: str  # "pytorch" | "onnxruntime"
    export_fidelity: dict[str, Any] | None
    export_seconds: float
    # a static-cache decoder's PyTorch wrapper (``decoder._Decoder``): calibration fills its
    # samples' KV buffers with the model's own keys/values (``calibration.samples``)
    decoder_module: Any = dataclasses.field(default=None, repr=False, compare=False)
    # an .onnx file's example made by edgec with dynamic dims held at 1: what a run failing on
    # it appends (``_made_example_note``); empty for given or sized examples
    example_note: str = dataclasses.field(default="", repr=False, compare=False)
    # a denoiser graph's recorded sampling trajectories and the fp32 session that ran them
    # (``calibration.trajectory.graph_trajectory_inputs``): calibration's and the floor's
    trajectories: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)


def resolve_source(source: Any, config: str | None = None,
                   example_inputs: Sequence[Any] | Mapping[str, Any] | None = None,
                   dynamic_shapes: Mapping[str, Mapping[int, str]] | None = None,
                   generate: bool = False, opset: int | None = None) -> Source:
    import torch

    reference = names_reference_model(source)
    if example_inputs is not None and isinstance(source, (str, os.PathLike)) and (
            generate or reference
            or not (str(source).endswith(".onnx") or Path(source).is_file())):
        raise UserError("example_inputs applies to an nn.Module or an .onnx file; a model "
                        "name or a checkpoint directory makes its own (--config batch=N,seq=N "
                        "sets a checkpoint's)")
    if generate:
        return _decoder_source(source, config, dynamic_shapes,
                               None if generate is True else generate, opset)
    if isinstance(source, torch.nn.Module):
        if example_inputs is None:
            raise UserError("compiling an nn.Module needs example_inputs=(tensor, ...)")
        if config:
            raise UserError("config applies to reference models and checkpoint directories, "
                            "not to an nn.Module: build the module as you want it compiled")
        half = {str(p.dtype) for p in source.parameters()} & {"torch.bfloat16", "torch.float16"}
        if half:
            raise UserError(f"the module's weights are {half.pop()}; edgec exports and verifies "
                            "in float32: pass module.float() (quantize= makes it smaller)")
        module, bound = _bound(_unwrapped(source), example_inputs)
        inputs = tuple(_tensor(i, x) for i, x in enumerate(bound))
        info = {"kind": "module", "class": type(source).__qualname__}
        from edgec.exporters.torch_export import ModuleState

        modes = [(m, m.training) for m in source.modules()]
        state = ModuleState(source)
        try:  # exported and checked in eval mode; the user's module is left as it was given
            from edgec.exporters.hf import without_kv_cache

            with without_kv_cache(source):
                src = _from_torch(module, inputs, dynamic_shapes, None, info, "module")
            if isinstance(module, _KeywordCall):
                src.parameter_map = strip_prefix(src.parameter_map, _KeywordCall.PREFIX)
            return src
        finally:
            for m, training in modes:
                m.training = training
            state.restore()  # its buffers too (a forward changing them is refused)
    if not isinstance(source, (str, os.PathLike)):
        raise UserError(f"source must be a model name, an .onnx path or an nn.Module, "
                        f"not {type(source).__name__}")
    path = Path(source)
    if str(source).endswith(".onnx") or path.suffix == ".onnx" or path.is_file():
        if config:
            raise UserError("--config applies to reference models, not to an .onnx file")
        return _from_onnx(path, example_inputs)
    if path.is_dir() and not reference:
        from edgec.exporters.diffusers_source import diffusers_source, is_diffusers_model
        from edgec.exporters.hf import WRAPPED, is_hf_checkpoint, load_hf

        if is_diffusers_model(path):
            return diffusers_source(path, config, dynamic_shapes)
        if not is_hf_checkpoint(path):
            raise UserError(f"{path}: is a directory without config.json; give an .onnx file, "
                            "a Hugging Face checkpoint directory or a model name (`edgec models`)")
        module, inputs, dims, outputs, info = load_hf(path, config)
        src = _from_torch(module, inputs, dims if dynamic_shapes is None else dynamic_shapes,
                          outputs, info, "hf")
        src.parameter_map = strip_prefix(src.parameter_map, WRAPPED)
        return src
    if os.sep in str(source) or "." in path.name:
        raise UserError(f"{source}: no such file; give an .onnx path or a model name "
                        "(`edgec models`)")
    from edgec.models import registry

    spec = registry.get(str(source))
    config = config or "tiny"
    _no_user_dims(spec.name, dynamic_shapes)
    module = spec.build(config)
    inputs = spec.example_inputs(config)
    info = _registry_info(spec, config)
    shapes = dynamic_shapes if dynamic_shapes is not None else spec.dynamic_shapes(config)
    return _from_torch(module, inputs, shapes, spec.output_names, info, "registry")


def registry_info(source: Any, config: str | None) -> dict[str, Any] | None:
    """The info ``resolve_source`` records for a reference model, without building or
    exporting it (options checked against the model before the export); None for a source
    that is not a registry name."""
    if not isinstance(source, str) or os.sep in source or "." in source or Path(source).exists():
        return None
    from edgec.models import registry

    if source not in registry.names():
        return None
    return _registry_info(registry.get(source), config or "tiny")


def _registry_info(spec, config: str) -> dict[str, Any]:
    info = {"kind": "registry", "name": spec.name, "config": config,
            "hyperparameters": spec.hyperparameters(config)}
    if spec.sampling:  # how Session.sample runs it, carried into the manifest
        info["sampling"] = dict(spec.sampling)
    return info


def names_reference_model(source: Any) -> bool:
    """Whether ``source`` is a reference model's name (`edgec models`) rather than a local path.

    A bare name (no path separator) that is also a local path which is no model source (an
    artifact compiled with ``-o video-dit``) hid the reference model ("is a directory without
    config.json"); one that is a model source (a file, a checkpoint) makes the name ambiguous,
    refused with how to pick. A ``Path`` is always a path."""
    if not isinstance(source, str) or "/" in source or os.sep in source:
        return False
    from edgec.models import registry

    if source not in registry.names():
        return False
    path = Path(source)
    if path.is_file() or any((path / f).is_file() for f in ("config.json", "model_index.json")):
        what = "file" if path.is_file() else "model directory"
        raise UserError(f"{source}: names both a reference model and the {what} ./{source} "
                        f"here; give ./{source} for the {what}, or run from another directory "
                        "for the reference model")
    return True


def _no_user_dims(name: str, dynamic_shapes) -> None:
    """Refuse a user's dynamic dims for a reference model: they replaced the model's own, so an
    input the user did not name became static and the export blamed the model for it. ``{}``
    (every dim static, what the static-shape targets export) stays allowed."""
    if dynamic_shapes:
        raise UserError(f"dynamic_shapes applies to an nn.Module or a checkpoint directory; the "
                        f"reference model {name!r} declares its own dynamic dims: leave "
                        "dynamic_shapes out (or give {} to export every dim static)")


def _tensor(i: int, x):
    import torch

    if x is None:
        raise UserError(f"example_inputs[{i}] is None; edgec exports tensor inputs: give a "
                        "tensor for every forward argument up to the last one given")
    try:
        return torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"example_inputs[{i}] ({type(x).__name__}) is not a tensor: "
                        f"{str(e).splitlines()[0]}") from None


def _bound(module, x) -> tuple[Any, tuple]:
    """The module to export and ``example_inputs`` as its forward's positional arguments: a
    dict is bound by name, a keyword-only argument of forward too, and an argument after one
    left out that has a default (the module then wrapped by ``_keyword_call`` in one whose
    forward takes it positionally, under its own name)."""
    if isinstance(x, Mapping):
        import inspect

        from edgec.exporters.torch_export import forward_input_names

        names = forward_input_names(module, 0, every=True)
        params = inspect.signature(module.forward).parameters.values()
        keywords = [p.name for p in params if p.kind == p.KEYWORD_ONLY]
        unknown = [k for k in x if k not in names and k not in keywords]
        if unknown:
            raise UserError(f"example_inputs names {unknown[0]!r}, which is not a forward "
                            f"argument of {type(module).__name__} (arguments: "
                            f"{', '.join(names + keywords)})")
        given = [k for k in x if k in names]
        used = names[:max(names.index(k) for k in given) + 1] if given else []
        gap = [n for n in used if n not in x]
        defaults = {p.name: p.default is not p.empty for p in params}
        needed = [n for n in gap if not defaults.get(n)]
        if needed:
            raise UserError(f"example_inputs gives no {needed[0]!r}, which forward takes "
                            f"before {used[-1]!r} and has no default for; give it too")
        required = [p.name for p in params
                    if p.kind == p.KEYWORD_ONLY and p.default is p.empty and p.name not in x]
        kw = [k for k in keywords if k in x]
        if required:
            raise UserError(f"example_inputs gives no {required[0]!r}, a keyword-only argument "
                            f"{type(module).__name__}.forward requires; give it too")
        if gap:  # a defaulted argument left out: the ones after it go by name
            kw = [n for n in used[used.index(gap[0]):] if n in x] + kw
            used = used[:used.index(gap[0])]
        if kw:
            return _keyword_call(module, used, kw), tuple(x[n] for n in used + kw)
        return module, tuple(x[n] for n in used)
    return module, (tuple(x) if isinstance(x, (tuple, list)) else (x,))


def _keyword_call(module, positional: list[str], keywords: list[str]):
    """``module`` behind a forward that takes ``keywords`` (keyword-only arguments, or ones
    after a defaulted argument left out) positionally after ``positional``, passing them by
    name, each under its own name (the ONNX inputs' and dynamic_shapes' names)."""
    import torch

    params = ", ".join(positional + keywords)  # forward's own argument names: identifiers
    call = ", ".join(positional + [f"{k}={k}" for k in keywords])
    space: dict[str, Any] = {}
    exec(f"def forward(self, {params}):\n    return self.keyword_call({call})\n", space)
    cls = type(type(module).__name__, (torch.nn.Module, _KeywordCall),
               {"forward": space["forward"], "__module__": type(module).__module__})
    wrapper = cls()
    wrapper.keyword_call = module
    return wrapper


class _KeywordCall:
    """Marks ``_keyword_call``'s wrappers; their parameter names start with ``PREFIX``."""

    PREFIX = "keyword_call."


def _decoder_source(source: Any, config: str | None, dynamic_shapes, static=None,
                    opset: int | None = None) -> Source:
    """The KV-cache decoder of ``llama`` or a Hugging Face causal LM, exported and verified.

    ``static`` (a ``decoder.StaticCache``): export it with fixed shapes (batch 1, a buffer of
    ``context - tokens`` slots) and make its ``present.*`` outputs the new tokens' keys/values
    only, as an NPU runs it."""
    import torch

    from edgec.exporters import decoder as dec

    if isinstance(source, torch.nn.Module) or not isinstance(source, (str, os.PathLike)):
        raise UserError("--generate exports the KV-cache decoder itself: give `llama`, a "
                        "Hugging Face *ForCausalLM checkpoint directory or a decoder .onnx")
    from edgec.exporters import vlm_source

    if isinstance(static, (vlm_source.VisionGraph, vlm_source.VlmPrefillGraph)):
        return vlm_source.vlm_graph_source(source, config, static, opset)
    prefill = static if isinstance(static, dec.PrefillGraph) else None
    scored = static if isinstance(static, vlm_source.VlmDecoderGraph) else None
    static = None if prefill is not None or scored is not None else static
    path = Path(source)
    if path.is_file() or path.suffix == ".onnx":
        if prefill is not None:
            raise UserError("--sparse-attention on a generation artifact exports a prefill "
                            "graph from the PyTorch model (`llama` or a Hugging Face "
                            "checkpoint directory), not from a decoder .onnx")
        if static is not None:
            raise UserError("a static-shape generation target exports the decoder itself: give "
                            "`llama` or a Hugging Face *ForCausalLM checkpoint directory")
        return _onnx_decoder_source(path)
    vision = None
    if vlm_source.is_vlm_source(source):  # the language model's decoder; its vision graphs
        if prefill is not None:  # are exported beside it
            raise UserError("a VLM's generation artifact has its own prefill graph; drop "
                            "--sparse-attention")
        vlm, src_info, kind = vlm_source.load_vlm(source, config)
        module, info = dec.reference_decoder(vlm.language, str(source))
        info = dataclasses.replace(info, **_vlm_token_ids(path))
        if scored is not None and scored.scored:
            from edgec.exporters.vision_prune import ScoredDecoder

            module = ScoredDecoder(vlm.language, scored.pruning.layer - 1)
        vision = src_info["vision"]
        batch, seq = 2, vlm.image_tokens + 8
    elif path.is_dir() and not names_reference_model(source):
        from edgec.exporters.hf import (
            example_shape,
            hf_source_info,
            is_hf_checkpoint,
            load_hf_model,
        )

        if not is_hf_checkpoint(path):
            raise UserError(f"{path}: is a directory without config.json; --generate takes a "
                            "Hugging Face *ForCausalLM checkpoint directory or `llama`")
        model, cfg, arch = load_hf_model(path)
        opts = example_shape(config)
        module, info = dec.hf_decoder(model, path)
        batch, seq, kind = opts["batch"], opts["seq"], "hf"
        src_info = hf_source_info(path, cfg, arch, opts)
    else:
        from edgec.models import registry

        spec = registry.get(str(source))
        config = config or "tiny"
        _no_user_dims(spec.name, dynamic_shapes)
        module, info = dec.reference_decoder(spec.build(config), spec.name)
        batch, seq = spec.example_inputs(config)[0].shape[:2]
        kind = "registry"
        src_info = {"kind": "registry", "name": spec.name, "config": config,
                    "hyperparameters": spec.hyperparameters(config)}
    if static is not None:
        if info.max_positions and static.context > info.max_positions:
            raise UserError(f"--context {static.context} is longer than the model's "
                            f"{info.max_positions} positions (max_position_embeddings); give "
                            f"--context ≤ {info.max_positions}")
        info = dataclasses.replace(info, context=static.context)
        batch, shapes = 1, {}
    else:
        shapes = dynamic_shapes if dynamic_shapes is not None else dec.decoder_dynamic_shapes(info)
    inputs = dec.example_inputs(info, int(batch), int(seq), static=static,
                                module=None if vision is not None else module)
    gen = info.to_json()
    if vision is not None:
        gen["vision"] = vision
    if static is not None:
        gen.update(cache="static", tokens=static.tokens)
    outputs = dec.output_names(info)
    if scored is not None and scored.scored:
        from edgec.exporters.vision_prune import SCORES_OUTPUT

        outputs.insert(1, SCORES_OUTPUT)
        gen["attention_scores"] = SCORES_OUTPUT
    src = _from_torch(module, inputs, shapes, outputs, {**src_info, "generation": gen}, kind,
                      input_names=dec.input_names(info), opset=opset)
    if static is not None:
        dec.new_slots_only(src.model, info)
        for name in info.present_names:
            src.reference[name] = src.reference[name][:, :, -static.tokens:]
        if scored is None or not scored.scored:  # a VLM's language model takes text ids too
            src.decoder_module = module
    if prefill is not None:
        _prefill_only(src, module, info, int(batch), prefill.tokens)
    src.parameter_map = strip_prefix(src.parameter_map, "model.")
    return src


def _vlm_token_ids(path: Path) -> dict[str, Any]:
    """A LLaVA checkpoint's eos/bos/pad ids, context and generation settings (its
    generation_config.json, else config.json or its text_config), for the decoder's
    ``DecoderInfo``; none for the reference model."""
    from edgec.exporters.decoder import _first, _ids, checkpoint_meta, file_generation_settings

    meta = checkpoint_meta(path) if path.is_dir() else {}
    return {"generation_config": file_generation_settings(path) if path.is_dir() else None,
            "eos_token_ids": _ids(meta.get("eos_token_id")),
            "bos_token_id": _first(meta.get("bos_token_id")),
            "pad_token_id": _first(meta.get("pad_token_id")),
            "max_positions": meta.get("max_position_embeddings")}


def _prefill_only(src: Source, module, info, batch: int, tokens: int) -> None:
    """The exported decoder made the prefill graph (``decoder.prefill_only``), its feeds and
    PyTorch reference replaced by a prompt of ``tokens`` tokens, and checked again."""
    from edgec.exporters import decoder as dec
    from edgec.exporters.verify import assert_close, compare_outputs
    from edgec.runtimes.ort import run_model

    src.feeds, src.reference = dec.prefill_example(module, info, batch, tokens)
    dec.prefill_only(src.model, info)
    errors = compare_outputs(run_model(src.model, src.feeds), src.reference)
    assert_close(errors, EXPORT_RTOL, "prefill graph (ORT) vs PyTorch")
    src.info["input_names"] = list(src.feeds)


def _onnx_decoder_source(path: Path) -> Source:
    """A decoder .onnx with Hugging Face names (edgec's or optimum's export); the file itself,
    run in ONNX Runtime, is the reference."""
    from edgec.exporters import decoder as dec
    from edgec.exporters.export_file import stored_parameter_map
    from edgec.onnx_io import load_onnx
    from edgec.runtimes.ort import run_model

    model = load_onnx(path)
    info = dec.onnx_decoder_info(model, path)
    ids, mask, positions, past = dec.example_inputs(info, 1, 8)
    feeds = {n: t.numpy() for n, t in zip(dec.input_names(info), _flat((ids, mask, positions,
                                                                          past)))}
    try:
        reference = run_model(model, feeds)
    except Exception as e:
        raise UserError(f"{path}: ONNX Runtime cannot run it as a decoder: "
                        f"{str(e).splitlines()[0]}") from e
    src_info = {"kind": "onnx", "path": str(path), "input_names": list(feeds),
                "output_names": [v.name for v in model.graph.outputs],
                "generation": info.to_json()}
    return Source("onnx", src_info, model, stored_parameter_map(model), feeds, reference,
                  "onnxruntime", None, 0.0)


def _flat(inputs) -> list:
    out = []
    for x in inputs:
        out += _flat(x) if isinstance(x, (tuple, list)) else [x]
    return out


def _unwrapped(module):
    """A PEFT model's base model, its adapter layers injected in place (what it runs): a
    ``PeftModel``'s own ``forward(*args, **kwargs)`` names no inputs to export."""
    if type(module).__module__.startswith("peft.") and hasattr(module, "get_base_model"):
        return module.get_base_model()
    return module


def _from_torch(module, inputs, dynamic_shapes, output_names, info, kind,
                input_names=None, opset=None) -> Source:
    import torch

    from edgec.exporters.dim_ranges import (
        DIM_RANGES_KEY,
        merge_ranges,
        table_ranges,
        verified_ranges,
    )
    from edgec.exporters.outputs import flatten_outputs
    from edgec.exporters.torch_export import export_module
    from edgec.exporters.verify import compare_outputs
    from edgec.fp32_noise import assert_exact
    from edgec.runtimes.ort import model_feeds, open_model

    t0 = time.perf_counter()
    try:
        result = export_module(module, inputs, dynamic_shapes, output_names, input_names, opset)
    except InternalError:
        if not _eager_attention(module):
            raise
        result = export_module(module, inputs, dynamic_shapes, output_names, input_names, opset)
        info = {**info, "attention": "eager (sdpa did not export)"}
    export_s = time.perf_counter() - t0
    with torch.no_grad():
        out = module(*inputs)
    flat = flatten_outputs(out)
    reference = {n: t.detach().cpu().numpy() for n, t in zip(result.output_names, flat)}
    feeds = {n: t.detach().cpu().numpy() for n, t in zip(result.input_names, _flat(inputs))}
    with open_model(result.model) as sess:  # one session for the check and the range probes
        def run(f):
            return sess.run(model_feeds(result.model, f))

        errors = compare_outputs(run(feeds), reference)
        ranges = verified_ranges(module, inputs, result, feeds, errors, EXPORT_RTOL, run)
    # dims positions index a table by (GPT-2's wpe), and a checkpoint's declared positions
    ranges = merge_ranges(ranges, table_ranges(result.model), _declared_ranges(
        result, info.get("max_positions")))
    doubled = (f" (traced at {' and '.join(f'{d} 2' for d in result.doubled)}: edgec doubles a "
               "size-1 dynamic dim, which torch.export cannot keep dynamic)"
               ) if result.doubled else ""
    rtol, noise = assert_exact(errors, result.model, feeds, EXPORT_RTOL,
                               "exported ONNX (ORT) vs PyTorch" + doubled)
    if ranges:
        result.model.metadata_props[DIM_RANGES_KEY] = json.dumps(ranges)
    info = {**info, "input_names": result.input_names, "output_names": result.output_names}
    return Source(kind, info, result.model, result.parameter_map, feeds, reference, "pytorch",
                  {"reference": "pytorch", "runtime": "onnxruntime (no graph optimization)",
                   "rtol": rtol, "outputs": errors,
                   **({"fp32_noise": noise} if noise and noise["widened"] else {})}, export_s)


def _declared_ranges(result, positions: int | None) -> dict[str, dict[str, int]]:
    """{seq: {"max": positions}}: a Hugging Face checkpoint's max_position_embeddings (or
    n_positions, max_seq_len) bounds the dynamic dim of input_ids' axis 1."""
    if not positions or "input_ids" not in result.input_names:
        return {}
    i = result.input_names.index("input_ids")
    shape = result.model.graph.inputs[i].shape
    dim = getattr(shape.dims[1], "value", None) if shape is not None and len(shape) > 1 else None
    return {dim: {"max": int(positions)}} if isinstance(dim, str) else {}


def _eager_attention(module) -> bool:
    """Switch the transformers models inside ``module`` from sdpa to eager attention; False when
    none used sdpa. torch's decomposition of sdpa with an additive bias (T5's relative position
    bias: the text encoder of CogVideoX, Wan, Flux, SD3) fails at a view of its output; eager
    attention is the same computation in MatMul/Softmax, which exports."""
    switched = False
    for sub in module.modules():
        config = getattr(sub, "config", None)
        setter = getattr(sub, "set_attn_implementation", None)
        if getattr(config, "_attn_implementation", None) == "sdpa" and callable(setter):
            setter("eager")
            switched = True
    if switched:
        _log.info("sdpa attention did not export; exporting with eager attention")
    return switched


def _from_onnx(path: Path, example_inputs) -> Source:
    from edgec.onnx_io import load_onnx
    from edgec.runtimes.ort import OrtSession

    model = load_onnx(path)
    try:
        sess = OrtSession(path, optimize=False)
    except Exception as e:
        import re

        ir_version = re.search(r"IR version: (\d+), max supported IR version: (\d+)", str(e))
        if ir_version:  # onnx >= 1.18 writes IR 11+ by default, which older ORTs refuse
            got, top = ir_version.groups()
            raise UserError(f"{path}: ONNX IR version {got} is newer than this onnxruntime "
                            f"reads ({top}); save it with model.ir_version = {top} (if it uses "
                            "nothing newer) or upgrade onnxruntime") from None
        raise UserError(f"{path}: ONNX Runtime cannot load it: {str(e).splitlines()[0]}") from e
    for kind, specs in (("input", sess.inputs), ("output", sess.outputs)):
        odd = next((s for s in specs if s.dtype.startswith("tensor(")), None)
        if odd is not None:  # bfloat16, string: numpy cannot hold them (a TypeError, exit 1)
            raise UserError(f"{path}: {kind} {odd.name!r} is {odd.dtype[7:-1]}, which edgec "
                            "cannot feed or read (no numpy dtype); give the graph a float32, "
                            "float16 or integer " + kind + " (a Cast inside the graph)")
    if example_inputs is not None:
        feeds, note = _onnx_example(path, [i.name for i in sess.inputs], example_inputs), ""
    else:
        from edgec.exporters.dim_ranges import stored_ranges
        from edgec.exporters.export_file import stored_example_dims

        least = {**{d: r["min"] for d, r in stored_ranges(model).items() if "min" in r},
                 **stored_example_dims(model)}
        feeds = random_feeds(sess.inputs, least=least)
        note = _made_example_note(sess.inputs, feeds, least)
    try:
        reference = sess.run(feeds)
    except UserError as e:
        if not note:
            raise
        raise type(e)(f"{e}{note}") from e.__cause__
    info = {"kind": "onnx", "path": str(path), "input_names": [i.name for i in sess.inputs],
            "output_names": [o.name for o in sess.outputs]}
    from edgec.exporters.export_file import stored_parameter_map, stored_sampling

    sampling = stored_sampling(model, info["input_names"], info["output_names"])
    if sampling:  # `edgec export` of a diffusion model: the artifact samples as the source
        info["sampling"] = sampling
    return Source("onnx", info, model, stored_parameter_map(model), feeds, reference,
                  "onnxruntime", None, 0.0, example_note=note)


def _made_example_note(specs, feeds: Mapping[str, np.ndarray], least: Mapping[str, int]) -> str:
    """What a failure on edgec's own example for an .onnx file appends: the file gives no size
    for some dynamic dims, which the example holds at 1 (a 1x1 image that a 2x2 MaxPool
    cannot pool), and where real inputs go. Empty when every dim had a size."""
    unsized = {d for s in specs for d in s.shape if not (isinstance(d, int) and d >= 0)
               and d not in least}
    if not unsized:
        return ""
    shapes = ", ".join(f"{s.name} {list(feeds[s.name].shape)}" for s in specs
                       if any(d in unsized for d in s.shape))
    return (f"; these are edgec's own example inputs ({shapes}: the file gives no size for "
            f"its dynamic dims {sorted(map(str, unsized))}, so each is 1); give real ones with "
            "--inputs FILE.npz (Python: example_inputs=)")


def _onnx_example(path: Path, names: list[str], example_inputs) -> dict[str, np.ndarray]:
    """An .onnx file's example as feeds: a dict by input name, or a tuple/list (or one array)
    bound to the graph's inputs in order, as an nn.Module's are to its arguments. ``dict()`` of
    a tuple of arrays was a TypeError (unhashable ndarray) or, with tensors, a refusal that
    printed the whole tensor as an unknown input name."""
    if isinstance(example_inputs, Mapping):
        items = example_inputs.items()
    else:
        if not isinstance(example_inputs, (tuple, list)):
            example_inputs = (example_inputs,)  # one array for a one-input graph
        if len(example_inputs) != len(names):
            raise UserError(f"{path}: example_inputs has {len(example_inputs)} arrays, the graph "
                            f"takes {len(names)} inputs {names}; give one per input in that "
                            "order, or a dict by name")
        items = zip(names, example_inputs)
    from edgec.runtimes.base import as_array

    return {k: as_array(v) for k, v in items}


def random_feeds(specs, seed: int = 0,
                 least: Mapping[str, int] | None = None) -> dict[str, np.ndarray]:
    """Inputs for a graph with no example data: N(0,1) floats, small non-negative ints.

    Symbolic dims become 1, or their ``least`` size (an edgec export's example size or dim
    range); integer
    inputs are drawn from [0, 2) so that index inputs (token ids, positions) stay in range for
    any table.
    """
    rng = np.random.default_rng(seed)
    feeds = {}
    for s in specs:
        shape = tuple(d if isinstance(d, int) and d >= 0 else (least or {}).get(d, 1)
                      for d in s.shape)
        dtype = np.dtype(s.dtype)
        if np.issubdtype(dtype, np.floating):
            feeds[s.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[s.name] = np.ones(shape, dtype=bool)
        else:
            feeds[s.name] = rng.integers(0, 2, size=shape).astype(dtype)
    return feeds
