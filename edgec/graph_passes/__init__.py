"""IR → IR rewrites: one module per pass, one subpackage per pass family; the compile order is
``edgec.pipeline.STAGES``."""

from edgec.graph_passes._infra import EdgecPass, PassManager, PassRecord, PassResult
from edgec.graph_passes.cleanup import CleanupPass

__all__ = ["EdgecPass", "PassManager", "PassRecord", "PassResult", "CleanupPass"]
