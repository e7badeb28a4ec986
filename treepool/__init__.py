"""treepool: fused per-cluster gradient pooling and tree-level parameter updates for
hierarchical meta-learning (TreeMAML, MAML, Meta-SGD, Reptile) in PyTorch.

The ops work on flat [N, P] parameter buffers whose rows (tasks or tree nodes) are in
DFS order of a task tree, so that each cluster is a contiguous range given by int64
``offsets``. See README.md and DESIGN.md.
"""

from ._backend import get_backend, native_available, set_backend, use_backend
from .ops import (
    reptile_update,
    reptile_update_,
    segment_broadcast,
    segment_mean,
    segment_sum,
    tree_update,
    tree_update_,
)

if native_available():
    from . import _autograd, _fake  # noqa: F401  (registrations of the native ops)

__version__ = "0.1.0"

__all__ = [
    "get_backend",
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
