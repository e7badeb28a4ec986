"""Soft pooling of task gradients (HSML, Yao et al. 2019) as matrix products.

HSML assigns every task softly to the clusters of a hierarchy.  A soft level is a
dense non-negative [C, T] matrix A (A[c, t] = how much task t belongs to cluster c),
so pooling is a matrix product (BLAS), not a segment reduction:

    pooled[c]  = sum_t A[c, t] g_t / sum_t A[c, t]                 (soft_segment_mean)
    shared[t]  = sum_c A[c, t] pooled[c] / sum_c A[c, t]            (soft_broadcast)
    phi_t     <- phi_t - lr * shared[t]                             (soft_tree_update)

With one-hot columns (a hard tree), ``shared[t]`` is the mean gradient of t's cluster
and soft_tree_update is TreeMAML's step (:func:`treepool.tree_update`) written per
task.  A :class:`SoftTree` (one assignment per level) can replace the hard
:class:`~treepool.TaskTree` in :class:`~treepool.TreeMAML`; gradients flow into the
assignments too, so they can come from a learned network as in HSML.
"""

from __future__ import annotations

from typing import List, Sequence, Union

import torch
from torch import Tensor

__all__ = ["SoftTree", "soft_segment_mean", "soft_broadcast", "soft_tree_update"]


def _check_assignment(assignment: Tensor, x: Tensor, name: str = "assignment") -> None:
    if not isinstance(assignment, Tensor):
        raise TypeError(f"{name} must be a [C, T] tensor, got {type(assignment).__name__}")
    if assignment.dim() != 2:
        raise ValueError(f"{name} must be a 2-D [C, T] tensor, got shape {tuple(assignment.shape)}")


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    return num / torch.where(den > 0, den, torch.ones_like(den))


def _membership_average(weights: Tensor, rows: Tensor, name: str, axis: str, count: int) -> Tensor:
    """``weights @ rows`` with each output row divided by its total weight (0 where it is 0)."""
    if rows.dim() != 2 or rows.shape[0] != count:
        raise ValueError(f"{name} must be [{axis}, P] with {axis} = {count}, got shape "
                         f"{tuple(rows.shape)}")
    return _safe_div(weights @ rows, weights.sum(dim=1, keepdim=True))


def soft_segment_mean(x: Tensor, assignment: Tensor) -> Tensor:
    """``out[c] = sum_t A[c, t] x[t] / sum_t A[c, t]`` for x [T, P], A [C, T] -> [C, P].

    A cluster with zero total weight gives 0.
    """
    _check_assignment(assignment, x)
    return _membership_average(assignment, x, "x", "T", assignment.shape[1])


def soft_broadcast(pooled: Tensor, assignment: Tensor) -> Tensor:
    """``out[t] = sum_c A[c, t] pooled[c] / sum_c A[c, t]`` for pooled [C, P] -> [T, P].

    A task with zero total membership gets 0.
    """
    _check_assignment(assignment, pooled)
    return _membership_average(assignment.T, pooled, "pooled", "C", assignment.shape[0])


def soft_tree_update(params: Tensor, grads: Tensor, assignment: Tensor,
                     lr: Union[float, Tensor]) -> Tensor:
    """One soft-pooled inner step, per task: ``params - lr * soft_broadcast(soft_segment_mean(grads))``.

    params, grads: [T, P]; assignment: [C, T]; lr: float, 0-d or [P] tensor.
    """
    shared = soft_broadcast(soft_segment_mean(grads, assignment), assignment)
    return params - lr * shared


class SoftTree:
    """Soft assignments of T tasks to the clusters of ``depth`` levels.

    ``assignments[k-1]`` is the [C_k, T] non-negative matrix of level k (inner step k
    of TreeMAML).  Unlike a TaskTree, levels need not refine each other and nothing
    is permuted: tasks stay in their original order.
    """

    def __init__(self, assignments: Sequence[Tensor]):
        assignments = list(assignments)
        if not assignments:
            raise ValueError("assignments must contain at least one [C, T] matrix")
        T = None
        for i, a in enumerate(assignments):
            if not isinstance(a, Tensor) or a.dim() != 2:
                raise ValueError(f"assignments[{i}] must be a 2-D [C, T] tensor")
            if T is None:
                T = a.shape[1]
            elif a.shape[1] != T:
                raise ValueError(f"assignments[{i}] has {a.shape[1]} columns, expected {T} (tasks)")
        self.assignments: List[Tensor] = assignments
        self.num_tasks = int(T)

    @property
    def depth(self) -> int:
        return len(self.assignments)

    def assignment(self, level: int) -> Tensor:
        """[C_level, T] assignment of ``level`` (1..depth)."""
        if not 1 <= level <= self.depth:
            raise ValueError(f"level must be in 1..{self.depth}, got {level!r}")
        return self.assignments[level - 1]

    @classmethod
    def from_logits(cls, logits: Sequence[Tensor], temperature: float = 1.0) -> "SoftTree":
        """Soft levels ``softmax(logits / temperature, dim=0)`` (each task's memberships sum to 1)."""
        return cls([torch.softmax(z / temperature, dim=0) for z in logits])

    @classmethod
    def from_task_tree(cls, tree, dtype=torch.float32, device=None) -> "SoftTree":
        """One-hot levels of a hard :class:`~treepool.TaskTree` (cluster numbering in DFS order)."""
        levels = []
        for lev in range(1, tree.depth + 1):
            labels = tree.labels(lev, device)
            a = torch.zeros(tree.num_clusters(lev), tree.num_tasks, dtype=dtype, device=labels.device)
            a[labels, torch.arange(tree.num_tasks, device=labels.device)] = 1
            levels.append(a)
        return cls(levels)

    def __repr__(self) -> str:
        return (f"SoftTree(num_tasks={self.num_tasks}, "
                f"clusters_per_level={[a.shape[0] for a in self.assignments]})")
