"""Recipe: everything a compile is asked to do, parsed and validated once, before any export.

``edgec.compile``, ``edgec.calibrate``, ``edgec compile`` and ``edgec calibrate`` all build one.
Each field carries its option (CLI flags, help, parser), so a new compile option is one field
here, one row in ``pipeline.STAGES`` and its pass module: the CLI and the Python API pick it up.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from edgec.errors import UserError

__all__ = ["Recipe", "Option", "LORA_MODES", "recipe_options"]

LORA_MODES = ("merge", "sparse-merge", "swappable")


@dataclasses.dataclass(frozen=True)
class Option:
    """How a Recipe field is given: CLI flags and help, and the parser of the raw value.

    ``parse(raw, target, parsed)`` turns a CLI string or a Python value into the field's value
    (raising UserError on bad input); ``parsed`` holds the fields parsed before it. ``kind``:
    ``value``, ``multiple`` (a repeatable flag: a list) or ``flag`` (a boolean switch).
    ``commands``: the CLI commands that take it.
    """

    flags: tuple[str, ...]
    help: str
    parse: Callable[[Any, Any, dict], Any]
    metavar: str | None = None
    kind: str = "value"
    commands: tuple[str, ...] = ("compile", "calibrate")


def _option(default: Any, *flags: str, help: str, parse: Callable[[Any, Any, dict], Any],
            metavar: str | None = None, kind: str = "value",
            commands: tuple[str, ...] = ("compile", "calibrate")) -> Any:
    return dataclasses.field(default=default, metadata={"option": Option(
        flags, help, parse, metavar, kind, commands)})


def _text(raw: Any, target, parsed: dict) -> str | None:
    return None if raw is None else str(raw)


def _sparse(raw: Any, target, parsed: dict):
    from edgec.graph_passes.sparse_attention import SparseAttentionConfig

    if raw is None or raw is False:
        return None
    if raw is True or raw == "default":
        return {}
    if isinstance(raw, str) and not raw.replace(",", "").strip():  # empty shell variables
        # ("$A" or "$A,$B" unset) read as the defaults
        raise UserError("sparse attention options are empty: give 'default' for the defaults "
                        "or k=v options (e.g. keep=0.2,block=64)")
    if isinstance(raw, SparseAttentionConfig):
        return raw
    items = SparseAttentionConfig.parse_items(raw)
    SparseAttentionConfig.check_values(items)  # before any export: the model adds only the grid
    return items


def _rotate(raw: Any, target, parsed: dict):
    from edgec.graph_passes.rotation.options import RotateOptions

    return None if raw is None or raw is False else RotateOptions.parse(raw)


def _prune(raw: Any, target, parsed: dict):
    from edgec.graph_passes.prune import PruneConfig

    return None if raw is None or raw is False else PruneConfig.parse(raw)


def _lora(raw: Any, target, parsed: dict) -> tuple:
    from edgec.lora.peft_adapter import parse_lora_option, read_adapter

    if raw is None or raw == []:
        return ()
    return tuple(read_adapter(path, weight=w) for path, w in parse_lora_option(raw))


def _lora_mode(raw: Any, target, parsed: dict) -> str:
    if raw not in LORA_MODES:
        raise UserError(f"unknown LoRA mode {raw!r}; use one of {', '.join(LORA_MODES)}")
    return raw


def _quantize(raw: Any, target, parsed: dict):
    from edgec.graph_passes.quantization.options import QuantOptions

    return None if raw is None or raw is False else QuantOptions.parse(raw, target)


def _calibration(raw: Any, target, parsed: dict):
    from edgec.calibration import calibration_input

    if parsed.get("quantize") is None:  # before reading the cache: say what is missing first
        raise UserError("--calib applies to quantized compiles; add --quantize SCHEME")
    return calibration_input(raw)


def _flag(name: str) -> Callable[[Any, Any, dict], bool]:
    """The parser of the on/off option ``name`` (named in its error)."""
    def parse(raw: Any, target, parsed: dict) -> bool:
        if not isinstance(raw, bool):
            raise UserError(f"{name} must be True or False, not {raw!r}")
        return raw
    return parse


def _context(raw: Any, target, parsed: dict) -> int | None:
    if raw is None:
        return None
    try:
        n = int(raw)
    except (TypeError, ValueError):
        n = 0
    if n < 2 or str(raw).strip() != str(n):
        raise UserError(f"--context takes a number of tokens ≥ 2, not {raw!r}")
    return n


def _soc(raw: Any, target, parsed: dict) -> str | None:
    if raw is None:
        return None
    if not target.socs:
        raise UserError(f"--soc names the Snapdragon a qnn-htp context binary is compiled for; "
                        f"{target.name} builds none: drop --soc")
    from edgec.targets.qnn_htp.soc import soc_named

    return soc_named(raw)


def _kv_cache(raw: Any, target, parsed: dict) -> str | None:
    if raw is None:
        return None
    if not target.kv_caches:
        from edgec.targets import TARGETS

        offered = [t.name for t in TARGETS.values() if t.kv_caches]
        raise UserError(f"--kv-cache sets the precision a generation artifact stores its KV "
                        f"cache in, on {', '.join(offered)}; {target.name} keeps the cache its "
                        "graph computes: drop --kv-cache")
    value = str(raw).strip().lower()
    if value not in target.kv_caches:
        raise UserError(f"--kv-cache {raw!r} is not a KV-cache precision {target.name} offers; "
                        f"choose one of: {' | '.join(target.kv_caches)}")
    return value


def _kv_retrieval(raw: Any, target, parsed: dict):
    from edgec.runtimes.freekv import parse_kv_retrieval

    if raw not in (None, False) and not parsed.get("generate"):  # what is missing comes first
        raise UserError("--kv-retrieval applies to generation artifacts; add --generate")
    return parse_kv_retrieval(raw)


def _vision_tokens(raw: Any, target, parsed: dict):
    from edgec.exporters.vision_prune import VisionPruning

    return VisionPruning.parse(raw)


_QUANTIZE_HELP = ("quantize with a scheme the target offers: w8a8 | w8a16 | w4a16 | w4a8 | fp8 "
                  "(`edgec targets` lists them); options after ':' "
                  "method=minmax|percentile|entropy (fp8: minmax|percentile|distribution), "
                  "exclude=NODE_OR_OP;... (kept in high precision), samples=N, mask_fill=F, "
                  "min_cos=F (mixed precision to that held-out cosine; default 0.98, 0 = "
                  "off), max_kld=F (... to that logits KL divergence, nats/token; default "
                  "0.05 on language models; either one given replaces the default floor, "
                  "both given both hold), smooth=ALPHA "
                  "(SmoothQuant folded into the norms), split=R (FFN outlier channels in a "
                  "branch of their own), gptq=true|false (GPTQ weight rounding; "
                  "default on for 4-bit weights after --rotate), stream=fp16|16bit|8bit "
                  "(qnn-htp: the residual stream's precision), held_out=N (samples the floor "
                  "holds on), reduce_range=true (ort-cpu w8a8: 7-bit int8 weights, for "
                  "ONNX Runtime's faster kernels on x86 without VNNI), block=N (weight-only: "
                  "input channels per weight scale, 0 = per output channel)")
_SPARSE_HELP = ("block-sparse attention (RainFusion2.0 / RainFusion), e.g. keep=0.2,block=64 "
                "or keep=0.2,sink=frame,grid=8x32x32. Defaults: keep=0.2, block=64, "
                "qblock=8×block (query tokens sharing one selection), prefix=0, sink=none (or "
                "frame), mode=rf2 (or rainfusion, mask), min_seq=256, chunk_mb=256; grid, "
                "prefix and tail come from the reference model when it has a video grid. "
                "Also: tail=N, tail_mode=dense|blocks, tile=TxHxW (default: the most compact "
                "dividing the grid), samples=N (rainfusion; 32), dense_steps=N (diffusion "
                "steps run dense first; 0), share=none|batch (one selection for the batch). "
                "Use 'default' for all defaults.")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A compile's options, in the order the pipeline applies them (``Recipe.parse`` builds it).

    ``target`` is the resolved ``targets.Target``; ``sparse_attention`` the options given (grid
    and prefix are filled from the source later); ``lora`` the adapters, read and checked.
    """

    target: Any
    config: str | None = _option(
        None, "--config", "-c", parse=_text,
        help="model config (tiny|small|base[+option]; default tiny); for a Hugging Face "
             "checkpoint the example inputs: batch=N,seq=N")
    sparse_attention: Any = _option(None, "--sparse-attention", metavar="K=V,...",
                                    help=_SPARSE_HELP, parse=_sparse)
    rotate: Any = _option(
        None, "--rotate", metavar="METHOD[:K=V,...]", parse=_rotate,
        help="rotate the quantized spaces, exactly in fp32 (QuaRot R1/R2 from the graph's "
             "structure): hadamard (random Hadamard) | dartquant (calibrated, QR-Orth); options "
             "r4=true|false (online Hadamard before FFN down projections; default: on where R1 "
             "passes, i.e. pre-norm decoders, except on qnn-htp), steps=N, seed=N")
    prune: Any = _option(None, "--prune", metavar="SPEC", parse=_prune,
                         help="magnitude-prune MatMul/Gemm weights before LoRA: magnitude:0.5 "
                              "(unstructured) or 2:4 (N:M)")
    lora: tuple = _option(
        (), "--lora", metavar="PATH[:WEIGHT]", kind="multiple", parse=_lora,
        help="PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors) "
             "or a diffusers LoRA file (.safetensors, e.g. pytorch_lora_weights.safetensors); "
             "repeat for several (merge modes: optional weight, e.g. a:0.7 --lora b:0.3)")
    lora_mode: str = _option(
        "merge", "--lora-mode", parse=_lora_mode,
        help="merge (W += s·BA, PEFT semantics) | sparse-merge (LoSA: the delta is masked by the "
             "base's zeros) | swappable (adapters as graph inputs, switched at run time)")
    quantize: Any = _option(None, "--quantize", "-q", metavar="SCHEME[:K=V,...]",
                            help=_QUANTIZE_HELP, parse=_quantize)
    calibration: Any = _option(
        None, "--calib", metavar="FILE_OR_DIR", parse=_calibration, commands=("compile",),
        help="calibration cache from `edgec calibrate` (reused, checked against the model), or "
             "an .npz of samples (keys = input names, leading sample axis; with --generate "
             "input_ids [and attention_mask] alone: prompts)")
    check: bool = _option(False, "--check", kind="flag", parse=_flag("check"),
                          commands=("compile",),
                          help="check every pass numerically")
    generate: bool = _option(
        False, "--generate", kind="flag", parse=_flag("generate"),
        help="export the KV-cache decoder (prefill and decode in one graph, Hugging Face names) "
             "for `edgec generate` / Session.generate; llama or a *ForCausalLM checkpoint")
    soc: str | None = _option(
        None, "--soc", metavar="CHIP", parse=_soc, commands=("compile",),
        help="qnn-htp: the Snapdragon the context binary is compiled for (a QNN binary is "
             "built for one HTP): sm8350|888, sm8450|8-gen-1, sm8550|8-gen-2, sm8650|8-gen-3, "
             "sm8750|8-elite, sc8380xp|x-elite, sa8295p, sa8255p (default: QNN's own, unnamed)")
    context: int | None = _option(
        None, "--context", metavar="N", parse=_context,
        help="the longest sequence (prompt + new tokens) the artifact generates: qnn-htp's "
             "static KV buffer (default 256), TensorRT's decode profile (--generate)")
    kv_cache: str | None = _option(
        None, "--kv-cache", metavar="PRECISION", parse=_kv_cache, commands=("compile",),
        help="the precision a generation artifact stores its KV cache in (--generate, "
             "openvino-cpu): f32 (default) | f16 | u8 (keys per channel within each block, "
             "values per token: OpenVINO GenAI's default): 0.30× (u8) or 0.5× (f16) the cache's "
             "memory; the compile measures what it costs against fp32")
    kv_retrieval: Any = _option(
        None, "--kv-retrieval", metavar="freekv[:K=V,...]", parse=_kv_retrieval,
        commands=("compile",),
        help="FreeKV page retrieval for long-context decoding (--generate, llama, CPU targets): "
             "budget=2048,page=32,sink=64,recent=256,tau=0.8 (min/max key digests per page, "
             "Quest scores, speculative selection from the previous query, per-head correction "
             "below tau)")

    prune_vision_tokens: Any = _option(
        None, "--prune-vision-tokens", metavar="K=V,...", parse=_vision_tokens,
        help="a VLM's prefill keeps the best image tokens after a decoder layer (training-free "
             "Dynamic-LLaVA / FastV; vlm or LLaVA, --generate): keep=0.25,layer=2,"
             "score=attention|norm")

    def __post_init__(self):
        t = self.target
        if t.fully_quantized and self.quantize is None:
            raise UserError(f"{t.name} runs quantized models only (every tensor is quantized); "
                            f"add --quantize {' | '.join(t.schemes)}")
        if self.lora_mode != "merge" and not self.lora:
            raise UserError(f"--lora-mode {self.lora_mode} needs the adapters it applies to: add "
                            "--lora DIR (swappable: the adapters whose modules get branches)")
        if self.lora_mode == "swappable":
            if any(a.weight != 1.0 for a in self.lora):
                raise UserError("adapter weights (DIR:WEIGHT) apply to merge modes; a swappable "
                                "artifact takes them at run time (Session.run(feeds, "
                                "adapter={'a': 0.7, 'b': 0.3}), edgec run --adapter a:0.7,b:0.3)")
            if self.lora and not t.swappable_adapters:
                raise UserError(f"swappable LoRA adapters cannot run on {t.name} (every tensor "
                                "is quantized there, adapters included); use --lora-mode merge")
            from edgec.lora.spec import check_names

            check_names(a.name for a in self.lora)  # run time addresses them by these names
        if self.prune is not None and self.rotate is not None:
            # a rotation folds dense orthogonal matrices into every rotated weight: --prune 2:4
            # --rotate hadamard shipped no zero at all while its report said 50% sparsity
            raise UserError("--prune and --rotate do not combine: rotating a pruned weight "
                            "makes it dense again; drop one of the two")
        if self.lora_mode == "sparse-merge" and self.rotate is not None:
            # the same for LoSA's kept zeros: sparse-merge then hadamard reported 50% sparsity
            # (zeros_destroyed=0) and shipped a model.onnx with no zero in any projection
            raise UserError("--lora-mode sparse-merge and --rotate do not combine: rotating the "
                            "sparse-merged weights makes them dense again; drop --rotate or "
                            "use --lora-mode merge")
        if self.soc is not None and self.quantize is not None and self.quantize.stream == "fp16":
            soc = t.socs[self.soc]
            if not soc.fp16:
                raise UserError(f"--quantize stream=fp16 runs the residual stream in fp16, which "
                                f"the HTP v{soc.htp_arch} of the {soc.name} ({soc.chip}) does "
                                "not compute; use stream=16bit (the default) there")
        if self.context is not None and not self.generate:
            raise UserError("--context sizes the KV cache of a generation artifact; add "
                            "--generate")
        if self.generate and self.sparse_attention is not None:
            self._check_sparse_prefill()
        if self.kv_cache is not None:
            self._check_kv_cache()
        if self.kv_retrieval is not None:
            if not self.generate:
                raise UserError("--kv-retrieval applies to generation artifacts; add --generate")
            if t.static_shapes or t.runtime not in ("ort", "openvino"):
                raise UserError(f"FreeKV retrieval runs on ort-cpu and openvino-cpu, not on "
                                f"{t.name}; drop --kv-retrieval")
            other = [n for n, v in (("--quantize", self.quantize), ("--lora", self.lora),
                                    ("--rotate", self.rotate), ("--prune", self.prune)) if v]
            if other:
                raise UserError(f"--kv-retrieval builds its decode graph from the fp32 model, "
                                f"so it does not carry {other[0]} yet; drop one of the two")
        if self.calibration is not None:
            if self.quantize is None:
                raise UserError("--calib applies to quantized compiles; add --quantize SCHEME")
            if self.quantize.scheme_on(t).weight_only and not isinstance(self.calibration,
                                                                         Path):
                # an .npz of samples is what GPTQ's Hessians and the floor are measured on
                # (generated feeds otherwise: a checkpoint's text windows, calibration.text)
                raise UserError(f"scheme {self.quantize.scheme} is weight-only: it takes no "
                                "calibration cache (no activation ranges); give an .npz of "
                                "samples for GPTQ and the accuracy floor, or drop --calib")

    @property
    def stored_kv_cache(self) -> str | None:
        """The precision a generation artifact keeps its KV cache in, where it is not the
        target's default (its first ``kv_caches`` entry, fp32)."""
        if self.kv_cache is None or self.kv_cache == next(iter(self.target.kv_caches)):
            return None
        return self.kv_cache

    def _check_kv_cache(self) -> None:
        """--kv-cache: a generation artifact's cache, kept by the runtime in that precision."""
        if not self.generate:
            raise UserError("--kv-cache sets the precision of a generation artifact's KV cache; "
                            "add --generate")
        if self.stored_kv_cache is None:
            return  # the default, named
        if self.kv_retrieval is not None:
            raise UserError(f"--kv-retrieval decodes from FreeKV's own fp32 pages, so --kv-cache "
                            f"{self.kv_cache} would not apply to it; drop one of the two")
        if self.sparse_attention is not None:
            raise UserError(f"the sparse prefill hands its fp32 keys/values to the decoder's "
                            f"cache, which --kv-cache {self.kv_cache} stores in another format; "
                            "drop one of the two")

    def _check_sparse_prefill(self) -> None:
        """--generate --sparse-attention: block-sparse attention in a separate prefill graph."""
        from edgec.graph_passes.sparse_attention import SparseAttentionConfig

        cfg = SparseAttentionConfig.parse(self.sparse_attention)
        if self.target.static_shapes:
            raise UserError(f"{self.target.name} prefills in fixed chunks of a static cache, "
                            "where block-sparse attention has nothing to skip; drop "
                            "--sparse-attention")
        if cfg.dense_steps or cfg.grid is not None or cfg.prefix or cfg.tail or cfg.mode != "rf2":
            raise UserError("a decoder's sparse prefill is causal rf2 block selection: drop "
                            "dense_steps, grid, prefix, tail and mode from --sparse-attention")
        if self.lora_mode == "swappable" and self.lora:
            raise UserError("swappable LoRA adapters are not bound into the sparse prefill "
                            "graph yet; use --lora-mode merge or drop --sparse-attention")

    @classmethod
    def parse(cls, target: Any, **options: Any) -> Recipe:
        """From a target name and the options of ``edgec.compile`` (Python values or CLI text)."""
        from edgec import targets

        tgt = targets.get(target) if isinstance(target, str) else target
        fields = _option_fields()
        unknown = sorted(set(options) - set(fields))
        if unknown:
            raise UserError(f"unknown compile option {unknown[0]!r}; known: {', '.join(fields)}")
        values = {}
        for name, f in fields.items():
            if name in options and options[name] is not None:
                values[name] = f.metadata["option"].parse(options[name], tgt, values)
        return cls(tgt, **values)

    def for_calibration(self) -> Recipe:
        """Refuse what ``calibrate`` cannot do, before any export."""
        if self.quantize is None:
            raise UserError("calibrate needs a quantization scheme (--quantize SCHEME)")
        if self.quantize.scheme_on(self.target).weight_only:
            raise UserError(f"scheme {self.quantize.scheme} is weight-only: it needs no "
                            "calibration")
        if self.calibration is not None:
            raise UserError("edgec calibrate writes a calibration cache; it takes samples as "
                            "--data FILE.npz, not a cache")
        return self

    def to_json(self) -> dict[str, Any]:
        """The recipe as the manifest records it."""
        sparse = self.sparse_attention
        calib = self.calibration
        return {
            "target": self.target.name, "config": self.config,
            "sparse_attention": (sparse.to_json() if hasattr(sparse, "to_json") else
                                 _plain(sparse)),
            "rotate": self.rotate.to_json() if self.rotate is not None else None,
            "prune": self.prune.describe() if self.prune is not None else None,
            "lora": [a.summary() for a in self.lora], "lora_mode": self.lora_mode,
            "quantize": _plain(dataclasses.asdict(self.quantize)) if self.quantize else None,
            "calibration": (None if calib is None else str(calib) if isinstance(calib, Path)
                            else f"cache {calib.model_hash[:12]}"),
            "check": self.check, "generate": self.generate, "context": self.context,
            "soc": self.soc, "kv_cache": self.kv_cache,
            "kv_retrieval": (self.kv_retrieval.to_json() if self.kv_retrieval is not None
                             else None),
            "prune_vision_tokens": (self.prune_vision_tokens.to_json()
                                    if self.prune_vision_tokens is not None else None),
        }


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: list(v) if isinstance(v, tuple) else v for k, v in value.items()}
    return value


def _option_fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(Recipe) if "option" in f.metadata}


def recipe_options(command: str) -> list[tuple[str, Any, Option]]:
    """(field name, default, option) of every Recipe option the CLI ``command`` takes."""
    return [(name, f.default, f.metadata["option"]) for name, f in _option_fields().items()
            if command in f.metadata["option"].commands]
