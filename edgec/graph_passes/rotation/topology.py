"""What a rotation needs to know about a transformer graph, read from the graph alone (never from
node names): norms and the MatMuls they feed, the residual stream, attention V/O per head with the
GQA grouping, and FFN down projections.

Everything a rotation would change is proven closed here: a stream value is read only by its norm
(and the next residual Add), a rotated V reaches nothing but its attention MatMul, and so on. Where
that proof fails the finder returns a ``Skip`` (node + reason) instead of a structure, so the pass
can rotate what is exact and report the rest.

A swappable-LoRA branch ``y + (x·A)·B`` (its nodes carry ``edgec.lora.branch`` metadata; A and B
are graph inputs) is part of its base ``Linear`` (``lora_add``): its x·A MatMul is not another
reader of x, and the branch's Add output stands for the base's output (stream writers, V tracing).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from edgec.graph_passes.rotation.heads import trace_attention

__all__ = ["Linear", "Norm", "Stream", "Attention", "Skip", "Topology", "analyze", "as_linear",
           "const_array", "const_tensor", "is_lora_reader", "LORA_BRANCH"]

# Node metadata of a swappable-LoRA branch (``graph_passes.lora.swappable``): the module name.
LORA_BRANCH = "edgec.lora.branch"


@dataclasses.dataclass(frozen=True)
class Skip:
    rotation: str  # "r1" | "r2" | "r4"
    node: str
    reason: str

    def to_json(self) -> dict[str, str]:
        return dataclasses.asdict(self)


def const_tensor(value: ir.Value | None) -> ir.TensorProtocol | None:
    """The value's constant tensor (initializer or Constant node, through Identity), None if it
    can vary (a graph input, or computed)."""
    while value is not None and _is(value.producer(), "Identity"):
        value = value.producer().inputs[0]
    if value is None or value.is_graph_input():
        return None
    return ir.convenience.get_const_tensor(value)


def const_array(value: ir.Value | None) -> np.ndarray | None:
    tensor = const_tensor(value)
    return None if tensor is None else tensor.numpy()


@dataclasses.dataclass
class Linear:
    """y = x·W (+ b): MatMul or Gemm with a constant 2-D weight, optionally a constant bias Add."""

    node: ir.Node
    bias_node: ir.Node | None = None  # Add(x·W, b) after a MatMul (a Gemm's bias is its input 2)
    # Add(x·W, (x·A)·B): a swappable-LoRA branch on this MatMul (before the bias Add, if any). The
    # branch reads the same x and adds into the same output, so it stands with its base Linear.
    lora_add: ir.Node | None = None

    @property
    def input(self) -> ir.Value:
        return self.node.inputs[0]

    @property
    def output(self) -> ir.Value:
        return (self.bias_node or self.lora_add or self.node).outputs[0]

    @property
    def lora_module(self) -> str | None:
        """The module name of this Linear's swappable-LoRA site, None without one."""
        return None if self.lora_add is None else self.lora_add.metadata_props[LORA_BRANCH]

    @property
    def transposed_source(self) -> ir.Value | None:
        """The constant behind ``Transpose(W)`` when the weight is reached through one (tied
        embeddings: lm_head reads the embedding table transposed)."""
        w = self.node.inputs[1]
        p = w.producer()
        return p.inputs[0] if p is not None and p.op_type == "Transpose" else None

    @property
    def shape(self) -> tuple[int, int]:
        """(in, out) without reading the weight."""
        src = self.transposed_source
        dims = tuple(const_tensor(src if src is not None else self.node.inputs[1]).shape)
        trans_b = self.node.op_type == "Gemm" and _attr(self.node, "transB", 0)
        return dims[::-1] if src is not None or trans_b else dims

    def weight(self) -> np.ndarray:
        """W in [in, out] layout."""
        w = self.node.inputs[1]
        src = self.transposed_source
        if src is not None:
            return const_array(src).T
        arr = const_array(w)
        return arr.T if self.node.op_type == "Gemm" and _attr(self.node, "transB", 0) else arr

    def bias(self) -> np.ndarray | None:
        if self.node.op_type == "Gemm":
            return const_array(self.node.inputs[2]) if len(self.node.inputs) > 2 else None
        if self.bias_node is None:
            return None
        return next(a for a in map(const_array, self.bias_node.inputs) if a is not None)


def _attr(node: ir.Node, name: str, default):
    a = node.attributes.get(name)
    return default if a is None else a.value


def as_linear(node: ir.Node | None) -> Linear | None:
    """``node`` as a Linear (its bias Add included), or None if its weight is not a 2-D constant."""
    if node is None or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
        return None
    w = node.inputs[1]
    if node.op_type == "Gemm":
        if (_attr(node, "transA", 0) or _attr(node, "alpha", 1.0) != 1.0
                or _attr(node, "beta", 1.0) != 1.0):
            return None
        c = node.inputs[2] if len(node.inputs) > 2 else None
        if c is not None and (const_array(c) is None or const_array(c).ndim != 1):
            return None
    elif node.op_type != "MatMul":
        return None
    p = w.producer() if w is not None else None
    if p is not None and p.op_type == "Transpose":  # a tied LM head reads the table transposed
        if node.op_type != "MatMul" or _attr(p, "perm", None) not in (None, (1, 0), [1, 0]):
            return None
        w = p.inputs[0]
    t = const_tensor(w)
    if t is None or len(t.shape) != 2 or not t.dtype.is_floating_point():
        return None
    lin = Linear(node)
    n_out = lin.shape[1]
    if node.op_type == "MatMul":
        lin.lora_add = _lora_add(node)
        y = lin.output
        uses = list(y.uses())
        if len(uses) == 1 and uses[0].node.op_type == "Add" and not y.is_graph_output():
            add = uses[0].node
            other = const_array(add.inputs[1 - uses[0].idx])
            if other is not None and other.ndim == 1 and other.shape[0] == n_out:
                lin.bias_node = add
    return lin


def _lora_branch(add: ir.Node) -> tuple[ir.Node, ir.Node] | None:
    """(xA, xAB) of a swappable-LoRA ``Add(y, (x·A)·B)`` whose branch nodes feed nothing else."""
    module = add.metadata_props.get(LORA_BRANCH)
    if module is None or not _is(add, "Add"):
        return None
    for v in add.inputs:
        xab = v.producer() if v is not None else None
        if not _is(xab, "MatMul") or xab.metadata_props.get(LORA_BRANCH) != module:
            continue
        xa = xab.inputs[0].producer()
        if (_is(xa, "MatMul") and xa.metadata_props.get(LORA_BRANCH) == module
                and xa.inputs[1].is_graph_input() and xab.inputs[1].is_graph_input()
                and all(len(list(n.outputs[0].uses())) == 1 and not n.outputs[0].is_graph_output()
                        for n in (xa, xab))):
            return xa, xab
    return None


def _lora_add(node: ir.Node) -> ir.Node | None:
    """The swappable-LoRA Add on this MatMul's output whose branch reads this MatMul's input."""
    y = node.outputs[0]
    uses = list(y.uses())
    if len(uses) != 1 or y.is_graph_output():
        return None
    add = uses[0].node
    branch = _lora_branch(add)
    if branch is None or branch[1].outputs[0] is y or branch[0].inputs[0] is not node.inputs[0]:
        return None
    return add


def is_lora_reader(node: ir.Node) -> bool:
    """``node`` is the x·A MatMul of a swappable-LoRA branch whose base Linear reads the same x:
    not a reader of its own (a rotation of x goes into the branch's A, see ``rotation.lora``)."""
    if not _is(node, "MatMul") or LORA_BRANCH not in node.metadata_props:
        return False
    for use in node.inputs[0].uses():
        base = use.node
        if use.idx == 0 and base is not node and _is(base, "MatMul"):
            add = _lora_add(base)
            if add is not None and _lora_branch(add)[0] is node:
                return True
    return False


def linear_ending_at(value: ir.Value) -> Linear | None:
    """The Linear whose output (after its LoRA branch and bias) is ``value``."""
    p = value.producer()
    if p is None:
        return None
    if p.op_type == "Add":  # a bias Add, a LoRA branch's Add, or the bias Add after that one
        for x in p.inputs:
            q = x.producer() if x is not None else None
            below = [y.producer() for y in q.inputs if y is not None] if _is(q, "Add") else []
            for node in (q, *below):
                lin = as_linear(node)
                if lin is not None and lin.output is value:
                    return lin
        return None
    lin = as_linear(p)
    return lin if lin is not None and lin.output is value else None


@dataclasses.dataclass
class Norm:
    """RMSNorm (decomposed as the exporter writes it, or the op) or LayerNorm over the last axis."""

    kind: str  # "rms" | "layer"
    node: ir.Node  # names the norm in reports (the normalizing node)
    input: ir.Value
    normalized: ir.Value  # x/rms(x), or the LayerNorm output
    output: ir.Value  # after the scale (and shift)
    scale: ir.Value | None
    shift: ir.Value | None
    scale_node: ir.Node | None  # the Mul by γ of a decomposed RMSNorm
    reads: list[ir.Node]  # the norm's nodes that read its input
    eps: float


def _is(node: ir.Node | None, op: str) -> bool:
    return node is not None and node.op_type == op and node.domain in ("", "ai.onnx")


def _scalar(value: ir.Value | None) -> float | None:
    arr = const_array(value)
    return float(arr.reshape(-1)[0]) if arr is not None and arr.size == 1 else None


def _reduces_last_axis(node: ir.Node, rank: int | None) -> bool:
    axes = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if axes is None:
        axes = _attr(node, "axes", None)
    if axes is None or len(np.atleast_1d(axes)) != 1 or not _attr(node, "keepdims", 1):
        return False
    axis = int(np.atleast_1d(axes)[0])
    return axis == -1 or (rank is not None and axis == rank - 1)


def _rms_eps(x: ir.Value, root: ir.Value, inverse: bool) -> tuple[float, list[ir.Node]] | None:
    """eps if ``root`` is 1/sqrt(mean(x²)+eps) (``inverse``) or sqrt(mean(x²)+eps)."""
    node = root.producer()
    if inverse:
        if _is(node, "Reciprocal"):
            node = node.inputs[0].producer()
        elif _is(node, "Div") and _scalar(node.inputs[0]) == 1.0:
            node = node.inputs[1].producer()
        else:
            return None
    if not _is(node, "Sqrt"):
        return None
    add = node.inputs[0].producer()
    if not _is(add, "Add"):
        return None
    eps = [_scalar(v) for v in add.inputs]
    mean = next((v.producer() for v, e in zip(add.inputs, eps) if e is None), None)
    if None not in eps or not _is(mean, "ReduceMean"):
        return None
    rank = len(x.shape) if x.shape is not None else None
    sq = mean.inputs[0].producer()
    if not _reduces_last_axis(mean, rank) or sq is None:
        return None
    if _is(sq, "Pow") and sq.inputs[0] is x and _scalar(sq.inputs[1]) == 2.0:
        return next(e for e in eps if e is not None), [sq]
    if _is(sq, "Mul") and sq.inputs[0] is x and sq.inputs[1] is x:
        return next(e for e in eps if e is not None), [sq]
    return None


def _match_rms(node: ir.Node) -> Norm | None:
    if _is(node, "Div"):
        candidates = [(node.inputs[0], node.inputs[1], False)]
    elif _is(node, "Mul"):
        a, b = node.inputs
        candidates = [(a, b, True), (b, a, True)]
    else:
        return None
    for x, root, inverse in candidates:
        found = _rms_eps(x, root, inverse)
        if found is None:
            continue
        eps, sq_nodes = found
        normalized = node.outputs[0]
        scale_node = scale = None
        uses = list(normalized.uses())
        if len(uses) == 1 and _is(uses[0].node, "Mul") and not normalized.is_graph_output():
            other = uses[0].node.inputs[1 - uses[0].idx]
            arr = const_array(other)
            if arr is not None and arr.ndim == 1:
                scale_node, scale = uses[0].node, other
        output = scale_node.outputs[0] if scale_node is not None else normalized
        return Norm("rms", node, x, normalized, output, scale, None, scale_node,
                    sq_nodes + [node], eps)
    return None


def find_norms(graph: ir.Graph) -> list[Norm]:
    """Every norm over the last axis, in graph order."""
    norms = []
    for node in graph:
        if _is(node, "LayerNormalization") or _is(node, "RMSNormalization"):
            rank = len(node.inputs[0].shape) if node.inputs[0].shape is not None else None
            axis = _attr(node, "axis", -1)
            if axis != -1 and axis != (rank or 0) - 1:
                continue
            shift = node.inputs[2] if len(node.inputs) > 2 else None
            kind = "layer" if node.op_type == "LayerNormalization" else "rms"
            norms.append(Norm(kind, node, node.inputs[0], node.outputs[0], node.outputs[0],
                              node.inputs[1], shift, None, [node],
                              float(_attr(node, "epsilon", 1e-5))))
        else:
            norm = _match_rms(node)
            if norm is not None:
                norms.append(norm)
    return norms


@dataclasses.dataclass
class Stream:
    """A pre-norm residual stream: embeddings and Linears write it, norms read it, nothing else
    touches it; each norm's output feeds only Linears (the last norm's: the LM head)."""

    tables: list[tuple[ir.Node, int]]  # (node, input) of embedding tables / constant addends
    writers: list[Linear]  # residual-branch outputs (o / down projections) and input projections
    blocks: list[tuple[Norm, list[Linear]]]  # every stream norm with the Linears it feeds
    values: list[ir.Value]  # the stream's values in order (embedding, then each residual Add)
    width: int
    # Reshapes of the stream itself that keep its last axis (OPT's [b, s, d] ↔ [b·s, d] around
    # each FFN half): R1 passes them untouched, see ``_through_flattens``
    reshapes: list[ir.Node] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Attention:
    """One attention block's V and O projections and how their columns / rows split into heads."""

    layer: int
    v: Linear
    o: Linear
    head_dim: int
    heads: int
    kv_heads: int
    v_columns: list[int]  # first column of each kv head's block in V's [in, out] weight
    o_rows: list[int]  # first row of each query head's block in O's [in, out] weight
    group: list[int]  # query head → the kv head it reads


@dataclasses.dataclass
class Topology:
    norms: list[Norm]
    stream: Stream | None
    attention: list[Attention]
    ffn_down: list[Linear]
    skipped: list[Skip]


def analyze(graph: ir.Graph) -> Topology:
    norms = find_norms(graph)
    skipped: list[Skip] = []
    stream = None
    if norms:
        stream = find_stream(norms)
        if isinstance(stream, Skip):
            skipped.append(stream)
            stream = None
    attention = []
    for node in graph:
        if _is(node, "Softmax"):
            found = trace_attention(node, len(attention))
            if isinstance(found, Skip):
                skipped.append(found)
            elif found is not None:
                attention.append(Attention(*found))
    return Topology(norms, stream, attention, find_ffn_down(graph, norms), skipped)


def _describe_reader(node: ir.Node, value: ir.Value) -> str:
    if _is(node, "Add") and any(linear_ending_at(x) is not None for x in node.inputs
                                if x is not value):
        return (f"post-norm: {node.name} adds the norm's output {value.name} into the residual "
                "stream, and R1 cannot pass a norm on the stream")
    if _is(node, "Mul") or _is(node, "Add"):
        return (f"modulated: {node.name} ({node.op_type}) scales or shifts the norm's output by a "
                "per-sample tensor (AdaLN), which does not commute with a rotation")
    return (f"{node.name} ({node.op_type}) reads the norm's output {value.name}; R1 can only pass "
            "into MatMuls with constant weights")


def _readers(norm: Norm) -> list[Linear] | Skip:
    out = norm.output
    if out.is_graph_output():
        return Skip("r1", norm.node.name, f"the norm's output {out.name} is a graph output")
    readers = []
    for use in _uses(out):
        if _is(use.node, "Shape") or (use.idx == 0 and is_lora_reader(use.node)):
            continue
        lin = as_linear(use.node) if use.idx == 0 else None
        if lin is None:
            return Skip("r1", norm.node.name, _describe_reader(use.node, out))
        readers.append(lin)
    if not readers:
        return Skip("r1", norm.node.name, "the norm's output is not used")
    return readers


def _writers(value: ir.Value, site: tuple[ir.Node, int] | None, tables: list,
             writers: list) -> Skip | None:
    """Collect what writes ``value`` (embedding tables, constants, Linears, sums of them) or say
    why not; ``site`` is the (node, input index) reading ``value``."""
    p = value.producer()
    arr = const_array(value)
    if arr is not None and site is not None and arr.ndim >= 1 and np.issubdtype(
            arr.dtype, np.floating):
        tables.append(site)  # a constant addend, e.g. position embeddings folded by the exporter
        return None
    if p is None:
        return Skip("r1", value.name, "the residual stream starts at a graph input")
    if _is(p, "Gather") and _attr(p, "axis", 0) == 0:
        table = const_tensor(p.inputs[0])
        if table is not None and len(table.shape) == 2 and table.dtype.is_floating_point():
            tables.append((p, 0))
            return None
    lin = linear_ending_at(value)
    if lin is not None:
        writers.append(lin)
        return None
    x = p.inputs[0] if flattens(p) else _scaled(p)
    if x is not None and not x.is_graph_output() and len(list(x.uses())) == 1:
        return _writers(x, None, tables, writers)  # (x·R1)·c = (x·c)·R1, a Reshape keeps R1
    if _is(p, "Add"):
        for i, x in enumerate(p.inputs):
            if x.is_graph_output() or (len(list(x.uses())) != 1 and const_tensor(x) is None):
                break
            skip = _writers(x, (p, i), tables, writers)
            if skip is not None:
                return skip
        else:
            return None
    return Skip("r1", p.name, f"{p.name} ({p.op_type}) writes into the residual stream; only "
                "embeddings and MatMuls with constant weights can be rotated")


def _scaled(node: ir.Node) -> ir.Value | None:
    """x of ``x·c``, ``c·x`` or ``x/c`` with a one-element constant c (Gemma's √d embedding
    scale): a scale of the whole stream commutes with R1. None for anything else."""
    if not (_is(node, "Mul") or _is(node, "Div")):
        return None
    for x, c in ((node.inputs[0], node.inputs[1]), (node.inputs[1], node.inputs[0]))[
            :2 if node.op_type == "Mul" else 1]:
        arr = const_array(c)
        if arr is not None and arr.size == 1 and const_tensor(x) is None:
            return x
    return None


def flattens(node: ir.Node | None) -> bool:
    """``node`` is a Reshape that keeps the last axis and only merges or splits the ones before
    it (GPT-2's Conv1D: [b, s, d] → [b·s, d] → Gemm → [b·s, d'] → [b, s, d']): a rotation of the
    last axis passes it. The new last axis must be a constant equal to the old one (a constant
    shape, or a Concat whose last part is constant)."""
    if not _is(node, "Reshape"):
        return False
    shape, x = node.inputs[1], node.inputs[0]
    arr = const_array(shape)
    p = shape.producer() if arr is None else None
    if _is(p, "Concat") and p.inputs:
        arr = const_array(p.inputs[-1])
    width = x.shape[-1] if x.shape is not None and len(x.shape) > 0 else None
    return (arr is not None and arr.ndim == 1 and arr.size > 0 and isinstance(width, int)
            and int(arr[-1]) == width)


def _uses(value: ir.Value):
    """``value``'s uses, each flattening Reshape (``flattens``) replaced by its output's uses."""
    for use in value.uses():
        y = use.node.outputs[0] if use.idx == 0 and flattens(use.node) else None
        if y is None or y.is_graph_output():
            yield use
        else:
            yield from _uses(y)


def find_stream(norms: list[Norm]) -> Stream | Skip:
    """Walk the residual stream from the first norm's input to the last norm (see ``Stream``)."""
    by_input: dict[int, list[Norm]] = {}
    for n in norms:
        by_input.setdefault(id(n.input), []).append(n)
    first = norms[0]
    tables: list[tuple[ir.Node, int]] = []
    writers: list[Linear] = []
    blocks, values, reshapes = [], [], []
    value = first.input
    while True:
        value = _through_flattens(value, by_input, reshapes)
        here = by_input.get(id(value), [])
        if len(here) != 1:
            return _no_single_norm(value, here, by_input)
        norm = here[0]
        readers = _readers(norm)
        if isinstance(readers, Skip):
            return readers
        if not blocks:
            skip = _writers(value, None, tables, writers)
            if skip is not None:
                return skip
        if value.is_graph_output():
            return Skip("r1", value.name, f"the residual stream value {value.name} is a graph "
                        "output")
        blocks.append((norm, readers))
        values.append(value)
        others = [u.node for u in value.uses()
                  if u.node not in norm.reads and not _is(u.node, "Shape")]
        if not others:
            break
        add = others[0]
        if len(others) != 1 or not _is(add, "Add"):
            return Skip("r1", add.name, f"{add.name} ({add.op_type}) reads the residual stream "
                        f"value {value.name} besides its norm")
        branch = add.inputs[1] if add.inputs[0] is value else add.inputs[0]
        if branch.is_graph_output() or len(list(branch.uses())) != 1:
            return Skip("r1", add.name, f"the residual branch {branch.name} is used elsewhere")
        skip = _writers(branch, (add, list(add.inputs).index(branch)), tables, writers)
        if skip is not None:
            return skip
        value = add.outputs[0]
    kinds = {n.kind for n, _ in blocks}
    if len(kinds) > 1:
        return Skip("r1", blocks[0][0].node.name, "the stream mixes RMSNorm and LayerNorm")
    width = readers[0].shape[0]
    for node, idx in tables:
        if const_tensor(node.inputs[idx]).shape[-1] != width:
            return Skip("r1", node.name, f"{node.name} adds a constant that is not {width} wide "
                        "into the residual stream")
    for node in reshapes:  # ``flattens`` kept the input's last axis; it must be the stream's
        if node.inputs[0].shape[-1] != width:
            return Skip("r1", node.name, f"{node.name} (Reshape) keeps a last axis of "
                        f"{node.inputs[0].shape[-1]}, not the stream's {width}")
    return Stream(tables, writers, blocks, values, width, reshapes)


def _through_flattens(value: ir.Value, by_input: dict[int, list[Norm]],
                      reshapes: list[ir.Node]) -> ir.Value:
    """The stream value past the Reshapes that carry it on: while no norm reads ``value``, it is
    no graph output and its one reader (a Shape aside: a rotation keeps the shape) is a Reshape
    of it that keeps the last axis (``flattens``), that Reshape's output; each such Reshape is
    appended to ``reshapes``. OPT's decoder layer does ``hidden_states.reshape(-1, d)`` before
    its FFN half and views the sum back to [b, s, d] after it, so its FFN LayerNorm and residual
    Add read a Reshape of the stream and the next layer reads a Reshape of that Add. In row-major
    order such a Reshape keeps every row of d values whole, so reshape(x·R1) = reshape(x)·R1 and
    a row's mean is unchanged (the zero-mean stream that makes LayerNorm an RMSNorm stays one);
    with no other reader, nothing sees the value before it, and it has no weight to rotate."""
    while not by_input.get(id(value)) and not value.is_graph_output():
        uses = [u for u in value.uses() if not _is(u.node, "Shape")]
        if len(uses) != 1 or uses[0].idx != 0 or not flattens(uses[0].node):
            break
        reshapes.append(uses[0].node)
        value = uses[0].node.outputs[0]
    return value


def _no_single_norm(value: ir.Value, here: list[Norm], by_input: dict[int, list[Norm]]) -> Skip:
    """Why R1 stops at the stream value ``value``, which not exactly one norm reads, named by
    what does read it. A Reshape of the stream that a norm reads is followed where it keeps the
    last axis and is the value's one reader (``_through_flattens``: OPT's [b·s, d] FFN half);
    where it is not, the skip names that Reshape and says which of the two failed."""
    if here:
        return Skip("r1", value.name, f"{len(here)} norms ({', '.join(n.node.name for n in here)}) "
                    f"read the residual stream value {value.name}; R1 passes a stream read by "
                    "one norm per block")
    readers = [u.node for u in value.uses() if not _is(u.node, "Shape")]
    for node in readers:
        if _is(node, "Reshape") and by_input.get(id(node.outputs[0])):
            norm = by_input[id(node.outputs[0])][0]
            if not flattens(node):
                why = ("that Reshape does not keep the last (hidden) axis, so a rotation of that "
                       "axis does not pass it")
            else:
                also = [f"{n.name} ({n.op_type})" for n in readers if n is not node]
                why = (f"{value.name} is also read by {', '.join(also)}" if also else
                       f"{value.name} is also a graph output")
            return Skip("r1", node.name, f"the residual stream itself is reshaped: {node.name} "
                        f"(Reshape) turns {value.name} into {node.outputs[0].name}, which the "
                        f"norm {norm.node.name} reads, and {why}; R1 follows a Reshape of the "
                        "stream only where it keeps the last axis (OPT's [b, s, d] → [b·s, d]) "
                        "and is the stream value's one reader")
    what = ", ".join(f"{n.name} ({n.op_type})" for n in readers) or "nothing"
    return Skip("r1", value.name, f"no norm reads the residual stream value {value.name} (read "
                f"by {what}); R1 passes a pre-norm stream whose every residual Add feeds the "
                "next block's norm")


_ELEMENTWISE = {"Mul", "Add", "Div", "Sub", "Gelu", "Relu", "Sigmoid", "Tanh", "Erf", "Pow",
                "HardSigmoid", "Softplus", "Elu", "Neg", "Exp", "Cast"}


def _from_linear(value: ir.Value, depth: int = 4) -> bool:
    """``value`` is an elementwise function of some Linear's output (an FFN's activation)."""
    p = value.producer()
    if p is None or depth == 0:
        return False
    if p.op_type in ("MatMul", "Gemm") and as_linear(p) is not None:
        return True
    if flattens(p):
        return _from_linear(p.inputs[0], depth)
    if p.op_type == "Add" and linear_ending_at(value) is not None:
        return True
    return p.op_type in _ELEMENTWISE and any(
        x is not None and const_tensor(x) is None and _from_linear(x, depth - 1) for x in p.inputs)


def find_ffn_down(graph: ir.Graph, norms: list[Norm]) -> list[Linear]:
    """Linears that read an activation of another Linear and write (through a bias and a gate)
    into a residual Add: the FFN down projections, where online R4 goes."""
    normed = {id(n.output) for n in norms}
    found = []
    for node in graph:
        lin = as_linear(node) if node.op_type in ("MatMul", "Gemm") else None
        if (lin is None or id(lin.input) in normed or not _from_linear(lin.input)
                or lin.input.producer().op_type in ("MatMul", "Gemm")):
            continue
        y = lin.output
        uses = list(y.uses())
        if len(uses) == 1 and uses[0].idx == 0 and flattens(uses[0].node):
            y = uses[0].node.outputs[0]  # back from [b·s, d] (GPT-2's Conv1D)
            uses = list(y.uses())
        if len(uses) == 1 and _is(uses[0].node, "Mul") and const_tensor(
                uses[0].node.inputs[1 - uses[0].idx]) is None:
            y = uses[0].node.outputs[0]  # a gate (AdaLN-zero)
            uses = list(y.uses())
        if len(uses) == 1 and _is(uses[0].node, "Add") and const_tensor(
                uses[0].node.inputs[1 - uses[0].idx]) is None:
            found.append(lin)
    return found
