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

import math
import numbers
from typing import Dict, Optional, Union

import torch.nn.functional as F
from torch import Tensor, nn

from ..tree import TaskTree
from ..tree.similarity import cosine_from_gram, gram_matrix
from .functional import LossFn
from .learner import InnerParams
from .maml import TreeMAML, check_steps
from .schedule import GrowingSchedule

__all__ = ["LearnedTreeMAML", "SIGNALS"]

SIGNALS = ("step_gradient", "root_gradient")


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
        signal: which gradients level k is clustered on: 'step_gradient' (default,
            the paper's: step k's gradients, at the level-(k-1) nodes) or
            'root_gradient' (every level from the gradients at theta of step 0, the
            tasks' only common point; no extra gradient is computed).
        center: cluster the cosine similarity of the gradients after subtracting
            the mean gradient of the cluster being split (what all its tasks share
            says nothing about how it splits).  Computed from the [T, T] Gram
            matrix, no [T, P] copy.
        affinity_momentum: ``None`` (default): every batch is clustered on its own
            similarity.  A number m in [0, 1]: keep a running [T, T] similarity per
            level over meta-batches, ``A <- (1 - w) A + w S`` with
            ``w = max(1 - m, 1 / n)`` at the n-th batch (a plain mean until
            1 / (1 - m) batches; m = 1: the mean of all batches), and cluster A.
            This assumes that task t of every batch is the same task (or the same
            position in a family whose tree changes slowly), as in a fixed task
            set or the demo's family.  A is updated in training mode only
            (``learner.train()``, like BatchNorm's running statistics); in eval
            mode the tree comes from A alone (the batch's own similarity until A
            exists).  :meth:`reset_affinity` forgets it; a batch with another
            number of tasks starts it afresh.
        Other arguments as in :class:`TreeMAML`.

    Which signal finds the tree: adjusted Rand index of the grown level 1 / level 2
    against the true ones (``python examples/learned_tree_ari.py``: 3 seeds, the demo's
    MLP at init, 200 training batches, 4 evaluation batches), on the demo's family
    (:class:`treepool.demo.HierarchicalRegression`, 4 x 4 x 4 tasks, scales 1, 1, 0.6,
    0.15) and a weaker hierarchy (scales 1, 0.5, 0.3, 0.3)::

        signal                                        demo          weak
        step, raw, per batch (paper; the default)     0.12 / 0.06   0.04 / 0.02
        step, centered, per batch                     0.16 / 0.08   0.09 / 0.04
        root, centered, per batch                     0.16 / 0.07   0.09 / 0.03
        lookahead affinity (issue 5), per batch       0.13 / 0.06   0.06 / 0.02
        lookahead affinity, accumulated (mean)        1.00 / 1.00   1.00 / 0.62
        root, raw, accumulated m=1                    1.00 / 1.00   1.00 / 0.50
        root, centered, accumulated m=0.99            1.00 / 1.00   1.00 / 0.71
        root, centered, accumulated m=1               1.00 / 1.00   1.00 / 0.73
        step, centered, accumulated m=1               1.00 / 1.00   1.00 / 0.91

    One batch carries little of the tree (5 noisy points per task at random inputs),
    whatever the signal; the lookahead affinity costs T x T extra forward passes and
    is no better.  Accumulated over batches the signal adds up, and centering removes
    what every task of the cluster shares (level 2 of the weak family: 0.50 raw, 0.73
    centered).  In meta-training (the demo, 300 steps, 2 seeds) root and step signals,
    centered, m=1, both reach 1.0 / 1.0 on the demo's family and 1.0 / 0.96 (root) and
    1.0 / 1.0 (step) on the weak one, with the same query MSE within noise; the demo
    uses ``signal='root_gradient', center=True, affinity_momentum=1.0``.

    ``last_tree`` holds the tree grown for the latest batch; ``running_affinity``
    the running similarity per level (``{level: [T, T] float64}``, not in the
    state dict).
    """

    def __init__(self, model: nn.Module, depth: int, *, branching: Optional[int] = None,
                 threshold: Optional[float] = None, method: str = "average", leaf_last: bool = True,
                 signal: str = "step_gradient", center: bool = False,
                 affinity_momentum: Optional[float] = None,
                 inner_lr: Union[float, Tensor] = 0.01, lr_mode: str = "fixed",
                 first_order: bool = False, inner_steps: Optional[int] = None,
                 loss_fn: LossFn = F.mse_loss, inner_params: InnerParams = None,
                 randomness: str = "different", chunk_size: Optional[int] = None):
        check_steps(depth, "depth")
        if signal not in SIGNALS:
            raise ValueError(f"signal must be one of {list(SIGNALS)}, got {signal!r}")
        if not isinstance(center, bool):
            raise ValueError(f"center must be a bool, got {center!r}")
        if affinity_momentum is not None and (
                isinstance(affinity_momentum, bool)
                or not isinstance(affinity_momentum, numbers.Real)
                or not math.isfinite(affinity_momentum) or not 0 <= affinity_momentum <= 1):
            raise ValueError(f"affinity_momentum must be None or a number in [0, 1], "
                             f"got {affinity_momentum!r}")
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
        self.signal = signal
        self.center = center
        self.affinity_momentum = None if affinity_momentum is None else float(affinity_momentum)
        self.last_tree: Optional[TaskTree] = None
        self.running_affinity: Dict[int, Tensor] = {}
        self._affinity_batches: Dict[int, int] = {}
        self._root_gram: Optional[Tensor] = None

    def reset_affinity(self) -> None:
        """Forget the running similarity (``affinity_momentum``)."""
        self.running_affinity.clear()
        self._affinity_batches.clear()

    def grow_step(self, prefix: Optional[TaskTree], grads: Tensor) -> TaskTree:
        """The tree after one more level, grown from this step's gradients [T, P] (original order)."""
        level = 1 if prefix is None else prefix.depth + 1
        if self.leaf_last and level == self.depth:
            return TaskTree.flat(grads.shape[0], 1) if prefix is None else prefix.with_leaf_level()
        if self.signal == "step_gradient" and not self.center and self.affinity_momentum is None:
            return TaskTree.grow(prefix, grads.detach(), branching=self.branching,
                                 threshold=self.threshold, method=self.method,
                                 chunk_size=self.chunk_size)
        from ..tree import clustering  # scipy on first use
        sim = self.similarity(prefix, grads)
        return clustering.grow_similarity(TaskTree, prefix, sim, branching=self.branching,
                                          threshold=self.threshold, method=self.method)

    def similarity(self, prefix: Optional[TaskTree], grads: Tensor) -> Tensor:
        """The [T, T] similarity (float64, CPU) that the next level is cut from, after
        updating the running one in training mode (see ``affinity_momentum``)."""
        level = 1 if prefix is None else prefix.depth + 1
        if self.signal == "root_gradient" and prefix is not None and self._root_gram is not None \
                and self._root_gram.shape[0] == grads.shape[0]:
            gram = self._root_gram
        else:
            gram = gram_matrix(grads.detach(), self.chunk_size).cpu()
            if prefix is None:
                self._root_gram = gram
        groups = None if prefix is None else prefix.labels(prefix.depth)
        sim = cosine_from_gram(gram, groups, center=self.center)
        m = self.affinity_momentum
        if m is None:
            return sim
        running = self.running_affinity.get(level)
        if running is not None and running.shape != sim.shape:
            self.reset_affinity()
            running = None
        if not self.training:
            return sim if running is None else running
        n = self._affinity_batches.get(level, 0) + 1
        w = max(1.0 - m, 1.0 / n)
        running = sim if running is None else running.mul(1.0 - w).add_(sim, alpha=w)
        self.running_affinity[level] = running
        self._affinity_batches[level] = n
        return running

    def schedule(self, tree, num_tasks: int):
        if tree is not None:
            raise ValueError("LearnedTreeMAML grows its own tree; do not pass tree=")
        return _Recording(self, GrowingSchedule(num_tasks, self.depth, self.grow_step))

    def extra_repr(self) -> str:
        return (f"num_params={self.num_params}, depth={self.depth}, branching={self.branching}, "
                f"threshold={self.threshold}, leaf_last={self.leaf_last}, signal={self.signal!r}, "
                f"center={self.center}, affinity_momentum={self.affinity_momentum}, "
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
