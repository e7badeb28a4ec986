"""treepool: fused per-cluster gradient pooling and tree-level parameter updates for
hierarchical meta-learning (TreeMAML, MAML, Meta-SGD, Reptile) in PyTorch.

The ops work on flat [N, P] parameter buffers whose rows (tasks or tree nodes) are in
DFS order of a task tree, so that each cluster is a contiguous range given by int64
``offsets``. See README.md and docs/design.md.
"""

from .ops import (
    get_backend,
    max_pool2d_indices,
    native_available,
    reptile_update,
    reptile_update_,
    segment_broadcast,
    segment_mean,
    segment_sum,
    set_backend,
    tree_update,
    tree_update_,
    use_backend,
)

from .tree import SoftTree, TaskTree, soft_broadcast, soft_segment_mean, soft_tree_update
from .meta import (MAML, InnerRate, LearnedTreeMAML, Reptile, SequentialReptile, TreeMAML,
                   tree_mean_weights)
from .meta.flat_params import FlatParams
from .meta.transference import (
    affinity_tree,
    choose_gradient,
    itmtl_candidates,
    lookahead_affinity,
    lookahead_params,
    pcgrad,
    task_gradients,
)

__version__ = "0.1.0"

__all__ = [
    "FlatParams",
    "InnerRate",
    "LearnedTreeMAML",
    "MAML",
    "Reptile",
    "SequentialReptile",
    "SoftTree",
    "TaskTree",
    "TreeMAML",
    "affinity_tree",
    "choose_gradient",
    "itmtl_candidates",
    "lookahead_affinity",
    "lookahead_params",
    "pcgrad",
    "soft_broadcast",
    "soft_segment_mean",
    "soft_tree_update",
    "task_gradients",
    "tree_mean_weights",
    "get_backend",
    "max_pool2d_indices",
    "native_available",
    "reptile_update",
    "reptile_update_",
    "segment_broadcast",
    "segment_mean",
    "segment_sum",
    "set_backend",
    "tree_update",
    "tree_update_",
    "use_backend",
]
