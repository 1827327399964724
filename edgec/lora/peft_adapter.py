"""PEFT LoRA adapters: read ``adapter_config.json`` + ``adapter_model.safetensors`` (never pickles),
validate them against a model's parameter map, and give each target's delta in ONNX layout.

PEFT semantics (peft/tuners/lora): ``ΔW = transpose(B·A, fan_in_fan_out) · scaling`` with
``scaling = alpha / r`` (``alpha / √r`` with ``use_rslora``), r and alpha per module from
``rank_pattern`` / ``alpha_pattern`` (first key k with ``re.match(rf"(.*\\.)?({k})$", module)``).
DoRA (``use_dora``): each module also has a magnitude m [out], and merging gives
``W' = m / ‖W + ΔW‖ · (W + ΔW)``, the norm per output channel (``LoraModule.dora_merged``).
``lora_bias``: lora_B has a bias b [out] too, and merging adds ``b · scaling`` to the base
layer's bias (which it must have). An ``nn.Embedding`` target stores ``lora_embedding_A``
[r, vocab] and ``lora_embedding_B`` [dim, r]: ΔW = (B·A)ᵀ · scaling, the table's [vocab, dim]
layout (read as ``fan_in_fan_out``). A Conv target (``nn.Conv1d/2d/3d``) stores lora_A as a
Conv [r, in, *kernel] with the base's kernel and lora_B as a 1×1 Conv [out, r, 1, ...]:
ΔW = (B·A) over the flattened kernel, reshaped to the weight's [out, in, *kernel] (PEFT's
``_ConvNd.get_delta_weight``; grouped Convs PEFT cannot merge, nor can edgec).
``modules_to_save`` (a task head trained whole, e.g. a sequence classifier's ``classifier``)
are saved as plain parameters (``classifier.weight``):
merging replaces the model's with them (``LoraAdapter.saved``).
An exported MatMul stores Wᵀ ([in, out]); the parameter map says which layout each initializer has.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edgec.errors import UserError
from edgec.lora.spec import NO_ADAPTER, adapter_weight, dir_name

__all__ = ["LoraModule", "LoraAdapter", "read_adapter", "write_peft_adapter",
           "parse_lora_option", "Target",
           "resolve_targets", "resolve_saved", "CONFIG_FILE", "WEIGHTS_FILE", "NO_ADAPTER"]

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIXES = ("base_model.model.",)
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<role>A|B)(?:\.[^.]+)?\.weight$")
_MAGNITUDE = re.compile(r"^(?P<module>.+)\.lora_magnitude_vector(?:\.[^.]+)?(?:\.weight)?$")
_BIAS = re.compile(r"^(?P<module>.+)\.lora_B(?:\.[^.]+)?\.bias$")
_EMBEDDING = re.compile(r"^(?P<module>.+)\.lora_embedding_(?P<role>A|B)(?:\.[^.]+)?$")
_BASE_LAYER = re.compile(r"^(?P<module>.+)\.base_layer\.(?P<param>weight|bias)$")
# a module's tensors: (pattern, its role in the module's entry; None: the pattern's own A/B)
_ROLES = ((_KEY, None), (_EMBEDDING, None), (_MAGNITUDE, "M"), (_BIAS, "b"))
# aLoRA applies only after its invocation tokens: merged, it ran on every token (PEFT refuses to
# merge it: an internal error from a checkpoint source, a silent merge from an .onnx one)
_PLAIN = "use a plain LoRA adapter"
_IN_PEFT = "merge it in PEFT (merge_and_unload), save the merged model and compile that"
# config key → (what it is, what to do): refused, never read past (layer_replication was merged as
# a plain LoRA, silently: its copied layers dropped; target_parameters read as inconsistent)
_UNSUPPORTED = {
    "use_qalora": ("QALoRA adapters (use_qalora set)", _PLAIN),
    "use_bdlora": ("BD-LoRA adapters (use_bdlora set)", _PLAIN),
    "alora_invocation_tokens": ("aLoRA (activated LoRA) adapters (alora_invocation_tokens set)",
                                _PLAIN),
    "layer_replication": ("layer_replication (the adapter runs on copies of the base's layers, "
                          "a model of another depth)", "use an adapter trained without it"),
    "target_parameters": ("target_parameters (LoRA on bare parameters, such as MoE experts)",
                          _IN_PEFT),
    # its token_adapter.trainable_tokens_delta was refused as "not a LoRA A/B weight"
    "trainable_token_indices": ("trainable_token_indices (embedding rows of chosen tokens "
                                "trained whole)", _IN_PEFT),
}


@dataclasses.dataclass
class LoraModule:
    """One adapted module: A [r, in], B [out, r] as PEFT stores them, and its scaling."""

    name: str
    A: np.ndarray
    B: np.ndarray
    rank: int
    alpha: float
    scaling: float
    fan_in_fan_out: bool
    magnitude: np.ndarray | None = None  # DoRA's m [out]; None: plain LoRA
    bias: np.ndarray | None = None  # lora_B's bias [out] (``lora_bias``); None: none
    embedding: bool = False  # an nn.Embedding target (lora_embedding_A/B)
    kernel: tuple[int, ...] = ()  # a Conv target's kernel (A is kept [r, in·∏kernel])

    @property
    def in_features(self) -> int:
        return self.A.shape[1] // math.prod(self.kernel)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """The adapted weight's shape as PyTorch has it ([out, in] or [out, in, *kernel]; a
        ``fan_in_fan_out`` layer's [in, out])."""
        out_in = (self.B.shape[0], self.in_features)
        return (*out_in, *self.kernel) if self.kernel else (
            out_in[::-1] if self.fan_in_fan_out else out_in)

    def bias_delta(self) -> np.ndarray | None:
        """What merging adds to the base layer's bias (PEFT: ``lora_B.bias · scaling``)."""
        return None if self.bias is None else self.bias * np.float32(self.scaling)

    def delta(self) -> np.ndarray:
        """ΔW in the PyTorch parameter's layout, computed in fp32 as PEFT does."""
        d = (self.B @ self.A) * np.float32(self.scaling)
        if self.kernel:
            return d.reshape(self.weight_shape)
        return d.T if self.fan_in_fan_out else d

    def dora_merged(self, w: np.ndarray) -> np.ndarray:
        """DoRA's merged weight in the parameter's layout ``w`` has: ``m / ‖W + ΔW‖ · (W + ΔW)``
        with the norm over each output channel's inputs (PEFT's merge: the bias is not
        rescaled)."""
        merged = w.astype(np.float64) + self.delta()
        if self.kernel:  # a Conv: the norm over each output channel's inputs and kernel
            out_in = merged.reshape(merged.shape[0], -1)
        else:
            out_in = merged.T if self.fan_in_fan_out else merged  # [out, in]
        norm = np.linalg.norm(out_in, axis=1)
        factor = self.magnitude.astype(np.float64) / norm
        out_in = factor[:, None] * out_in
        if self.kernel:
            return out_in.reshape(merged.shape).astype(w.dtype)
        return (out_in.T if self.fan_in_fan_out else out_in).astype(w.dtype)


@dataclasses.dataclass
class LoraAdapter:
    name: str
    path: Path | None
    config: dict[str, Any]
    modules: dict[str, LoraModule]
    weight: float = 1.0
    saved: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # modules_to_save
    # base weights PEFT saved beside an embedding's LoRA (``save_embedding_layers``): the
    # model's own unless the vocabulary was resized, which the merge checks
    base_layers: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    format: str = "peft"  # "diffusers": one safetensors file (``edgec.lora.diffusers_lora``)
    ignored: dict[str, int] = dataclasses.field(default_factory=dict)  # component → tensors

    @property
    def rank(self) -> int:
        return max((m.rank for m in self.modules.values()), default=0)

    @property
    def dora(self) -> bool:
        return any(m.magnitude is not None for m in self.modules.values())

    @property
    def has_bias(self) -> bool:
        return any(m.bias is not None for m in self.modules.values())

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "path": str(self.path) if self.path else None,
                "weight": self.weight, "modules": len(self.modules), "max_rank": self.rank,
                "r": self.config.get("r"), "lora_alpha": self.config.get("lora_alpha"),
                "use_rslora": bool(self.config.get("use_rslora")), "dora": self.dora,
                "lora_bias": self.has_bias, "saved_parameters": sorted(self.saved),
                "format": self.format, **({"ignored": self.ignored} if self.ignored else {})}


def write_peft_adapter(adapter: LoraAdapter, path: Path) -> Path:
    """``adapter`` as a PEFT adapter directory (``adapter_config.json`` +
    ``adapter_model.safetensors`` in PEFT's key names) at ``path``: what an adapter read from
    another format becomes for PEFT and for a swappable artifact."""
    from safetensors.numpy import save_file

    tensors: dict[str, np.ndarray] = {}
    for mod, lm in adapter.modules.items():
        key = f"base_model.model.{mod}"
        A, B = lm.A, lm.B
        if lm.kernel:  # a Conv's: lora_A a Conv with the kernel, lora_B a 1×1 Conv
            A = A.reshape(A.shape[0], -1, *lm.kernel)
            B = B.reshape(*B.shape, *(1,) * len(lm.kernel))
        if lm.embedding:
            tensors[f"{key}.lora_embedding_A"], tensors[f"{key}.lora_embedding_B"] = A, B
        else:
            tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = A, B
        if lm.bias is not None:
            tensors[f"{key}.lora_B.bias"] = lm.bias
        if lm.magnitude is not None:
            tensors[f"{key}.lora_magnitude_vector"] = lm.magnitude
    for name, value in adapter.saved.items():
        tensors[f"base_model.model.{name}"] = value
    path.mkdir(parents=True, exist_ok=True)
    config = {**adapter.config, "peft_type": "LORA",
              "target_modules": sorted(adapter.modules) or adapter.config.get("target_modules")}
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2, default=list))
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()},
              str(path / WEIGHTS_FILE), metadata={"format": "pt"})
    return path


def _pattern_value(patterns: Mapping[str, Any], module: str, default):
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_adapter(path: str | Path, name: str | None = None, weight: float = 1.0) -> LoraAdapter:
    """Read and self-check one LoRA adapter: a PEFT adapter directory, or a diffusers-format
    weights file (or a directory holding ``pytorch_lora_weights.safetensors``)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    from edgec.lora.diffusers_lora import diffusers_lora_file, read_diffusers_lora

    root = Path(path)
    if root.name == WEIGHTS_FILE and (root.parent / CONFIG_FILE).is_file():
        root = root.parent  # a PEFT directory's weights file: its config holds the scales
    file = diffusers_lora_file(root)
    if file is not None:
        return read_diffusers_lora(file, name, weight)
    if root.is_file() and root.suffix in (".bin", ".pt", ".pth", ".ckpt"):
        raise UserError(f"{root}: a pickle, which edgec never loads; save the LoRA as "
                        "safetensors (PEFT save_pretrained, diffusers save_lora_weights)")
    if not root.is_dir():
        raise UserError(f"{root}: LoRA adapter not found; give a PEFT adapter directory "
                        f"(with {CONFIG_FILE} and {WEIGHTS_FILE}, from save_pretrained) or a "
                        "diffusers LoRA .safetensors file")
    if not (root / WEIGHTS_FILE).is_file():
        hint = (" (adapter_model.bin is a pickle, which edgec does not load: re-save with "
                "save_pretrained(dir, safe_serialization=True))"
                if (root / "adapter_model.bin").exists() else "")
        named = _named_adapters(root)
        where = (f"give {' or '.join(map(str, named))} (PEFT saves an adapter not named "
                 "'default' in a subdirectory of that name)" if named and not hint
                 else "give a PEFT adapter directory")
        raise UserError(f"{root}: no {WEIGHTS_FILE}{hint}; {where}")
    try:
        config = json.loads((root / CONFIG_FILE).read_text())
    except FileNotFoundError:
        raise UserError(f"{root}: no {CONFIG_FILE}; give a PEFT adapter directory") from None
    except ValueError as e:
        raise UserError(f"{root / CONFIG_FILE}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise UserError(f"{root / CONFIG_FILE}: not a LoraConfig (a JSON object with r, "
                        f"lora_alpha, target_modules, ...), but a JSON {type(config).__name__}")
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise UserError(f"{root}: peft_type {config.get('peft_type')!r} is not LoRA; edgec "
                        "merges LoRA adapters only")
    for key, (what, advice) in _UNSUPPORTED.items():
        if config.get(key):
            raise UserError(f"{root}: {what}: not supported yet; {advice}")
    if config.get("bias") not in (None, "none"):  # was refused as a resized vocabulary, or
        # "not a LoRA A/B weight": the base's biases trained too, saved beside the factors
        raise UserError(f"{root}: PEFT's bias={config['bias']!r} (the base's biases trained "
                        f"with the adapter) is not supported yet; {_IN_PEFT}")
    try:
        tensors = load_file(str(root / WEIGHTS_FILE))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{root / WEIGHTS_FILE}: unreadable safetensors ({e})") from None
    return adapter_from_tensors(tensors, config, name or dir_name(root), root, weight)


def _named_adapters(root: Path) -> list[Path]:
    """The PEFT adapters in ``root``'s subdirectories (``save_pretrained`` of an adapter with
    another name than "default" writes ``root/<name>/adapter_model.safetensors``)."""
    return sorted(d for d in root.iterdir() if (d / WEIGHTS_FILE).is_file())


def adapter_from_tensors(tensors: Mapping[str, np.ndarray], config: Mapping[str, Any],
                         name: str, path: Path | None = None, weight: float = 1.0) -> LoraAdapter:
    pairs: dict[str, dict[str, np.ndarray]] = {}
    saved: dict[str, np.ndarray] = {}
    base_layers: dict[str, np.ndarray] = {}
    to_save = list(config.get("modules_to_save") or [])
    for key, value in tensors.items():
        for prefix in _PREFIXES:
            key = key.removeprefix(prefix)
        module = key.rpartition(".")[0]
        # PEFT's rule is a plain suffix: "classifier" also saves DistilBERT's "pre_classifier"
        if "lora_" not in key and any(module.endswith(t) for t in to_save):
            saved[key] = np.asarray(value, dtype=np.float32)  # a module_to_save's parameter
            continue
        base = _BASE_LAYER.match(key)
        if base is not None:  # PEFT's save_embedding_layers: the base table beside its LoRA
            base_layers[f"{base['module']}.{base['param']}"] = np.asarray(value, np.float32)
            continue
        for pattern, role in _ROLES:
            m = pattern.match(key)
            if m is not None:
                entry = pairs.setdefault(m["module"], {})
                entry[role or m["role"]] = value
                if pattern is _EMBEDDING:
                    entry["E"] = True
                break
        else:
            raise UserError(f"{name}: adapter tensor {key!r} is not a LoRA A/B weight, lora_B "
                            "bias, DoRA magnitude, saved base layer or a parameter of its "
                            "modules_to_save")
    r0, alpha0 = (_number(config, key, 8, kind, name) for key, kind in (("r", int),
                                                                      ("lora_alpha", float)))
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    for key, table in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        if not isinstance(table, Mapping):
            raise UserError(f"{name}: {key} in {CONFIG_FILE} is not a table of module: value; "
                            "the adapter is inconsistent")
        for k in table:
            _number(table, k, None, int if key == "rank_pattern" else float, name, key)
    modules = {}
    dora, lora_bias = bool(config.get("use_dora")), bool(config.get("lora_bias"))
    if dora and lora_bias:
        raise UserError(f"{name}: use_dora and lora_bias together, which PEFT does not make "
                        "or merge; the adapter is inconsistent")
    targets = config.get("target_modules")
    stray = next((m for m in sorted(pairs) if not _targeted(m, targets)), None)
    if stray is not None:  # PEFT itself loads nothing there (its merge: NoMatchingPeftModule)
        raise UserError(f"{name}: module {stray} has LoRA weights but target_modules "
                        f"{targets!r} in {CONFIG_FILE} does not name it; the adapter is "
                        "inconsistent")
    for mod, ab in sorted(pairs.items()):
        if not {"A", "B"} <= set(ab):
            have = f"lora_{'A' if 'A' in ab else 'B'}" if "A" in ab or "B" in ab else \
                "the DoRA magnitude" if "M" in ab else "a lora_B bias"
            raise UserError(f"{name}: module {mod} has {have} but not lora_A and lora_B")
        for role, flag, missing, extra in (
                ("b", lora_bias, "has no lora_B bias, but the adapter sets lora_bias",
                 "has a lora_B bias, but lora_bias is not set"),
                ("M", dora, "has no lora_magnitude_vector, but the adapter is DoRA (use_dora=true)",
                 "has a DoRA lora_magnitude_vector, but use_dora is not set")):
            if (role in ab) != flag:
                raise UserError(f"{name}: module {mod} {missing if flag else extra} in "
                                f"{CONFIG_FILE}; the adapter is inconsistent")
        A, B = (np.asarray(ab[k], dtype=np.float32) for k in "AB")
        A, B, kernel = _conv_factors(A, B, name, mod)
        rank = int(_pattern_value(rank_pattern, mod, r0))
        alpha = float(_pattern_value(alpha_pattern, mod, alpha0))
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            raise UserError(f"{name}: module {mod} has lora_A {list(A.shape)} and lora_B "
                            f"{list(B.shape)}, which do not form a rank-r product")
        if A.shape[0] != rank:
            raise UserError(f"{name}: module {mod} has rank {A.shape[0]} in its weights but r="
                            f"{rank} in {CONFIG_FILE} (rank_pattern); the adapter is inconsistent")
        scaling = 0.0 if rank == 0 else alpha / (math.sqrt(rank) if config.get("use_rslora")
                                                  else rank)
        magnitude = _per_output(ab, "M", "DoRA magnitude", B, name, mod) if dora else None
        b = _per_output(ab, "b", "lora_B bias", B, name, mod) if lora_bias else None
        embedding = bool(ab.get("E"))
        if embedding and magnitude is not None:
            raise UserError(f"{name}: module {mod} is an embedding with DoRA, which is not "
                            "supported yet; use a plain LoRA adapter on embeddings")
        modules[mod] = LoraModule(mod, A, B, rank, alpha, scaling,
                                  embedding or bool(config.get("fan_in_fan_out")), magnitude, b,
                                  embedding, kernel)
    if not modules and not saved:
        raise UserError(f"{name}: the adapter holds no LoRA tensors (its weights file is "
                        "empty or has only saved base layers); give a trained adapter")
    return LoraAdapter(name, path, dict(config), modules, float(weight), saved, base_layers)


def _targeted(module: str, targets) -> bool:
    """PEFT's ``target_modules`` rule: a string is a regex the whole name matches, a list names
    modules by their last components; None or "all-linear" (PEFT resolves it) name any."""
    if targets is None or targets == "all-linear":
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith(f".{t}") for t in targets)


def _number(config: Mapping[str, Any], key: str, default, kind, name: str,
            where: str | None = None):
    """``config[key]`` as ``kind`` (``default`` when absent), refused in one line when it is
    not a finite number (a string "eight" was a ValueError: an internal error)."""
    value = config.get(key, default)
    try:
        number = kind(value) if not isinstance(value, (bool, str)) else None
    except (TypeError, ValueError, OverflowError):
        number = None
    if number is None or not math.isfinite(number):
        raise UserError(f"{name}: {where + '.' if where else ''}{key}={value!r} in "
                        f"{CONFIG_FILE} is not a number; the adapter is inconsistent")
    return number


def _conv_factors(A: np.ndarray, B: np.ndarray, name: str, mod: str
                  ) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """A Conv's lora_A [r, in, *kernel] and 1×1 lora_B [out, r, 1, ...] as the matrices
    [r, in·∏kernel] and [out, r], and the kernel; a Linear's as they are (kernel ())."""
    if A.ndim <= 2 and B.ndim <= 2:
        return A, B, ()
    if A.ndim != B.ndim or A.ndim < 3 or any(d != 1 for d in B.shape[2:]):
        raise UserError(f"{name}: module {mod} has lora_A {list(A.shape)} and lora_B "
                        f"{list(B.shape)}, which are not a Conv's LoRA (lora_A a Conv with the "
                        "base's kernel, lora_B a 1×1 Conv); the adapter is inconsistent")
    if B.shape[1] != A.shape[0]:
        raise UserError(f"{name}: module {mod} is a grouped Conv's LoRA (lora_A rank "
                        f"{A.shape[0]}, lora_B {B.shape[1]} per group), which PEFT cannot merge "
                        "and neither can edgec; leave that layer out of target_modules")
    return A.reshape(A.shape[0], -1), B.reshape(B.shape[0], B.shape[1]), tuple(A.shape[2:])


def _per_output(ab: Mapping[str, np.ndarray], key: str, what: str, B: np.ndarray, name: str,
                mod: str) -> np.ndarray:
    """A per-output-channel vector of the module (DoRA's magnitude, lora_B's bias), checked."""
    v = np.asarray(ab[key], dtype=np.float32).reshape(-1)
    if v.shape != (B.shape[0],):
        raise UserError(f"{name}: module {mod} has a {what} of {list(np.shape(ab[key]))} for "
                        f"{B.shape[0]} outputs; the adapter is inconsistent")
    return v


def parse_lora_option(option: Any) -> list[tuple[str, float]]:
    """``"dir"``, ``"dir:0.5"``, a list of those or of ``(dir, weight)``, or ``{dir: weight}``;
    a weight that is not a finite number is refused in one line."""
    if option is None:
        return []
    if isinstance(option, Mapping):
        return [(str(k), _weight(k, v)) for k, v in option.items()]
    items = [option] if isinstance(option, (str, Path)) else list(option)
    out = []
    for item in items:
        if isinstance(item, (tuple, list)) and len(item) == 2:
            out.append((str(item[0]), _weight(item[0], item[1])))
            continue
        if not isinstance(item, (str, Path)):
            raise UserError(f"lora={item!r}: give an adapter path, 'PATH:WEIGHT' or "
                            "(PATH, WEIGHT)")
        text = str(item)
        head, sep, tail = text.rpartition(":")
        if sep and head and not Path(text).exists():
            try:
                float(tail)
            except ValueError:
                if Path(head).exists():  # a real adapter with a weight that is no number
                    _weight(head, tail)
            else:
                out.append((head, _weight(head, tail)))
                continue
        out.append((text, 1.0))
    seen: dict[Path, str] = {}
    for path, _ in out:  # merged twice, the adapter was summed: a weight of 2, or a typo
        key = Path(os.path.realpath(path))
        if key in seen:
            what = (f"{path} is given twice" if path == seen[key] else
                    f"{path} and {seen[key]} are the same adapter")
            raise UserError(f"lora: {what}; give it once (with a weight: PATH:WEIGHT)")
        seen[key] = path
    return out


def _weight(path: Any, value: Any) -> float:
    """The run-time blend's rule (``edgec.lora.spec``), so both refuse the same weights."""
    try:
        return adapter_weight(value)
    except ValueError as e:
        raise UserError(f"--lora {path}: weight {value!r} {e}; give PATH:WEIGHT, e.g. "
                        "./adapter:0.7") from None


@dataclasses.dataclass
class Target:
    """Where one adapted module lands in the ONNX graph."""

    module: str
    parameter: str
    initializer: str
    layout: str  # "same" | "transposed": initializer vs the PyTorch parameter
    shape: tuple[int, ...]  # the initializer's shape
    bias: str | None = None  # the base layer's bias initializer, where the adapter adds to it
    # whether the PyTorch weight is [in, out] (a GPT-2 Conv1D): known from the model, not the
    # adapter's global ``fan_in_fan_out``, which PEFT sets per layer type as it loads
    fan_in_fan_out: bool = False

    def to_onnx_layout(self, delta_param: np.ndarray) -> np.ndarray:
        return delta_param.T if self.layout == "transposed" else delta_param


def resolve_targets(adapter: LoraAdapter, parameter_map: Mapping[str, Mapping[str, str]],
                    model) -> dict[str, Target]:
    """Map every adapted module to its base weight's initializer; refuse mismatches (one line)."""
    if not parameter_map:
        raise UserError("the model has no parameter map, so LoRA weights cannot be placed; "
                        "compile a reference model or nn.Module, or an .onnx from `edgec export`")
    inits = model.graph.initializers
    out = {}
    for mod, lm in adapter.modules.items():
        param = next((p for p in (f"{mod}.weight", f"{mod.removeprefix('model.')}.weight",
                                  f"{mod}.base_layer.weight") if p in parameter_map), None)
        if param is None and _folded_with_batchnorm(model, mod):
            raise UserError(f"adapter {adapter.name}: module {mod}'s weight was folded with the "
                            "BatchNorm after it by the export, so the LoRA cannot be merged "
                            "into it; merge the adapter in PEFT (merge_and_unload) and compile "
                            "the merged model")
        if param is None:
            raise UserError(f"adapter {adapter.name}: target module {mod} is not in the model "
                            "(no such weight in its parameter map); was it trained on this base?")
        entry = parameter_map[param]
        value = inits.get(entry["initializer"])
        if value is None or value.const_value is None:
            raise UserError(f"adapter {adapter.name}: the weight of module {mod} is no longer an "
                            "initializer in the graph; apply LoRA before passes that fold it")
        shape = tuple(value.const_value.shape)
        param_shape = shape[::-1] if entry["layout"] == "transposed" else shape
        fan = _fan_in_fan_out(adapter, lm, param_shape, value, entry["layout"])
        if param_shape != dataclasses.replace(lm, fan_in_fan_out=fan).weight_shape:
            what = "(out, in, *kernel)" if lm.kernel else "(in, out)" if lm.embedding \
                else "(out, in) or (in, out)"
            want = lm.weight_shape if lm.kernel or lm.embedding else lm.weight_shape[::-1] \
                if lm.fan_in_fan_out else lm.weight_shape
            raise UserError(
                f"adapter {adapter.name}: module {mod} expects a {list(want)} weight "
                f"{what} but the model's is {list(param_shape)}; the adapter was trained on a "
                "different base model")
        bias = None
        if lm.bias is not None:
            bias = _bias_initializer(adapter, mod, param, parameter_map, inits)
        out[mod] = Target(mod, param, entry["initializer"], entry["layout"], shape, bias, fan)
    return out


# node metadata the exporter's optimizer (onnxscript's rewriter) leaves on the Conv it made
_REWRITE_RULE = "pkg.onnxscript.rewriter.rule_name"


def _folded_with_batchnorm(model, mod: str) -> bool:
    """Whether ``mod``'s weight went into a Conv the export fused with the BatchNorm after it:
    the initializer keeps the module's name but holds W·γ/√(σ²+ε), so the parameter map (built
    from equal values) has no entry for it."""
    for name in (f"{mod}.weight", f"{mod.removeprefix('model.')}.weight"):
        value = model.graph.initializers.get(name)
        if value is not None and any("BatchNorm" in u.node.metadata_props.get(_REWRITE_RULE, "")
                                     for u in value.uses()):
            return True
    return False


def _fan_in_fan_out(adapter: LoraAdapter, lm: LoraModule, param_shape: tuple[int, ...], value,
                    layout: str) -> bool:
    """Whether module ``lm``'s PyTorch weight is [in, out]: from its shape, or for a square one
    from how the graph's MatMul/Gemm read its initializer. PEFT decides this per layer type
    (True for a GPT-2 Conv1D, False for an nn.Linear) and saves whichever the last layer set,
    so the adapter's ``fan_in_fan_out`` is no guide for a mix (GPT-2's c_proj with lm_head)."""
    if lm.kernel or lm.embedding:
        return lm.fan_in_fan_out
    out_in = (lm.B.shape[0], lm.in_features)
    if out_in[0] != out_in[1] or param_shape != out_in:
        return param_shape == out_in[::-1]  # or neither: the caller refuses the shape
    in_out = _reads_in_out(value)
    if in_out is None:
        raise UserError(f"adapter {adapter.name}: module {lm.name}'s weight is square and no "
                        "MatMul or Gemm of the graph reads it, so whether it is [out, in] or "
                        "[in, out] (fan_in_fan_out) cannot be told; merge the adapter in PEFT "
                        "(merge_and_unload) and compile the merged model")
    return in_out == (layout == "same")


def _reads_in_out(value) -> bool | None:
    """Whether the MatMul/Gemm nodes reading initializer ``value`` as their weight (directly or
    through one Transpose) read it as [in, out]; None where none does or they disagree."""
    votes: set[bool] = set()

    def visit(v, flipped: bool) -> None:
        for use in v.uses():
            node = use.node
            if node.op_type == "MatMul" and use.idx == 1:
                votes.add(not flipped)
            elif node.op_type == "Gemm" and use.idx == 1:
                trans = node.attributes.get("transB")
                votes.add((trans is None or trans.value == 0) != flipped)
            elif node.op_type == "Transpose" and not flipped and len(node.outputs) == 1:
                visit(node.outputs[0], True)

    visit(value, False)
    return votes.pop() if len(votes) == 1 else None


def resolve_saved(adapter: LoraAdapter, parameter_map: Mapping[str, Mapping[str, str]],
                  model) -> dict[str, Target]:
    """Each ``modules_to_save`` parameter the adapter carries → the initializer it replaces;
    refuse a parameter the model does not have or of another shape (one line), and a saved
    base layer that is not the model's own (a resized vocabulary)."""
    inits = model.graph.initializers
    out = {}
    for key, value in adapter.base_layers.items():
        target = _saved_target(adapter, key, value, parameter_map, inits)
        own = target.to_onnx_layout(inits[target.initializer].const_value.numpy())
        if not np.allclose(own, value, rtol=1e-5, atol=1e-6):
            raise UserError(f"adapter {adapter.name}: its saved base {key} differs from the "
                            "model's (a resized vocabulary?), which is not supported yet; "
                            "merge on the base it was trained on")
    for key, value in adapter.saved.items():
        out[key] = _saved_target(adapter, key, value, parameter_map, inits)
    return out


def _mapped(param: str | None, parameter_map: Mapping[str, Mapping[str, str]], inits):
    """(``param``'s parameter-map entry, its initializer holding a value), None for either
    that is not there."""
    entry = parameter_map.get(param) if param else None
    value = inits.get(entry["initializer"]) if entry else None
    return entry, value if value is not None and value.const_value is not None else None


def _saved_target(adapter: LoraAdapter, key: str, value: np.ndarray,
                  parameter_map: Mapping[str, Mapping[str, str]], inits) -> Target:
    """The initializer a saved parameter (``key``) of ``adapter`` stands for, checked."""
    param = next((p for p in (key, key.removeprefix("model.")) if p in parameter_map), None)
    entry, init = _mapped(param, parameter_map, inits)
    if init is None:
        raise UserError(f"adapter {adapter.name}: its saved module parameter {key} "
                        "is not a weight of the exported model (not this "
                        "base, or a parameter the export folded away, such as an all-zero "
                        "bias)")
    shape = tuple(init.const_value.shape)
    want = shape[::-1] if entry["layout"] == "transposed" else shape
    if tuple(value.shape) != want:
        raise UserError(f"adapter {adapter.name}: its saved {key} is {list(value.shape)}, the "
                        f"model's {list(want)}; the adapter was trained on a different base "
                        "(or head size)")
    return Target(key, param, entry["initializer"], entry["layout"], shape)


def _bias_initializer(adapter: LoraAdapter, mod: str, weight_param: str,
                      parameter_map: Mapping[str, Mapping[str, str]], inits) -> str:
    """The initializer of the base layer's bias, which a ``lora_bias`` adapter adds to."""
    entry, value = _mapped(weight_param.removesuffix("weight") + "bias", parameter_map, inits)
    if value is None:
        raise UserError(f"adapter {adapter.name}: module {mod} has a lora_B bias (lora_bias), but "
                        "the exported graph has no bias to merge it into: the layer has none "
                        "(PEFT refuses this merge too), or its bias is all zeros and the "
                        "export folded it away (not supported yet)")
    n = adapter.modules[mod].bias.shape[0]
    if tuple(value.const_value.shape) != (n,):
        raise UserError(f"adapter {adapter.name}: module {mod}'s bias is "
                        f"{list(value.const_value.shape)}, its lora_B bias [{n}]; the adapter "
                        "was trained on a different base model")
    return entry["initializer"]
