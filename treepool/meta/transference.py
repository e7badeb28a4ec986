"""Task transference: lookahead affinity (Fifty et al. 2020), TAG (Fifty et al. 2021), IT-MTL.

For T tasks with losses L_j and gradients g_i = grad L_i(theta), the lookahead
affinity of task i onto task j is

    Z[i -> j] = 1 - L_j(theta - lr g_i) / L_j(theta)

("Measuring and harnessing transference in multi-task learning", Fifty et al. 2020);
TAG ("Efficiently identifying task groupings for multi-task learning", Fifty et al.
2021) divides it by lr.  Z[i, j] > 0: a step on task i lowers task j's loss.

All T lookahead vectors theta - lr g_i are one :func:`treepool.tree_update` (one task
per cluster, every cluster under the root), and the T x T lookahead losses are one
nested ``vmap`` (parameters x tasks).  :func:`affinity_tree` clusters Z into a
:class:`~treepool.TaskTree`; :func:`choose_gradient` is IT-MTL's choice among
candidate combined gradients by their total lookahead loss.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..tree import TaskTree
from .flat_params import FlatParams
from .functional import LossFn, ModelFunctions, check_inputs

__all__ = ["task_gradients", "lookahead_params", "lookahead_losses", "lookahead_affinity",
           "affinity_tree", "pcgrad", "itmtl_candidates", "choose_gradient"]


class _Rows:
    """The model's loss as a function of [P] parameter rows (FlatParams layout)."""

    def __init__(self, model: nn.Module, params: Optional[Tensor]):
        self.flat = FlatParams(model)
        self.fns = ModelFunctions(model, self.flat.names)
        theta = self.flat.buffer if params is None else params
        if not isinstance(theta, Tensor) or theta.dim() != 1 or theta.shape[0] != self.flat.numel:
            shape = tuple(theta.shape) if isinstance(theta, Tensor) else type(theta).__name__
            raise ValueError(f"params must be a [P] vector with P = {self.flat.numel}, got {shape}")
        self.theta = theta

    def grads(self, x, y, loss_fn: LossFn) -> Tensor:
        """[T, P] gradients of every task at theta."""
        g = self.fns.task_grads(self.flat.unflatten(self.theta), x, y, loss_fn, shared=True)
        return torch.cat([g[n].reshape(g[n].shape[0], -1) for n in self.flat.names], dim=1)

    def losses(self, rows: Tensor, x, y, loss_fn: LossFn) -> Tensor:
        """[T] losses of task t at theta (``rows`` [P]) or at ``rows[t]`` ([T, P])."""
        return self.fns.losses(self.flat.unflatten(rows), x, y, loss_fn, shared=rows.dim() == 1)


def task_gradients(model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn = F.mse_loss, *,
                   params: Optional[Tensor] = None) -> Tensor:
    """[T, P] per-task gradients g_i = grad L_i(theta) (one vmap); theta = ``params`` or the model's."""
    T = check_inputs("x", x, None)
    check_inputs("y", y, T)
    return _Rows(model, params).grads(x, y, loss_fn)


def lookahead_params(theta: Tensor, grads: Tensor, lr) -> Tensor:
    """[M, P] lookahead vectors ``theta - lr * grads[i]`` in one fused tree_update.

    theta: [P]; grads: [M, P] (one candidate per row); lr: float, 0-d or [P] tensor.
    """
    M = grads.shape[0]
    dev = grads.device
    offsets = torch.arange(M + 1, dtype=torch.int64, device=dev)
    parents = torch.zeros(M, dtype=torch.int64, device=dev)
    return ops.tree_update(theta[None], grads, offsets, parents, lr)


def lookahead_losses(model: nn.Module, lookahead: Tensor, x: Tensor, y: Tensor,
                     loss_fn: LossFn = F.mse_loss) -> Tensor:
    """[M, T] losses: ``out[i, j] = L_j(lookahead[i])`` in one nested vmap."""
    rows = _Rows(model, None)
    return torch.func.vmap(lambda row: rows.losses(row, x, y, loss_fn))(lookahead)


def lookahead_affinity(model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn = F.mse_loss, *,
                       lr: float = 0.01, tag: bool = False, params: Optional[Tensor] = None,
                       eval_x: Optional[Tensor] = None, eval_y: Optional[Tensor] = None,
                       grads: Optional[Tensor] = None) -> Tensor:
    """[T, T] affinity ``Z[i, j] = 1 - L_j(theta - lr g_i) / L_j(theta)`` (``/ lr`` with ``tag``).

    g_i is computed on (x[i], y[i]); the losses L_j are measured on (eval_x[j],
    eval_y[j]), by default the same batch.  ``params`` [P] is theta (default: the
    model's parameters); ``grads`` [T, P] may be given to skip computing them.
    No autograd graph is kept.
    """
    T = check_inputs("x", x, None)
    check_inputs("y", y, T)
    eval_x = x if eval_x is None else eval_x
    eval_y = y if eval_y is None else eval_y
    check_inputs("eval_x", eval_x, T)
    check_inputs("eval_y", eval_y, T)
    with torch.no_grad():
        rows = _Rows(model, params)
        theta = rows.theta.detach()
        if grads is None:
            grads = rows.grads(x, y, loss_fn)
        ahead = lookahead_params(theta, grads.detach(), lr)
        after = lookahead_losses(model, ahead, eval_x, eval_y, loss_fn)  # [T, T]
        before = rows.losses(theta, eval_x, eval_y, loss_fn)             # [T]
        z = 1.0 - after / before[None, :]
        if tag:
            z = z / lr
    return z


def affinity_tree(affinity: Tensor, depth: int, **kwargs) -> TaskTree:
    """A :class:`TaskTree` of tasks that help each other: :meth:`TaskTree.from_affinity` on Z.

    Z is symmetrized ((Z + Z^T) / 2); ``kwargs`` (branching, threshold,
    num_clusters, method) as in :meth:`TaskTree.from_affinity`.
    """
    return TaskTree.from_affinity(affinity, depth, **kwargs)


def pcgrad(grads: Tensor) -> Tensor:
    """PCGrad (Yu et al. 2020) combined gradient [P] of per-task gradients [T, P].

    Each g_i is projected off every g_j it conflicts with (<g_i, g_j> < 0), j in
    task order; the projected gradients are summed.  The projections are sequential by
    definition (a Python loop over j), each one batched over all i.
    """
    projected = grads.clone()
    T = grads.shape[0]
    for j in range(T):
        gj = grads[j]
        dots = projected @ gj
        coef = torch.where(dots < 0, dots / gj.dot(gj).clamp_min(torch.finfo(gj.dtype).tiny),
                           torch.zeros_like(dots))
        coef[j] = 0
        projected -= coef[:, None] * gj[None, :]
    return projected.sum(dim=0)


def itmtl_candidates(grads: Tensor) -> Tensor:
    """IT-MTL's candidate combined gradients [2, P]: the total gradient and PCGrad's."""
    return torch.stack([grads.sum(dim=0), pcgrad(grads)])


def choose_gradient(model: nn.Module, candidates: Tensor, x: Tensor, y: Tensor,
                    loss_fn: LossFn = F.mse_loss, *, lr: float = 0.01,
                    params: Optional[Tensor] = None,
                    task_weights: Optional[Tensor] = None) -> Tuple[int, Tensor]:
    """IT-MTL (Fifty et al. 2020): the candidate with the lowest total lookahead loss.

    candidates: [M, P] combined gradients (e.g. :func:`itmtl_candidates`); every one
    gives a lookahead theta - lr c_m, evaluated on all T tasks (one fused update and
    one nested vmap).  Returns ``(index, totals [M])`` with
    ``totals[m] = sum_j w_j L_j(theta - lr c_m)``.
    """
    T = check_inputs("x", x, None)
    check_inputs("y", y, T)
    with torch.no_grad():
        theta = _Rows(model, params).theta
        ahead = lookahead_params(theta.detach(), candidates.detach(), lr)
        losses = lookahead_losses(model, ahead, x, y, loss_fn)
        totals = losses.sum(dim=1) if task_weights is None else losses @ task_weights
    return int(torch.argmin(totals)), totals
