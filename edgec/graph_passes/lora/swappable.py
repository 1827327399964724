"""Swappable LoRA: each adapted MatMul gets an explicit branch whose weights are graph inputs.

    y = MatMul(x, W)  ⇒  y = Add(MatMul(x, W), MatMul(MatMul(x, A_in), B_in))
    (a Linear on 2-D inputs exports as Gemm(x, W, b, transB=1): the same branch on its output)
        A_in = ``lora.<module>.A``  [in, r]  = M_a·Aᵀ
        B_in = ``lora.<module>.B``  [r, out] = w·s·Bᵀ·M_b

A Conv (``nn.Conv1d/2d/3d``, groups 1) gets the convolution form of the same branch:

    y = Conv(x, W)  ⇒  y = Add(Conv(x, W), Conv(Conv(x, A_in), B_in))
        A_in [r, in, *kernel] with W's strides, pads and dilations; B_in = w·s·B [out, r, 1, ...]

which is the merged ``Conv(x, W + s·B·A)`` (PEFT's lora_A is a Conv with the base's kernel,
lora_B a 1×1 Conv; no rotation factors: a rotation does not move a Conv's weight). Its rank is
fixed (OpenVINO's CPU Convolution takes no weight of dynamic shape) at the sum of the compiled
adapters' ranks on it, so that any blend of them (``Session.run(adapter={...})``) fits.

One compiled model then serves any adapter on those modules: the runtime binds A_in/B_in
(``edgec.lora.binding``), zeros of rank 1 give the base model exactly. W stays the base MatMul's
own initializer, so a quantization pass can quantize it and leave the branch in fp32 (branch nodes
carry ``edgec.lora.branch``). The sites are recorded in model metadata ``edgec.lora.sites``
(module, inputs, shapes, rank, ``blend_rank`` (Σ of the compiled adapters' ranks: what a blend
of them binds), and the transforms M_a/M_b that a rotation pass sets when it
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
        targets, ranks, fan, kernels, blend = {}, {}, {}, {}, {}
        for adapter in self.adapters:
            unswappable(adapter)
            for mod, t in resolve_targets(adapter, self.parameter_map, model).items():
                tied = self.parameter_map.get(t.parameter, {}).get("tied")
                if tied and adapter.modules[mod].rank:  # PEFT merges ΔW into the one shared
                    # table, so the embedding changes too; a branch at one reader cannot
                    raise UserError(f"adapter {adapter.name}: module {mod} is tied to "
                                    f"{tied[0]} (one weight in PyTorch), and PEFT's merge "
                                    "changes both; a swappable branch adapts only one of "
                                    "them: use --lora-mode merge")
                targets[mod] = t
                lm = adapter.modules[mod]
                blend[mod] = blend.get(mod, 0) + lm.rank
                # a Conv's rank is fixed: the sum, so any blend of these adapters fits
                ranks[mod] = (ranks.get(mod, 0) + lm.rank) if lm.kernel else \
                    max(ranks.get(mod, 1), lm.rank)
                fan[mod] = t.fan_in_fan_out
                kernels[mod] = adapter.modules[mod].kernel
        matmuls, gemms, convs = (_consumers(model, op) for op in ("MatMul", "Gemm", "Conv"))
        sites = []
        for mod, t in sorted(targets.items()):
            if kernels[mod]:
                nodes = convs.get(t.initializer, [])
                if len(nodes) != 1 or t.layout != "same" or _attr(nodes[0], "group", 1) != 1:
                    raise UserError(f"module {mod}: its weight is not the weight of exactly one "
                                    f"ungrouped Conv ({len(nodes)} found), so it cannot get a "
                                    "swappable branch; use --lora-mode merge")
                sites.append(_add_conv_branch(model, nodes[0], mod, t.shape, ranks[mod],
                                              len(sites)))
            else:
                nodes = matmuls.get(t.initializer, []) or gemms.get(t.initializer, [])
                # the weight as the node reads it: MatMul [in, out]; Gemm [out, in] with transB
                flipped = len(nodes) == 1 and _attr(nodes[0], "transB", 0) == 1
                if len(nodes) != 1 or (t.layout == "transposed") == (fan[mod] != flipped) or (
                        nodes[0].op_type == "Gemm" and (_attr(nodes[0], "transA", 0) != 0
                                                        or _attr(nodes[0], "alpha", 1.0) != 1.0)):
                    raise UserError(f"module {mod}: its weight is not the right-hand input of "
                                    f"exactly one MatMul or plain Gemm ({len(nodes)} found), so "
                                    "it cannot get a swappable branch; use --lora-mode merge")
                in_f, out_f = t.shape[::-1] if flipped else t.shape
                sites.append(_add_branch(model, nodes[0], mod, in_f, out_f, ranks[mod],
                                         len(sites)))
            # the rank a blend of these adapters binds: TensorRT's profile must reach it
            sites[-1].update(parameter=t.parameter, initializer=t.initializer,
                             blend_rank=max(blend[mod], ranks[mod]))
        model.metadata_props[SITES_KEY] = json.dumps(sites)
        stats = {"adapters": [a.summary() for a in self.adapters], "mode": "swappable",
                 "sites": len(sites), "inputs_added": 2 * len(sites),
                 "max_rank": max(ranks.values(), default=0)}
        return PassResult(model, bool(sites), stats)


def _consumers(model: ir.Model, op: str) -> dict[str, list[ir.Node]]:
    """Initializer → the ``op`` nodes reading it as their weight (input 1), where those are
    all its readers."""
    out: dict[str, list[ir.Node]] = {}
    for name, value in model.graph.initializers.items():
        uses = list(value.uses())
        if uses and all(u.node.op_type == op and u.idx == 1 for u in uses):
            out[name] = [u.node for u in uses]
    return out


def _attr(node: ir.Node, name: str, default):
    attr = node.attributes.get(name)
    return attr.value if attr is not None else default


def _inputs(model: ir.Model, mod: str, a_shape: list, b_shape: list) -> tuple[ir.Value, ...]:
    """The graph inputs ``lora.<mod>.A`` / ``.B`` of these shapes (the rank dim named)."""
    values = []
    for role, shape in (("A", a_shape), ("B", b_shape)):
        v = ir.Value(name=f"lora.{mod}.{role}", type=ir.TensorType(ir.DataType.FLOAT),
                     shape=ir.Shape(shape))
        v.metadata_props["edgec.lora"] = json.dumps({"module": mod, "role": role})
        model.graph.inputs.append(v)
        values.append(v)
    return tuple(values)


def _attach(model: ir.Model, node: ir.Node, mod: str, xa: ir.Node, xab: ir.Node) -> None:
    """``node``'s output y becomes y + ``xab`` (the branch ``xa`` → ``xab``) for its readers;
    a graph output keeps its name."""
    graph = model.graph
    y = node.outputs[0]
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


def _add_branch(model: ir.Model, node: ir.Node, mod: str, in_f: int, out_f: int, rank: int,
                k: int) -> dict:
    r = f"lora_r_{k}"
    a_in, b_in = _inputs(model, mod, [in_f, r], [r, out_f])
    xa = ir.node("MatMul", [node.inputs[0], a_in], name=f"lora/{mod}/xA")
    xab = ir.node("MatMul", [xa.outputs[0], b_in], name=f"lora/{mod}/xAB")
    _attach(model, node, mod, xa, xab)
    return {"module": mod, "a_input": a_in.name, "b_input": b_in.name, "in_features": in_f,
            "out_features": out_f, "rank": rank, "a_transform": None, "b_transform": None}


def _add_conv_branch(model: ir.Model, node: ir.Node, mod: str, shape: tuple[int, ...],
                     rank: int, k: int) -> dict:
    out_f, in_f, *kernel = shape
    # the rank fixed: OpenVINO's CPU Convolution refuses a weight of dynamic shape (adapters
    # of lower rank are padded; a higher one needs a recompile)
    a_in, b_in = _inputs(model, mod, [rank, in_f, *kernel], [out_f, rank, *[1] * len(kernel)])
    # A convolves as W does (strides, pads, dilations, auto_pad); B is 1×1 with the defaults
    attrs = {a.name: a.value for a in node.attributes.values() if a.name != "group"}
    xa = ir.node("Conv", [node.inputs[0], a_in], attributes=attrs, name=f"lora/{mod}/xA")
    xab = ir.node("Conv", [xa.outputs[0], b_in], name=f"lora/{mod}/xAB")
    _attach(model, node, mod, xa, xab)
    return {"module": mod, "a_input": a_in.name, "b_input": b_in.name, "in_features": in_f,
            "out_features": out_f, "rank": rank, "kernel": list(kernel), "a_transform": None,
            "b_transform": None}
