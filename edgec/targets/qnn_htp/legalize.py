"""QNN HTP legalization: exact rewrites that let a static transformer graph run whole on the NPU.

Run on the fp32 graph before quantization (the QDQ quantizer then wraps the new ops), after
``MaskFillPass`` (which bounds -inf/float-min attention masks for the same target):

    Transpose of rank > 5 (± its Reshape in/out)   ⇒  Reshape → Transpose, each rank ≤ 4
    Einsum(a, b), a batched matrix product         ⇒  Transpose → Reshape → MatMul → … (einsum.py)
    GatherND(data, constant indices)               ⇒  Reshape(data, flat) → Gather(linear indices)
    Gather(data, indices, axis=a ≠ 0)              ⇒  Transpose(a first) → Gather(axis=0) →
                                                      Transpose(back)
    Where(IsNaN(p), c, p),  p = Softmax(·)          ⇒  p
    Mish(x)                                        ⇒  x · Tanh(Softplus(x))
    x · Sigmoid(x)  (SiLU)                         ⇒  Max(x, x) · Sigmoid(x)  (silu.py)
    Reciprocal(x)                                  ⇒  Div(1, x)
    Transpose(W), W an initializer                 ⇒  Wᵀ, a new initializer
    LayerNormalization(x, w, w)                    ⇒  LayerNormalization(x, w, copy of w)
    a ∘ b → (elementwise)* → LayerNormalization,   ⇒  a ∘ Tile(b), b repeated over those axes
      ∘ ∈ {Add, Sub, Mul, Div}, b broadcast whole
      rows × features blocks over outer axes

Why, as measured on the HTP emulator (onnxruntime-qnn 2.x): the HTP takes tensors of rank ≤ 5 only
(video-dit's unpatchify is rank 8); it rejects GatherND on bool data (BERT's key mask); and the
IsNaN → Where guard the exporter puts after a masked Softmax fails graph finalization
(QNN_COMMON_ERROR_MEM_ALLOC). The HTP has no Mish (Softplus and Tanh it has): ONNX Runtime expands
Mish by its ONNX function body in a session, but the EPContext compile cannot, and fails with an
anonymous "INVALID_GRAPH: Encountered an invalid node". At 16-bit activations (w8a16) a
LayerNormalization whose bias is the very tensor of its scale (equal constants, e.g. both ones,
which the cleanup merges into one initializer) disagrees with ONNX Runtime on the same QDQ graph
(cosine 0.80 on LayerNorm → MLP → residual; 0.979 on a whole ViT encoder); a separate copy is right
(0.9999): the quantizer then quantizes the bias as a bias. And the HTP miscomputes, at 16-bit
activations (w8a16; w8a8 is right), an Add or Mul whose operand of shape [N, D] / [1, N, D] is
broadcast over the batch of a [B, N, D] tensor when the result reaches a LayerNormalization,
directly or through elementwise ops (Add → LayerNormalization, Add → Mul/Relu →
LayerNormalization): device vs ONNX Runtime on the same QDQ graph, cosine 0.6–0.87 (the batch rows
after the first wrong, or all of them) wherever N was a multiple of 8 (8–64 tried; N = 3–7 and 60
were right). Sub, Div and Max were right; so are broadcasting [B, 1, D] over the rows and a [D]
bias. Rank 4 the same: a [B, 1, N, D] operand over the heads axis is wrong too. Expand does not
help (the QNN EP lowers it to a multiply by ones of the full shape, itself a broadcast); Tile does,
as does an operand of the full shape. The rule tiles Sub and Div too (cheap, exact), and any N.
And the HTP's quantized Reciprocal is wrong whenever its input's quantized range ends below 1
(8 or 16 bits alike): it returns 1/x scaled by that range's maximum, e.g. inputs in [0.094, 0.169]
(the Sqrt of a trained LLaMA's RMSNorm mean square: the exporter writes ``torch.rsqrt`` as Sqrt →
Reciprocal) gave 1.79–1.01 for 10.6–5.9, so every RMSNorm output of SmolLM2-135M came out 5.9×
too small and the whole decoder disagreed with ONNX Runtime (cosine 0.21); ranges reaching 1
were right, which is why random-weight models (mean square ≈ 1) never showed it. Div(1, x) on the
same QDQ parameters is right at every range tried. A weight read through a Transpose (the
exporter's tied lm_head: MatMul(x, Transpose(E)), E also the embedding Gather's table, too large
for the exporter's constant folding) is refused by the HTP at 16-bit activations (SmolLM2-135M
w8a16: "cannot run MatMul"); folded into its own transposed initializer it is an ordinary
weight, quantized per output channel like any other (for a tied table, a second copy).
A Gather along any axis but the first is wrong on the HTP: at 8-bit activations it returned other
rows than ONNX Runtime ([1, 4, 40, 16] along axis 2, block-sparse attention's token permutation:
max error 2.3 on values in [-1, 1]; [1, 8, 8256, 64] the same, [2, 8, 8256, 64] right), at 16
bits the graph does not finalize (QNN_COMMON_ERROR_MEM_ALLOC); along axis 0 every shape tried
was right, so the axis is moved to the front and back with Transposes.

At 16-bit activations the HTP halves a SiLU (a Mul of a tensor by its own Sigmoid) whose input
range is wide (scale ≳ 3: a trained diffusion UNet's ±2·10⁵); its multiplicand as a distinct tensor
is right (``silu.py``).

Guarantees: the first three, the Tile and the folded weight Transpose are pure data movement (bit
exact); Max(x, x) is x bit for bit; 1/x and Div(1, x) are the same IEEE operation. The NaN
guard only acts on NaN, which a Softmax of finite inputs never yields (masks are finite after
``MaskFillPass``). Mish's rewrite is its ONNX function body, which ONNX Runtime itself runs for
it (bit exact there).

The Transpose lowering and the broadcast tiling look past their node (producer, users), so they
are pass code; the other seven are local and are onnxscript rewrite rules (``GatherNDToGather``,
``DropSoftmaxNanGuard``, ``MishToSoftplusTanh``, ``UnshareLayerNormBias``, ``ReciprocalToDiv``,
``GatherToLeadingAxis``, ``FoldWeightTranspose``, all in ``RULES``), as is ``SiluOperandCopy``
(applied on its own, with the Mul's operands in either order). Shapes are inferred first: earlier
rewrites (block-sparse attention) leave values without one.
Graph output names never change.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import MatchResult, pattern

from edgec.graph_passes._infra import EdgecPass, PassResult
from edgec.graph_passes._infra import register_constant as _const
from edgec.graph_passes._infra import static_dims as _static_dims
from edgec.graph_passes.fold_weight_transpose import FoldWeightTranspose
from edgec.targets.qnn_htp.einsum import lower_einsum
from edgec.targets.qnn_htp.silu import SiluOperandCopy

__all__ = ["MAX_RANK", "RULES", "DropSoftmaxNanGuard", "UnshareLayerNormBias", "GatherNDToGather",
           "GatherToLeadingAxis", "FoldWeightTranspose", "MishToSoftplusTanh", "QnnLegalizePass",
           "ReciprocalToDiv", "block_broadcast_repeats"]

MAX_RANK = 5  # the HTP's tensor rank limit (Transpose/Reshape of rank 6 are rejected)

# binary ops whose block broadcast is tiled, and the ops between them and the LayerNormalization
_TILED_BINARY = frozenset({"Add", "Sub", "Mul", "Div"})
_ELEMENTWISE = _TILED_BINARY | {"Max", "Min", "Pow", "Relu", "LeakyRelu", "PRelu", "Sigmoid",
                                "HardSigmoid", "Tanh", "Gelu", "Erf", "Neg", "Abs", "Sqrt", "Exp",
                                "Clip", "Identity"}
_MAX_HOPS = 16  # elementwise ops followed from a binary op towards a LayerNormalization


class QnnLegalizePass(EdgecPass):
    """Rewrite the patterns the QNN HTP cannot run (see the module docstring); stats per rewrite."""

    name = "qnn-legalize"
    exact = True
    rtol = 1e-6

    def call(self, model: ir.Model) -> PassResult:
        # earlier rewrites (block-sparse attention) leave values without a shape; the rules
        # below read ranks and static dims
        ir.passes.common.ShapeInferencePass(strict_mode=False)(model)
        graph = model.graph
        stats: dict[str, int] = {"transposes_lowered": 0, "transposes_skipped": 0,
                                 "einsums_lowered": 0}
        for node in list(graph):
            if node.op_type == "Einsum" and node.domain in ("", "ai.onnx"):
                stats["einsums_lowered"] += lower_einsum(graph, node)
        for node in list(graph):
            if node.op_type == "Transpose" and node.domain in ("", "ai.onnx"):
                rank = len(node.attributes.get_ints("perm", ()) or ())
                if rank > MAX_RANK:
                    key = "transposes_lowered" if _lower_transpose(graph, node) else \
                        "transposes_skipped"
                    stats[key] += 1
        for key, rule in zip(("gathernd_rewritten", "nan_guards_removed", "mish_expanded",
                              "layernorm_biases_unshared", "reciprocals_to_div",
                              "gathers_to_leading_axis", "weight_transposes_folded"), RULES):
            stats[key] = pattern.RewriteRuleSet([rule]).apply_to_model(model)  # a count per rule
        stats["silu_operands_copied"] = _SILU.apply_to_model(model)
        stats["broadcasts_tiled"] = 0
        for node in list(graph):
            if node.op_type in _TILED_BINARY and node.domain in ("", "ai.onnx"):
                stats["broadcasts_tiled"] += _tile_block_broadcast(graph, node)
        ir.passes.common.RemoveUnusedNodesPass()(model)
        modified = any(v for k, v in stats.items() if k != "transposes_skipped")
        return PassResult(model, modified, stats)


def _groups(dims: list[int], perm: list[int]) -> tuple[list[int], list[int]]:
    """Fewest axes that carry the same transpose: drop size-1 axes, merge axes adjacent in both."""
    axes = [a for a in range(len(dims)) if dims[a] != 1]
    order = [a for a in perm if dims[a] != 1]
    groups: list[list[int]] = []
    for a in order:
        if groups and axes.index(a) == axes.index(groups[-1][-1]) + 1:
            groups[-1].append(a)
        else:
            groups.append([a])
    in_order = sorted(range(len(groups)), key=lambda g: groups[g][0])
    sizes = [math.prod(dims[a] for a in groups[g]) for g in in_order]
    rank_of = {g: i for i, g in enumerate(in_order)}
    return sizes, [rank_of[g] for g in range(len(groups))]


def _lower_transpose(graph: ir.Graph, node: ir.Node) -> bool:
    """Replace a rank > 5 Transpose whose result only feeds Reshapes by rank ≤ 4 steps."""
    x, out = node.inputs[0], node.outputs[0]
    dims = _static_dims(x)
    users = [u for u, _ in out.uses()]
    if dims is None or out.is_graph_output() or not users:
        return False
    for u in users:  # a 0 in a Reshape target copies an input dim: its meaning would change
        target = u.inputs[1].const_value if u.op_type == "Reshape" else None
        if target is None or (0 in target.numpy().tolist()
                              and not u.attributes.get_int("allowzero", 0)):
            return False
    producer = x.producer()  # read the un-reshaped tensor: never materialize the rank-6+ view
    if producer is None or producer.op_type != "Reshape":
        return False
    src = producer.inputs[0]
    sizes, perm = _groups(dims, list(node.attributes.get_ints("perm")))
    if not sizes:  # every axis has size 1
        sizes, perm = [1], [0]
    new_nodes: list[ir.Node] = []
    base = node.name or "transpose"

    def emit(shape: list[int], order: list[int]) -> None:
        nonlocal src
        shp = _const(graph, f"{base}_lower{len(new_nodes)}_shape", np.array(shape, np.int64))
        r = ir.node("Reshape", [src, shp], name=f"{base}_lower{len(new_nodes)}_reshape")
        t = ir.node("Transpose", r.outputs, attributes={"perm": order},
                    name=f"{base}_lower{len(new_nodes)}")
        # typed at the source: later passes read element types (calibration's histograms)
        r.outputs[0].type, r.outputs[0].shape = x.type, ir.Shape(shape)
        t.outputs[0].type, t.outputs[0].shape = x.type, ir.Shape([shape[i] for i in order])
        new_nodes.extend([r, t])
        src = t.outputs[0]

    if len(sizes) <= MAX_RANK:
        emit(sizes, perm)
    else:  # bring the next wanted run of axes forward, one rank-4 transpose at a time
        cur = list(range(len(sizes)))
        while cur != perm:
            k = next(i for i, (a, b) in enumerate(zip(cur, perm)) if a != b)
            j = cur.index(perm[k])
            r = 1
            while j + r < len(cur) and k + r < len(perm) and cur[j + r] == perm[k + r]:
                r += 1
            prod = [math.prod(sizes[a] for a in part)
                    for part in (cur[:k], cur[k:j], cur[j:j + r], cur[j + r:])]
            emit(prod, [0, 2, 1, 3])
            cur = cur[:k] + cur[j:j + r] + cur[k:j] + cur[j + r:]
    graph.insert_before(node, new_nodes)
    for u in users:
        u.replace_input_with(0, src)
    graph.remove(node, safe=True)
    return True


def block_broadcast_repeats(dims: list[int], out: list[int]) -> list[int] | None:
    """Tile repeats that make an operand of shape ``dims`` cover the outer axes of ``out``.

    Returned where the operand, aligned to ``out``'s rank, is broadcast (size 1 or missing) on an
    axis that lies before one of its own non-trivial inner axes other than the last (a block of
    rows × features repeated, e.g. [N, D] over the batch of [B, N, D]); those axes are repeated.
    None where it broadcasts only along the last axes or not at all ([D], [B, 1, D], [B, N, 1]).
    """
    rank = len(out)
    if len(dims) > rank:
        return None
    dims = [1] * (rank - len(dims)) + list(dims)
    inner = [b for b in range(rank - 1) if dims[b] == out[b] > 1]
    if not inner:
        return None
    reps = [out[a] if a < inner[-1] and dims[a] == 1 else 1 for a in range(rank)]
    return reps if any(r > 1 for r in reps) else None


def _feeds_layernorm(value: ir.Value) -> bool:
    """``value`` reaches a LayerNormalization's input, directly or through elementwise ops."""
    stack, seen = [value], set()
    while stack and len(seen) <= _MAX_HOPS:
        v = stack.pop()
        for user, idx in v.uses():
            if user.domain not in ("", "ai.onnx") or id(user) in seen:
                continue
            if user.op_type == "LayerNormalization" and idx == 0:
                return True
            if user.op_type in _ELEMENTWISE:
                seen.add(id(user))
                stack.extend(user.outputs)
    return False


def _tile_block_broadcast(graph: ir.Graph, node: ir.Node) -> int:
    """Tile each operand of a binary op that broadcasts a block over outer axes (see above).

    Only where the result reaches a LayerNormalization and both input shapes are static; returns
    the number of operands tiled. The op itself stays: only its input changes.
    """
    if len(node.inputs) != 2 or any(v is None for v in node.inputs):
        return 0
    dims = [_static_dims(v) for v in node.inputs]
    if any(d is None for d in dims) or not _feeds_layernorm(node.outputs[0]):
        return 0
    try:
        out = [int(d) for d in np.broadcast_shapes(*(tuple(d) for d in dims))]
    except ValueError:
        return 0
    tiled = 0
    base = node.outputs[0].name or node.name or "binary"
    for i, (v, d) in enumerate(zip(node.inputs, dims)):
        reps = block_broadcast_repeats(d, out)
        if reps is None:
            continue
        new_nodes, src = [], v
        if len(d) < len(out):  # align the rank first (Tile keeps it)
            full = [1] * (len(out) - len(d)) + d
            shp = _const(graph, f"{base}_bcast{i}_shape", np.array(full, np.int64))
            r = ir.node("Reshape", [v, shp], name=f"{base}_bcast{i}_reshape")
            r.outputs[0].name, r.outputs[0].type = f"{base}_bcast{i}_aligned", v.type
            r.outputs[0].shape = ir.Shape(full)
            new_nodes.append(r)
            src, d = r.outputs[0], full
        rep = _const(graph, f"{base}_bcast{i}_repeats", np.array(reps, np.int64))
        t = ir.node("Tile", [src, rep], name=f"{base}_bcast{i}_tile")
        t.outputs[0].name, t.outputs[0].type = f"{base}_bcast{i}_tiled", v.type
        t.outputs[0].shape = ir.Shape([a * b for a, b in zip(d, reps)])
        new_nodes.append(t)
        graph.insert_before(node, new_nodes)
        node.replace_input_with(i, t.outputs[0])
        tiled += 1
    return tiled


class GatherNDToGather(pattern.RewriteRuleClassBase):
    """GatherND(data, constant indices) ⇒ Reshape(data, flat) → Gather(linear indices)."""

    def pattern(self, op, data, indices):
        batch_dims = pattern.AttrVar("batch_dims", can_match_none=True)  # absent means 0
        return op.GatherND(data, indices, batch_dims=batch_dims, _outputs=["out"])

    def check(self, context, data, indices, batch_dims, **_) -> MatchResult:
        result = MatchResult()
        if batch_dims is not None and batch_dims.as_int() != 0:
            return result.fail(f"batch_dims={batch_dims.as_int()} (only 0 is rewritten)")
        if indices.const_value is None:
            return result.fail("indices are not a constant", indices)
        dims = _static_dims(data)
        if dims is None:
            return result.fail(f"data shape {data.shape} is not static", data)
        idx = indices.const_value.numpy()
        k = idx.shape[-1] if idx.ndim else 0
        if not 0 < k <= len(dims):
            return result.fail(f"indices of shape {idx.shape} do not index data of rank "
                               f"{len(dims)}")
        lead = np.array(dims[:k])
        if ((idx < -lead) | (idx >= lead)).any():  # Gather would read another element, not fail
            return result.fail("indices are out of range", indices)
        return result

    def rewrite(self, op, data, indices, out, **_):
        dims = _static_dims(data)
        idx = indices.const_value.numpy().astype(np.int64)
        k = idx.shape[-1]
        lead = np.array(dims[:k], np.int64)
        idx = np.where(idx < 0, idx + lead, idx)
        strides = np.cumprod(np.concatenate([[1], lead[::-1][:-1]]))[::-1]
        linear = (idx * strides).sum(-1).astype(np.int64)
        # initializers, not Constant nodes: the QDQ quantizer and the HTP expect static weights
        flat = op.initializer(ir.tensor(np.array([int(lead.prod()), *dims[k:]], np.int64)),
                              name=f"{out.name}_flat_shape")
        lin = op.initializer(ir.tensor(linear), name=f"{out.name}_linear_indices")
        flattened = op.Reshape(data, flat)
        gathered = op.Gather(flattened, lin, axis=0)
        flattened.type = gathered.type = data.type  # typed at the source (calibration reads it)
        return gathered


class GatherToLeadingAxis(pattern.RewriteRuleClassBase):
    """Gather(data, indices, axis=a ≠ 0) ⇒ Transpose(Gather(Transpose(data, a first), indices,
    axis=0), back) (the HTP's Gather on an inner axis is wrong: module docstring)."""

    def pattern(self, op, data, indices):
        return op.Gather(data, indices, _allow_other_attributes=True, _outputs=["out"])

    def check(self, context, data, indices, out, **_) -> MatchResult:
        result = MatchResult()
        rank = None if data.shape is None else len(data.shape)
        if rank is None or indices.shape is None:
            return result.fail("the rank of the data or the indices is unknown", data)
        axis = out.producer().attributes.get_int("axis", 0)
        if axis % rank == 0:
            return result.fail("already a Gather on the leading axis")
        return result

    def rewrite(self, op, data, indices, out):
        rank, r_idx = len(data.shape), len(indices.shape)
        axis = out.producer().attributes.get_int("axis", 0) % rank
        front = [axis, *(a for a in range(rank) if a != axis)]
        moved = op.Transpose(data, perm=front)
        gathered = op.Gather(moved, indices, axis=0)
        moved.type = gathered.type = data.type  # typed at the source (calibration reads it)
        # gathered: [indices dims, data dims before axis, data dims after axis]
        back = [*range(r_idx, r_idx + axis), *range(r_idx), *range(r_idx + axis, rank + r_idx - 1)]
        if back == sorted(back):  # a scalar index: the order is already right
            return gathered
        return op.Transpose(gathered, perm=back)


class DropSoftmaxNanGuard(pattern.RewriteRuleClassBase):
    """Where(IsNaN(p), c, p) ⇒ p, for p the output of a Softmax."""

    def pattern(self, op, p, c):
        return op.Where(op.IsNaN(p), c, p)

    def check(self, context, p, c, **_) -> MatchResult:
        result = MatchResult()
        producer = p.producer()
        if producer is None or producer.op_type != "Softmax" or producer.domain != "":
            return result.fail("the guarded value is not a Softmax output", p)
        return result

    def rewrite(self, op, p, c):
        # The rewriter gives the returned value the guard's name: a p that is itself a graph output
        # would lose its name, so it stays and an Identity carries the guard's name instead.
        return op.Identity(p) if p.is_graph_output() else p


class MishToSoftplusTanh(pattern.RewriteRuleClassBase):
    """Mish(x) ⇒ x · Tanh(Softplus(x)): ONNX's own function body for Mish, all three HTP ops."""

    def pattern(self, op, x):
        return op.Mish(x)

    def rewrite(self, op, x):
        soft = op.Softplus(x)
        gate = op.Tanh(soft)
        soft.type = gate.type = x.type  # typed at the source (calibration reads it)
        return op.Mul(x, gate)


class UnshareLayerNormBias(pattern.RewriteRuleClassBase):
    """LayerNormalization(x, w, w): a bias that is the scale tensor itself (the cleanup merges
    equal initializers) ⇒ LayerNormalization(x, w, copy of w), so each is quantized for its own
    role."""

    def pattern(self, op, x, scale, bias):
        return op.LayerNormalization(x, scale, bias, _allow_other_attributes=True,
                                     _outputs=["out"])

    def check(self, context, x, scale, bias, **_) -> MatchResult:
        result = MatchResult()
        if bias is not scale or scale.const_value is None:
            return result.fail("the bias is not the scale's constant", bias)
        return result

    def rewrite(self, op, x, scale, bias, out):
        node = out.producer()
        copy = op.initializer(ir.tensor(scale.const_value.numpy().copy()),
                              name=f"{out.name}_bias")
        return op.LayerNormalization(x, scale, copy,
                                     **{a.name: a for a in node.attributes.values()})


class ReciprocalToDiv(pattern.RewriteRuleClassBase):
    """Reciprocal(x) ⇒ Div(1, x), 1 a scalar of x's float type (the HTP's quantized Reciprocal
    is wrong for input ranges below 1: module docstring)."""

    def pattern(self, op, x):
        return op.Reciprocal(x, _outputs=["out"])

    def check(self, context, x, **_) -> MatchResult:
        result = MatchResult()
        if x.dtype is None or not x.dtype.is_floating_point():
            return result.fail("the input's element type is unknown or not a float", x)
        return result

    def rewrite(self, op, x, out):
        one = op.initializer(ir.tensor(np.array(1, dtype=x.dtype.numpy())),
                             name=f"{out.name}_one")
        return op.Div(one, x)


# either operand order of the SiLU's Mul
_SILU = pattern.RewriteRuleSet([SiluOperandCopy.rule()], commute=True)

RULES = pattern.RewriteRuleSet([GatherNDToGather.rule(), DropSoftmaxNanGuard.rule(),
                                MishToSoftplusTanh.rule(), UnshareLayerNormBias.rule(),
                                ReciprocalToDiv.rule(), GatherToLeadingAxis.rule(),
                                FoldWeightTranspose.rule()])
