"""The hand-written meta-steps that treepool is measured against, and the models and
data the benchmark runs them on.

Each baseline is what a strong PyTorch user would write without treepool, so that a
ratio against it means something:

- :func:`vmap_maml_loss`: MAML with ``torch.func``: one ``vmap(grad(...))`` over tasks per
  inner step on a dict of per-parameter tensors; the first step runs at the shared
  parameters (``in_dims=None``), so its forward is one matrix product for all tasks.
- :func:`vmap_tree_maml_loss`: TreeMAML computing each cluster's gradient ONCE, as the
  gradient of the mean support loss of its tasks at the parent's parameters (the
  cluster's tasks' samples form one batch); ``vmap`` over the clusters of a level when
  they have equal sizes (nested: parents outside, each parent's children inside sharing
  its unbatched weights), a Python loop over them otherwise.
- :func:`loop_maml_loss`: MAML as learn2learn users write it, a Python loop over tasks
  with ``torch.autograd.grad(create_graph=not first_order)``.
- :func:`loop_tree_maml_loss`: TreeMAML as a Python loop over the clusters of each level
  (one ``autograd.grad`` per cluster) and over the tasks for the query loss.

Every ``*_loss`` function returns the outer loss (mean query loss at the adapted
parameters), differentiable w.r.t. ``model.parameters()`` (first order: the inner
gradients are constants). :func:`meta_step` turns one into a full meta-step.

First order everywhere means what treepool means: the inner gradients are constants,
but the adapted parameters still depend on the meta-parameters through the identity
(``phi = theta - lr * g``, ``d phi / d theta = I``). The first-order baselines record
no graph for their inner gradients (``torch.no_grad`` around ``torch.func.grad``, or
``autograd.grad`` at detached parameters).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

Params = Dict[str, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]


# --------------------------------------------------------------------------- models

def mlp(width: int, in_dim: int = 1) -> nn.Module:
    """in_dim -> width -> width -> 1 with ReLUs (for sine-style regression, MSE)."""
    return nn.Sequential(nn.Linear(in_dim, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, 1))


def conv_net(ways: int = 5, channels: int = 64, layers: int = 4, image: int = 28) -> nn.Module:
    """The Omniglot conv net of MAML: ``layers`` x [conv3x3 -> ReLU -> maxpool 2], then a
    linear head. No BatchNorm: its running statistics are buffers that the learners
    (and a vmap over tasks) cannot share per task."""
    blocks: List[nn.Module] = []
    size, cin = image, 1
    for _ in range(layers):
        blocks += [nn.Conv2d(cin, channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        cin, size = channels, size // 2
    return nn.Sequential(*blocks, nn.Flatten(), nn.Linear(channels * size * size, ways))


@dataclass
class Batch:
    """A meta-batch: support and query tensors [T, n, ...]."""

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor

    def tensors(self):
        return self.support_x, self.support_y, self.query_x, self.query_y

    def to(self, dtype=None, device=None) -> "Batch":
        def cast(t):
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None)
        return Batch(*(cast(t) for t in self.tensors()))


def regression_batch(num_tasks: int, shots: int, in_dim: int = 1, seed: int = 0) -> Batch:
    """Sine regression tasks: y = sin(<slope_t, x>), ``shots`` support and query points."""
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(num_tasks, shots, in_dim, generator=g)
    xq = torch.randn(num_tasks, shots, in_dim, generator=g)
    slope = torch.randn(num_tasks, 1, in_dim, generator=g)
    return Batch(xs, (xs * slope).sum(-1, keepdim=True).sin(), xq,
                 (xq * slope).sum(-1, keepdim=True).sin())


def classification_batch(num_tasks: int, ways: int = 5, shots: int = 1, queries: int = 1,
                         image: int = 28, seed: int = 0) -> Batch:
    """N-way K-shot image tasks (random images: only the cost matters here); labels
    0..ways-1, ``shots`` support and ``queries`` query images per class."""
    g = torch.Generator().manual_seed(seed)

    def images(per_class):
        x = torch.randn(num_tasks, ways * per_class, 1, image, image, generator=g)
        y = torch.arange(ways).repeat_interleave(per_class).expand(num_tasks, -1).contiguous()
        return x, y

    return Batch(*images(shots), *images(queries))


def balanced_labels(num_tasks: int, depth: int = 3, branching: int = 4) -> List[List[int]]:
    """Per-task cluster labels of levels 1..depth of a balanced tree: branching**k
    clusters at level k (capped at T), contiguous blocks of tasks; the last level is
    the leaves (every task alone)."""
    levels = []
    for k in range(1, depth):
        clusters = min(num_tasks, branching ** k)
        levels.append([t * clusters // num_tasks for t in range(num_tasks)])
    levels.append(list(range(num_tasks)))
    return levels


# --------------------------------------------------------------------------- meta-step

def meta_step(loss: Callable[[], Tensor], optimizer: torch.optim.Optimizer) -> None:
    """One meta-step: outer loss (inner loop included), backward, optimizer step."""
    optimizer.zero_grad(set_to_none=True)
    loss().backward()
    optimizer.step()


def _task_loss(model: nn.Module, loss_fn: LossFn):
    def loss(params: Params, x: Tensor, y: Tensor) -> Tensor:
        return loss_fn(functional_call(model, params, (x,)), y)
    return loss


def _sgd(params: Params, grads: Params, lr: float) -> Params:
    return {n: p - lr * grads[n] for n, p in params.items()}


def _inner_grad_mode(first_order: bool):
    """First order: inner gradients are constants, so no graph is recorded for them."""
    return torch.no_grad() if first_order else contextlib.nullcontext()


# --------------------------------------------------------------------------- (a) vmap MAML

def vmap_maml_loss(model: nn.Module, batch: Batch, inner_lr: float, inner_steps: int,
                   first_order: bool, loss_fn: LossFn = F.mse_loss) -> Tensor:
    """MAML with torch.func: per inner step one vmap over tasks of grad(support loss)."""
    loss = _task_loss(model, loss_fn)
    task_grads = vmap(grad(loss), in_dims=(0, 0, 0))
    params: Params = dict(model.named_parameters())
    for step in range(inner_steps):
        # The first step runs at the shared meta-parameters: no per-task copies.
        batched = task_grads if step else vmap(grad(loss), in_dims=(None, 0, 0))
        with _inner_grad_mode(first_order):
            grads = batched(params, batch.support_x, batch.support_y)
        params = _sgd(params, grads, inner_lr)
    return vmap(loss)(params, batch.query_x, batch.query_y).mean()


# --------------------------------------------------------------------------- (b) vmap TreeMAML

@dataclass
class Level:
    """One tree level as the cluster baselines use it (precomputed once per tree)."""

    num_clusters: int
    parents: List[int]           # parent cluster (level above) of each cluster
    members: List[List[int]]     # task ids of each cluster
    parent_index: Tensor         # parents as an int64 tensor
    task_order: Tensor           # tasks sorted by cluster (stable)
    sorted_already: bool         # task_order is 0..T-1
    equal_sizes: bool
    fanout: int                  # b when cluster c's parent is c // b for all c, else 0


def tree_levels(labels: Sequence[Sequence[int]], device=None) -> List[Level]:
    """Levels 1..K from per-task labels (level 1 first, each refining the one above;
    labels of a level need not be 0..C-1 or contiguous); index tensors on ``device``."""
    out = []
    above = [0] * len(labels[0])
    num_above = 1
    for level in labels:
        ids: Dict[int, int] = {}
        for lab in level:
            ids.setdefault(lab, len(ids))
        dense = [ids[lab] for lab in level]
        members: List[List[int]] = [[] for _ in ids]
        for task, c in enumerate(dense):
            members[c].append(task)
        parents = [above[m[0]] for m in members]
        order = [t for m in members for t in m]
        fanout = len(members) // num_above
        if parents != [c // fanout for c in range(len(members))]:
            fanout = 0
        out.append(Level(len(members), parents, members, torch.tensor(parents, device=device),
                         torch.tensor(order, device=device), order == list(range(len(order))),
                         len({len(m) for m in members}) == 1, fanout))
        above, num_above = dense, len(members)
    return out


def _cluster_batch(x: Tensor, level: Level) -> Tensor:
    """[T, n, ...] -> [C, m * n, ...]: each equal-size cluster's samples as one batch."""
    if not level.sorted_already:
        x = x.index_select(0, level.task_order)
    return x.reshape(level.num_clusters, -1, *x.shape[2:])


def vmap_tree_maml_loss(model: nn.Module, levels: List[Level], batch: Batch, inner_lr: float,
                        first_order: bool, loss_fn: LossFn = F.mse_loss) -> Tensor:
    """TreeMAML with torch.func, each cluster's gradient computed once.

    Inner step k (level k): cluster c's parameters are its parent's minus inner_lr times
    the gradient, at the parent's parameters, of the mean support loss of c's tasks.
    The outer loss is the mean query loss at the leaves.

    When every parent has the same number b of equal-size children, a nested vmap
    (parents outside, their b children inside with the parent's parameters unbatched)
    lets the children of a parent share its weights in one matrix product instead of
    copying them b times.
    """
    loss = _task_loss(model, loss_fn)
    params: Params = dict(model.named_parameters())  # level 0: the root, unbatched
    for depth, level in enumerate(levels):
        context = _inner_grad_mode(first_order)
        if not level.equal_sizes:
            with context:
                grads = _cluster_grads_loop(loss, params, depth == 0, level, batch)
            at_parent = params if depth == 0 else _rows(params, level.parent_index)
            params = _sgd(at_parent, grads, inner_lr)
            continue
        xs, ys = _cluster_batch(batch.support_x, level), _cluster_batch(batch.support_y, level)
        if depth == 0 or level.fanout == 1:  # one parameter set per cluster, or the root
            with context:
                grads = vmap(grad(loss), in_dims=(None if depth == 0 else 0, 0, 0))(params, xs, ys)
            params = _sgd(params, grads, inner_lr)
        elif level.fanout:
            b = level.fanout
            per_parent = vmap(grad(loss), in_dims=(None, 0, 0))
            with context:
                grads = vmap(per_parent)(params, xs.unflatten(0, (-1, b)), ys.unflatten(0, (-1, b)))
            params = {n: (p.unsqueeze(1) - inner_lr * grads[n]).flatten(0, 1)
                      for n, p in params.items()}
        else:
            at_parent = _rows(params, level.parent_index)
            with context:
                grads = vmap(grad(loss))(at_parent, xs, ys)
            params = _sgd(at_parent, grads, inner_lr)
    leaf = levels[-1]
    if not leaf.sorted_already:  # rows are clusters; put them back in task order
        task_to_row = torch.empty_like(leaf.task_order)
        task_to_row[leaf.task_order] = torch.arange(len(task_to_row), device=task_to_row.device)
        params = _rows(params, task_to_row)
    return vmap(loss)(params, batch.query_x, batch.query_y).mean()


def _rows(params: Params, index: Tensor) -> Params:
    return {n: p.index_select(0, index) for n, p in params.items()}


def _cluster_grads_loop(loss, params: Params, shared: bool, level: Level, batch: Batch) -> Params:
    """Unequal clusters: one grad per cluster in a Python loop, stacked [C, ...]."""
    per_cluster = []
    for members, parent in zip(level.members, level.parents):
        at_parent = params if shared else {n: p[parent] for n, p in params.items()}
        index = torch.tensor(members, device=batch.support_x.device)
        xs = batch.support_x.index_select(0, index).flatten(0, 1)
        ys = batch.support_y.index_select(0, index).flatten(0, 1)
        per_cluster.append(grad(loss)(at_parent, xs, ys))
    return {n: torch.stack([g[n] for g in per_cluster]) for n in params}


# --------------------------------------------------------------------------- (c) loop MAML

def loop_maml_loss(model: nn.Module, batch: Batch, inner_lr: float, inner_steps: int,
                   first_order: bool, loss_fn: LossFn = F.mse_loss) -> Tensor:
    """MAML the learn2learn way: per task, autograd.grad steps on a list of parameters."""
    names = [n for n, _ in model.named_parameters()]
    theta = list(model.parameters())
    losses = []
    for t in range(batch.support_x.shape[0]):
        params = theta
        for _ in range(inner_steps):
            grads = _grads(model, names, params, batch.support_x[t], batch.support_y[t], loss_fn,
                           first_order)
            params = [p - inner_lr * g for p, g in zip(params, grads)]
        pred = functional_call(model, dict(zip(names, params)), (batch.query_x[t],))
        losses.append(loss_fn(pred, batch.query_y[t]))
    return torch.stack(losses).mean()


def _grads(model, names, params, x, y, loss_fn, first_order):
    """Gradient of the loss at params; first order: at detached copies, no graph kept."""
    if first_order:
        params = [p.detach().requires_grad_() for p in params]
    loss = loss_fn(functional_call(model, dict(zip(names, params)), (x,)), y)
    return torch.autograd.grad(loss, params, create_graph=not first_order)


# --------------------------------------------------------------------------- (d) loop TreeMAML

def loop_tree_maml_loss(model: nn.Module, levels: List[Level], batch: Batch, inner_lr: float,
                        first_order: bool, loss_fn: LossFn = F.mse_loss) -> Tensor:
    """TreeMAML as Python loops: one autograd.grad per cluster, at its parent's params,
    of the mean support loss of its tasks; then the query loss task by task."""
    names = [n for n, _ in model.named_parameters()]
    nodes = [list(model.parameters())]  # level 0: the root
    for level in levels:
        new_nodes = []
        for members, parent in zip(level.members, level.parents):
            index = torch.tensor(members, device=batch.support_x.device)
            xs = batch.support_x.index_select(0, index).flatten(0, 1)
            ys = batch.support_y.index_select(0, index).flatten(0, 1)
            grads = _grads(model, names, nodes[parent], xs, ys, loss_fn, first_order)
            new_nodes.append([p - inner_lr * g for p, g in zip(nodes[parent], grads)])
        nodes = new_nodes
    leaf_of_task = {t: c for c, members in enumerate(levels[-1].members) for t in members}
    losses = []
    for t in range(batch.query_x.shape[0]):
        params = dict(zip(names, nodes[leaf_of_task[t]]))
        pred = functional_call(model, params, (batch.query_x[t],))
        losses.append(loss_fn(pred, batch.query_y[t]))
    return torch.stack(losses).mean()
