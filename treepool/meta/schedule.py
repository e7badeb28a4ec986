"""Schedules: how the inner loop's parameters live on tree nodes and move down a tree.

The one inner loop of every learner (:meth:`treepool.meta.maml.TreeMAML._inner_loop`)
is, for inner steps k = 0 .. K-1,

    state = schedule.start(theta)
    state = schedule.step(state, k, lr_k, gradients)     # K times
    rows  = schedule.task_params(state)                  # {name: [T, *shape]}

``theta`` and every state hold parameter-major dicts ``{name: [N, *shape]}`` (N nodes;
the root is unbatched ``[*shape]``).  ``gradients`` (:class:`Gradients`) computes
either every task's gradient or, for a node, the gradient of the mean loss of its
tasks; the schedule picks the cheaper one that is exact.  Schedules:

* :class:`TreeSchedule`: a fixed :class:`~treepool.TaskTree` (TreeMAML; MAML on the flat tree);
* :class:`ShardedSchedule`: the same tree with tasks sharded over torch.distributed ranks;
* :class:`SoftSchedule`: soft (HSML-style) assignments;
* :class:`GrowingSchedule`: a tree grown from each step's gradients (Learned TreeMAML).

TreeMAML's step (Garcia et al. 2021), for cluster c of level k with parent p(c):

    theta^k_c = theta^{k-1}_{p(c)} - alpha_k * mean_{t in c} grad L_t(theta^{k-1}_{p(c)})
              = theta^{k-1}_{p(c)} - alpha_k * grad (mean_{t in c} L_t)(theta^{k-1}_{p(c)})
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .. import ops
from ..tree import SoftTree, TaskTree, soft_tree_update
from .functional import (Inputs, LossFn, ModelFunctions, Params, exact_norms, reshape_rows,
                         take_rows)

__all__ = ["Gradients", "GrowingSchedule", "NodeState", "ShardedSchedule", "SoftSchedule",
           "TreeSchedule", "descend"]

# Padding a ragged level to its largest cluster (zero-weight rows) costs at most this
# much more forward/backward work than one gradient per task; past it the level takes
# per-task gradients pooled by the fused tree_update kernel.
MAX_PADDING = 1.5


@dataclass
class NodeState:
    """Parameters of the nodes of one level: ``{name: [N, *shape]}``, or the unbatched
    root when ``root``; ``level`` is the tree level (0: the root)."""
    params: Params
    level: int = 0
    root: bool = True
    extra: object = None  # a schedule's own bookkeeping (e.g. the grown tree)


def descend(base: Params, grads: Params, lr) -> Params:
    """``base - lr * grads`` for every parameter (lr: float, 0-d tensor or ``{name: tensor}``)."""
    out = {}
    for n, g in grads.items():
        rate = lr[n] if isinstance(lr, dict) else lr
        if isinstance(rate, Tensor):
            out[n] = torch.addcmul(base[n], rate, g, value=-1)
        else:
            out[n] = torch.add(base[n], g, alpha=-rate)
    return out


def pooled_update(node: Params, grads: Params, offsets: Tensor, parents: Tensor, lr) -> Params:
    """:func:`treepool.tree_update` of every parameter in one multi-tensor call:
    ``node[parents[c]] - lr * mean of grads over cluster c`` (grads rows in DFS order)."""
    names = list(grads)
    rate = [lr[n] for n in names] if isinstance(lr, dict) else lr
    out = ops.tree_update([node[n] for n in names], [grads[n] for n in names], offsets, parents,
                          rate)
    return dict(zip(names, out))


def gather(params: Params, index: Optional[Tensor]) -> Params:
    """Rows ``index`` of every parameter (None: all of them)."""
    if index is None:
        return params
    return {n: p.index_select(0, index) for n, p in params.items()}


def flat_rows(params: Params) -> Tensor:
    """[N, P] concatenation of ``{name: [N, *shape]}`` (a copy; for clustering and sums)."""
    return torch.cat([p.reshape(p.shape[0], -1) for p in params.values()], dim=1)


def _unflat_rows(rows: Tensor, like: Params) -> Params:
    out, a = {}, 0
    for n, p in like.items():
        k = p[0].numel() if p.dim() and p.shape[0] else p.numel()
        out[n] = rows[:, a:a + k].reshape(rows.shape[0], *p.shape[1:])
        a += k
    return out


def _flat_rate(lr, like: Params):
    """A rate for [N, P] rows: float / 0-d as is, ``{name: tensor}`` as one [P] vector."""
    if not isinstance(lr, dict):
        return lr
    return torch.cat([lr[n].expand(p.shape[1:]).reshape(-1) for n, p in like.items()])


class Gradients:
    """Gradients of the support losses of a task batch (rows in the schedule's order).

    ``create_graph=False`` (first order, or no grad mode) computes them with no graph.
    """

    def __init__(self, fns: ModelFunctions, x: Inputs, y: Tensor, loss_fn: LossFn,
                 create_graph: bool, name: str = "support_x"):
        self.fns, self.x, self.y, self.loss_fn = fns, x, y, loss_fn
        self.create_graph = create_graph
        self.name = name

    def _run(self, fn: Callable[[], Params], params: Params, shared: bool) -> Params:
        try:
            if self.create_graph:
                with exact_norms(self.fns.model):
                    return fn()
            return fn()
        except (RuntimeError, TypeError, ValueError) as error:
            probe = {n: (p[None] if shared else p) for n, p in params.items()}
            self.fns.diagnose(self.name, probe, self.x, error)
            raise

    def per_task(self, params: Params, shared: bool, rows: Optional[Tensor] = None) -> Params:
        """``{name: [T, *shape]}``, task t's gradient at ``params[t]`` (or at the shared
        ``params``); ``rows``: only these rows of the batch."""
        x, y = take_rows(self.x, rows), take_rows(self.y, rows)
        return self._run(lambda: self.fns.task_grads(params, x, y, self.loss_fn, shared,
                                                     self.create_graph), params, shared)

    def per_node(self, params: Params, shared: bool, groups: int,
                 index: Optional[Tensor] = None, weights: Optional[Tensor] = None) -> Params:
        """``{name: [C, *shape]}``: node c's gradient of the (weighted) mean loss of its
        tasks. Tasks are rows ``index`` ([C * m], padded) or all rows, in ``groups``
        equal blocks; ``weights`` [C, m] (zero for padding rows, each row summing to 1)."""
        x = reshape_rows(take_rows(self.x, index), groups)
        y = reshape_rows(take_rows(self.y, index), groups)
        if weights is None:
            fn = lambda: self.fns.node_grads(params, x, y, self.loss_fn, shared,  # noqa: E731
                                             self.create_graph)
        else:
            fn = lambda: self.fns.weighted_node_grads(params, x, y, weights, self.loss_fn,  # noqa: E731
                                                     shared, self.create_graph)
        return self._run(fn, params, shared)


def task_grads_at_nodes(state: NodeState, grads: Gradients, node_of_row) -> Tuple[Params, Params]:
    """(every task's gradient at its node's parameters, the node parameters as rows
    ``[N, *shape]``); ``node_of_row(device)`` maps each row to its node."""
    if state.root:
        g = grads.per_task(state.params, True)
        node = {n: p[None] for n, p in state.params.items()}
    else:
        g = grads.per_task(gather(state.params, node_of_row(_device(state.params))), False)
        node = state.params
    return g, node


class TreeSchedule:
    """A fixed :class:`TaskTree`: rows in its DFS order, one parameter set per node.

    A level whose clusters all hold one task takes per-task gradients; a level of
    equal clusters takes one gradient per node (the mean loss of its tasks, vmapped
    over nodes); a ragged level is padded to equal clusters with zero-weight rows
    when that costs at most ``MAX_PADDING`` times the rows, else takes per-task
    gradients and pools them with the fused :func:`treepool.tree_update` kernel.
    """

    def __init__(self, tree: TaskTree):
        self.tree = tree
        self.num_tasks = tree.num_tasks
        self._identity_perm = bool(torch.equal(tree.perm, torch.arange(tree.num_tasks)))
        self._plans: Dict = {}
        self._identity_of: Dict[int, bool] = {}

    def order(self, x: Inputs) -> Inputs:
        return x if self._identity_perm else take_rows(x, self.tree.perm)

    def unorder(self, rows: Tensor) -> Tensor:
        return rows if self._identity_perm else rows.index_select(
            0, self.tree.inv_perm_on(rows.device))

    def start(self, theta: Params) -> NodeState:
        return NodeState(theta, 0, True)

    def _plan(self, level: int, device):
        """How level ``level`` is pooled: ('task',) | ('node', m) | ('pad', index, weights) | ('kernel',)."""
        key = (level, str(device))
        if device is None:  # the kind of plan only
            for (lv, _), plan in self._plans.items():
                if lv == level:
                    return plan
            key = (level, "cpu")
        if key not in self._plans:
            sizes = self.tree.cluster_sizes(level)
            C, T = len(sizes), self.num_tasks
            if max(sizes) == 1 and C == T:
                plan = ("task",)
            elif min(sizes) == max(sizes):
                plan = ("node", sizes[0])
            elif C * max(sizes) <= MAX_PADDING * T and min(sizes) > 0:
                m = max(sizes)
                offsets = self.tree.offsets(level).tolist()
                index = torch.tensor([offsets[c] + min(j, sizes[c] - 1)
                                      for c in range(C) for j in range(m)], device=device)
                weights = torch.tensor([[1.0 / sizes[c] if j < sizes[c] else 0.0 for j in range(m)]
                                        for c in range(C)], dtype=torch.float64, device=device)
                plan = ("pad", index, weights)
            else:
                plan = ("kernel",)
            self._plans[key] = plan
        return self._plans[key]

    def _identity_parents(self, level: int) -> bool:
        """True when every node of level - 1 has one child at ``level``, its own row
        (MAML's flat tree); level >= 2."""
        if level not in self._identity_of:
            parents = self.tree.parents(level)
            self._identity_of[level] = (parents.shape[0] == self.tree.num_clusters(level - 1)
                                        and torch.equal(parents, torch.arange(parents.shape[0])))
        return self._identity_of[level]

    def step(self, state: NodeState, k: int, lr, grads: Gradients) -> NodeState:
        tree = self.tree
        level = min(k + 1, tree.depth)
        same = level == state.level
        if not (state.root or same) and self._identity_parents(level):
            same = True  # the nodes' own rows: no identity gather
        if state.root:
            base, parents = state.params, None
        elif same:
            base, parents = state.params, None
        else:
            parents = tree.parents(level, _device(state.params))
            base = gather(state.params, parents)
        plan = self._plan(level, _device(state.params))
        if plan[0] == "kernel":
            return NodeState(self._kernel_step(state, level, same, lr, grads), level, False)
        if plan[0] == "task":
            g = grads.per_task(base, state.root)
        elif plan[0] == "node":
            g = grads.per_node(base, state.root, len(tree.cluster_sizes(level)))
        else:
            _, index, weights = plan
            g = grads.per_node(base, state.root, weights.shape[0], index, weights)
        return NodeState(descend(base, g, lr), level, False)

    def _kernel_step(self, state: NodeState, level: int, same: bool, lr, grads: Gradients) -> Params:
        """Per-task gradients at each task's node, pooled per cluster by tree_update."""
        tree, dev = self.tree, _device(state.params)
        g, node = task_grads_at_nodes(state, grads, lambda d: tree.segment_ids(state.level, d))
        parents = (torch.arange(tree.num_clusters(level), device=dev) if same
                   else tree.parents(level, dev))
        return pooled_update(node, g, tree.offsets(level, dev), parents, lr)

    def factored_phase(self, steps: int) -> Optional[Tuple[int, List[int]]]:
        """(first, pools): the longest run of trailing steps ``first .. steps - 1`` whose
        levels have clusters of one size, ``pools[j]`` tasks each at step first + j (1
        at the leaves), and whose first step starts from the root or from such a level;
        None when the last step's level is ragged."""
        pools: List[int] = []
        for k in reversed(range(steps)):
            plan = self._plan(min(k + 1, self.tree.depth), None)
            if plan[0] not in ("task", "node"):
                break
            pools.insert(0, 1 if plan[0] == "task" else plan[1])
        first = steps - len(pools)
        if first > 0:  # step first - 1 is ragged: its level cannot be the run's base
            first, pools = first + 1, pools[1:]
        return (first, pools) if pools else None

    def leaf_base(self, state: NodeState):
        """(params, shared, groups) of the nodes the leaf phase starts from, with the
        tasks of node c the c-th of ``groups`` equal blocks of rows; None when the
        level's clusters are not of one size."""
        if state.root:
            return state.params, True, 1
        plan = self._plan(state.level, None)
        if plan[0] == "task":
            return state.params, False, self.num_tasks
        if plan[0] == "node":
            return state.params, False, self.num_tasks // plan[1]
        return None

    def task_params(self, state: NodeState) -> Params:
        """``{name: [T, *shape]}`` in DFS row order."""
        if state.root:
            return {n: p.expand(self.num_tasks, *p.shape) for n, p in state.params.items()}
        if self._plan(state.level, _device(state.params))[0] == "task":
            return state.params
        return gather(state.params, self.tree.segment_ids(state.level, _device(state.params)))


def _device(params: Params) -> torch.device:
    return next(iter(params.values())).device


class ShardedSchedule(TreeSchedule):
    """:class:`TreeSchedule` with the tree's DFS rows sharded over torch.distributed
    ranks (:class:`~treepool.distributed.ShardedTree`): this rank's rows are its block
    of the DFS order, and each step all-reduces the sums of the clusters that span
    ranks (section 7 of docs/design.md).  The update runs on [n, P] rows."""

    def __init__(self, sharded):
        self.sharded = sharded
        self.tree = sharded.tree
        self.num_tasks = sharded.num_local_tasks
        if self.num_tasks == 0:
            # The collectives of backward must run on every rank in the same order; a
            # rank without tasks would have no graph to run them from.
            raise ValueError("with a process group every rank must hold at least one task "
                             "(see rows_per_rank)")

    def order(self, x: Inputs) -> Inputs:
        return x  # each rank passes its own tasks, already in its DFS order

    def unorder(self, rows: Tensor) -> Tensor:
        return rows

    def step(self, state: NodeState, k: int, lr, grads: Gradients) -> NodeState:
        sharded = self.sharded
        level = min(k + 1, self.tree.depth)
        g, node = task_grads_at_nodes(state, grads, lambda d: sharded.segment_ids(state.level, d))
        rows = sharded.tree_update(flat_rows(node), flat_rows(g), level, _flat_rate(lr, g),
                                   same_level=level == state.level)
        return NodeState(_unflat_rows(rows, g), level, False)

    def task_params(self, state: NodeState) -> Params:
        return gather(state.params, self.sharded.segment_ids(state.level, _device(state.params)))


class SoftSchedule:
    """Soft assignments (HSML-style, Yao et al. 2019): rows in the original task
    order, every task its own parameters, pooled by matrix products."""

    def __init__(self, tree: SoftTree):
        self.tree = tree
        self.num_tasks = tree.num_tasks

    def order(self, x: Inputs) -> Inputs:
        return x

    def unorder(self, rows: Tensor) -> Tensor:
        return rows

    def start(self, theta: Params) -> NodeState:
        return NodeState(theta, 0, True)

    def step(self, state: NodeState, k: int, lr, grads: Gradients) -> NodeState:
        a = self.tree.assignment(min(k + 1, self.tree.depth))
        g = grads.per_task(state.params, state.root)
        base = self.task_params(state)
        out = {}
        for n, gn in g.items():
            rate = lr[n] if isinstance(lr, dict) else lr
            if isinstance(rate, Tensor) and rate.dim():
                rate = rate.expand(gn.shape[1:]).reshape(-1)
            T = gn.shape[0]
            out[n] = soft_tree_update(base[n].reshape(T, -1), gn.reshape(T, -1), a,
                                      rate).view(gn.shape)
        return NodeState(out, k + 1, False)

    def task_params(self, state: NodeState) -> Params:
        if state.root:
            return {n: p.expand(self.num_tasks, *p.shape) for n, p in state.params.items()}
        return state.params


class GrowingSchedule:
    """A tree grown per task batch from each inner step's gradients (Learned TreeMAML,
    Garcia et al. 2021): at step k < depth, every cluster of level k-1 is split by
    clustering its tasks' gradients (:meth:`TaskTree.grow`), then TreeMAML's pooled
    update runs on the new level.  Rows stay in the original task order.

    ``grow(prefix, grads)`` returns the tree one level deeper; ``depth`` is the number
    of steps that grow.  The grown tree is ``state.extra`` (and :attr:`last_tree`).
    """

    def __init__(self, num_tasks: int, depth: int, grow: Callable[[Optional[TaskTree], Tensor], TaskTree]):
        self.num_tasks, self.depth, self.grow = num_tasks, depth, grow
        self.last_tree: Optional[TaskTree] = None

    def order(self, x: Inputs) -> Inputs:
        return x

    def unorder(self, rows: Tensor) -> Tensor:
        return rows

    def start(self, theta: Params) -> NodeState:
        return NodeState(theta, 0, True, None)

    def step(self, state: NodeState, k: int, lr, grads: Gradients) -> NodeState:
        grown: Optional[TaskTree] = state.extra
        g, node = task_grads_at_nodes(state, grads, lambda d: grown.labels(grown.depth, d))
        dev = _device(g)
        if k < self.depth:
            new = self.grow(grown, flat_rows(g).detach())
            level = new.depth
            if grown is not None:
                # node rows are numbered as the previous tree's last level; remap them
                # if the grown tree numbered that level differently
                old_of_new = grown.labels(level - 1, dev).index_select(
                    0, new.perm_on(dev).index_select(0, new.offsets(level - 1, dev)[:-1]))
                if not torch.equal(old_of_new, torch.arange(old_of_new.shape[0], device=dev)):
                    node = gather(node, old_of_new)
            grown = new
            parents = grown.parents(level, dev)
        else:
            level = grown.depth
            parents = torch.arange(grown.num_clusters(level), device=dev)
        out = pooled_update(node, gather(g, grown.perm_on(dev)), grown.offsets(level, dev),
                            parents, lr)
        self.last_tree = grown
        return NodeState(out, level, False, grown)

    def task_params(self, state: NodeState) -> Params:
        if state.root:
            return {n: p.expand(self.num_tasks, *p.shape) for n, p in state.params.items()}
        grown: TaskTree = state.extra
        return gather(state.params, grown.labels(grown.depth, _device(state.params)))
