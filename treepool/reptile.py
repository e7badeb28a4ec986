"""Reptile, hierarchical Reptile and Sequential Reptile.

**Reptile** (Nichol et al. 2018, "On first-order meta-learning algorithms"): every
task runs k SGD steps from theta,

    phi_t^0 = theta,   phi_t^j = phi_t^{j-1} - alpha grad L_t(phi_t^{j-1}),

(all tasks batched: one vmap per step), then

    theta <- theta + eps * (mean_t phi_t^k - theta)              (reptile_update)

**Hierarchical Reptile** (``tree=``): phi is pooled per cluster first, level by level
from the leaves up, so every cluster of a level counts the same whatever its size:
the mean above becomes the tree mean, mean over level-1 clusters of the mean over
their children ... of the mean over their tasks.  It is one weighted
:func:`treepool.reptile_update_` with w_t = prod over t's ancestors of 1 / (number of
children of the ancestor's parent).

**Sequential Reptile** (Lee et al., ICLR 2022, "Sequential Reptile: inter-task
gradient alignment for multilingual learning"): one inner trajectory whose j-th
batch comes from task t_j ~ Cat(p),

    phi^j = phi^{j-1} - alpha grad L_{t_j}(phi^{j-1}),   theta <- theta + eps (phi^k - theta).

Outer step: :meth:`step` updates theta in place (plain Reptile with step size eps),
or :meth:`outer_grad` sets ``theta.grad = theta - pooled(phi)`` so that any
``torch.optim`` optimizer can do the outer step.
"""

from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops
from ._functional import LossFn, MetaLearnerBase, check_task_batch
from .tree import TaskTree

__all__ = ["Reptile", "SequentialReptile", "tree_mean_weights"]


def tree_mean_weights(tree: TaskTree, dtype=torch.float32, device=None) -> Tensor:
    """[T] weights, DFS row order, such that the weighted mean of rows is the tree mean
    (mean over level-1 clusters of the mean over their children ... of their tasks).
    They sum to 1."""
    w = np.ones(tree.num_tasks, dtype=np.float64)
    prev_clusters = 1
    for level in range(1, tree.depth + 1):
        parents = tree.parents(level).numpy()
        seg = tree.segment_ids(level).numpy()
        children = np.bincount(parents, minlength=prev_clusters)
        w /= children[parents[seg]]
        prev_clusters = parents.shape[0]
    sizes = np.diff(tree.offsets(tree.depth).numpy())
    w /= sizes[tree.segment_ids(tree.depth).numpy()]
    return torch.as_tensor(w, dtype=dtype, device=device)


def _minibatch(x: Tensor, y: Tensor, batch_size: Optional[int], generator) -> tuple:
    """Random ``batch_size`` examples of every task (dim 1), drawn independently per task."""
    if batch_size is None or batch_size >= x.shape[1]:
        return x, y
    T, n = x.shape[0], x.shape[1]
    idx = torch.rand(T, n, generator=generator, device="cpu").argsort(dim=1)[:, :batch_size]
    idx = idx.to(x.device)

    def take(t):
        return torch.take_along_dim(t, idx.view(T, batch_size, *([1] * (t.dim() - 2))), dim=1)

    return take(x), take(y)


class Reptile(MetaLearnerBase):
    """Reptile (Nichol et al. 2018), batched over tasks; hierarchical with ``tree``.

    Args:
        model: any ``nn.Module`` without running-statistics buffers.
        inner_lr: alpha, the inner SGD step size.
        inner_steps: k, SGD steps per task.
        outer_lr: eps, the step size of :meth:`step`.
        tree: optional :class:`TaskTree` over the T tasks of a batch: hierarchical
            Reptile (pool phi per cluster, from the leaves up).
        batch_size: examples per inner step drawn from each task's data (None: all).
        loss_fn: ``loss_fn(prediction, target) -> scalar`` (default MSE).
        process_group, rows_per_rank: shard the tasks over torch.distributed ranks;
            each rank passes its own tasks (with a tree, those of
            ``ShardedTree(tree, rows_per_rank).local_tasks``) and pooling all-reduces.

    ``parameters()`` is theta, one [P] tensor.
    """

    def __init__(self, model: nn.Module, inner_lr: float = 0.01, inner_steps: int = 5,
                 outer_lr: Union[float, Tensor] = 0.1, tree: Optional[TaskTree] = None,
                 batch_size: Optional[int] = None, loss_fn: LossFn = F.mse_loss,
                 randomness: str = "error", generator: Optional[torch.Generator] = None, *,
                 process_group=None, rows_per_rank=None):
        super().__init__(model, randomness)
        if not isinstance(inner_steps, int) or inner_steps < 0:
            raise ValueError(f"inner_steps must be an int >= 0, got {inner_steps!r}")
        self.process_group, self.rows_per_rank = process_group, rows_per_rank
        if tree is not None and not isinstance(tree, TaskTree):
            raise TypeError(f"tree must be a TaskTree or None, got {type(tree).__name__}")
        self.inner_lr = float(inner_lr)
        self.inner_steps = inner_steps
        self.outer_lr = outer_lr
        self.tree = tree
        self.batch_size = batch_size
        self.loss_fn = loss_fn
        self.generator = generator

    def adapt(self, x: Tensor, y: Tensor, loss_fn: Optional[LossFn] = None,
              steps: Optional[int] = None) -> Tensor:
        """phi [T, P] (original task order, no graph): ``steps`` SGD steps of every task from theta."""
        loss_fn = loss_fn or self.loss_fn
        T = check_task_batch("x", x, None)
        check_task_batch("y", y, T)
        steps = self.inner_steps if steps is None else steps
        with torch.no_grad():
            phi = self.theta.detach()[None].expand(T, -1).clone()
            for _ in range(steps):
                xb, yb = _minibatch(x, y, self.batch_size, self.generator)
                phi.sub_(self.fn.grads(phi, xb, yb, loss_fn), alpha=self.inner_lr)
        return phi

    def _pool_args(self, phi: Tensor, tree: Optional[TaskTree]):
        tree = self.tree if tree is None else tree
        T = phi.shape[0]
        offsets = torch.tensor([0, T], dtype=torch.int64, device=phi.device)
        if tree is None:
            return phi, offsets, None
        if tree.num_tasks != T:
            raise ValueError(f"the data have {T} tasks but the tree has {tree.num_tasks}")
        weights = tree_mean_weights(tree, phi.dtype, phi.device)
        return tree.permute_rows(phi), offsets, weights

    def _sharded_pool_args(self, phi: Tensor, tree: Optional[TaskTree]):
        """With a process group: the mean over every rank's tasks, as one row to pool."""
        from .distributed import ShardedTree, all_reduce_mean

        tree = self.tree if tree is None else tree
        weights = None
        if tree is not None:
            sharded = ShardedTree(tree, self.rows_per_rank, self.process_group)
            if phi.shape[0] != sharded.num_local_tasks:
                raise ValueError(f"this rank holds {sharded.num_local_tasks} of the tree's "
                                 f"{tree.num_tasks} tasks but the data have {phi.shape[0]}")
            weights = sharded.local_rows(tree_mean_weights(tree, phi.dtype, phi.device))
        mean = all_reduce_mean(phi, weights, self.process_group)
        return mean[None], torch.tensor([0, 1], dtype=torch.int64, device=phi.device), None

    def pooled(self, phi: Tensor, tree: Optional[TaskTree] = None) -> Tensor:
        """[P] mean of phi (the tree mean for hierarchical Reptile); with a process
        group, over every rank's tasks (each rank passes its own; with a tree, those of
        its block of the DFS order, as for :class:`~treepool.TreeMAML`)."""
        rows, offsets, weights = self._pool(phi, tree)
        return ops.segment_mean(rows, offsets, weights)[0]

    def _pool(self, phi: Tensor, tree: Optional[TaskTree]):
        if self.process_group is not None:
            return self._sharded_pool_args(phi, tree)
        return self._pool_args(phi, tree)

    def step(self, x: Tensor, y: Tensor, loss_fn: Optional[LossFn] = None, *,
             eps: Union[float, Tensor, None] = None, tree: Optional[TaskTree] = None) -> Tensor:
        """One Reptile meta-step, theta updated in place (reptile_update_); returns phi."""
        phi = self.adapt(x, y, loss_fn)
        rows, offsets, weights = self._pool(phi, tree)
        eps = self.outer_lr if eps is None else eps
        with torch.no_grad():
            ops.reptile_update_(self.theta[None], rows, offsets, eps, weights)
        return phi

    def outer_grad(self, x: Tensor, y: Tensor, loss_fn: Optional[LossFn] = None, *,
                   tree: Optional[TaskTree] = None) -> Tensor:
        """Adds ``theta - pooled(phi)`` to ``theta.grad`` (for a torch.optim step); returns phi."""
        phi = self.adapt(x, y, loss_fn)
        with torch.no_grad():
            g = self.theta.detach() - self.pooled(phi, tree)
            if self.theta.grad is None:
                self.theta.grad = g
            else:
                self.theta.grad.add_(g)
        return phi


class SequentialReptile(MetaLearnerBase):
    """Sequential Reptile (Lee et al., ICLR 2022): one trajectory over tasks drawn from Cat(p).

    Args:
        model, inner_lr, inner_steps, outer_lr, batch_size, loss_fn: as in :class:`Reptile`.
        probs: [T] task probabilities p (None: uniform; normalised if they do not sum to 1).
        generator: ``torch.Generator`` for the task draws and minibatches.

    The inner loop is sequential by definition (step j starts where step j-1 ended),
    so it is a Python loop over steps; each step is one task's gradient.
    """

    def __init__(self, model: nn.Module, inner_lr: float = 0.01, inner_steps: int = 10,
                 outer_lr: Union[float, Tensor] = 0.1, probs: Optional[Tensor] = None,
                 batch_size: Optional[int] = None, loss_fn: LossFn = F.mse_loss,
                 randomness: str = "error", generator: Optional[torch.Generator] = None):
        super().__init__(model, randomness)
        if not isinstance(inner_steps, int) or inner_steps < 0:
            raise ValueError(f"inner_steps must be an int >= 0, got {inner_steps!r}")
        self.inner_lr = float(inner_lr)
        self.inner_steps = inner_steps
        self.outer_lr = outer_lr
        self.probs = probs
        self.batch_size = batch_size
        self.loss_fn = loss_fn
        self.generator = generator
        self.last_tasks: Optional[Tensor] = None

    def sample_tasks(self, num_tasks: int, probs: Optional[Tensor] = None) -> Tensor:
        """[inner_steps] task ids t_j ~ Cat(p)."""
        p = self.probs if probs is None else probs
        if p is None:
            p = torch.ones(num_tasks, dtype=torch.float64)
        p = torch.as_tensor(p, dtype=torch.float64).cpu()
        if p.dim() != 1 or p.shape[0] != num_tasks:
            raise ValueError(f"probs must have shape [{num_tasks}], got {tuple(p.shape)}")
        if (p < 0).any() or not torch.isfinite(p).all() or p.sum() <= 0:
            raise ValueError("probs must be finite, non-negative and not all zero")
        return torch.multinomial(p, self.inner_steps, replacement=True, generator=self.generator)

    def adapt(self, x: Tensor, y: Tensor, loss_fn: Optional[LossFn] = None,
              tasks: Optional[Tensor] = None, probs: Optional[Tensor] = None) -> Tensor:
        """phi^k [P] (no graph): the trajectory over ``tasks`` (default: drawn from p)."""
        loss_fn = loss_fn or self.loss_fn
        T = check_task_batch("x", x, None)
        check_task_batch("y", y, T)
        tasks = self.sample_tasks(T, probs) if tasks is None else torch.as_tensor(tasks).cpu()
        self.last_tasks = tasks
        task_grad = torch.func.grad(self.fn.loss(loss_fn))
        with torch.no_grad():
            phi = self.theta.detach().clone()
            for t in tasks.tolist():
                xb, yb = _minibatch(x[t:t + 1], y[t:t + 1], self.batch_size, self.generator)
                phi.sub_(task_grad(phi, xb[0], yb[0]), alpha=self.inner_lr)
        return phi

    def step(self, x: Tensor, y: Tensor, loss_fn: Optional[LossFn] = None, *,
             eps: Union[float, Tensor, None] = None, tasks: Optional[Tensor] = None) -> Tensor:
        """One meta-step, theta += eps (phi^k - theta) in place (reptile_update_); returns phi^k."""
        phi = self.adapt(x, y, loss_fn, tasks)
        offsets = torch.tensor([0, 1], dtype=torch.int64, device=phi.device)
        eps = self.outer_lr if eps is None else eps
        with torch.no_grad():
            ops.reptile_update_(self.theta[None], phi[None], offsets, eps)
        return phi

    def outer_grad(self, x: Tensor, y: Tensor, loss_fn: Optional[LossFn] = None, *,
                   tasks: Optional[Tensor] = None) -> Tensor:
        """Adds ``theta - phi^k`` to ``theta.grad`` (for a torch.optim step); returns phi^k."""
        phi = self.adapt(x, y, loss_fn, tasks)
        with torch.no_grad():
            g = self.theta.detach() - phi
            if self.theta.grad is None:
                self.theta.grad = g
            else:
                self.theta.grad.add_(g)
        return phi
