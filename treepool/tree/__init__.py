"""Task trees: the layout the ops work on, the ways to build one, and soft trees.

``layout`` (:class:`TaskTree`: levels, DFS order, offsets and parents), ``levels``
(validation of label arrays), ``clustering`` (trees learned from gradients or
affinities, scipy imported on first use), ``similarity`` (chunked cosine
similarity), ``soft`` (HSML-style soft assignments pooled by matrix products).
"""

from .layout import TaskTree
from .soft import SoftTree, soft_broadcast, soft_segment_mean, soft_tree_update

__all__ = ["SoftTree", "TaskTree", "soft_broadcast", "soft_segment_mean", "soft_tree_update"]
