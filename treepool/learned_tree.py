"""Learned TreeMAML: TreeMAML on a tree grown online from the inner-step gradients.

Garcia et al. 2021 ("Meta-learning with MAML on trees") build the task tree while
adapting: at inner step k every cluster of level k-1 is split by clustering the
tasks' step-k gradients (online top-down, non-binary), and the step is then
TreeMAML's pooled update on the new level,

    G^k      = [grad L^s_t(theta^{k-1}_{node(t)})]_t
    level k  = refine(level k-1, G^k)                  (TaskTree.grow)
    theta^k_c = theta^{k-1}_{parent(c)} - alpha_k mean_{t in c} G^k_t   (tree_update)

A new tree is grown for every meta-batch (the clustering is not differentiated).
By default (``leaf_last=True``) the last of the ``depth`` steps is per task (the
leaves), as in TreeMAML on a complete tree.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops
from ._functional import LossFn
from .maml import TreeMAML, _arange
from .tree import TaskTree

__all__ = ["LearnedTreeMAML"]


class LearnedTreeMAML(TreeMAML):
    """TreeMAML whose tree is grown per meta-batch by clustering the inner-step gradients.

    Args:
        model: the network (see :class:`TreeMAML`).
        depth: number of tree levels = inner steps that pool (K).
        branching: at most this many children per cluster at each split.
        threshold: cosine similarity; a cluster is split while its tasks' merge
            similarity is below it (with ``branching`` too: both limits).
        method: linkage of the agglomerative clustering ('average', 'complete', ...).
        leaf_last: the last level is the leaves (per-task step) instead of a split.
        inner_steps: default ``depth``; extra steps stay on the last level.
        Other arguments as in :class:`TreeMAML`.

    ``last_tree`` holds the tree grown for the latest batch.
    """

    def __init__(self, model: nn.Module, depth: int, *, branching: Optional[int] = None,
                 threshold: Optional[float] = None, method: str = "average", leaf_last: bool = True,
                 inner_lr: Union[float, Tensor] = 0.01, lr_mode: str = "fixed",
                 first_order: bool = False, inner_steps: Optional[int] = None,
                 loss_fn: LossFn = F.mse_loss, randomness: str = "error",
                 chunk_size: Optional[int] = None):
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be an int >= 1, got {depth!r}")
        if branching is None and threshold is None and (depth > 1 or not leaf_last):
            raise ValueError("LearnedTreeMAML needs branching, threshold or both to split clusters")
        super().__init__(model, None, inner_lr=inner_lr, lr_mode=lr_mode, first_order=first_order,
                         inner_steps=depth if inner_steps is None else inner_steps,
                         loss_fn=loss_fn, randomness=randomness)
        self.depth = depth
        self.branching = branching
        self.threshold = threshold
        self.method = method
        self.leaf_last = bool(leaf_last)
        self.chunk_size = chunk_size
        self.last_tree: Optional[TaskTree] = None

    def _tree(self, tree, num_tasks: int):
        if tree is not None:
            raise ValueError("LearnedTreeMAML grows its own tree; do not pass tree=")
        return None

    def grow_step(self, prefix: Optional[TaskTree], grads: Tensor) -> TaskTree:
        """The tree after one more level, grown from this step's gradients [T, P] (original order)."""
        level = 1 if prefix is None else prefix.depth + 1
        if self.leaf_last and level == self.depth:
            return TaskTree.flat(grads.shape[0], 1) if prefix is None else prefix.with_leaf_level()
        return TaskTree.grow(prefix, grads.detach(), branching=self.branching,
                             threshold=self.threshold, method=self.method,
                             chunk_size=self.chunk_size)

    def _leaf_rows(self, support_x: Tensor, support_y: Tensor, loss_fn: LossFn,
                   tree) -> Tuple[Tensor, Optional[TaskTree]]:
        # Rows stay in original task order; each step's gradients are permuted to the
        # DFS order of the tree grown so far for the pooled update.
        create_graph = self._create_graph()
        dev = self.theta.device
        T = support_x.shape[0]
        node = self.theta[None]
        labels = None  # task -> node row of the previous level
        grown: Optional[TaskTree] = None
        for k in range(self.inner_steps):
            params = node.expand(T, -1) if labels is None else node.index_select(0, labels)
            grads = self.fn.grads(params, support_x, support_y, loss_fn)
            if not create_graph:
                grads = grads.detach()
            if k < self.depth:
                new = self.grow_step(grown, grads)
                level = new.depth
                if grown is not None:
                    # node rows are numbered as the previous tree's last level; the grown
                    # tree keeps that numbering, but remap if it did not
                    old_of_new = grown.labels(level - 1, dev).index_select(
                        0, new.perm_on(dev).index_select(0, new.offsets(level - 1, dev)[:-1]))
                    if not torch.equal(old_of_new, _arange(old_of_new.shape[0], dev)):
                        node = node.index_select(0, old_of_new)
                grown = new
                parents = grown.parents(level, dev)
            else:
                level = grown.depth
                parents = _arange(node.shape[0], dev)
            node = ops.tree_update(node, grads.index_select(0, grown.perm_on(dev)),
                                   grown.offsets(level, dev), parents, self.inner_rate(k))
            labels = grown.labels(level, dev)
        self.last_tree = grown
        return node.index_select(0, labels), None

    def extra_repr(self) -> str:
        return (f"num_params={self.flat.numel}, depth={self.depth}, branching={self.branching}, "
                f"threshold={self.threshold}, leaf_last={self.leaf_last}, "
                f"inner_steps={self.inner_steps}, first_order={self.first_order}")
