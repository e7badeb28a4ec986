"""TreeMAML and MAML with fixed or learned inner rates (Meta-SGD, MAML++).

**TreeMAML** (Garcia et al. 2021, "Meta-learning with MAML on trees"). Tasks are the
leaves of a :class:`~treepool.TaskTree` of depth K.  Inner step k = 1..K uses the
clusters of level k: every task in cluster c gets the same step, the mean of the
gradients of the tasks in c, each taken at the task's current parameters,

    theta^k_c = theta^{k-1}_{parent(c)} - alpha_k * mean_{t in c} grad L^s_t(theta^{k-1}_{parent(c)}),

with theta^0 = theta.  The mean of the gradients is the gradient of the mean loss, so a
node's pooled gradient is computed once per node (docs/design.md, section 5).  The outer
loss is the mean query loss at the leaves, mean_t L^q_t(theta^K_{leaf(t)}); its gradient
is second order (through the inner gradients) or first order (inner gradients detached).

**MAML** (Finn et al. 2017) is TreeMAML on the tree whose every level is the leaves.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..tree import SoftTree, TaskTree
from .factored import FactoredLinears
from .functional import Inputs, LossFn, Params, batch_statistics
from .learner import InnerParams, MetaLearner
from .rates import InnerRate
from .schedule import Gradients, ShardedSchedule, SoftSchedule, TreeSchedule

__all__ = ["MAML", "TreeMAML"]


def check_steps(value, name: str = "inner_steps") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


class TreeMAML(MetaLearner):
    """TreeMAML (Garcia et al. 2021) on a fixed :class:`TaskTree` (or a soft tree).

    Args:
        model: any ``nn.Module`` (BatchNorm, Dropout, several inputs: see README).
        tree: a :class:`TaskTree` over the T tasks of a meta-batch, a
            :class:`~treepool.SoftTree` (HSML-style soft assignments), or None
            (then pass ``tree=`` to every call).
        inner_lr: initial inner learning rate (float, or a tensor for learned modes).
        inner_steps: K; default ``tree.depth``.  Step k uses level min(k, depth).
        lr_mode: see :class:`~treepool.meta.rates.InnerRate` ('fixed', 'per_step',
            'per_layer', 'per_step_layer', 'per_parameter', 'per_step_parameter').
        first_order: detach the inner gradients (first-order MAML / TreeMAML).
        loss_fn: ``loss_fn(prediction, target) -> scalar`` of one task (default MSE).
        inner_params: which parameters adapt (names or a predicate; default all).
        randomness: vmap randomness for Dropout ('different', default; 'same'; 'error').
        process_group: shard the tasks over the ranks of this torch.distributed group;
            each rank passes the data of :meth:`local_tasks` and calls
            :meth:`sync_grads` after ``backward()``.
        rows_per_rank: tasks per rank in DFS order (default: as even as possible).
        factored: per-task ``nn.Linear`` weights of the leaf steps kept as low-rank
            updates (:mod:`treepool.meta.factored`): 'auto' (default: where it pays;
            in first order, a plain MLP's large layers that do not pay are updated in
            place instead), 'always' (every eligible layer) or 'never' (dense).
        check_finite: raise ``FloatingPointError`` when a task's query loss is inf or
            NaN (a diverged inner loop) instead of returning it; one host sync per call.

    Data are tensors ``[T, n, ...]`` (or tuples of them, passed as ``model(*x)``) in the
    tree's original task order; the DFS permutation is internal.
    """

    def __init__(self, model: nn.Module, tree: Union[TaskTree, SoftTree, None] = None, *,
                 inner_lr: Union[float, Tensor] = 0.01, inner_steps: Optional[int] = None,
                 lr_mode: str = "fixed", first_order: bool = False,
                 loss_fn: LossFn = F.mse_loss, inner_params: InnerParams = None,
                 randomness: str = "different", process_group=None, rows_per_rank=None,
                 factored: str = "auto", check_finite: bool = True):
        super().__init__(model, inner_params, randomness)
        self.check_finite = bool(check_finite)
        self.factored = FactoredLinears(model, self.fns, factored)
        if tree is not None and not isinstance(tree, (TaskTree, SoftTree)):
            raise TypeError(f"tree must be a TaskTree, a SoftTree or None, got {type(tree).__name__}")
        if inner_steps is None:
            if tree is None:
                raise ValueError("inner_steps is needed when no tree is given")
            inner_steps = tree.depth
        self.inner_steps = check_steps(inner_steps)
        self.tree = tree
        self.first_order = bool(first_order)
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        self.loss_fn = loss_fn
        self.process_group, self.rows_per_rank = process_group, rows_per_rank
        theta = self.theta()
        first = next(iter(theta.values()))
        self.inner_rate = InnerRate(inner_lr, lr_mode, self.inner_steps, self._shapes(),
                                    dtype=first.dtype, device=first.device)
        self._schedules = {}

    # ----------------------------------------------------------------- schedules

    @property
    def distributed(self) -> bool:
        """True when tasks are sharded over the ranks of ``process_group``."""
        return self.process_group is not None

    def _tree(self, tree, num_tasks: int):
        tree = self.tree if tree is None else tree
        if tree is None:
            raise ValueError("no tree: pass tree= to the constructor or to this call")
        if not isinstance(tree, (TaskTree, SoftTree)):
            raise TypeError(f"tree must be a TaskTree or a SoftTree, got {type(tree).__name__}")
        return tree

    def sharded(self, tree: TaskTree):
        """The :class:`~treepool.distributed.ShardedTree` of ``tree`` over the group."""
        from ..distributed import ShardedTree

        key = ("sharded", id(tree))
        entry = self._schedules.get(key)
        if entry is None or entry[0] is not tree:
            sharded = ShardedTree(tree, self.rows_per_rank, self.process_group,
                                  num_params=self.num_params, dtype=self.param_dtype)
            entry = self._schedules[key] = (tree, sharded)
        return entry[1]

    def schedule(self, tree, num_tasks: int):
        """The schedule (docs/design.md, section 5) of ``tree`` for a batch of ``num_tasks``."""
        tree = self._tree(tree, num_tasks)
        if self.distributed:
            if not isinstance(tree, TaskTree):
                raise TypeError("a process group needs a TaskTree (soft trees are not sharded)")
            sched = ShardedSchedule(self.sharded(tree))
            if num_tasks != sched.num_tasks:
                raise ValueError(f"this rank holds {sched.num_tasks} of the tree's {tree.num_tasks} "
                                 f"tasks (local_tasks()) but the data have {num_tasks}")
            return sched
        if tree.num_tasks != num_tasks:
            raise ValueError(f"support_x has {num_tasks} tasks but the tree has {tree.num_tasks}")
        key = id(tree)
        entry = self._schedules.get(key)
        if entry is None or entry[0] is not tree:
            sched = SoftSchedule(tree) if isinstance(tree, SoftTree) else TreeSchedule(tree)
            entry = self._schedules[key] = (tree, sched)
        return entry[1]

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
        from ..distributed import sync_grads

        sync_grads(self, self.process_group)

    # ----------------------------------------------------------------- inner loop

    def _inner_loop(self, schedule, x: Inputs, y: Tensor, loss_fn: LossFn, steps: int) -> Params:
        """The one inner loop: ``{name: [T, *shape]}`` leaf parameters, schedule row order."""
        create_graph = torch.is_grad_enabled() and not self.first_order
        grads = Gradients(self.fns, x, y, loss_fn, create_graph)
        state = schedule.start(self.theta())
        for k in range(steps):
            state = schedule.step(state, k, self.inner_rate(k), grads)
        return schedule.task_params(state)

    def _factored_losses(self, schedule, sx: Inputs, sy: Tensor, qx: Inputs, qy: Tensor,
                         loss_fn: LossFn) -> Optional[Tensor]:
        """[T] query losses with the trailing steps in factored form (the leaf steps, and
        the node steps above them where that pays), or None where no layer is factored
        (then the dense loop runs)."""
        if type(schedule) is not TreeSchedule or self.factored.mode == "never":
            return None
        phase = schedule.factored_phase(self.inner_steps)
        if phase is None:
            return None
        first, pools = phase
        rates = [self.inner_rate(k) for k in range(first, self.inner_steps)]
        create_graph = torch.is_grad_enabled() and not self.first_order
        try:
            names, skip, in_place = self.factored.plan(sx, rates, pools, create_graph)
        except (RuntimeError, TypeError, ValueError) as error:
            probe = {n: p[None] for n, p in self.theta().items()}
            self.fns.diagnose("support_x", probe, sx, error)
            raise
        if not names and not in_place:
            return None
        first, rates, pools = first + skip, rates[skip:], pools[skip:]
        grads = Gradients(self.fns, sx, sy, loss_fn, create_graph)
        state = schedule.start(self.theta())
        for k in range(first):
            state = schedule.step(state, k, self.inner_rate(k), grads)
        params, shared, groups = schedule.leaf_base(state)
        return self.factored.query_losses(names, params, shared, groups, sx, sy, qx, qy, rates,
                                          pools, loss_fn, create_graph, in_place)

    def adapt(self, support_x: Inputs, support_y: Tensor, steps: Optional[int] = None, *,
              loss_fn: Optional[LossFn] = None, tree=None) -> Params:
        """Adapted parameters of every task, ``{name: [T, *shape]}`` in the original task
        order, after ``steps`` inner steps (default ``inner_steps``; more is allowed: extra
        steps stay on the last level with the last step's rate).

        Differentiable w.r.t. the meta-parameters in grad mode; under ``torch.no_grad()``
        for evaluation.  Use :meth:`predict`, :meth:`task_losses`, :meth:`task_params`
        or :meth:`task_model` on the result.
        """
        steps = self.inner_steps if steps is None else check_steps(steps, "steps")
        T = self._check_support(support_x, support_y)
        schedule = self.schedule(tree, T)
        with batch_statistics(self.model):
            rows = self._inner_loop(schedule, schedule.order(support_x), schedule.order(support_y),
                                    loss_fn or self.loss_fn, steps)
        return {n: schedule.unorder(p) for n, p in rows.items()}

    def meta_loss(self, support_x: Inputs, support_y: Tensor, query_x: Inputs, query_y: Tensor,
                  loss_fn: Optional[LossFn] = None, *, tree=None, reduction: str = "mean") -> Tensor:
        """Outer loss: mean over tasks of the query loss at the task's adapted parameters.

        ``reduction='none'`` returns the [T] per-task query losses (original order).
        Call ``.backward()`` on the result and step any optimizer on ``parameters()``.
        With a process group, each rank passes the data of ``local_tasks()`` and gets
        its share of the mean; :meth:`sync_grads` after ``backward()`` sums them.
        """
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        loss_fn = loss_fn or self.loss_fn
        T = self._check_support(support_x, support_y, query_x, query_y)
        schedule = self.schedule(tree, T)
        sx, sy = schedule.order(support_x), schedule.order(support_y)
        qx, qy = schedule.order(query_x), schedule.order(query_y)
        with batch_statistics(self.model):
            losses = self._factored_losses(schedule, sx, sy, qx, qy, loss_fn)
            if losses is None:
                rows = self._inner_loop(schedule, sx, sy, loss_fn, self.inner_steps)
                try:
                    losses = self.fns.losses(rows, qx, qy, loss_fn)
                except (RuntimeError, TypeError, ValueError) as error:
                    self.fns.diagnose("query_x", rows, qx, error)
                    raise
        if self.check_finite and not bool(torch.isfinite(losses.detach()).all()):
            bad = int((~torch.isfinite(losses.detach())).sum())
            raise FloatingPointError(
                f"{bad} of {losses.numel()} tasks have a non-finite query loss: the inner loop "
                f"diverged or the data hold inf/NaN (inner_lr={self.inner_rate.extra_repr()}); "
                "lower inner_lr, or pass check_finite=False to get the NaN instead")
        if reduction == "mean" and self.distributed:
            return losses.sum() / self._tree(tree, T).num_tasks  # summed over the ranks
        if reduction == "mean":
            return losses.mean()
        return schedule.unorder(losses)

    forward = meta_loss

    def extra_repr(self) -> str:
        return (f"num_params={self.num_params}, inner_steps={self.inner_steps}, "
                f"first_order={self.first_order}, tree={self.tree!r}")


class MAML(TreeMAML):
    """MAML (Finn et al. 2017): TreeMAML on :meth:`TaskTree.flat`, every level the leaves.

        phi_t^k = phi_t^{k-1} - alpha_k grad L^s_t(phi_t^{k-1}),  phi_t^0 = theta,
        outer loss = mean_t L^q_t(phi_t^K).

    Any number of tasks per batch; ``num_tasks`` (keyword) is needed only with a process
    group.  With ``lr_mode='per_parameter'`` this is Meta-SGD (Li et al. 2017); with
    ``'per_step_layer'`` MAML++'s learned per-layer per-step rates (Antoniou et al. 2019).
    """

    def __init__(self, model: nn.Module, *, inner_lr: Union[float, Tensor] = 0.01,
                 inner_steps: int = 1, num_tasks: Optional[int] = None, lr_mode: str = "fixed",
                 first_order: bool = False, loss_fn: LossFn = F.mse_loss,
                 inner_params: InnerParams = None, randomness: str = "different",
                 process_group=None, rows_per_rank=None, factored: str = "auto",
                 check_finite: bool = True):
        if num_tasks is not None and (isinstance(num_tasks, bool) or not isinstance(num_tasks, int)
                                      or num_tasks < 1):
            raise ValueError(f"num_tasks must be an int >= 1 or None, got {num_tasks!r}")
        if process_group is not None and num_tasks is None:
            raise ValueError("MAML with a process group needs num_tasks (all ranks' tasks)")
        check_steps(inner_steps)
        tree = None if num_tasks is None else TaskTree.flat(num_tasks, inner_steps)
        super().__init__(model, tree, inner_lr=inner_lr, inner_steps=inner_steps, lr_mode=lr_mode,
                         first_order=first_order, loss_fn=loss_fn, inner_params=inner_params,
                         randomness=randomness, process_group=process_group,
                         rows_per_rank=rows_per_rank, factored=factored,
                         check_finite=check_finite)
        self._flat_trees = {}

    def _tree(self, tree, num_tasks: int):
        if tree is None and not self.distributed and (
                self.tree is None or self.tree.num_tasks != num_tasks):
            tree = self._flat_trees.get(num_tasks)
            if tree is None:
                tree = self._flat_trees[num_tasks] = TaskTree.flat(num_tasks, self.inner_steps)
        return super()._tree(tree, num_tasks)
