"""LoRA merge: PEFT adapters folded into the base weights they adapt.

    W ← W + Σᵢ wᵢ·sᵢ·(Bᵢ·Aᵢ)                    (merge; PEFT ``merge_and_unload`` semantics)
    W ← W + Σᵢ wᵢ·sᵢ·(Bᵢ·Aᵢ) ⊙ 1[W ≠ 0]         (sparse-merge, LoSA: the base's zeros stay zero)
    W ← m / ‖W + s·B·A‖ · (W + s·B·A)          (a DoRA adapter, per output channel; alone on its
                                                module, at weight 1, merge mode only)
    b ← b + Σᵢ wᵢ·sᵢ·bᵢ                          (``lora_bias``: lora_B's bias into the layer's)
    W ← W_saved                                  (``modules_to_save``: a task head trained whole)

The delta is computed in the PyTorch parameter's layout and transposed to the initializer's
(the exporter stores a Linear's W as Wᵀ [in, out] for MatMul). Weights are found through the
exporter's parameter map; mismatched adapters are refused before anything changes. The merged
model computes base+adapter, not the base, so the pass is not ``exact``: ``--check`` reports the
change, and tests hold it to PEFT's own merged model (≤ 1e-4).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from edgec.errors import UserError
from edgec.graph_passes._infra import EdgecPass, PassResult, fresh_name
from edgec.lora.peft_adapter import LoraAdapter, resolve_saved, resolve_targets

__all__ = ["LoraMergePass"]

logger = logging.getLogger(__name__)


class LoraMergePass(EdgecPass):
    name = "lora-merge"
    exact = False  # base → base + adapter: checked against PEFT's merge in tests, not vs the base

    def __init__(self, adapters: Sequence[LoraAdapter],
                 parameter_map: Mapping[str, Mapping[str, str]], sparse: bool = False):
        super().__init__()
        self.adapters = list(adapters)
        self.parameter_map = parameter_map
        self.sparse = sparse
        if sparse:
            self.name = "lora-sparse-merge"

    def call(self, model: ir.Model) -> PassResult:
        deltas: dict[str, np.ndarray] = {}
        modules: dict[str, list[str]] = {}
        dora: dict[str, tuple] = {}  # initializer → (module, its Target): merged, not added
        merged_modules = 0
        bias_deltas: dict[str, np.ndarray] = {}  # bias initializer → what lora_bias adds
        for adapter in self.adapters:  # validate everything before touching any weight
            for mod, target in resolve_targets(adapter, self.parameter_map, model).items():
                # the layout the model's weight has, whatever the adapter's fan_in_fan_out says
                lm = dataclasses.replace(adapter.modules[mod],
                                         fan_in_fan_out=target.fan_in_fan_out)
                if lm.rank == 0 or adapter.weight == 0.0:
                    continue
                modules.setdefault(target.initializer, []).append(mod)
                merged_modules += 1
                if target.bias is not None:
                    modules.setdefault(target.bias, []).append(mod)
                    bias_deltas[target.bias] = bias_deltas.get(target.bias, 0) + \
                        lm.bias_delta() * np.float32(adapter.weight)
                if lm.magnitude is not None:
                    _check_dora(adapter, mod, self.sparse)
                    dora[target.initializer] = (lm, target)
                    continue
                d = lm.delta() * np.float32(adapter.weight)  # the PyTorch parameter's layout
                deltas[target.initializer] = deltas.get(target.initializer, 0) + \
                    target.to_onnx_layout(d)
                for init, layout in _tied_copies(target, self.parameter_map):
                    deltas[init] = deltas.get(init, 0) + (d.T if layout == "transposed" else d)
                    modules.setdefault(init, []).append(mod)
        replaced, splits = self._replacements(model, modules)
        for init_name, (lm, _) in dora.items():
            if len(modules[init_name]) > 1:
                raise UserError(f"module {lm.name} is adapted by a DoRA adapter and another one; "
                                "DoRA renormalizes the merged weight, so it merges alone: "
                                "drop the other adapter on that module")
        _refuse_shared(modules, self.parameter_map)
        for init_name, (lm, target) in dora.items():  # the delta the DoRA merge makes
            w = model.graph.initializers[init_name].const_value.numpy()
            param = target.to_onnx_layout(w)  # the layout flip is its own inverse
            deltas[init_name] = target.to_onnx_layout(lm.dora_merged(param)) - w

        zeros_before = zeros_after = total = masked = 0
        max_delta = 0.0
        for init_name, delta in deltas.items():
            value = model.graph.initializers[init_name]
            w = value.const_value.numpy()
            if self.sparse:  # what the mask drops: PEFT's merge keeps it (the reference's)
                masked += int(np.count_nonzero(delta[w == 0]))
                delta = np.where(w != 0, delta, np.float32(0))
            merged = w + delta.astype(w.dtype)
            zeros_before += w.size - int(np.count_nonzero(w))
            zeros_after += merged.size - int(np.count_nonzero(merged))
            total += w.size
            max_delta = max(max_delta, float(np.abs(delta).max()))
            value.const_value = ir.tensor(merged, name=init_name)
        for init_name, (shared, readers) in splits.items():  # a tied parameter untied
            _split(model, shared, init_name, readers)
        for init_name, new in replaced.items():
            model.graph.initializers[init_name].const_value = ir.tensor(new, name=init_name)
        for init_name, delta in bias_deltas.items():  # biases are not pruned: added whole
            value = model.graph.initializers[init_name]
            b = value.const_value.numpy()
            value.const_value = ir.tensor(b + delta.astype(b.dtype), name=init_name)
        kinds = Counter(m.rsplit(".", 1)[-1] for a in self.adapters for m in a.modules
                        if a.modules[m].rank and a.weight)
        stats = {
            "adapters": [a.summary() for a in self.adapters],
            "mode": "sparse-merge" if self.sparse else "merge",
            "modules_merged": merged_modules,
            "dora_modules": len(dora),
            "biases_changed": len(bias_deltas),
            "parameters_replaced": len(replaced),
            "weights_changed": len(deltas),
            "by_module_kind": dict(sorted(kinds.items())),
            "skipped": {"zero rank or weight": sum(
                1 for a in self.adapters for m in a.modules.values()
                if m.rank == 0 or a.weight == 0.0)},
            "merged_elements": total,
            "sparsity_before": zeros_before / total if total else 0.0,
            "sparsity_after": zeros_after / total if total else 0.0,
            "zeros_before": zeros_before,
            "zeros_after": zeros_after,
            "zeros_destroyed": max(0, zeros_before - zeros_after),
            "max_abs_delta": max_delta,
        }
        if self.sparse:
            stats["delta_masked"] = masked
            if total and not zeros_before:
                stats["warning"] = (
                    "sparse-merge: the adapted weights have no zeros, so LoSA's mask keeps "
                    "every entry and this is a plain merge; prune the base first (--prune 2:4 "
                    "or magnitude:0.5) or use --lora-mode merge")
                logger.warning("%s", stats["warning"])
        return PassResult(model, bool(deltas or bias_deltas or replaced), stats)

    def _replacements(self, model: ir.Model, modules: dict[str, list[str]]
                      ) -> tuple[dict[str, np.ndarray], dict[str, tuple[str, list]]]:
        """The ``modules_to_save`` parameters, initializer → the saved value in its layout;
        ``modules`` gains them (for the shared-initializer check). A parameter whose
        initializer also holds one PyTorch ties to it gets an initializer of its own (the
        second table: new name → (shared initializer, the readers that move to it))."""
        out: dict[str, np.ndarray] = {}
        splits: dict[str, tuple[str, list]] = {}
        for adapter in self.adapters:
            for key, target in resolve_saved(adapter, self.parameter_map, model).items():
                if adapter.weight != 1.0:
                    raise UserError(f"adapter {adapter.name} replaces {key} (modules_to_save), "
                                    "which a weight cannot scale; give it without "
                                    f":{adapter.weight:g}")
                if target.initializer in modules:
                    raise UserError(f"{key} is replaced by adapter {adapter.name} "
                                    "(modules_to_save) and also adapted or replaced by "
                                    f"{modules[target.initializer][0]}; merge one of them")
                init = target.initializer
                readers = _untied_readers(model, adapter, key, target, self.parameter_map)
                if readers:
                    init = fresh_name(model.graph, f"{target.parameter}.saved")
                    splits[init] = (target.initializer, readers)
                modules[init] = [key.rpartition(".")[0]]
                out[init] = target.to_onnx_layout(adapter.saved[key])
        return out, splits


def _check_dora(adapter: LoraAdapter, module: str, sparse: bool) -> None:
    if adapter.weight != 1.0:
        raise UserError(f"adapter {adapter.name} is DoRA (module {module}): its magnitude "
                        "renormalizes the merged weight, so it cannot be scaled by a weight; "
                        f"give it without :{adapter.weight:g}")
    if sparse:
        raise UserError(f"adapter {adapter.name} is DoRA (module {module}): sparse-merge masks a "
                        "plain LoRA delta, and DoRA's magnitude renormalizes the dense merged "
                        "weight; use --lora-mode merge")


def _tied_copies(target, parameter_map) -> list[tuple[str, str]]:
    """(initializer, layout) of the parameters PyTorch ties to ``target``'s that the export
    stores apart (a small LM head's transposed copy of its embedding table): one parameter in
    PyTorch, so the merge changes each copy."""
    tied = parameter_map.get(target.parameter, {}).get("tied", ())
    return list(dict.fromkeys((parameter_map[t]["initializer"], parameter_map[t]["layout"])
                              for t in tied if t in parameter_map
                              and parameter_map[t]["initializer"] != target.initializer))


def _untied_readers(model: ir.Model, adapter: LoraAdapter, key: str, target,
                    parameter_map) -> list[tuple[ir.Node, int]]:
    """The readers (node, input) of ``target``'s initializer that are saved parameter ``key``'s,
    where that initializer also holds a parameter PyTorch ties to it (an embedding table and its
    LM head as one); [] where it holds none. PEFT's ``modules_to_save`` unties them (its copy
    replaces that module alone: the tied embedding or head keeps the base's weight), so only
    these readers may see the saved value: the table's lookups (Gather) are the embedding's,
    the rest the head's."""
    tied = [t for t in parameter_map.get(target.parameter, {}).get("tied", ())
            if parameter_map.get(t, {}).get("initializer") == target.initializer]
    if not tied:
        return []
    uses = list(model.graph.initializers[target.initializer].uses())
    lookups = [(u.node, u.idx) for u in uses if u.node.op_type == "Gather" and u.idx == 0]
    rest = [(u.node, u.idx) for u in uses if (u.node, u.idx) not in lookups]
    module = target.parameter.rpartition(".")[0].rpartition(".")[2]
    role = ("head" if re.search(r"head|^embed_out$|^output$", module) else
            "lookup" if re.search(r"emb|^wte$|^shared$", module) else None)
    if role is None or not lookups or not rest:
        raise UserError(f"adapter {adapter.name} replaces {key} (modules_to_save), which PEFT "
                        f"unties from {tied[0]}, but the exported graph stores both in one "
                        "weight whose readers cannot be told apart; merge the adapter in PEFT "
                        "(merge_and_unload) and compile the merged model")
    return lookups if role == "lookup" else rest


def _split(model: ir.Model, shared: str, name: str, readers: list[tuple[ir.Node, int]]) -> None:
    """A new initializer ``name`` (for now a copy of ``shared``) read by ``readers`` instead."""
    old = model.graph.initializers[shared]
    new = ir.Value(name=name, const_value=ir.tensor(old.const_value.numpy(), name=name),
                   shape=old.shape, type=old.type)
    model.graph.register_initializer(new)
    for node, idx in readers:
        node.replace_input_with(idx, new)


def _refuse_shared(modules: Mapping[str, list[str]], parameter_map) -> None:
    """A deduplicated initializer holds several parameters: merging one would change the others.
    Parameters PyTorch ties (``tied`` in the map: an embedding and its LM head) are one
    parameter there too, and PEFT's merge changes both: those merge."""
    holders: dict[str, list[str]] = {}
    for param, entry in parameter_map.items():
        holders.setdefault(entry["initializer"], []).append(param)
    for init_name, mods in modules.items():
        def ours(param: str, mods=mods) -> bool:
            return any(param.startswith(m + ".") for m in mods)

        others = [p for p in holders.get(init_name, []) if not ours(p)
                  and not any(ours(t) for t in parameter_map[p].get("tied", ()))]
        if others:
            raise UserError(f"module {mods[0]}: its weight is stored in one initializer with "
                            f"{others[0]} (equal weights deduplicated by the exporter), so it "
                            "cannot be merged alone; use --lora-mode swappable")
