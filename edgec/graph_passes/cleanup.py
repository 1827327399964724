"""Cleanup: onnx-ir's own passes (identity removal, dead code, topological sort), and two that
make any ONNX file edgec is given one its passes and runtimes take: initializers that are also
listed as graph inputs become plain weights (an IR < 4 file lists them: the manifest then named
W and B as inputs every session refused), and unnamed nodes get unique names (passes that index
nodes by name mistook them for one another).

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

    def call(self, model: ir.Model) -> PassResult:
        nodes, inits = len(model.graph), len(model.graph.initializers)
        inner = ir.passes.Sequential(
            common.RemoveInitializersFromInputsPass(),
            common.IdentityEliminationPass(),
            common.RemoveUnusedNodesPass(),
            common.RemoveUnusedFunctionsPass(),
            common.RemoveUnusedOpsetsPass(),
            common.TopologicalSortPass(),
            common.NameFixPass(),
        )
        modified = inner(model).modified
        stats = {
            "nodes_removed": nodes - len(model.graph),
            "initializers_removed": inits - len(model.graph.initializers),
        }
        return PassResult(model, modified and any(stats.values()), stats)
