"""The treepool ops: one public function per op, on the compiled kernels or the reference.

``functions`` (the public ops, the only entry point the rest of treepool uses),
``backend`` (which implementation runs), ``checks`` (argument checks shared by every
backend), ``reference`` (pure PyTorch, the oracle), ``autograd`` / ``autograd_multi``
(the rules of the native ops and their list forms), ``functorch`` (their torch.func
support), ``fake`` (fake kernels for torch.compile), ``numerics`` (shared numeric rules).
"""

from .backend import get_backend, native_available, set_backend, use_backend
from .functions import (
    max_pool2d_indices,
    reptile_update,
    reptile_update_,
    segment_broadcast,
    segment_mean,
    segment_sum,
    tree_update,
    tree_update_,
)

if native_available():
    from . import autograd, autograd_multi, fake  # noqa: F401  (registrations of the native ops)

__all__ = ["get_backend", "max_pool2d_indices", "native_available", "reptile_update",
           "reptile_update_", "segment_broadcast", "segment_mean", "segment_sum", "set_backend",
           "tree_update", "tree_update_", "use_backend"]
