"""Swappable LoRA: each adapted MatMul gets an explicit branch whose weights are graph inputs.

    y = MatMul(x, W)  ⇒  y = Add(MatMul(x, W), MatMul(MatMul(x, A_in), B_in))
        A_in = ``lora.<module>.A``  [in, r]  = M_a·Aᵀ
        B_in = ``lora.<module>.B``  [r, out] = w·s·Bᵀ·M_b

One compiled model then serves any adapter on those modules: the runtime binds A_in/B_in
(``edgec.lora.binding``), zeros of rank 1 give the base model exactly. W stays the base MatMul's
own initializer, so a quantization pass can quantize it and leave the branch in fp32 (branch nodes
carry ``edgec.lora.branch``). The sites are recorded in model metadata ``edgec.lora.sites``
(module, inputs, shapes, rank, and the transforms M_a/M_b that a rotation pass sets when it
rotates W on its input / output side, so that swapping stays exact). With no adapter bound the
graph is the base model, which is what ``--check`` verifies (``exact``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import onnx_ir as ir

from edgec.errors import UserError
from edgec.graph_passes._infra import EdgecPass, PassResult
from edgec.lora.binding import SITES_KEY, lora_sites, unswappable
from edgec.lora.peft_adapter import LoraAdapter, resolve_targets

__all__ = ["LoraSwappablePass", "SITES_KEY", "lora_sites"]


class LoraSwappablePass(EdgecPass):
    name = "lora-swappable"
    exact = True  # unbound (zero) adapters: exactly the base model
    rtol = 1e-6

    def __init__(self, adapters: Sequence[LoraAdapter],
                 parameter_map: Mapping[str, Mapping[str, str]]):
        super().__init__()
        self.adapters = list(adapters)
        self.parameter_map = parameter_map

    def call(self, model: ir.Model) -> PassResult:
        targets, ranks, fan = {}, {}, {}
        for adapter in self.adapters:
            unswappable(adapter)
            for mod, t in resolve_targets(adapter, self.parameter_map, model).items():
                targets[mod] = t
                ranks[mod] = max(ranks.get(mod, 1), adapter.modules[mod].rank)
                fan[mod] = adapter.modules[mod].fan_in_fan_out
        consumers = _matmul_consumers(model)
        sites = []
        for mod, t in sorted(targets.items()):
            nodes = consumers.get(t.initializer, [])
            if len(nodes) != 1 or (t.layout == "transposed") == fan[mod]:
                raise UserError(f"module {mod}: its weight is not the [in, out] right-hand input "
                                f"of exactly one MatMul ({len(nodes)} found), so it cannot get a "
                                "swappable branch; use --lora-mode merge")
            in_f, out_f = t.shape
            sites.append(_add_branch(model, nodes[0], mod, in_f, out_f, ranks[mod], len(sites)))
            sites[-1].update(parameter=t.parameter, initializer=t.initializer)
        model.metadata_props[SITES_KEY] = json.dumps(sites)
        stats = {"adapters": [a.summary() for a in self.adapters], "mode": "swappable",
                 "sites": len(sites), "inputs_added": 2 * len(sites),
                 "max_rank": max(ranks.values(), default=0)}
        return PassResult(model, bool(sites), stats)


def _matmul_consumers(model: ir.Model) -> dict[str, list[ir.Node]]:
    out: dict[str, list[ir.Node]] = {}
    for name, value in model.graph.initializers.items():
        uses = list(value.uses())
        if uses and all(u.node.op_type == "MatMul" and u.idx == 1 for u in uses):
            out[name] = [u.node for u in uses]
    return out


def _add_branch(model: ir.Model, node: ir.Node, mod: str, in_f: int, out_f: int, rank: int,
                k: int) -> dict:
    graph = model.graph
    r = f"lora_r_{k}"
    a_in = ir.Value(name=f"lora.{mod}.A", type=ir.TensorType(ir.DataType.FLOAT),
                    shape=ir.Shape([in_f, r]))
    b_in = ir.Value(name=f"lora.{mod}.B", type=ir.TensorType(ir.DataType.FLOAT),
                    shape=ir.Shape([r, out_f]))
    for v, role in ((a_in, "A"), (b_in, "B")):
        v.metadata_props["edgec.lora"] = json.dumps({"module": mod, "role": role})
        graph.inputs.append(v)
    x, y = node.inputs[0], node.outputs[0]
    xa = ir.node("MatMul", [x, a_in], name=f"lora/{mod}/xA")
    xab = ir.node("MatMul", [xa.outputs[0], b_in], name=f"lora/{mod}/xAB")
    add = ir.node("Add", [y, xab.outputs[0]], name=f"lora/{mod}/add")
    for n in (xa, xab, add):
        n.metadata_props["edgec.lora.branch"] = mod
    out = add.outputs[0]
    out.name, out.type, out.shape = f"{y.name}_lora", y.type, y.shape
    is_output = any(o is y for o in graph.outputs)
    y.replace_all_uses_with(out, replace_graph_outputs=True)
    add.replace_input_with(0, y)  # replace_all_uses_with also rewired the Add's own input
    graph.insert_after(node, [xa, xab, add])
    if is_output:  # the graph output keeps its name
        name = y.name
        y.name, out.name = f"{name}_base", name
    return {"module": mod, "a_input": a_in.name, "b_input": b_in.name, "in_features": in_f,
            "out_features": out_f, "rank": rank, "a_transform": None, "b_transform": None}
