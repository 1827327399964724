"""What the quantization pass quantizes, and at which precision (per target).

Two facts about real transformers drive this module:
- attention masks (``Where(keep, 0, finfo.min)``, ``(1 - mask) · finfo.min``), position ids and
  token ids are not activations: quantizing a tensor that holds −3.4e38 destroys every score that
  shares its range. They are found by taint from integer/bool graph inputs and huge constants.
- swappable LoRA branches (``edgec.lora.branch`` nodes) stay float: the base is quantized, the
  adapters bound at run time are not, so any adapter can be swapped in.
- on a fully quantized target (``Target.fully_quantized``, the QNN HTP) every tensor must be
  quantized, so the sensitive ones (the attention-score chain up to and through Softmax, masks,
  user exclusions, and tensors measured to carry outlier channels) get 16 bits instead of
  staying float. So does the residual stream where the scheme asks (``stream``): every residual
  sum is rounded once per layer and read by every later one, so 8 bits there add up (llama
  small+outliers with a Hadamard rotation on the HTP: logits cosine 0.981 → 0.992).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from edgec.errors import UserError
from edgec.graph_passes.quantization.mask_fill import HUGE, _constant
from edgec.graph_passes.quantization.outlier_split import OUTLIER_TAG
from edgec.graph_passes.rotation.edit import ROTATION_TAG
from edgec.graph_passes.rotation.topology import find_norms

__all__ = ["QuantPlan", "plan_quantization", "residual_sums", "output_heads", "norm_outputs",
           "rotated_outputs", "float_stream_nodes", "FLOAT_NODES_KEY", "FLOAT_STREAM_REASON"]

# why plan_quantization keeps a node float under QuantScheme.float_stream (plan.reasons)
FLOAT_STREAM_REASON = "float residual stream (fp16 on the device)"
# model metadata a fully quantized graph carries when some of its compute stays float
# (``float_stream``): the target builds it for a device that runs float ops (fp16 on the HTP)
FLOAT_NODES_KEY = "edgec.quantize.float_nodes"

_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Where", "Expand", "Reshape", "Unsqueeze", "Squeeze",
                "Transpose", "Slice", "Concat", "Tile", "Identity", "Min", "Max", "Neg",
                "Cast", "Gather", "GatherND", "GatherElements"}
_LOOKUPS = {"Gather", "GatherND", "GatherElements"}
_SCORE_CHAIN = {"Add", "Sub", "Mul", "Div", "Reshape", "Transpose", "Identity", "Cast"}


@dataclasses.dataclass
class QuantPlan:
    nodes_to_exclude: list[str]
    tensors_16bit: list[str]
    mask_tensors: list[str]
    reasons: dict[str, str]  # node → why it was excluded
    stream_tensors: list[str] = dataclasses.field(default_factory=list)  # residual sums at 16 bits
    head_nodes: list[str] = dataclasses.field(default_factory=list)  # output heads at w8a16
    # fully quantized: the MatMuls kept in high precision (the user's exclusions, the accuracy
    # floor's kept layers) at w8a16 too: 8-bit weights where the scheme's are narrower
    wide_nodes: list[str] = dataclasses.field(default_factory=list)


def _is_float(v: ir.Value) -> bool:
    return v.dtype is not None and v.dtype.is_floating_point()


def _is_huge(v: ir.Value) -> bool:
    c = _constant(v)
    return (c is not None and np.issubdtype(c.dtype, np.floating) and c.size > 0
            and bool(np.any(c <= -HUGE)))


def _mask_taint(model: ir.Model) -> set[str]:
    """Tensors that are masks or position/integer-derived, not activations.

    Two kinds, one forward sweep in topological order:
    - huge: carries a mask fill (≤ -1e4): from such a constant through elementwise ops
      (``Add(scores, mask)`` included: its range is destroyed too); Softmax ends it.
    - derived: a pure function of integer/bool inputs and constants (``Cast(mask)``, position
      angles, ``inv_freq @ positions``): quantizing positions would bend RoPE angles. A lookup
      of integer indices into a float table (embeddings) yields an activation, not a mask.
    A Where's condition selects but carries no values, so only its data inputs count.
    """
    inputs = {v.name for v in model.graph.inputs}
    derived = {v.name for v in model.graph.inputs
               if v.dtype is not None and not v.dtype.is_floating_point()}
    huge: set[str] = set()
    for node in model.graph:
        ins = [v for v in node.inputs if v is not None]
        data = ins[1:] if node.op_type == "Where" else ins
        if node.op_type == "Softmax" or not ins:
            continue
        if node.op_type in _ELEMENTWISE and any(v.name in huge or _is_huge(v) for v in data):
            huge.update(o.name for o in node.outputs)
        if node.op_type in _LOOKUPS and _is_float(ins[0]) and ins[0].name not in derived:
            continue  # an embedding lookup: integer indices into a float table → an activation
        live = [v for v in data if v.const_value is None and _constant(v) is None]
        if any(v.name in derived for v in ins) and all(v.name in derived or v.name in huge
                                                       for v in live):
            derived.update(o.name for o in node.outputs)
    return (huge | derived) - inputs


def _score_chain(model: ir.Model) -> set[str]:
    """Tensors from an attention-score MatMul through Softmax (its input chain and output)."""
    out: set[str] = set()
    for node in model.graph:
        if node.op_type != "Softmax":
            continue
        out.update(o.name for o in node.outputs)
        stack = [node.inputs[0]]
        while stack:
            v = stack.pop()
            if v is None or v.name in out or not _is_float(v):
                continue
            prod = v.producer()
            if prod is not None and prod.op_type == "Where":
                continue  # a bounded two-level mask ({0, -F}) is exact in 8 bits
            out.add(v.name)
            if prod is not None and prod.op_type in _SCORE_CHAIN:
                stack.extend(prod.inputs)
    return out


def _angles(model: ir.Model) -> set[str]:
    """Sin/Cos inputs back to graph inputs, their outputs, and the constants on the way: 8-bit
    angles bend embeddings, and so does an 8-bit frequency table. A timestep embedding's table
    spans 1 to 1e-4 (``exp(-ln(10⁴)·i/half)``): on one 8-bit grid its step is 0.004, and a
    timestep near 1000 turns that into radians of error in every sinusoid. With the table at 16
    bits the tiny DiTs' held-out cosine on the HTP went 0.85 → 0.9985 (video-dit), 0.78 → 0.996
    (motion-dit), 0.90 → 0.998 (motion-gen), 0.85 → 0.995 (pose-prior)."""
    out: set[str] = set()
    for node in model.graph:
        if node.op_type not in ("Sin", "Cos"):
            continue
        out.update(o.name for o in node.outputs)
        stack = [node.inputs[0]]
        while stack:
            v = stack.pop()
            if v is None or v.name in out or not _is_float(v):
                continue
            out.add(v.name)
            if v.const_value is not None:
                continue
            prod = v.producer()
            if prod is not None and prod.op_type in _ELEMENTWISE:
                stack.extend(prod.inputs)
    return out


def _selections(model: ir.Model) -> set[str]:
    """What only decides a selection: the data input of each TopK/ArgMax/ArgMin and, back from
    it, every float tensor read by nothing else (block-sparse attention's pooled q/k and block
    scores). Their values only pick indices, and on an 8-bit grid near-equal scores tie; the
    HTP breaks ties otherwise than ONNX Runtime, so it gathered other key blocks (video-dit with
    block-sparse attention on the HTP: cosine 0.83 vs ORT on the same graph, its first
    departure a K-block Gather). At 16 bits both pick the same blocks."""
    picks = {"TopK", "ArgMax", "ArgMin"}
    out: set[str] = set()
    chain: set[str] = set()  # nodes whose every float output only decides a selection

    def decide(v: ir.Value) -> None:  # once every reader of v has been decided
        if _is_float(v) and v.const_value is None and any(True for _ in v.uses()) and all(
                u.node.name in chain or (u.node.op_type in picks and u.idx == 0)
                or u.node.op_type in ("Shape", "Size") for u in v.uses()):
            out.add(v.name)

    nodes = list(model.graph)
    for node in reversed(nodes):  # readers come after their producer
        for v in node.outputs:
            decide(v)
        floats = [o for o in node.outputs if _is_float(o)]
        if floats and all(o.name in out for o in floats):
            chain.add(node.name)
    for v in model.graph.inputs:
        decide(v)
    return out


def _where_consistent(model: ir.Model, sixteen: set[str]) -> set[str]:
    """The HTP needs a Where's data inputs in its output's type: spread 16-bit among them."""
    changed = True
    while changed:
        changed = False
        for node in model.graph:
            if node.op_type != "Where":
                continue
            group = [v.name for v in (node.inputs[1], node.inputs[2], node.outputs[0])
                     if v is not None and _is_float(v)]
            if any(n in sixteen for n in group) and not all(n in sixteen for n in group):
                sixteen.update(group)
                changed = True
    return sixteen


def _squares(model: ir.Model) -> set[str]:
    """x² of a decomposed RMSNorm (``Pow(x, 2)``): at 16 bits beside the 8-bit rest of the norm
    the HTP computed garbage (cosine 0.0004 vs ORT on llama small+outliers, measured), so
    measured outliers there stay 8-bit."""
    out = set()
    for node in model.graph:
        if node.op_type == "Pow" and len(node.inputs) > 1:
            exponent = _constant(node.inputs[1])
            if exponent is not None and exponent.size == 1 and float(exponent.reshape(())) == 2:
                out.add(node.outputs[0].name)
    return out


def norm_outputs(model: ir.Model, sixteen: set[str]) -> set[str]:
    """The output of each fused ``RMSNormalization`` whose input is 16-bit: the HTP runs the op
    only with its input and output at one width (16 in, 8 out fails to finalize)."""
    return {n.outputs[0].name for n in model.graph
            if n.op_type == "RMSNormalization" and n.inputs[0] is not None
            and n.inputs[0].name in sixteen and _is_float(n.outputs[0])}


def rotated_outputs(model: ir.Model, sixteen: set[str]) -> set[str]:
    """Outputs of the online rotations (``edgec.rotation`` nodes, R4) whose input is 16-bit. A
    rotation keeps each token's norm, so a token far larger than the rest (a massive
    activation) stays as far larger after it, and only a lower crest factor shows: measured on
    the input, the precision the input needed is the one its rotation needs (SmolLM2-135M on the
    HTP with R4: 8-bit rotated down-projection inputs, perplexity 142.7; 16-bit, 112.4)."""
    out: set[str] = set()
    for node in model.graph:
        if ROTATION_TAG in node.metadata_props and any(
                v is not None and (v.name in sixteen or v.name in out) for v in node.inputs):
            out.update(o.name for o in node.outputs if _is_float(o))
    return out


def residual_sums(model: ir.Model) -> set[str]:
    """The residual stream's sums: each ``Add`` output that a norm (found from the graph,
    pre- or post-norm) reads, and a ``Concat`` a norm reads: the stream's entry where a DiT
    joins its text and video tokens. video-dit tiny on the HTP at w8a8, calibrated on its
    sampler's trajectory: with that entry at 8 bits the floor's held-out samples measured
    0.9941 and a 16-step sample 0.9926 (HTP 0.9944); at 16 bits 0.9954 / 0.9942 (HTP 0.9958).
    Found by swapping ranges: the trajectory's 1.12× wider range of the patch embedding and its
    concatenation (vs the draws') was the whole of that model's trajectory-vs-draws gap. The
    embedding lookup that starts a decoder's stream keeps its table's type: a 16-bit Gather
    output beside the 8-bit table did not compile on the HTP."""
    out = set()
    for norm in find_norms(model.graph):
        producer = norm.input.producer()
        if (producer is not None and producer.op_type in ("Add", "Concat")
                and _is_float(norm.input)):
            out.add(norm.input.name)
    return out


_PASS_THROUGH = {"Reshape", "Transpose", "Identity", "Squeeze", "Unsqueeze", "Flatten", "Cast"}


def output_heads(model: ir.Model) -> set[str]:
    """MatMuls with a constant 2-D weight (or a Transpose of one: a head tied to the embedding
    table) whose output is a graph output, through layout ops and adds of a constant (a bias)
    only: the LM head of a decoder, a classifier's last layer."""
    outputs = {v.name for v in model.graph.outputs}
    heads = set()
    for node in model.graph:
        if node.op_type != "MatMul" or len(node.inputs) < 2 or node.inputs[1] is None:
            continue
        weight = node.inputs[1]
        if weight.const_value is None and weight.producer() is not None and \
                weight.producer().op_type == "Transpose":
            weight = weight.producer().inputs[0]
        w = weight.const_value if weight is not None else None
        if w is None or len(w.shape) != 2:
            continue
        v = node.outputs[0]
        while v.name not in outputs:
            uses = list(v.uses())
            if len(uses) != 1:
                break
            user = uses[0].node
            others = [x for x in user.inputs if x is not None and x is not v]
            if not (user.op_type in _PASS_THROUGH or user.op_type == "Add" and all(
                    _constant(x) is not None for x in others)):
                break
            v = user.outputs[0]
        if v.name in outputs:
            heads.add(node.name)
    return heads


def float_stream_nodes(model: ir.Model) -> set[str]:
    """What ``QuantScheme.float_stream`` keeps float on a fully quantized target: the residual
    sums' Adds, the norms that read them (one op each: ``LayerNormalization`` or the HTP's
    fused ``RMSNormalization``), ``outlier_split``'s branches and the Adds that join them."""
    sums = residual_sums(model)

    def tagged(v: ir.Value | None) -> bool:
        return v is not None and v.producer() is not None and \
            OUTLIER_TAG in v.producer().metadata_props

    out = set()
    for node in model.graph:
        first = node.inputs[0] if node.inputs else None
        makes_sum = any(o.name in sums for o in node.outputs)
        norm = node.op_type in ("RMSNormalization", "LayerNormalization") and \
            first is not None and first.name in sums
        join = node.op_type == "Add" and any(tagged(v) for v in node.inputs)
        if makes_sum or norm or join or OUTLIER_TAG in node.metadata_props:
            out.add(node.name)
    return out


def plan_quantization(model: ir.Model, fully_quantized: bool, exclude: tuple[str, ...] = (),
                      outliers: set[str] = frozenset(), stream: bool = False,
                      head: bool = False, float_stream: bool = False,
                      head_float: bool = False) -> QuantPlan:
    """Decide exclusions (float stays float) or, when ``fully_quantized``, 16-bit tensors:
    by op (score chains, angles, user exclusions), the measured ``outliers``, with ``stream``
    the residual sums, and with ``head`` the inputs of the output heads (``output_heads``).
    Fully quantized, an excluded MatMul runs at w8a16 (``wide_nodes``): the highest precision
    the device has, so a 4-bit scheme's exclusions get 8-bit weights as well.
    ``float_stream`` (fully quantized only): ``float_stream_nodes`` stay float, their
    quantized readers read them at 16 bits."""
    mask = _mask_taint(model)
    wanted = set(exclude)
    excluded, reasons, sixteen, sums, heads, wide = [], {}, set(), set(), set(), set()
    float_heads = output_heads(model) if head_float and not fully_quantized else set()
    floating = float_stream_nodes(model) if fully_quantized and float_stream else set()
    for node in model.graph:
        if node.name in floating:
            excluded.append(node.name)
            reasons[node.name] = FLOAT_STREAM_REASON
            sixteen.update(o.name for o in node.outputs if _is_float(o) and any(
                u.node.name not in floating for u in o.uses()))
            continue
        float_ins = [v for v in node.inputs if v is not None and _is_float(v)]
        user = node.name in wanted or node.op_type in wanted
        outlier = OUTLIER_TAG in node.metadata_props  # outlier_split's branch: wide or float
        touches_mask = any(v.name in mask for v in float_ins)
        if "edgec.lora.branch" in node.metadata_props:
            if fully_quantized:
                raise UserError("swappable LoRA adapters cannot run on a fully quantized target "
                                "(the adapter weights would be quantized with the base); use "
                                "--lora-mode merge")
            excluded.append(node.name)  # adapters stay high precision: swapping stays exact
            reasons[node.name] = "swappable LoRA branch"
            continue
        if fully_quantized:
            if user or outlier:
                sixteen.update(v.name for v in (*float_ins, *node.outputs) if _is_float(v)
                               and v.const_value is None)
            if user and node.op_type == "MatMul":
                wide.add(node.name)
            continue
        if ROTATION_TAG in node.metadata_props:  # an online rotation (R4) runs in float: the
            excluded.append(node.name)  # next MatMul quantizes its rotated output, once
            reasons[node.name] = "online rotation"
            continue
        if node.name in float_heads:
            excluded.append(node.name)
            reasons[node.name] = "output head (the scheme keeps it float)"
        elif outlier:
            excluded.append(node.name)
            reasons[node.name] = "outlier channels"
        elif user:
            excluded.append(node.name)
            reasons[node.name] = "excluded by the user"
        elif touches_mask:
            excluded.append(node.name)
            reasons[node.name] = "reads an attention mask / integer-derived tensor"
    if fully_quantized:
        sixteen |= _score_chain(model) | _angles(model) | _selections(model) | \
            (set(outliers) - _squares(model))
        sums = residual_sums(model) if stream and not floating else set()
        heads = output_heads(model) if head else set()
        head_inputs = {n.inputs[0].name for n in model.graph if n.name in heads
                       and n.inputs[0] is not None and _is_float(n.inputs[0])}
        sixteen = _where_consistent(model, sixteen | sums | head_inputs)
        sixteen |= norm_outputs(model, sixteen)
        sixteen |= rotated_outputs(model, sixteen)
        # a float tensor only float nodes read stays unquantized (a 16-bit override would make
        # the quantizer round it, e.g. a residual sum measured to carry outlier channels)
        sixteen -= {o.name for node in model.graph if node.name in floating
                    for o in node.outputs if all(u.node.name in floating for u in o.uses())}
    return QuantPlan(excluded, sorted(sixteen), sorted(mask), reasons, sorted(sums),
                     sorted(heads), sorted(wide))
