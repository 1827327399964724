"""Block-sparse attention (RainFusion2.0 / RainFusion): options, sites, the rewrite, metrics.

``rewrite`` holds the pass; ``sites`` finds attention sites; ``config`` parses the options and
the token layout; ``builder`` emits the block-sparse subgraph; ``layout`` holds tiles, permutations
and the numpy reference; ``metrics`` measures block recall (not a pass).
"""

from edgec.graph_passes.sparse_attention.config import (
                                                        Layout,
                                                        SparseAttentionConfig,
                                                        config_for_source,
)
from edgec.graph_passes.sparse_attention.rewrite import SparseAttentionPass
from edgec.graph_passes.sparse_attention.sites import AttentionSite, find_attention_sites

__all__ = ["SparseAttentionConfig", "SparseAttentionPass", "AttentionSite",
           "find_attention_sites", "Layout", "config_for_source"]
