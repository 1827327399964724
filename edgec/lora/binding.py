"""Swappable adapters at run time: PEFT adapter → the feeds of a swappable graph's LoRA inputs.

Per site (see ``graph_passes.lora.swappable``): ``A_in = M_a·Aᵀ`` [in, r], ``B_in = w·s·Bᵀ·M_b``
[r, out], zero-padded to the site's compiled rank so shapes stay stable; modules the adapter does
not adapt (and the reserved adapter ``base``) get zeros, which is exactly the base model. M_a / M_b
(``a_transform`` / ``b_transform``) are products of factors in ``adapters/transforms.safetensors``
(``edgec.lora.transforms``), made by a rotation pass (``graph_passes.rotation.lora_transforms``)
and written by ``ship_transforms``, or none.

Artifact layout (swappable mode): ``adapters/<name>/adapter_config.json`` and
``adapters/<name>/adapter_model.safetensors`` (the PEFT files as given), listed in the manifest's
``lora.adapters`` with ``lora.default`` (the adapter ``run`` uses when none is named).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgec.artifact import contained_path
from edgec.errors import UserError
from edgec.lora.peft_adapter import (
    CONFIG_FILE,
    NO_ADAPTER,
    WEIGHTS_FILE,
    LoraAdapter,
    read_adapter,
    write_peft_adapter,
)
from edgec.lora.spec import blend_spec, check_names
from edgec.lora.transforms import (
    Factor,
    apply_left,
    apply_right,
    factor_names,
    load_factors,
    save_factors,
)

__all__ = ["AdapterBank", "site_feeds", "blend_spec", "ship_adapters", "ship_transforms",
           "lora_sites", "unswappable", "adapter_inputs", "adapter_bindings", "TRANSFORMS_FILE",
           "SITES_KEY"]

logger = logging.getLogger(__name__)
# the advice in "no adapter named ..." errors; the CLI swaps in its own (--adapter ./DIR)
LOAD_HINT = "load one with Session.load_adapter(dir)"

TRANSFORMS_FILE = "adapters/transforms.safetensors"
SITES_KEY = "edgec.lora.sites"  # model metadata: the swappable sites (graph_passes.lora.swappable)


def lora_sites(model) -> list[dict]:
    """The swappable-LoRA sites recorded in an onnx_ir.Model's metadata (none: ``[]``)."""
    raw = model.metadata_props.get(SITES_KEY)
    return json.loads(raw) if raw else []


def adapter_inputs(model) -> set[str]:
    """Names of the graph inputs that carry adapter weights (bound by the session, not users)."""
    return {n for s in lora_sites(model) for n in (s["a_input"], s["b_input"])}


def site_feeds(sites: Sequence[Mapping[str, Any]], adapter: LoraAdapter | None,
               transforms: Mapping[str, Factor] | None = None) -> dict[str, np.ndarray]:
    """The A/B inputs of every site for ``adapter`` (None: the base model); ``transforms``: the
    factors the sites name (``edgec.lora.transforms``)."""
    transforms = transforms or {}
    by_module = {s["module"]: s for s in sites}
    if adapter is not None:
        unswappable(adapter)
        unknown = sorted(set(adapter.modules) - set(by_module))
        if unknown:
            raise UserError(f"adapter {adapter.name}: target module {unknown[0]} has no LoRA "
                            f"branch in this artifact (its branches: {_modules(by_module)}); an "
                            "adapter on other modules of this base needs a recompile with it "
                            "among --lora, one trained on another base cannot run here")
    feeds = {}
    for s in sites:
        in_f, out_f, rank = s["in_features"], s["out_features"], max(1, s["rank"])
        lm = adapter.modules.get(s["module"]) if adapter is not None else None
        kernel = tuple(s.get("kernel") or ())
        if kernel or (lm is not None and lm.kernel):
            feeds.update(_conv_feeds(s, kernel, lm, adapter))
            continue
        if lm is None or lm.rank == 0 or adapter.weight == 0.0:
            a, b = np.zeros((in_f, rank), np.float32), np.zeros((rank, out_f), np.float32)
        else:
            if lm.A.shape[1] != in_f or lm.B.shape[0] != out_f:
                raise UserError(f"adapter {adapter.name}: module {s['module']} is "
                                f"[{lm.B.shape[0]}, {lm.A.shape[1]}] (out, in), the model's is "
                                f"[{out_f}, {in_f}]; it was trained on a different base model")
            a = lm.A.T.astype(np.float64)
            b = lm.B.T.astype(np.float64) * (lm.scaling * adapter.weight)
            a = apply_left([transforms[n] for n in factor_names(s.get("a_transform"))], a)
            b = apply_right(b, [transforms[n] for n in factor_names(s.get("b_transform"))])
            if lm.rank < rank:  # pad to the compiled rank: same shapes for every adapter
                a = np.pad(a, ((0, 0), (0, rank - lm.rank)))
                b = np.pad(b, ((0, rank - lm.rank), (0, 0)))
        feeds[s["a_input"]] = np.ascontiguousarray(a, dtype=np.float32)
        feeds[s["b_input"]] = np.ascontiguousarray(b, dtype=np.float32)
    return feeds


def adapter_bindings(sites: Sequence[Mapping[str, Any]], adapters: Sequence[LoraAdapter],
                     transforms: Mapping[str, Factor] | None = None
                     ) -> list[tuple[str, dict[str, np.ndarray]]]:
    """(name, feeds) of each adapter a swappable artifact ships (the default first), then the
    base: what quantization calibrates and holds its accuracy floor on. Calibrated on the base
    alone, activation ranges clipped what an adapter adds downstream of its branch (llama tiny
    with a q/v adapter: cosine 0.50 vs PEFT's merge, the base 0.9997); none without sites."""
    if not sites:
        return []
    return [(a.name, site_feeds(sites, a, transforms)) for a in adapters] + [
        (NO_ADAPTER, site_feeds(sites, None))]


def _modules(by_module: Mapping[str, Any]) -> str:
    """The branched module kinds and their counts, e.g. ``q_proj ×2, v_proj ×2``."""
    kinds: dict[str, int] = {}
    for m in by_module:
        kinds[m.rpartition(".")[2]] = kinds.get(m.rpartition(".")[2], 0) + 1
    return ", ".join(f"{k} ×{n}" if n > 1 else k for k, n in kinds.items()) or "none"


def _conv_feeds(site: Mapping[str, Any], kernel: tuple[int, ...], lm, adapter
                ) -> dict[str, np.ndarray]:
    """A Conv site's A [r, in, *kernel] and B = w·s·B [out, r, 1, ...], padded to the compiled
    rank (zeros: the base)."""
    in_f, out_f, rank = site["in_features"], site["out_features"], max(1, site["rank"])
    a = np.zeros((rank, in_f, *kernel), np.float32)
    b = np.zeros((out_f, rank, *(1,) * len(kernel)), np.float32)
    if lm is not None and lm.rank and adapter.weight != 0.0:
        if lm.rank > rank:
            raise UserError(f"adapter {adapter.name}: module {site['module']} has rank "
                            f"{lm.rank}, over the rank {rank} its Conv branch was compiled at "
                            "(a Conv branch's rank is fixed); recompile with this adapter among "
                            "--lora")
        if lm.weight_shape != (out_f, in_f, *kernel):
            raise UserError(f"adapter {adapter.name}: module {site['module']} is "
                            f"{list(lm.weight_shape)} (out, in, *kernel), the model's Conv is "
                            f"{[out_f, in_f, *kernel]}; it was trained on a different base model")
        a[:lm.rank] = lm.A.reshape(lm.rank, in_f, *kernel)
        b[:, :lm.rank] = (lm.B * np.float32(lm.scaling * adapter.weight)).reshape(
            out_f, lm.rank, *(1,) * len(kernel))
    return {site["a_input"]: a, site["b_input"]: b}


def unswappable(adapter: LoraAdapter) -> None:
    """Refuse what a branch x·A·B added to the base cannot compute: a DoRA adapter (it rescales
    the merged weight per output channel by m / ‖W + ΔW‖), an embedding or a lora_B bias."""
    if adapter.dora:
        raise UserError(f"adapter {adapter.name} is DoRA: its magnitude rescales the merged "
                        "weight, which a swappable branch cannot carry; use --lora-mode merge")
    embedding = next((m for m, lm in adapter.modules.items() if lm.embedding), None)
    if embedding is not None:
        raise UserError(f"adapter {adapter.name} adapts the embedding {embedding}, a table "
                        "lookup that a swappable branch x·A·B does not express; use "
                        "--lora-mode merge")
    if adapter.saved:
        raise UserError(f"adapter {adapter.name} replaces whole modules (modules_to_save: "
                        f"{sorted(adapter.saved)[0]}...), which a swappable branch x·A·B does not "
                        "carry; use --lora-mode merge")
    if adapter.has_bias:
        raise UserError(f"adapter {adapter.name} has lora_B biases (lora_bias), which a "
                        "swappable branch x·A·B does not carry; use --lora-mode merge")


def blended(parts: Sequence[tuple[LoraAdapter, float]]) -> LoraAdapter:
    """One adapter computing Σ wᵢ·(adapter i's delta) on the union of their modules: per module,
    A = [A₁; A₂; ...] and B = [w₁s₁B₁, w₂s₂B₂, ...] (rank Σ rᵢ, scaling 1)."""
    by_module: dict[str, list] = {}
    for adapter, w in parts:
        unswappable(adapter)
        for mod, lm in adapter.modules.items():
            if lm.rank and w * adapter.weight:
                by_module.setdefault(mod, []).append((lm, w * adapter.weight))
    modules = {}
    for mod, terms in by_module.items():
        first = terms[0][0]
        if any(lm.kernel != first.kernel or lm.A.shape[1] != first.A.shape[1]
               or lm.B.shape[0] != first.B.shape[0] for lm, _ in terms):
            raise UserError(f"adapters blended on module {mod} disagree on its shape; they were "
                            "trained on different base models")
        A = np.concatenate([lm.A for lm, _ in terms], axis=0)
        with np.errstate(over="ignore"):  # a weight float32 holds can still overflow B·w·s
            B = np.concatenate([lm.B * np.float32(lm.scaling * w) for lm, w in terms], axis=1)
        if not np.isfinite(B).all():
            raise UserError(f"adapter blend {_weights(parts)}: module {mod}'s weighted lora_B "
                            "overflows float32; give smaller weights")
        modules[mod] = dataclasses.replace(first, A=A, B=B, rank=A.shape[0],
                                           alpha=float(A.shape[0]), scaling=1.0)
    name = _weights(parts) or NO_ADAPTER
    return LoraAdapter(name, None, {"r": max((m.rank for m in modules.values()), default=0)},
                       modules)


def _weights(parts: Sequence[tuple[LoraAdapter, float]]) -> str:
    return "+".join(f"{a.name}:{w:g}" for a, w in parts)


def ship_adapters(adapters: Sequence[LoraAdapter], stage: Path) -> dict[str, str]:
    """Copy the PEFT files into ``stage/adapters/<name>/``; returns name → relative dir."""
    check_names(a.name for a in adapters)  # the recipe checked them before the export
    out = {}
    for a in adapters:
        rel = f"adapters/{a.name}"
        if a.format != "peft":  # a diffusers file: shipped as the PEFT directory it reads as
            write_peft_adapter(a, stage / rel)
            out[a.name] = rel
            continue
        (stage / rel).mkdir(parents=True)
        for f in (CONFIG_FILE, WEIGHTS_FILE):
            shutil.copyfile(a.path / f, stage / rel / f)
        out[a.name] = rel
    return out


def ship_transforms(sites: Sequence[Mapping[str, Any]], transforms: Mapping[str, Factor],
                    stage: Path) -> str | None:
    """Write the factors the sites name (a rotation's M_a / M_b) to ``stage/TRANSFORMS_FILE``
    (float32 safetensors, ``edgec.lora.transforms``); returns its relative path, None if none."""
    names = {n for s in sites for k in ("a_transform", "b_transform")
             for n in factor_names(s.get(k))}
    missing = sorted(names - set(transforms))
    if missing:
        raise UserError(f"LoRA site transform {missing[0]!r} is named in the model but no pass "
                        "produced it; this is an edgec bug, please report it")
    if not names:
        return None
    (stage / TRANSFORMS_FILE).parent.mkdir(parents=True, exist_ok=True)
    save_factors({n: transforms[n] for n in sorted(names)}, stage / TRANSFORMS_FILE)
    return TRANSFORMS_FILE


class AdapterBank:
    """The adapters a session can switch between, each kept as ready-made feeds."""

    def __init__(self, spec: Mapping[str, Any], root: Path):
        self.sites = list(spec["sites"])
        self.input_names = {n for s in self.sites for n in (s["a_input"], s["b_input"])}
        self.transforms = {}
        if (root / TRANSFORMS_FILE).is_file():
            self.transforms = load_factors(root / TRANSFORMS_FILE)
        self._feeds = {NO_ADAPTER: site_feeds(self.sites, None)}
        self._adapters: dict[str, LoraAdapter] = {}
        self._blends: dict[tuple, dict[str, np.ndarray]] = {}  # the last few blends' feeds
        for name, rel in (spec.get("adapters") or {}).items():
            self._add(read_adapter(contained_path(root, rel, f"lora.adapters.{name}"), name))
        self.active: str | dict[str, float] = spec.get("default") or NO_ADAPTER

    @property
    def names(self) -> list[str]:
        return list(self._feeds)

    def _add(self, adapter: LoraAdapter) -> None:
        self._feeds[adapter.name] = site_feeds(self.sites, adapter, self.transforms)
        self._adapters[adapter.name] = adapter
        self._blends.clear()

    def load(self, path: str | Path, name: str | None = None) -> str:
        adapter = read_adapter(path, name)
        # "base" would silently run this adapter instead; "a:2" would be read as a blend
        check_names([adapter.name], "rename its directory or give load_adapter(path, name=...)")
        if adapter.name in self._adapters:
            logger.warning("adapter %r replaced by %s", adapter.name, path)
        self._add(adapter)
        return adapter.name

    def feeds(self, spec: str | Mapping[str, float] | None) -> dict[str, np.ndarray]:
        """The inputs for one adapter by name, or a weighted blend of loaded ones
        (``{"style": 0.7, "subject": 0.5}`` or ``"style:0.7,subject:0.5"``)."""
        spec = blend_spec(self.active if spec is None else spec)
        if isinstance(spec, dict):
            return self._blend(spec)
        if spec not in self._feeds:
            raise UserError(f"no adapter named {spec!r}; loaded: {', '.join(self._feeds)} "
                            f"({LOAD_HINT})")
        return self._feeds[spec]

    def _blend(self, weights: dict[str, float]) -> dict[str, np.ndarray]:
        """Σ wᵢ·sᵢ·BᵢAᵢ at every site as one adapter of rank Σ rᵢ (A stacked, B weighted and
        stacked): exactly PEFT's weighted merge, and the rotation factors apply to it as to each
        (they are linear)."""
        key = tuple(sorted(weights.items()))
        if key not in self._blends:
            unknown = [n for n in weights if n not in self._feeds]
            if unknown:
                raise UserError(f"no adapter named {unknown[0]!r} to blend; loaded: "
                                f"{', '.join(self._feeds)} ({LOAD_HINT})")
            parts = [(self._adapters[n], w) for n, w in weights.items() if n != NO_ADAPTER]
            if len(self._blends) >= 4:
                self._blends.pop(next(iter(self._blends)))
            self._blends[key] = site_feeds(self.sites, blended(parts), self.transforms)
        return self._blends[key]
