"""Weight and node edits for the rotation pass.

Every weight is read once from the unmodified graph into a float64 copy, rotations compose on the
copies (so R1 on one side and R2/R4 on the other never see each other's rounding), and each copy is
written back once in the initializer's own dtype. A weight shared by several nodes (the exporter
deduplicates equal constants; a tied LM head reads the embedding table through a Transpose) is
copied for the node being rotated, so the other readers keep the value they had.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from edgec.graph_passes.rotation.topology import Linear, Norm, const_array

__all__ = ["WeightEditor"]

ROTATION_TAG = "edgec.rotation"  # metadata on nodes this pass inserts: which rotation they apply


class WeightEditor:
    def __init__(self, graph: ir.Graph):
        self.graph = graph
        self._weights: dict[int, tuple[Linear, np.ndarray]] = {}
        self._biases: dict[int, tuple[Linear, np.ndarray | None]] = {}
        self._tables: dict[tuple[int, int], tuple[ir.Node, int, np.ndarray]] = {}
        self._names = {v.name for n in graph for v in (*n.inputs, *n.outputs) if v is not None}
        self._names |= set(graph.initializers) | {v.name for v in graph.inputs}
        self.split = 0  # initializers copied because another node also reads them

    # -- cached float64 copies ------------------------------------------------------------------
    def weight(self, lin: Linear) -> np.ndarray:
        """The [in, out] weight (a mutable float64 copy; edits stick)."""
        if id(lin.node) not in self._weights:
            self._weights[id(lin.node)] = (lin, lin.weight().astype(np.float64))
        return self._weights[id(lin.node)][1]

    def set_weight(self, lin: Linear, w: np.ndarray) -> None:
        self._weights[id(lin.node)] = (lin, w)

    def bias(self, lin: Linear) -> np.ndarray | None:
        if id(lin.node) not in self._biases:
            b = lin.bias()
            self._biases[id(lin.node)] = (lin, None if b is None else b.astype(np.float64))
        return self._biases[id(lin.node)][1]

    def set_bias(self, lin: Linear, b: np.ndarray) -> None:
        self._biases[id(lin.node)] = (lin, b)

    def table(self, site: tuple[ir.Node, int]) -> np.ndarray:
        """An embedding table or constant addend (input ``site[1]`` of ``site[0]``)."""
        node, idx = site
        if (id(node), idx) not in self._tables:
            arr = const_array(node.inputs[idx]).astype(np.float64)
            self._tables[(id(node), idx)] = (node, idx, arr)
        return self._tables[(id(node), idx)][2]

    def set_table(self, site: tuple[ir.Node, int], t: np.ndarray) -> None:
        self._tables[(id(site[0]), site[1])] = (site[0], site[1], t)

    # -- writing back ---------------------------------------------------------------------------
    def flush(self) -> int:
        """Write every edited copy into the graph; returns how many tensors were written."""
        for lin, w in self._weights.values():
            src = lin.transposed_source
            if src is not None:  # tied LM head: give it its own [in, out] initializer
                transpose = lin.node.inputs[1].producer()
                self._write(lin.node, 1, w, dtype=const_array(src).dtype, base=src.name)
                if not list(transpose.outputs[0].uses()):
                    self.graph.remove(transpose, safe=True)
                self.split += 1
                continue
            trans_b = lin.node.op_type == "Gemm" and lin.node.attributes.get("transB")
            self._write(lin.node, 1, w.T if trans_b and trans_b.value else w)
        for lin, b in self._biases.values():
            if b is not None:
                self._write_bias(lin, b)
        for node, idx, t in self._tables.values():
            self._write(node, idx, t)
        return len(self._weights) + len(self._biases) + len(self._tables)

    def fresh(self, base: str, suffix: str = "_rot") -> str:
        name, k = f"{base}{suffix}", 1
        while name in self._names:
            k += 1
            name = f"{base}{suffix}{k}"
        self._names.add(name)
        return name

    def constant(self, array: np.ndarray, base: str, suffix: str = "_rot") -> ir.Value:
        name = self.fresh(base, suffix)
        value = ir.Value(name=name, shape=ir.Shape(array.shape),
                         type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                         const_value=ir.tensor(array, name=name))
        self.graph.register_initializer(value)
        return value

    def _write(self, node: ir.Node, idx: int, array: np.ndarray, dtype=None, base=None) -> None:
        old = node.inputs[idx]
        dtype = dtype or const_array(old).dtype
        array = np.ascontiguousarray(array.astype(dtype))
        init = self.graph.initializers.get(old.name)
        if init is old and len(list(old.uses())) == 1 and not old.is_graph_output():
            old.const_value = ir.tensor(array, name=old.name)
            old.shape = ir.Shape(array.shape)  # an edit may change it (outlier_split)
            return
        if init is old:
            self.split += 1
        node.replace_input_with(idx, self.constant(array, base or old.name))
        self._drop_if_unused(old)

    def _drop_if_unused(self, value: ir.Value) -> None:
        if list(value.uses()) or value.is_graph_output():
            return
        if self.graph.initializers.get(value.name) is value:
            del self.graph.initializers[value.name]
        elif value.producer() is not None and value.producer().op_type == "Constant":
            self.graph.remove(value.producer(), safe=True)

    def _write_bias(self, lin: Linear, b: np.ndarray) -> None:
        node = lin.node
        if lin.bias_node is not None:
            add = lin.bias_node
            idx = 0 if const_array(add.inputs[0]) is not None else 1
            self._write(add, idx, b)
            return
        dtype = lin.weight().dtype
        if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
            self._write(node, 2, b)
            return
        if node.op_type == "Gemm":
            node.resize_inputs(3)
            node.replace_input_with(2, self.constant(b.astype(dtype), f"{node.name}_bias"))
            return
        y = lin.output  # after a LoRA branch's Add, if any
        add = self.node("Add", [y, self.constant(b.astype(dtype), f"{y.name}_bias")], y, "r1")
        out = add.outputs[0]
        y.replace_all_uses_with(out, replace_graph_outputs=True)
        add.replace_input_with(0, y)  # replace_all_uses_with rewired the Add's own input too
        if out.is_graph_output():  # the graph output keeps its name
            y.name, out.name = out.name, y.name
        self.graph.insert_after(y.producer(), [add])
        lin.bias_node = add

    # -- nodes ----------------------------------------------------------------------------------
    def node(self, op: str, inputs: Sequence[ir.Value], like: ir.Value, tag: str,
             **attributes) -> ir.Node:
        """A new node whose one output has ``like``'s type and shape and a fresh name."""
        n = ir.node(op, list(inputs), attributes=attributes or None,
                    name=self.fresh(f"{tag}/{op}"), metadata_props={ROTATION_TAG: tag})
        out = n.outputs[0]
        out.name, out.type, out.shape = self.fresh(f"{like.name}_{tag}"), like.type, like.shape
        return n

    def drop_norm_scale(self, norm: Norm) -> None:
        """The norm's γ (and β) now live in the Linears it feeds: make the norm weightless."""
        if norm.scale_node is not None:  # decomposed RMSNorm: bypass the Mul by γ
            norm.output.replace_all_uses_with(norm.normalized)
            self.graph.remove(norm.scale_node, safe=True)
            self._drop_if_unused(norm.scale)
        elif norm.kind == "rms" and norm.scale is not None:  # RMSNormalization op
            self._write(norm.node, 1, np.ones(const_array(norm.scale).shape))

    def layer_norm_to_rms(self, norm: Norm, opset: int) -> None:
        """LayerNorm(x) = RMSNorm(x) once the stream is zero-mean: x / sqrt(mean(x²) + ε)."""
        ln, x = norm.node, norm.input
        dtype = x.dtype.numpy() if x.dtype is not None else np.dtype(np.float32)
        sq = self.node("Mul", [x, x], x, "r1")
        if opset >= 18:
            axes = self.constant(np.array([-1], dtype=np.int64), f"{ln.name}_axes")
            mean = self.node("ReduceMean", [sq.outputs[0], axes], x, "r1", keepdims=1)
        else:
            mean = self.node("ReduceMean", [sq.outputs[0]], x, "r1", axes=[-1], keepdims=1)
        mean.outputs[0].shape = None
        eps = self.constant(np.array(norm.eps, dtype=dtype), f"{ln.name}_eps")
        var = self.node("Add", [mean.outputs[0], eps], mean.outputs[0], "r1")
        root = self.node("Sqrt", [var.outputs[0]], var.outputs[0], "r1")
        y = self.node("Div", [x, root.outputs[0]], ln.outputs[0], "r1")
        self.graph.insert_before(ln, [sq, mean, var, root, y])
        ln.outputs[0].replace_all_uses_with(y.outputs[0])
        self.graph.remove(ln, safe=True)
        for v in ln.inputs[1:]:
            if v is not None:
                self._drop_if_unused(v)

    def insert_online(self, lin: Linear, factors: Sequence[np.ndarray], tag: str) -> int:
        """x → x·(F₁ ⊗ … ⊗ Fₖ) before ``lin`` (two small MatMuls when factored); node count."""
        x = lin.input
        dtype = x.dtype.numpy() if x.dtype is not None else np.dtype(np.float32)
        if len(factors) == 1:
            m = self.constant(factors[0].astype(dtype), f"{tag}_hadamard")
            nodes = [self.node("MatMul", [x, m], x, tag)]
        else:
            a = factors[0]
            for f in factors[1:-1]:
                a = np.kron(a, f)
            b = factors[-1]
            shape = self.constant(np.array([-1, a.shape[0], b.shape[0]], np.int64), f"{tag}_shape")
            split = self.node("Reshape", [x, shape], x, tag)
            right = self.node("MatMul", [split.outputs[0],
                                         self.constant(b.astype(dtype), f"{tag}_right")], x, tag)
            left = self.node("MatMul", [self.constant(a.T.astype(dtype), f"{tag}_left"),
                                        right.outputs[0]], x, tag)
            back_shape = self.node("Shape", [x], x, tag)
            back = self.node("Reshape", [left.outputs[0], back_shape.outputs[0]], x, tag)
            for n in (split, right, left):
                n.outputs[0].shape = None
            back_shape.outputs[0].type = ir.TensorType(ir.DataType.INT64)
            back_shape.outputs[0].shape = None
            nodes = [split, right, left, back_shape, back]
        self.graph.insert_before(lin.node, nodes)
        lin.node.replace_input_with(0, nodes[-1].outputs[0])
        return len(nodes)
