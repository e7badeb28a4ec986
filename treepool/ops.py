"""The public treepool ops.

Rows of a [T, P] buffer are tasks (or tree nodes) in DFS order; ``offsets`` [C + 1]
(int64) groups them into clusters: cluster c owns rows offsets[c] .. offsets[c+1]-1.
``weights`` [T] are optional non-negative per-row weights.

Every op runs on the compiled kernels (``torch.ops.treepool.*``) when the native
backend is active and has kernels for the tensors' device, else on the pure-PyTorch
reference (:mod:`treepool.reference`). Both are differentiable in every floating
input, lr and eps included, twice over (second-order MAML needs it), and work under
torch.compile.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from . import _checks, reference
from ._backend import runs_native

Rate = Union[float, Tensor]


def segment_sum(x: Tensor, offsets: Tensor, weights: Optional[Tensor] = None) -> Tensor:
    """Weighted sum of every cluster's rows: ``out[c] = sum_{t in c} w_t x[t]``.

    x: [T, P] float32/float64/float16/bfloat16; offsets: [C + 1] int64; weights: [T].
    Returns [C, P]; an empty cluster gives 0. Half types accumulate in float32.
    """
    _checks.check_types("segment_sum", [("x", x), ("offsets", offsets)], [("weights", weights)])
    if runs_native(x):
        return torch.ops.treepool.segment_sum(x, offsets, weights)
    return reference.segment_sum(x, offsets, weights)


def segment_mean(x: Tensor, offsets: Tensor, weights: Optional[Tensor] = None) -> Tensor:
    """Weighted mean of every cluster's rows:
    ``out[c] = sum_{t in c} w_t x[t] / sum_{t in c} w_t``.

    The pooled gradient of TreeMAML (Garcia et al. 2021). A cluster that is empty or
    whose weights are all zero gives 0 (and passes back a zero gradient).
    """
    _checks.check_types("segment_mean", [("x", x), ("offsets", offsets)], [("weights", weights)])
    if runs_native(x):
        return torch.ops.treepool.segment_mean(x, offsets, weights)
    return reference.segment_mean(x, offsets, weights)


def segment_broadcast(g: Tensor, offsets: Tensor, weights: Optional[Tensor] = None,
                      mean: bool = False, num_rows: Optional[int] = None) -> Tensor:
    """Adjoint of segment_sum (``mean=False``) and segment_mean (``mean=True``):
    ``out[t] = w_t g[c(t)]``, divided by ``W_c = sum_{u in c} w_u`` when ``mean``.

    g: [C, P]; returns [T, P] with T = ``num_rows`` (default ``offsets[-1]``, which
    reads the offsets: pass it explicitly on CUDA or under torch.compile).
    """
    _checks.check_types("segment_broadcast", [("g", g), ("offsets", offsets)],
                        [("weights", weights)])
    if num_rows is None:
        _checks.check_index("segment_broadcast", "offsets", offsets, "[C + 1]")
        num_rows = int(offsets[-1]) if offsets.numel() else 0
    if runs_native(g):
        return torch.ops.treepool.segment_broadcast(g, offsets, weights, mean, num_rows)
    return reference.segment_broadcast(g, offsets, weights, mean, num_rows)


def tree_update(node_params: Tensor, grads: Tensor, offsets: Tensor, parents: Tensor,
                lr: Rate, weights: Optional[Tensor] = None) -> Tensor:
    """One TreeMAML inner step for every cluster of a tree level (Garcia et al. 2021):

        out[c] = node_params[parents[c]] - lr * segment_mean(grads, offsets, weights)[c]

    node_params: [C_prev, P], the parameters of the level above; grads: [T, P], each
    task's gradient at its current node; parents: [C] int64, non-decreasing, the node
    of the level above that cluster c descends from. lr: a float, a 0-d tensor, or a
    [P] tensor (a per-parameter rate as in Meta-SGD, Li et al. 2017). Returns [C, P].
    """
    lr_value, lr_tensor = _checks.as_rate(lr, "lr", "tree_update")
    _checks.check_types("tree_update", [("grads", grads), ("offsets", offsets),
                                        ("node_params", node_params), ("parents", parents)],
                        [("weights", weights)])
    if runs_native(grads):
        return torch.ops.treepool.tree_update(node_params, grads, offsets, parents, weights,
                                              lr_value, lr_tensor)
    return reference.tree_update(node_params, grads, offsets, parents, lr_value, lr_tensor,
                                 weights)


def reptile_update(theta: Tensor, phi: Tensor, offsets: Tensor, eps: Rate,
                   weights: Optional[Tensor] = None) -> Tensor:
    """Reptile's outer step for every cluster (Nichol et al. 2018):

        out[c] = theta[c] + eps * (segment_mean(phi, offsets, weights)[c] - theta[c])

    theta: [C, P], one meta-parameter vector per cluster (C = 1 for plain Reptile);
    phi: [T, P], the tasks' adapted parameters; eps: float, 0-d or [P] tensor.
    """
    eps_value, eps_tensor = _checks.as_rate(eps, "eps", "reptile_update")
    _checks.check_types("reptile_update", [("phi", phi), ("offsets", offsets), ("theta", theta)],
                        [("weights", weights)])
    if runs_native(phi):
        return torch.ops.treepool.reptile_update(theta, phi, offsets, weights, eps_value,
                                                 eps_tensor)
    return reference.reptile_update(theta, phi, offsets, eps_value, eps_tensor, weights)


def _refuse_autograd(op: str, *tensors: Optional[Tensor]) -> None:
    if torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in tensors):
        raise RuntimeError(
            f"treepool.{op}: in-place ops do not record gradients; call it under "
            f"torch.no_grad() or use the out-of-place form")


def tree_update_(out: Tensor, node_params: Tensor, grads: Tensor, offsets: Tensor,
                 parents: Tensor, lr: Rate, weights: Optional[Tensor] = None) -> Tensor:
    """:func:`tree_update` written into the caller's ``out`` [C, P]; returns ``out``.

    For loops that need no autograd (first-order inner loops): it saves a fresh
    [C, P] allocation per step. ``out`` may be ``node_params`` itself only when
    parents[c] == c for every c (an inner step that stays on the same level).
    """
    lr_value, lr_tensor = _checks.as_rate(lr, "lr", "tree_update_")
    _checks.check_types("tree_update_", [("grads", grads), ("offsets", offsets),
                                         ("node_params", node_params), ("parents", parents),
                                         ("out", out)], [("weights", weights)])
    _refuse_autograd("tree_update_", out, node_params, grads, lr_tensor, weights)
    if runs_native(grads):
        torch.ops.treepool.tree_update_(out, node_params, grads, offsets, parents, weights,
                                        lr_value, lr_tensor)
        return out
    return reference.tree_update_(out, node_params, grads, offsets, parents, lr_value,
                                  lr_tensor, weights)


def reptile_update_(theta: Tensor, phi: Tensor, offsets: Tensor, eps: Rate,
                    weights: Optional[Tensor] = None) -> Tensor:
    """:func:`reptile_update` applied to ``theta`` in place; returns ``theta``."""
    eps_value, eps_tensor = _checks.as_rate(eps, "eps", "reptile_update_")
    _checks.check_types("reptile_update_", [("phi", phi), ("offsets", offsets), ("theta", theta)],
                        [("weights", weights)])
    _refuse_autograd("reptile_update_", theta, phi, eps_tensor, weights)
    if runs_native(phi):
        torch.ops.treepool.reptile_update_(theta, phi, offsets, weights, eps_value, eps_tensor)
        return theta
    return reference.reptile_update_(theta, phi, offsets, eps_value, eps_tensor, weights)
