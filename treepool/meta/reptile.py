"""Reptile, hierarchical Reptile and Sequential Reptile.

**Reptile** (Nichol et al. 2018, "On first-order meta-learning algorithms"): every
task runs k SGD steps from theta,

    phi_t^0 = theta,   phi_t^j = phi_t^{j-1} - alpha grad L_t(phi_t^{j-1}),

(all tasks batched: one vmap per step), then

    theta <- theta + eps * (mean_t phi_t^k - theta)              (reptile_update)

**Hierarchical Reptile** (``tree=``): phi is pooled per cluster first, level by level
from the leaves up, so every cluster of a level counts the same whatever its size:
one weighted :func:`treepool.reptile_update_` with w_t = prod over t's ancestors of
1 / (number of children of the ancestor's parent) (:func:`tree_mean_weights`).

**Sequential Reptile** (Lee et al., ICLR 2022, "Sequential Reptile: inter-task
gradient alignment for multilingual learning"): one inner trajectory whose j-th
batch comes from task t_j ~ Cat(p),

    phi^j = phi^{j-1} - alpha grad L_{t_j}(phi^{j-1}),   theta <- theta + eps (phi^k - theta).

Outer step: :meth:`Reptile.step` updates the model's parameters in place (plain Reptile
with step size eps), or :meth:`Reptile.outer_grad` adds ``theta - pooled(phi)`` to their
``.grad`` so that any ``torch.optim`` optimizer can do the outer step.
"""

from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..tree import TaskTree
from .functional import Inputs, LossFn, Params, batch_statistics, num_tasks_of, take_rows
from .learner import InnerParams, MetaLearner
from .rates import check_rate_value

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


def _minibatch(x: Inputs, y: Tensor, batch_size: Optional[int], generator) -> tuple:
    """Random ``batch_size`` examples of every task (dim 1), drawn independently per task."""
    n = (x[0] if isinstance(x, (tuple, list)) else x).shape[1]
    if batch_size is None or batch_size >= n:
        return x, y
    T = num_tasks_of(x)
    idx = torch.rand(T, n, generator=generator, device="cpu").argsort(dim=1)[:, :batch_size]

    def take(t):
        i = idx.to(t.device).view(T, batch_size, *([1] * (t.dim() - 2)))
        return torch.take_along_dim(t, i, dim=1)

    xb = tuple(take(t) for t in x) if isinstance(x, (tuple, list)) else take(x)
    return xb, take(y)


def _check_int(value, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


class _ReptileBase(MetaLearner):
    def __init__(self, model, inner_lr, inner_steps, outer_lr, batch_size, loss_fn,
                 inner_params, randomness, generator):
        super().__init__(model, inner_params, randomness)
        self.inner_lr = check_rate_value("inner_lr", inner_lr, allow_tensor=False)
        self.inner_steps = _check_int(inner_steps, "inner_steps", 0)
        self.outer_lr = check_rate_value("outer_lr", outer_lr, upper=1.0, positive=True)
        if batch_size is not None:
            _check_int(batch_size, "batch_size", 1)
        self.batch_size = batch_size
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        self.loss_fn = loss_fn
        self.generator = generator

    def _move_towards(self, target: Params, offsets: Tensor, weights, eps) -> None:
        """theta <- theta + eps (pooled target - theta), in place on the model's parameters."""
        eps = self.outer_lr if eps is None else check_rate_value("eps", eps, upper=1.0, positive=True)
        theta = self.theta()
        with torch.no_grad():
            ops.reptile_update_([p.detach()[None] for p in theta.values()],
                                [target[n] for n in theta], offsets, eps, weights)

    def _add_outer_grad(self, pooled: Params) -> None:
        with torch.no_grad():
            for name, p in self.theta().items():
                g = p.detach() - pooled[name]
                if p.grad is None:
                    p.grad = g
                else:
                    p.grad.add_(g)


class Reptile(_ReptileBase):
    """Reptile (Nichol et al. 2018), batched over tasks; hierarchical with ``tree``.

    Args:
        model: any ``nn.Module``; its parameters are theta.
        inner_lr: alpha, the inner SGD step size.
        inner_steps: k, SGD steps per task.
        outer_lr: eps in (0, 1], the step size of :meth:`step`.
        tree: optional :class:`TaskTree` over the T tasks of a batch: hierarchical
            Reptile (pool phi per cluster, from the leaves up).
        batch_size: examples per inner step drawn from each task's data (None: all).
        loss_fn: ``loss_fn(prediction, target) -> scalar`` (default MSE).
        inner_params, randomness: as in :class:`~treepool.TreeMAML`.
        process_group, rows_per_rank: shard the tasks over torch.distributed ranks;
            each rank passes its own tasks (with a tree, those of
            ``ShardedTree(tree, rows_per_rank).local_tasks``) and pooling all-reduces.
    """

    def __init__(self, model: nn.Module, inner_lr: float = 0.01, inner_steps: int = 5,
                 outer_lr: Union[float, Tensor] = 0.1, tree: Optional[TaskTree] = None,
                 batch_size: Optional[int] = None, loss_fn: LossFn = F.mse_loss,
                 randomness: str = "different", generator: Optional[torch.Generator] = None, *,
                 inner_params: InnerParams = None, process_group=None, rows_per_rank=None):
        super().__init__(model, inner_lr, inner_steps, outer_lr, batch_size, loss_fn,
                         inner_params, randomness, generator)
        if tree is not None and not isinstance(tree, TaskTree):
            raise TypeError(f"tree must be a TaskTree or None, got {type(tree).__name__}")
        self.tree = tree
        self.process_group, self.rows_per_rank = process_group, rows_per_rank
        self._ranks_checked = False
        self._sharded = None

    def adapt(self, x: Inputs, y: Tensor, steps: Optional[int] = None, *,
              loss_fn: Optional[LossFn] = None) -> Params:
        """phi ``{name: [T, *shape]}`` (original task order, no graph): ``steps`` SGD
        steps of every task from theta."""
        loss_fn = loss_fn or self.loss_fn
        T = self._check_support(x, y)
        steps = self.inner_steps if steps is None else _check_int(steps, "steps", 0)
        theta = {n: p.detach() for n, p in self.theta().items()}
        phi = {n: p.expand(T, *p.shape).clone() for n, p in theta.items()}
        with torch.no_grad(), batch_statistics(self.model):
            for _ in range(steps):
                xb, yb = _minibatch(x, y, self.batch_size, self.generator)
                grads = self.fns.task_grads(phi, xb, yb, loss_fn)
                for n, g in grads.items():
                    if not bool(torch.isfinite(g).all()):
                        raise FloatingPointError(
                            f"Reptile: the inner gradient of {n!r} is not finite; lower inner_lr "
                            "or check the data")
                    phi[n].sub_(g, alpha=self.inner_lr)
        return phi

    def _pool_args(self, T: int, device, dtype, tree: Optional[TaskTree]):
        """(row order, offsets, weights) for pooling T rows into one."""
        tree = self.tree if tree is None else tree
        offsets = torch.tensor([0, T], dtype=torch.int64, device=device)
        if tree is None:
            return None, offsets, None
        if tree.num_tasks != T:
            raise ValueError(f"the data have {T} tasks but the tree has {tree.num_tasks}")
        return tree.perm_on(device), offsets, tree_mean_weights(tree, dtype, device)

    def _pooled_rows(self, phi: Params, tree: Optional[TaskTree]):
        """(rows to pool, offsets, weights): this process's rows, or with a process
        group the all-reduced mean over every rank's tasks as one row."""
        first = next(iter(phi.values()))
        T = first.shape[0]
        if self.process_group is None:
            order, offsets, weights = self._pool_args(T, first.device, first.dtype, tree)
            return {n: take_rows(p, order) for n, p in phi.items()}, offsets, weights
        from ..distributed import ShardedTree, all_reduce_mean, check_ranks_agree

        tree = self.tree if tree is None else tree
        weights = None
        if tree is None and not self._ranks_checked:
            check_ranks_agree(self.process_group, num_params=self.num_params, dtype=first.dtype)
            self._ranks_checked = True
        if tree is not None:
            if self._sharded is None or self._sharded[0] is not tree:
                self._sharded = (tree, ShardedTree(tree, self.rows_per_rank, self.process_group,
                                                   num_params=self.num_params, dtype=first.dtype))
            sharded = self._sharded[1]
            if T != sharded.num_local_tasks:
                raise ValueError(f"this rank holds {sharded.num_local_tasks} of the tree's "
                                 f"{tree.num_tasks} tasks but the data have {T}")
            weights = sharded.local_rows(tree_mean_weights(tree, first.dtype, first.device))
        flat = torch.cat([p.reshape(T, -1) for p in phi.values()], dim=1)
        mean = all_reduce_mean(flat, weights, self.process_group)
        out, a = {}, 0
        for n, p in phi.items():
            k = p[0].numel()
            out[n] = mean[a:a + k].reshape(1, *p.shape[1:])
            a += k
        return out, torch.tensor([0, 1], dtype=torch.int64, device=first.device), None

    def pooled(self, phi: Params, tree: Optional[TaskTree] = None) -> Params:
        """``{name: [*shape]}`` mean of phi (the tree mean for hierarchical Reptile); with a
        process group, over every rank's tasks."""
        rows, offsets, weights = self._pooled_rows(phi, tree)
        names = list(rows)
        means = ops.segment_mean([rows[n] for n in names], offsets, weights)
        return {n: m[0] for n, m in zip(names, means)}

    def step(self, x: Inputs, y: Tensor, loss_fn: Optional[LossFn] = None, *,
             eps: Union[float, Tensor, None] = None, tree: Optional[TaskTree] = None) -> Params:
        """One Reptile meta-step, the model's parameters updated in place
        (:func:`treepool.reptile_update_`); returns phi."""
        phi = self.adapt(x, y, loss_fn=loss_fn)
        rows, offsets, weights = self._pooled_rows(phi, tree)
        self._move_towards(rows, offsets, weights, eps)
        return phi

    def outer_grad(self, x: Inputs, y: Tensor, loss_fn: Optional[LossFn] = None, *,
                   tree: Optional[TaskTree] = None) -> Params:
        """Adds ``theta - pooled(phi)`` to every adapted parameter's ``.grad`` (for a
        torch.optim step); returns phi."""
        phi = self.adapt(x, y, loss_fn=loss_fn)
        self._add_outer_grad(self.pooled(phi, tree))
        return phi


class SequentialReptile(_ReptileBase):
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
                 randomness: str = "different", generator: Optional[torch.Generator] = None, *,
                 inner_params: InnerParams = None):
        super().__init__(model, inner_lr, inner_steps, outer_lr, batch_size, loss_fn,
                         inner_params, randomness, generator)
        self.probs = probs
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

    def adapt(self, x: Inputs, y: Tensor, loss_fn: Optional[LossFn] = None,
              tasks: Optional[Tensor] = None, probs: Optional[Tensor] = None) -> Params:
        """phi^k ``{name: [*shape]}`` (no graph): the trajectory over ``tasks`` (default: drawn from p)."""
        loss_fn = loss_fn or self.loss_fn
        T = self._check_support(x, y)
        tasks = self.sample_tasks(T, probs) if tasks is None else torch.as_tensor(tasks).cpu()
        self.last_tasks = tasks
        task_grad = torch.func.grad(self.fns.task_loss(loss_fn))
        phi = {n: p.detach().clone() for n, p in self.theta().items()}
        with torch.no_grad(), batch_statistics(self.model):
            for t in tasks.tolist():
                index = torch.tensor([t])
                xb, yb = _minibatch(take_rows(x, index), take_rows(y, index), self.batch_size,
                                    self.generator)
                xb = tuple(v[0] for v in xb) if isinstance(xb, tuple) else xb[0]
                for n, g in task_grad(phi, xb, yb[0]).items():
                    phi[n].sub_(g, alpha=self.inner_lr)
        return phi

    def step(self, x: Inputs, y: Tensor, loss_fn: Optional[LossFn] = None, *,
             eps: Union[float, Tensor, None] = None, tasks: Optional[Tensor] = None) -> Params:
        """One meta-step, theta += eps (phi^k - theta) in place (reptile_update_); returns phi^k."""
        phi = self.adapt(x, y, loss_fn, tasks)
        offsets = torch.tensor([0, 1], dtype=torch.int64, device=next(iter(phi.values())).device)
        self._move_towards({n: p[None] for n, p in phi.items()}, offsets, None, eps)
        return phi

    def outer_grad(self, x: Inputs, y: Tensor, loss_fn: Optional[LossFn] = None, *,
                   tasks: Optional[Tensor] = None) -> Params:
        """Adds ``theta - phi^k`` to every adapted parameter's ``.grad``; returns phi^k."""
        phi = self.adapt(x, y, loss_fn, tasks)
        self._add_outer_grad(phi)
        return phi
