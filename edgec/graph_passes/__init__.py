"""IR → IR rewrites, one module per pass family; the order is the table in ``PIPELINE``."""

from edgec.graph_passes._infra import EdgecPass, PassManager, PassRecord, PassResult
from edgec.graph_passes.cleanup import CleanupPass

__all__ = ["EdgecPass", "PassManager", "PassRecord", "PassResult", "CleanupPass"]
