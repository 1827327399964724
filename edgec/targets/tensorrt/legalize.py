"""TensorRT legalization: exact rewrites of common Q/DQ forms into TensorRT's symmetric signed form.

    Q(x, s, 128:u8) → DQ(·, s', 128:u8)   ⇒  Q(x, s, 0:i8) → DQ(·, s')
    DQ(W:u8|i8|u4|i4, s, z)  with W - z inside the signed range  ⇒  DQ(W - z : i8|i4, s)

Both are exact: ``clamp(round(x/s) + 128, 0, 255) - 128 == clamp(round(x/s), -128, 127)``, and a
constant weight shifted by its own zero point dequantizes to the same values. Anything that cannot
be made legal this way (an activation zero point other than the midpoint, a shifted weight outside
the signed range) is left as it is and reported by ``check_tensorrt_graph``.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgec.graph_passes._infra import EdgecPass, PassResult
from edgec.targets.tensorrt.rules import const_array, is_constant, qdq_nodes

__all__ = ["TensorRTLegalizePass"]

# unsigned → signed type of the same width, and the signed range and midpoint shift
_SIGNED = {ir.DataType.UINT8: (ir.DataType.INT8, -128, 127, 128),
           ir.DataType.INT8: (ir.DataType.INT8, -128, 127, 0),
           ir.DataType.UINT4: (ir.DataType.INT4, -8, 7, 8),
           ir.DataType.INT4: (ir.DataType.INT4, -8, 7, 0)}


class TensorRTLegalizePass(EdgecPass):
    """Shift unsigned or zero-pointed Q/DQ to symmetric signed form where the result is identical.

    Guarantees: outputs are bitwise unchanged (every rewrite is an exact integer shift); stats
    count the rewritten weights and Q/DQ pairs and the asymmetric sites left for the checker.
    """

    name = "tensorrt-legalize"
    exact = True
    rtol = 1e-6

    def call(self, model: ir.Model) -> PassResult:
        stats = {"weights_shifted": 0, "qdq_pairs_shifted": 0, "left_asymmetric": 0}
        graph = model.graph
        for node in qdq_nodes(graph):
            zp = node.inputs[2] if len(node.inputs) > 2 else None
            if zp is None or node.graph is None or _const_dtype(zp) not in _SIGNED:
                continue  # float8 and 16-bit forms have no signed shift; the checker judges them
            if _is_symmetric_signed(zp):
                continue
            if node.op_type == "DequantizeLinear" and is_constant(node.inputs[0]):
                done = _shift_weight(graph, node)
                stats["weights_shifted" if done else "left_asymmetric"] += 1
            elif node.op_type == "QuantizeLinear":
                done = _shift_pair(graph, node)
                stats["qdq_pairs_shifted" if done else "left_asymmetric"] += 1
        modified = bool(stats["weights_shifted"] or stats["qdq_pairs_shifted"])
        return PassResult(model, modified, stats)


def _const_dtype(value: ir.Value) -> ir.DataType | None:
    return ir.convenience.get_const_tensor(value).dtype if is_constant(value) else None


def _is_symmetric_signed(zp: ir.Value) -> bool:
    arr = const_array(zp)
    return _const_dtype(zp) in (ir.DataType.INT8, ir.DataType.INT4) and not arr.any()


def _shift_weight(graph: ir.Graph, dq: ir.Node) -> bool:
    w, zp = dq.inputs[0], dq.inputs[2]
    w_arr, zp_arr = const_array(w), const_array(zp)
    spec = _SIGNED.get(ir.convenience.get_const_tensor(w).dtype)
    if zp_arr is None or spec is None:
        return False
    signed, lo, hi, _ = spec
    shifted = w_arr.astype(np.int32) - _broadcast(zp_arr.astype(np.int32), w_arr.shape, dq)
    if shifted.min(initial=0) < lo or shifted.max(initial=0) > hi:
        return False  # the weight uses more than the signed range: no exact signed form
    new_w = _initializer(graph, f"{w.name}_signed", ir.tensor(shifted.astype(signed.numpy())))
    dq.replace_input_with(0, new_w)
    dq.resize_inputs(2)  # no zero point: symmetric
    _drop_if_unused(graph, w)
    _drop_if_unused(graph, zp)
    return True


def _shift_pair(graph: ir.Graph, q: ir.Node) -> bool:
    zp = q.inputs[2]
    zp_arr, spec = const_array(zp), _SIGNED.get(_const_dtype(zp))
    if zp_arr is None or spec is None or q.outputs[0].is_graph_output():
        return False
    signed, _, _, mid = spec
    uses = list(q.outputs[0].uses())
    if not mid or np.any(zp_arr != mid) or not uses:
        return False
    for use in uses:  # every consumer must undo exactly the same midpoint
        dq = use.node
        dzp = dq.inputs[2] if len(dq.inputs) > 2 else None
        if (dq.op_type != "DequantizeLinear" or use.idx != 0 or dzp is None
                or _const_dtype(dzp) != _const_dtype(zp) or np.any(const_array(dzp) != mid)):
            return False
    zero = ir.tensor(np.zeros(zp_arr.shape, dtype=signed.numpy()))
    q.replace_input_with(2, _initializer(graph, f"{zp.name}_signed", zero))
    q.outputs[0].dtype = signed
    for use in uses:
        old = use.node.inputs[2]
        use.node.resize_inputs(2)
        _drop_if_unused(graph, old)
    _drop_if_unused(graph, zp)
    return True


def _broadcast(param: np.ndarray, shape: tuple[int, ...], dq: ir.Node) -> np.ndarray:
    """A per-tensor, per-axis or per-block parameter expanded to the weight's shape."""
    if param.size == 1:
        return param.reshape(())
    axis = (dq.attributes["axis"].as_int() if "axis" in dq.attributes else 1) % len(shape)
    if param.ndim == 1:
        return param.reshape([-1 if d == axis else 1 for d in range(len(shape))])
    block = dq.attributes["block_size"].as_int()
    return np.repeat(param, block, axis=axis)[tuple(slice(0, n) for n in shape)]


def _initializer(graph: ir.Graph, name: str, tensor: ir.TensorProtocol) -> ir.Value:
    taken = set(graph.initializers) | {v.name for n in graph for v in n.outputs}
    unique, i = name, 1
    while unique in taken:
        unique, i = f"{name}_{i}", i + 1
    value = ir.Value(name=unique, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype),
                     const_value=tensor)
    graph.register_initializer(value)
    return value


def _drop_if_unused(graph: ir.Graph, value: ir.Value) -> None:
    if value.uses() or value.is_graph_output():
        return
    if value.name in graph.initializers and not value.is_graph_input():
        graph.initializers.pop(value.name)
    elif (src := value.producer()) is not None and src.op_type == "Constant":
        graph.remove(src, safe=True)
