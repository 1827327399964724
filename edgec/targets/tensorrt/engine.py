"""tensorrt: an NVIDIA TensorRT engine (target/model.plan) built from the TensorRT-legal model.onnx.

The build checks TensorRT's Q/DQ rules first (``rules``); where TensorRT is installed it
parses the ONNX, builds a strongly typed network when the graph carries its own precision (Q/DQ or
fp16/bf16 tensors: the types decide, not builder flags), keeps fp32 layers fp32 (TF32 off), reuses
and saves a timing cache, and sizes one optimization profile from the example inputs. Without
TensorRT the checked model.onnx is the artifact and the manifest says how to build the engine.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from edgec.errors import TargetUnavailableError, UserError
from edgec.targets.base import BuildResult, Target
from edgec.targets.tensorrt.rules import RULES, Violation, check_tensorrt_graph, qdq_nodes

__all__ = ["build", "TIMING_CACHE_ENV", "build_engine", "optimization_profile",
           "generation_profiles"]

logger = logging.getLogger(__name__)

# A timing cache shared across compiles (engine builds time every tactic; the cache skips that).
TIMING_CACHE_ENV = "EDGEC_TRT_TIMING_CACHE"
UNAVAILABLE = ("TensorRT is not installed here (it needs an NVIDIA GPU and pip install "
               "'edgec[tensorrt]')")


def _build_later(model: ir.Model, model_path: Path, generation: Mapping[str, Any] | None = None,
                companions: bool = False) -> str:
    """How to build the engine on a GPU machine: the command that rebuilds the same engine.

    A decoder's engine needs ``--generate --context N`` (its two profiles; without them the
    example's sizes make one profile, with no empty-cache prefill). What ``model.onnx`` alone
    cannot give back (swappable adapters, a sparse prefill graph, a dense companion) takes the
    whole compile again.
    """
    from edgec.lora.binding import lora_sites

    name = model_path.name
    done = f"the TensorRT-legal {name} was produced and checked; build the engine"
    whole = (name != "model.onnx" or companions or bool(lora_sites(model))
             or bool(generation and generation.get("graph") == "prefill"))
    if whole:  # (the adapters, the other graphs are made by the compile from its source)
        return (f"{done} by rerunning this compile (its source model and the options in "
                "manifest.json's recipe) on a GPU machine: this artifact's other parts are not "
                "rebuilt from model.onnx alone")
    flags = f" --generate --context {_context(generation)}" if generation else ""
    return (f"{done} with `edgec compile model.onnx --target tensorrt{flags} -o DIR` on a GPU "
            "machine")


def build(target: Target, model_path: Path, target_dir: Path, generation=None,
          companions: bool = False, **options) -> BuildResult:
    from edgec.onnx_io import load_onnx
    from edgec.runtimes import EXAMPLE_INPUTS

    model = load_onnx(model_path)
    violations = check_tensorrt_graph(model)
    if violations:
        raise UserError(_violations_line(violations, target))
    n_qdq = len(qdq_nodes(model.graph))
    if generation:  # a KV-cache decoder: one profile for prefill, one for decode
        profiles = generation_profiles(model, generation)
        profile = profiles[0]
    else:
        profile = optimization_profile(model, _example_shapes(model_path.parent / EXAMPLE_INPUTS))
        profiles = [profile]
        past = next((v.name for v in model.graph.inputs
                     if v.name.startswith("past_key_values.")), None)
        if past is not None:  # a decoder built as a plain graph: no empty-cache prefill
            logger.warning("TensorRT profile: %s is a KV-cache input, sized from the example "
                           "(no empty-cache prefill, no cache longer than the example's); for a "
                           "decoder's prefill and decode profiles compile with --generate "
                           "--context N", past)
    typed = n_qdq > 0 or any(v.dtype in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
                             for v in (*model.graph.inputs, *model.graph.initializers.values()))
    summary = (f"TensorRT legality: {len(RULES)} rules checked on {n_qdq} Q/DQ nodes, "
               "0 violations")
    pinned = _pinned_dims(model, profile)
    if pinned:  # an .onnx from the CLI has an all-ones example: an engine for 1x1 inputs only
        summary += (f"; the optimization profile holds dynamic {', '.join(pinned)} at 1 (the "
                    "example's size): the engine takes no larger input; compile with --inputs "
                    "FILE.npz (Python: example_inputs=) at the largest sizes you will run")
        logger.warning("TensorRT profile: %s", summary.split("; ", 1)[1])
    runtime: dict[str, Any] = {
        "name": "tensorrt", "profile": profile, "strongly_typed": typed,
        **({"profiles": profiles} if generation else {}),
        "legality": {"rules": sorted(RULES), "qdq_nodes": n_qdq, "violations": 0},
        "config": dict(target.runtime_config)}
    trt, reason = _import_tensorrt()
    if trt is not None:
        target_dir.mkdir(parents=True, exist_ok=True)
        try:
            build_engine(trt, model_path, target_dir / "model.plan", target_dir / "timing.cache",
                         profiles, typed)
            return BuildResult(
                runtime={**runtime, "model": "target/model.plan", "engine": "target/model.plan",
                         "timing_cache": "target/timing.cache", "tensorrt": trt.__version__},
                files=["target/model.plan", "target/timing.cache"], notes=[summary])
        except TargetUnavailableError as e:
            reason = str(e)
    later = _build_later(model, model_path, generation, companions)
    note = f"{UNAVAILABLE if reason is None else reason}; {later}"
    return BuildResult(runtime={**runtime, "model": "model.onnx", "engine": None,
                                "unavailable": note}, files=[], notes=[note, summary])


def _import_tensorrt():
    """(module, None), or (None, why not) when TensorRT is absent or cannot load."""
    if importlib.util.find_spec("tensorrt") is None:
        return None, None
    try:
        return importlib.import_module("tensorrt"), None
    except (ImportError, OSError) as e:  # e.g. the wheel is there but libnvinfer is not
        return None, f"TensorRT is installed but does not load ({e})"


def _violations_line(violations: list[Violation], target: Target) -> str:
    shown = "; ".join(f"node {v.node!r} ({v.op}) breaks {v.rule}: {v.message}"
                      for v in violations[:3])
    more = f" (+{len(violations) - 3} more)" if len(violations) > 3 else ""
    # (it also said "or run the tensorrt-legalize pass first", which no user can, and a QDQ
    # model's "already quantized" refusal sent users back here)
    return (f"the model is not TensorRT-legal: {shown}{more}; compile its float model with a "
            f"tensorrt scheme (--quantize {'|'.join(target.schemes)}: symmetric int8 "
            "activations, as TensorRT needs)")


def _example_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    if not path.is_file():
        return {}
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k].shape for k in data.files}


def _pinned_dims(model: ir.Model, profile: Mapping[str, Mapping[str, list[int]]]
                 ) -> list[str]:
    """"input[axis]" of the dynamic dims when the profile allows every one of them only size
    1 (an all-ones example, as the CLI makes for an .onnx file); none otherwise (a batch-1
    example beside a real sequence length is a choice)."""
    pinned, free = [], 0
    for value in model.graph.inputs:
        p = profile.get(value.name)
        if p is None or value.shape is None:
            continue
        for i, d in enumerate(value.shape):
            if not isinstance(d, int):
                if p["max"][i] == 1:
                    pinned.append(f"{value.name}[{i}]")
                else:
                    free += 1
    return pinned if pinned and not free else []


def optimization_profile(model: ir.Model, examples: Mapping[str, tuple[int, ...]]
                         ) -> dict[str, dict[str, list[int]]]:
    """min/opt/max per graph input: fixed dims as they are; a dynamic dim runs 1..example size,
    narrowed to the sizes the graph is good for where the model stores them (``dim_ranges``).

    The engine then accepts any size up to the example's (TensorRT needs an upper bound at
    build time); compile with the largest example you will run. A swappable-LoRA input's rank
    dim is sized from its site instead (``adapter_rank_ranges``): users never feed those.
    """
    profile = {}
    ranks, ranges = adapter_rank_ranges(model), graph_ranges(model)
    for value in model.graph.inputs:
        if value.const_value is not None:
            continue
        dims = list(value.shape) if value.shape is not None else None
        if value.name in ranks and dims is not None:
            lo, opt, hi = ranks[value.name]
            profile[value.name] = {k: [d if isinstance(d, int) else r for d in dims]
                                   for k, r in (("min", lo), ("opt", opt), ("max", hi))}
            continue
        example = examples.get(value.name)
        if example is not None and dims is not None and len(example) != len(dims):
            raise UserError(f"example input {value.name!r} has rank {len(example)}, the model "
                            f"input has rank {len(dims)}")
        dims = dims if dims is not None else [None] * len(example or ())
        if dims and not all(isinstance(d, int) for d in dims) and example is None:
            raise UserError(f"input {value.name!r} has dynamic shape {_dims(dims)} and no example "
                            "input to size TensorRT's optimization profile; pass example inputs")
        bounds = [(d, d, d) if isinstance(d, int) else
                  _within(getattr(d, "value", None), (1, int(e), int(e)), ranges, value.name)
                  for d, e in zip(dims, example or dims)]
        profile[value.name] = {k: [b[i] for b in bounds]
                               for i, k in enumerate(("min", "opt", "max"))}
    return profile


def graph_ranges(model: ir.Model) -> dict[str, dict[str, int]]:
    """The sizes each named dim's graph is good for, as the manifest records them
    (``exporters/dim_ranges.py``: the traced ranges and the dims positions index a table by)."""
    from edgec.exporters.dim_ranges import merge_ranges, stored_ranges, table_ranges

    return merge_ranges(stored_ranges(model), table_ranges(model))


def _within(dim: str | None, bounds: tuple[int, int, int],
            ranges: Mapping[str, Mapping[str, int]], where: str) -> tuple[int, int, int]:
    """A dynamic dim's (min, opt, max) narrowed to its stored range: outside it the graph
    computes what PyTorch does not, and every run's feed check refuses those sizes, so the
    profile ran from 1 (``seq >= 2`` traced) to sizes no run may feed."""
    from edgec.exporters.dim_ranges import range_text

    r = ranges.get(dim or "")
    if not r:
        return bounds
    lo, opt, hi = bounds
    lo, hi = max(lo, r.get("min", lo)), min(hi, r.get("max", hi))
    if lo > hi:
        raise UserError(f"TensorRT's optimization profile for input {where!r} would size {dim} "
                        f"{bounds[0]}..{bounds[2]}, but the graph is good for {dim} "
                        f"{range_text(r)} only; give an example (or --context) within it")
    return lo, min(max(opt, lo), hi), hi


def adapter_rank_ranges(model: ir.Model) -> dict[str, tuple[int, int, int]]:
    """Swappable-LoRA input → (min, opt, max) of its rank dim: 1 (any lower-rank adapter, the
    base's zeros), the compiled rank (every single adapter is padded to it), and the sum of the
    compiled adapters' ranks on the site (a blend binds rank Σ rᵢ; ``edgec.lora.binding``)."""
    from edgec.lora.binding import lora_sites

    out = {}
    for s in lora_sites(model):
        rank = max(1, int(s["rank"]))
        top = max(rank, int(s.get("blend_rank") or rank))
        for name in (s["a_input"], s["b_input"]):
            out[name] = (1, rank, top)
    return out


def _dims(dims) -> str:
    """A shape as a user reads it: ``[172, lora_r_0]`` (dim names, not SymbolicDim reprs)."""
    names = (d if isinstance(d, int) else getattr(d, "value", d) for d in dims)
    return "[" + ", ".join("?" if n is None else str(n) for n in names) + "]"


def _context(generation: Mapping[str, Any]) -> int:
    """The longest sequence a decoder's engine takes: ``--context``, else the model's."""
    return int(generation.get("context") or generation.get("max_positions") or 2048)


def generation_profiles(model: ir.Model, generation: Mapping[str, Any]
                        ) -> list[dict[str, dict[str, list[int]]]]:
    """[prefill, decode] optimization profiles of a KV-cache decoder, by its named dims.

    Prefill: 1..``prefill`` new tokens (default min(context, 512)) over an empty cache. Decode:
    one token over 1..context-1 cached ones. ``context`` (``--context``) bounds the cache;
    default the model's max positions, else 2048. Batch 1..``batch`` (default 1). A sparse
    prefill graph (``graph: prefill``, no cache inputs) gets the prefill profile only, up to
    the whole context.
    """
    context = _context(generation)
    prefill_only = generation.get("graph") == "prefill"
    prefill = int(generation.get("prefill") or (context if prefill_only else min(context, 512)))
    batch = int(generation.get("batch") or 1)
    ranges = [
        {"batch_size": (1, 1, batch), "sequence_length": (1, prefill, prefill),
         "past_sequence_length": (0, 0, 0), "total_sequence_length": (1, prefill, prefill)},
        {"batch_size": (1, 1, batch), "sequence_length": (1, 1, 1),
         "past_sequence_length": (1, context // 2, context - 1),
         "total_sequence_length": (2, context // 2 + 1, context)},
    ]
    profiles = []
    ranks = adapter_rank_ranges(model)  # swappable LoRA on the decoder: the same in both
    stored = graph_ranges(model)
    for dims in ranges[:1] if prefill_only else ranges:
        profile = {}
        for value in model.graph.inputs:
            shape = list(value.shape) if value.shape is not None else []
            bounds = []
            for d in shape:
                if isinstance(d, int):
                    bounds.append((d, d, d))
                elif value.name in ranks:
                    bounds.append(ranks[value.name])
                elif str(d) in dims:
                    bounds.append(_within(str(d), dims[str(d)], stored, value.name))
                else:
                    raise UserError(f"decoder input {value.name!r} has a dim {d} that is not one "
                                    f"of {', '.join(dims)}; re-export it with --generate")
            profile[value.name] = {k: [b[i] for b in bounds]
                                   for i, k in enumerate(("min", "opt", "max"))}
        profiles.append(profile)
    return profiles


def build_engine(trt, model_path: Path, plan_path: Path, cache_path: Path,
                 profiles: list[Mapping[str, Mapping[str, list[int]]]],
                 strongly_typed: bool) -> None:
    """Parse ``model_path`` with TensorRT's ONNX parser and write the serialized plan (one
    optimization profile per entry of ``profiles``)."""
    log = trt.Logger(trt.Logger.WARNING)
    try:
        builder = trt.Builder(log)
    except (TypeError, RuntimeError) as e:  # pybind returns no builder when CUDA cannot start
        raise TargetUnavailableError(f"TensorRT is installed but could not start a builder "
                                     f"(no usable NVIDIA GPU? {e})") from None
    flags = 0
    if strongly_typed:
        if not hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
            raise UserError(f"TensorRT {trt.__version__} has no strongly typed networks, which "
                            "quantized and fp16 graphs need; install TensorRT >= 10")
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, log)
    if not parser.parse_from_file(str(model_path)):  # the path lets it find external data
        raise UserError(_parser_line(parser))
    config = builder.create_builder_config()
    # TF32 is on by default for fp32 matmul/conv on Ampere+: ~1e-3 error breaks fp32 fidelity.
    if hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    shared = Path(os.environ[TIMING_CACHE_ENV]) if os.environ.get(TIMING_CACHE_ENV) else None
    source = next((p for p in (cache_path, shared) if p is not None and p.is_file()), None)
    cache = config.create_timing_cache(source.read_bytes() if source else b"")
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        logger.warning("timing cache %s is from another TensorRT or GPU; building without it",
                       source)
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    for profile in profiles:
        opt_profile = builder.create_optimization_profile()
        for name, p in profile.items():
            opt_profile.set_shape(name, p["min"], p["opt"], p["max"])
        config.add_optimization_profile(opt_profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise UserError("TensorRT could not build an engine for this model (its log above says "
                        "which layer); check the GPU supports the model's precision (fp8 needs "
                        "Ada or later) or compile for ort-cpu")
    plan_path.write_bytes(memoryview(plan))
    timing = memoryview(config.get_timing_cache().serialize())
    for path in (cache_path, shared):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(timing)


def _parser_line(parser) -> str:
    errors = [parser.get_error(i) for i in range(parser.num_errors)]
    if not errors:
        return "TensorRT's ONNX parser rejected the model without saying why; see its log"
    e = errors[0]
    name = _call(e, "node_name") or f"#{_call(e, 'node')}"
    op = _call(e, "node_operator") or "?"
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    return (f"TensorRT's ONNX parser rejected node {name!r} ({op}): {e.desc()}{more}; see "
            "onnx-tensorrt's docs/operators.md for what it supports, or compile for ort-cpu")


def _call(obj, method: str):
    fn = getattr(obj, method, None)  # node_name/node_operator arrived in TensorRT 10
    return fn() if callable(fn) else None


