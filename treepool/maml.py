"""TreeMAML, MAML and learned inner learning rates (Meta-SGD).

**TreeMAML** (Garcia et al. 2021, "Meta-learning with MAML on trees"). Tasks are the
leaves of a :class:`~treepool.TaskTree` of depth K.  Inner step k = 1..K uses the
clusters of level k: every task in cluster c gets the same step, the mean of the
gradients of the tasks in c, each taken at the task's current parameters,

    theta^k_c = theta^{k-1}_{parent(c)} - alpha_k * mean_{t in c} grad L^s_t(theta^{k-1}_{parent(c)}),

with theta^0 = theta (the root).  Parameters live on tree nodes ([C_k, P] per level)
and every step is one :func:`treepool.tree_update`.  The outer loss is the mean query
loss at the leaves, mean_t L^q_t(theta^K_{leaf(t)}); its gradient is second order
(through the inner gradients) or first order (inner gradients detached).

**MAML** (Finn et al. 2017) is TreeMAML on the tree whose every level is the leaves
(:meth:`TaskTree.flat`).

**Learned inner rates** (:class:`InnerRate`): alpha_k is one float ('fixed'), one
learnable scalar per step ('per_step'), one learnable [P] vector shared by all steps
('per_parameter', Meta-SGD, Li et al. 2017) or one per step ('per_step_parameter', the
adaptive-update view of Arnold et al. 2021).

Per-task gradients are one ``torch.func.vmap(torch.func.grad(...))`` per inner step
over :class:`~treepool.FlatParams` rows; nothing loops over tasks in Python.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops
from ._functional import LossFn, MetaLearnerBase, check_task_batch
from .soft_pooling import SoftTree, soft_tree_update
from .tree import TaskTree

__all__ = ["InnerRate", "TreeMAML", "MAML"]

_MODES = ("fixed", "per_step", "per_parameter", "per_step_parameter")


class InnerRate(nn.Module):
    """Inner learning rate alpha_k of step k (0-based in :meth:`forward`).

    Modes:
      * ``'fixed'``: one float, not learned;
      * ``'per_step'``: a learnable [K] vector, alpha_k a scalar;
      * ``'per_parameter'``: a learnable [P] vector used at every step (Meta-SGD,
        Li et al. 2017: theta' = theta - alpha * grad, alpha elementwise);
      * ``'per_step_parameter'``: a learnable [K, P] matrix, one vector per step.

    ``init`` is a float (every entry) or a tensor broadcastable to the shape.
    """

    def __init__(self, init: Union[float, Tensor] = 0.01, mode: str = "fixed", num_steps: int = 1,
                 numel: Optional[int] = None, *, dtype=None, device=None):
        super().__init__()
        if mode not in _MODES:
            raise ValueError(f"lr_mode must be one of {list(_MODES)}, got {mode!r}")
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
        self.mode = mode
        self.num_steps = num_steps
        if mode == "fixed":
            if isinstance(init, Tensor):
                if init.numel() != 1:
                    raise ValueError("lr_mode='fixed' needs a single float inner_lr")
                init = float(init)
            self.value = float(init)
            self.rate = None
            return
        if mode in ("per_parameter", "per_step_parameter") and numel is None:
            raise ValueError(f"lr_mode={mode!r} needs numel (the number of parameters P)")
        shape = {"per_step": (num_steps,), "per_parameter": (numel,),
                 "per_step_parameter": (num_steps, numel)}[mode]
        value = torch.empty(shape, dtype=dtype or torch.get_default_dtype(), device=device)
        with torch.no_grad():
            value.copy_(torch.as_tensor(init, dtype=value.dtype, device=value.device).expand(shape))
        self.rate = nn.Parameter(value)

    def forward(self, step: int) -> Union[float, Tensor]:
        """alpha for inner step ``step`` (0-based): a float, a 0-d or a [P] tensor."""
        if self.mode == "fixed":
            return self.value
        if self.mode == "per_parameter":
            return self.rate
        return self.rate[min(step, self.num_steps - 1)]

    def extra_repr(self) -> str:
        if self.mode == "fixed":
            return f"mode='fixed', value={self.value}"
        return f"mode={self.mode!r}, shape={tuple(self.rate.shape)}"


def _rows_of(node: Tensor, seg: Tensor) -> Tensor:
    """node[seg], without a copy when every task has its own node (seg = arange)."""
    return node if node.shape[0] == seg.shape[0] else node.index_select(0, seg)


def _arange(n: int, device) -> Tensor:
    return torch.arange(n, dtype=torch.int64, device=device)


class TreeMAML(MetaLearnerBase):
    """TreeMAML (Garcia et al. 2021) on a fixed :class:`TaskTree` (or a soft tree).

    Args:
        model: any ``nn.Module`` without running-statistics buffers; its trainable
            parameters initialise theta (one [P] ``nn.Parameter``).
        tree: a :class:`TaskTree` over the T tasks of a meta-batch, a
            :class:`~treepool.SoftTree` (HSML-style soft assignments), or None
            (then pass ``tree=`` to every call).
        inner_lr: initial inner learning rate (float, or a tensor for learned modes).
        lr_mode: 'fixed', 'per_step', 'per_parameter' (Meta-SGD) or
            'per_step_parameter'; see :class:`InnerRate`.
        first_order: detach the inner gradients (first-order MAML / TreeMAML).
        inner_steps: K; default ``tree.depth``.  Step k uses level min(k, depth):
            extra steps stay on the last level; with fewer steps than levels, the
            leaves use the parameters of their level-K node.
        loss_fn: default ``loss_fn(prediction, target) -> scalar`` (MSE).
        randomness: ``torch.func.vmap`` randomness ('error', 'different', 'same').
        process_group: shard the tasks over the ranks of this torch.distributed group
            (e.g. ``torch.distributed.group.WORLD``); each rank passes the data of
            :meth:`local_tasks` and calls :meth:`sync_grads` after ``backward()``.
        rows_per_rank: tasks per rank in DFS order (default: as even as possible).

    ``parameters()`` are the meta-parameters (theta and the learnable rates): use any
    ``torch.optim`` optimizer on them.  Data are tensors [T, n, ...] in the ORIGINAL
    task order (the tree's task ids); the DFS permutation is internal.
    """

    def __init__(self, model: nn.Module, tree: Union[TaskTree, SoftTree, None] = None,
                 inner_lr: Union[float, Tensor] = 0.01, lr_mode: str = "fixed",
                 first_order: bool = False, inner_steps: Optional[int] = None,
                 loss_fn: LossFn = F.mse_loss, randomness: str = "error", *,
                 process_group=None, rows_per_rank=None):
        super().__init__(model, randomness)
        if tree is not None and not isinstance(tree, (TaskTree, SoftTree)):
            raise TypeError(f"tree must be a TaskTree, a SoftTree or None, got {type(tree).__name__}")
        if inner_steps is None:
            if tree is None:
                raise ValueError("inner_steps is needed when no tree is given")
            inner_steps = tree.depth
        if not isinstance(inner_steps, int) or inner_steps < 1:
            raise ValueError(f"inner_steps must be an int >= 1, got {inner_steps!r}")
        self.tree = tree
        self.process_group, self.rows_per_rank = process_group, rows_per_rank
        self._sharded = {}
        self.inner_steps = inner_steps
        self.first_order = bool(first_order)
        self.loss_fn = loss_fn
        self.inner_rate = InnerRate(inner_lr, lr_mode, inner_steps, self.flat.numel,
                                    dtype=self.theta.dtype, device=self.theta.device)

    # ----------------------------------------------------------------- inner loop

    def _tree(self, tree, num_tasks: int):
        tree = self.tree if tree is None else tree
        if tree is None:
            raise ValueError("no tree: pass tree= to the constructor or to this call")
        if not isinstance(tree, (TaskTree, SoftTree)):
            raise TypeError(f"tree must be a TaskTree or a SoftTree, got {type(tree).__name__}")
        if self.distributed and isinstance(tree, TaskTree):
            local = self.sharded(tree).num_local_tasks
            if num_tasks != local:
                raise ValueError(f"this rank holds {local} of the tree's {tree.num_tasks} tasks "
                                 f"(local_tasks()) but the data have {num_tasks}")
        elif tree.num_tasks != num_tasks:
            raise ValueError(f"the data have {num_tasks} tasks but the tree has {tree.num_tasks}")
        return tree

    def _inner_hard(self, tree: TaskTree, xs: Tensor, ys: Tensor, loss_fn: LossFn,
                    create_graph: bool) -> Tuple[Tensor, Tensor]:
        """Inner loop with rows in DFS order. Returns (node params [C, P], row -> node [T])."""
        dev = self.theta.device
        node = self.theta[None]
        seg = None
        prev = 0
        for k in range(self.inner_steps):
            level = min(k + 1, tree.depth)
            grads = self._task_grads(node, seg, xs, ys, loss_fn)
            if not create_graph:
                grads = grads.detach()
            parents = tree.parents(level, dev) if level != prev else _arange(node.shape[0], dev)
            node = ops.tree_update(node, grads, tree.offsets(level, dev), parents, self.inner_rate(k))
            seg, prev = tree.segment_ids(level, dev), level
        return node, seg

    # ----------------------------------------------------------------- distributed

    @property
    def distributed(self) -> bool:
        """True when tasks are sharded over the ranks of ``process_group``."""
        return self.process_group is not None

    def sharded(self, tree: TaskTree):
        """The :class:`~treepool.distributed.ShardedTree` of ``tree`` over the group."""
        from .distributed import ShardedTree

        key = id(tree)
        if key not in self._sharded or self._sharded[key].tree is not tree:
            self._sharded[key] = ShardedTree(tree, self.rows_per_rank, self.process_group)
        return self._sharded[key]

    def local_tasks(self, tree: Optional[TaskTree] = None) -> Tensor:
        """With a process group: the original ids of the tasks whose data this rank
        passes, in the order it passes them (its block of the tree's DFS order)."""
        tree = self.tree if tree is None else tree
        if not isinstance(tree, TaskTree):
            raise ValueError("local_tasks needs a TaskTree: pass tree= here or to the constructor")
        return self.sharded(tree).local_tasks

    def sync_grads(self) -> None:
        """With a process group: sum the meta-parameters' gradients over the ranks,
        after ``meta_loss(...).backward()`` on every rank; then step the optimizer."""
        from .distributed import sync_grads

        sync_grads(self, self.process_group)

    def _inner_sharded(self, sharded, xs: Tensor, ys: Tensor, loss_fn: LossFn,
                       create_graph: bool) -> Tensor:
        """Inner loop over this rank's rows only; returns their leaf parameters [n, P]."""
        dev = self.theta.device
        node, seg, prev = self.theta[None], None, 0
        if sharded.num_local_tasks == 0:
            # The collectives of backward must run on every rank in the same order; a
            # rank without tasks would have no graph to run them from.
            raise ValueError("with a process group every rank must hold at least one task "
                             "(see rows_per_rank)")
        for k in range(self.inner_steps):
            level = min(k + 1, sharded.tree.depth)
            grads = self._task_grads(node, seg, xs, ys, loss_fn)
            if not create_graph:
                grads = grads.detach()
            node = sharded.tree_update(node, grads, level, self.inner_rate(k),
                                       same_level=level == prev)
            seg, prev = sharded.segment_ids(level, dev), level
        return _rows_of(node, seg)

    def _task_grads(self, node: Tensor, seg: Optional[Tensor], xs: Tensor, ys: Tensor,
                    loss_fn: LossFn) -> Tensor:
        """Every task's gradient at its node's parameters (seg: task -> node; None
        before the first step, when all tasks share theta)."""
        if seg is None:
            return self.fn.grads(self.theta, xs, ys, loss_fn, shared=True)
        return self.fn.grads(_rows_of(node, seg), xs, ys, loss_fn)

    def _inner_soft(self, tree: SoftTree, xs: Tensor, ys: Tensor, loss_fn: LossFn,
                    create_graph: bool) -> Tensor:
        """Inner loop with soft pooling; rows in original order. Returns phi [T, P]."""
        phi = self.theta[None].expand(tree.num_tasks, -1)
        for k in range(self.inner_steps):
            level = min(k + 1, tree.depth)
            grads = self.fn.grads(phi, xs, ys, loss_fn)
            if not create_graph:
                grads = grads.detach()
            phi = soft_tree_update(phi, grads, tree.assignment(level), self.inner_rate(k))
        return phi

    def _create_graph(self) -> bool:
        return torch.is_grad_enabled() and not self.first_order

    def _leaf_rows(self, support_x: Tensor, support_y: Tensor, loss_fn: LossFn,
                   tree) -> Tuple[Tensor, Optional[TaskTree]]:
        """Leaf parameters of every task, [T, P], and the tree whose DFS order the rows
        are in (None: original task order)."""
        create_graph = self._create_graph()
        if self.distributed:
            if not isinstance(tree, TaskTree):
                raise TypeError("a process group needs a TaskTree (soft trees are not sharded)")
            return self._inner_sharded(self.sharded(tree), support_x, support_y, loss_fn,
                                       create_graph), None
        if isinstance(tree, SoftTree):
            return self._inner_soft(tree, support_x, support_y, loss_fn, create_graph), None
        node, seg = self._inner_hard(tree, tree.permute_rows(support_x), tree.permute_rows(support_y),
                                     loss_fn, create_graph)
        return _rows_of(node, seg), tree

    def _check_batch(self, support_x, support_y, query_x=None, query_y=None):
        T = check_task_batch("support_x", support_x, None)
        check_task_batch("support_y", support_y, T)
        if query_x is not None:
            check_task_batch("query_x", query_x, T)
            check_task_batch("query_y", query_y, T)
        return T

    def adapt(self, support_x: Tensor, support_y: Tensor, loss_fn: Optional[LossFn] = None, *,
              tree=None) -> Tensor:
        """The adapted (leaf) parameters of every task, [T, P] in original task order.

        Differentiable w.r.t. the meta-parameters when grad mode is on; call under
        ``torch.no_grad()`` for evaluation.
        """
        T = self._check_batch(support_x, support_y)
        rows, order = self._leaf_rows(support_x, support_y, loss_fn or self.loss_fn,
                                      self._tree(tree, T))
        return rows if order is None else order.unpermute_rows(rows)

    def meta_loss(self, support_x: Tensor, support_y: Tensor, query_x: Tensor, query_y: Tensor,
                  loss_fn: Optional[LossFn] = None, *, tree=None, reduction: str = "mean") -> Tensor:
        """Outer loss: mean over tasks of the query loss at the task's leaf parameters.

        ``reduction='none'`` returns the [T] per-task query losses (original order).
        Call ``.backward()`` on the result and step any optimizer on ``parameters()``.

        With a process group, each rank passes the data of ``local_tasks()`` (in that
        order) and gets its share of the mean; after ``backward()`` on every rank,
        :meth:`sync_grads` sums the gradients into the single-process meta-gradient.
        """
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        loss_fn = loss_fn or self.loss_fn
        T = self._check_batch(support_x, support_y, query_x, query_y)
        tree = self._tree(tree, T)
        rows, order = self._leaf_rows(support_x, support_y, loss_fn, tree)
        if order is not None:
            query_x, query_y = order.permute_rows(query_x), order.permute_rows(query_y)
        losses = self.fn.losses(rows, query_x, query_y, loss_fn)
        if reduction == "mean" and self.distributed:
            return losses.sum() / tree.num_tasks  # summed over the ranks: the mean
        if reduction == "mean":
            return losses.mean()
        return losses if order is None else order.unpermute_rows(losses)

    forward = meta_loss

    def extra_repr(self) -> str:
        return (f"num_params={self.flat.numel}, inner_steps={self.inner_steps}, "
                f"first_order={self.first_order}, tree={self.tree!r}")


class MAML(TreeMAML):
    """MAML (Finn et al. 2017): TreeMAML on :meth:`TaskTree.flat`, every level the leaves.

        phi_t^k = phi_t^{k-1} - alpha_k grad L^s_t(phi_t^{k-1}),  phi_t^0 = theta,
        outer loss = mean_t L^q_t(phi_t^K).

    ``num_tasks`` may be None: the flat tree is then built for each batch's T.
    With ``lr_mode='per_parameter'`` this is Meta-SGD (Li et al. 2017).
    """

    def __init__(self, model: nn.Module, num_tasks: Optional[int] = None,
                 inner_lr: Union[float, Tensor] = 0.01, inner_steps: int = 1,
                 lr_mode: str = "fixed", first_order: bool = False,
                 loss_fn: LossFn = F.mse_loss, randomness: str = "error", *,
                 process_group=None, rows_per_rank=None):
        if process_group is not None and num_tasks is None:
            raise ValueError("MAML with a process group needs num_tasks (all ranks' tasks)")
        tree = None if num_tasks is None else TaskTree.flat(num_tasks, inner_steps)
        super().__init__(model, tree, inner_lr=inner_lr, lr_mode=lr_mode, first_order=first_order,
                         inner_steps=inner_steps, loss_fn=loss_fn, randomness=randomness,
                         process_group=process_group, rows_per_rank=rows_per_rank)
        self._flat_trees = {}

    def _tree(self, tree, num_tasks: int):
        if tree is None and not self.distributed and (
                self.tree is None or self.tree.num_tasks != num_tasks):
            tree = self._flat_trees.get(num_tasks)
            if tree is None:
                tree = self._flat_trees[num_tasks] = TaskTree.flat(num_tasks, self.inner_steps)
        return super()._tree(tree, num_tasks)
