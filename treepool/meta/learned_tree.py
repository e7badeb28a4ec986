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

from typing import Optional, Union

import torch.nn.functional as F
from torch import Tensor, nn

from ..tree import TaskTree
from .functional import LossFn
from .learner import InnerParams
from .maml import TreeMAML, check_steps
from .schedule import GrowingSchedule

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
                 loss_fn: LossFn = F.mse_loss, inner_params: InnerParams = None,
                 randomness: str = "different", chunk_size: Optional[int] = None):
        check_steps(depth, "depth")
        if branching is None and threshold is None and (depth > 1 or not leaf_last):
            raise ValueError("LearnedTreeMAML needs branching, threshold or both to split clusters")
        super().__init__(model, None, inner_lr=inner_lr, lr_mode=lr_mode, first_order=first_order,
                         inner_steps=depth if inner_steps is None else inner_steps,
                         loss_fn=loss_fn, inner_params=inner_params, randomness=randomness,
                         factored="never")
        self.depth = depth
        self.branching = branching
        self.threshold = threshold
        self.method = method
        self.leaf_last = bool(leaf_last)
        self.chunk_size = chunk_size
        self.last_tree: Optional[TaskTree] = None

    def grow_step(self, prefix: Optional[TaskTree], grads: Tensor) -> TaskTree:
        """The tree after one more level, grown from this step's gradients [T, P] (original order)."""
        level = 1 if prefix is None else prefix.depth + 1
        if self.leaf_last and level == self.depth:
            return TaskTree.flat(grads.shape[0], 1) if prefix is None else prefix.with_leaf_level()
        return TaskTree.grow(prefix, grads.detach(), branching=self.branching,
                             threshold=self.threshold, method=self.method,
                             chunk_size=self.chunk_size)

    def schedule(self, tree, num_tasks: int):
        if tree is not None:
            raise ValueError("LearnedTreeMAML grows its own tree; do not pass tree=")
        return _Recording(self, GrowingSchedule(num_tasks, self.depth, self.grow_step))

    def extra_repr(self) -> str:
        return (f"num_params={self.num_params}, depth={self.depth}, branching={self.branching}, "
                f"threshold={self.threshold}, leaf_last={self.leaf_last}, "
                f"inner_steps={self.inner_steps}, first_order={self.first_order}")


class _Recording:
    """A GrowingSchedule that stores the grown tree on the learner (``last_tree``)."""

    def __init__(self, learner: LearnedTreeMAML, schedule: GrowingSchedule):
        self.learner, self.inner = learner, schedule

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def task_params(self, state):
        self.learner.last_tree = self.inner.last_tree
        return self.inner.task_params(state)
