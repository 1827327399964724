"""Cleanup: onnx-ir's own passes (identity removal, dead code, topological sort), and what makes
any ONNX file edgec is given one its passes and runtimes take: initializers also listed as graph
inputs become plain weights (an IR < 4 file lists them: the manifest then named W and B as
inputs every session refused), and unnamed or repeated nodes get unique names (onnx.helper and
older exporters leave them empty; ONNX Runtime's quantizer and the passes that find a quantized
node's fp32 original go by node name). With ``lift_constants`` (an ONNX file given as the
source) ``Constant`` nodes become initializers too: the legacy exporter (``torch.onnx.export``,
``dynamo=False``) writes a Resize's scales, a Reshape's shape, as ``Constant`` nodes, and the
QNN HTP's quantizer took the node for an op to quantize: Q/DQ on the Resize's scales left a
Resize the HTP refused, a ConvTranspose after it run on the wrong channel count.

Guarantees the graph computes exactly what it did; reports how many nodes and initializers went.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes import common

from edgec.graph_passes._infra import EdgecPass, PassResult

__all__ = ["CleanupPass"]


class CleanupPass(EdgecPass):
    name = "cleanup"
    exact = True
    rtol = 1e-6

    def __init__(self, lift_constants: bool = False):
        super().__init__()
        self.lift_constants = lift_constants

    def call(self, model: ir.Model) -> PassResult:
        nodes, inits = len(model.graph), len(model.graph.initializers)
        lifted = 0
        if self.lift_constants:
            constants = sum(n.op_type == "Constant" for n in model.graph)
            common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
            lifted = constants - sum(n.op_type == "Constant" for n in model.graph)
            nodes, inits = nodes - lifted, inits + lifted
        inner = ir.passes.Sequential(
            common.RemoveInitializersFromInputsPass(),
            _IdentityElimination(),
            common.RemoveUnusedNodesPass(),
            common.RemoveUnusedFunctionsPass(),
            common.RemoveUnusedOpsetsPass(),
            common.TopologicalSortPass(),
        )
        modified = inner(model).modified
        named = _name_nodes(model)
        stats = {
            "nodes_removed": nodes - len(model.graph),
            "initializers_removed": inits - len(model.graph.initializers),
            **({"nodes_named": named} if named else {}),
            **({"constants_lifted": lifted} if lifted else {}),
        }
        return PassResult(model, modified and any(stats.values()) or bool(named or lifted), stats)


class _IdentityElimination(common.IdentityEliminationPass):
    """onnx-ir's pass, keeping an Identity between two graph outputs: onnx-ir (1.1) merged it,
    so ``return y, y`` left two outputs of one name and lost ``output_0`` (the compile's check
    then found the output missing)."""

    def _try_eliminate_identity_node(self, node: ir.Node) -> bool:
        if (node.op_type == "Identity" and node.domain == "" and len(node.inputs) == 1
                and node.inputs[0] is not None and node.inputs[0].is_graph_output()
                and all(v.is_graph_output() for v in node.outputs)):
            return False
        return super()._try_eliminate_identity_node(node)


def _name_nodes(model: ir.Model) -> int:
    """Name each unnamed node, and each repeat of a name, ``{op_type}_{i}`` (unique)."""
    nodes = list(ir.traversal.RecursiveGraphIterator(model.graph))
    taken, seen, named = {n.name for n in nodes if n.name}, set(), 0
    for i, node in enumerate(nodes):
        if node.name and node.name not in seen:
            seen.add(node.name)
            continue
        name, k = f"{node.op_type}_{i}", 0
        while name in taken:
            k += 1
            name = f"{node.op_type}_{i}_{k}"
        node.name = name
        taken.add(name)
        seen.add(name)
        named += 1
    return named
