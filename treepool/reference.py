"""Pure-PyTorch reference implementation of the treepool ops.

Written for clarity, not speed: it is the oracle of the tests and the fallback when
the compiled extension is missing. Autograd comes for free from the PyTorch ops
used here. Half types (float16, bfloat16) are computed in float32 and rounded once
at the end, as the native kernels do.

Layout (DESIGN.md section 2): a [T, P] buffer whose rows are tasks in DFS order;
``offsets`` [C + 1] says that cluster c owns rows offsets[c]..offsets[c+1]-1.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _checks


def _checking() -> bool:
    # Value checks read the index tensors; under torch.compile they would break
    # the graph, and the fake kernels have already checked the metadata.
    return not torch.compiler.is_compiling()


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types, the dtype itself otherwise."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def cluster_of_rows(offsets: Tensor, num_rows: int) -> Tensor:
    """[T] cluster index of every row: c for offsets[c] <= t < offsets[c+1]."""
    sizes = offsets[1:] - offsets[:-1]
    clusters = torch.arange(sizes.numel(), device=offsets.device)
    return torch.repeat_interleave(clusters, sizes, output_size=num_rows)


def masked_reciprocal(W: Tensor) -> Tensor:
    """1 / W where W > 0, else 0: the scale of a cluster mean (a cluster of zero total
    weight has mean 0). The reciprocal is masked, not the quotient, so that its
    gradient is 0 there rather than NaN."""
    positive = W > 0
    return torch.where(positive, 1.0 / torch.where(positive, W, torch.ones_like(W)),
                       torch.zeros_like(W))


def _weighted_sums(x: Tensor, offsets: Tensor, weights: Optional[Tensor]):
    """(S, W) in the accumulation dtype: S[c] = sum_t w_t x[t], W[c] = sum_t w_t."""
    acc = accumulate_dtype(x.dtype)
    T, P = x.shape
    C = offsets.numel() - 1
    rows = cluster_of_rows(offsets, T)
    w = torch.ones(T, dtype=acc, device=x.device) if weights is None else weights.to(acc)
    S = torch.zeros(C, P, dtype=acc, device=x.device).index_add(0, rows, x.to(acc) * w[:, None])
    W = torch.zeros(C, dtype=acc, device=x.device).index_add(0, rows, w)
    return S, W


def _mean_acc(x: Tensor, offsets: Tensor, weights: Optional[Tensor]) -> Tensor:
    """Weighted cluster means in the accumulation dtype; a cluster of zero weight gives 0."""
    S, W = _weighted_sums(x, offsets, weights)
    return S * masked_reciprocal(W)[:, None]


def _rate(rate: float, rate_tensor: Optional[Tensor], acc: torch.dtype):
    return rate if rate_tensor is None else rate_tensor.to(acc)


def segment_sum(x: Tensor, offsets: Tensor, weights: Optional[Tensor] = None) -> Tensor:
    """out[c] = sum_{t in c} w_t x[t]."""
    _checks.segment_args("segment_sum", "x", x, offsets, weights, _checking())
    return _weighted_sums(x, offsets, weights)[0].to(x.dtype)


def segment_mean(x: Tensor, offsets: Tensor, weights: Optional[Tensor] = None) -> Tensor:
    """out[c] = sum_{t in c} w_t x[t] / sum_{t in c} w_t (0 for an empty or zero-weight c)."""
    _checks.segment_args("segment_mean", "x", x, offsets, weights, _checking())
    return _mean_acc(x, offsets, weights).to(x.dtype)


def segment_broadcast(g: Tensor, offsets: Tensor, weights: Optional[Tensor] = None,
                      mean: bool = False, num_rows: Optional[int] = None) -> Tensor:
    """out[t] = s_t g[c(t)] with s_t = w_t, or w_t / W_c when ``mean`` (the adjoints
    of segment_sum and segment_mean)."""
    if num_rows is None:
        num_rows = int(offsets[-1])
    _checks.broadcast_args("segment_broadcast", g, offsets, weights, num_rows, _checking())
    acc = accumulate_dtype(g.dtype)
    rows = cluster_of_rows(offsets, num_rows)
    if weights is None:
        w = torch.ones(num_rows, dtype=acc, device=g.device)
    else:
        w = weights.to(acc)
    if mean:
        W = torch.zeros(g.shape[0], dtype=acc, device=g.device).index_add(0, rows, w)
        w = w * masked_reciprocal(W)[rows]
    return (g.to(acc)[rows] * w[:, None]).to(g.dtype)


def tree_update(node_params: Tensor, grads: Tensor, offsets: Tensor, parents: Tensor,
                lr: float = 1.0, lr_tensor: Optional[Tensor] = None,
                weights: Optional[Tensor] = None) -> Tensor:
    """out[c] = node_params[parents[c]] - lr * segment_mean(grads, offsets, weights)[c]."""
    _checks.tree_update_args("tree_update", node_params, grads, offsets, parents,
                             lr_tensor, weights, _checking())
    acc = accumulate_dtype(grads.dtype)
    pooled = _mean_acc(grads, offsets, weights)
    out = node_params.to(acc)[parents] - _rate(lr, lr_tensor, acc) * pooled
    return out.to(grads.dtype)


def reptile_update(theta: Tensor, phi: Tensor, offsets: Tensor, eps: float = 1.0,
                   eps_tensor: Optional[Tensor] = None,
                   weights: Optional[Tensor] = None) -> Tensor:
    """out[c] = theta[c] + eps * (segment_mean(phi, offsets, weights)[c] - theta[c])."""
    _checks.reptile_update_args("reptile_update", theta, phi, offsets, eps_tensor,
                                weights, _checking())
    acc = accumulate_dtype(phi.dtype)
    pooled = _mean_acc(phi, offsets, weights)
    th = theta.to(acc)
    out = th + _rate(eps, eps_tensor, acc) * (pooled - th)
    return out.to(phi.dtype)


def tree_update_(out: Tensor, node_params: Tensor, grads: Tensor, offsets: Tensor,
                 parents: Tensor, lr: float = 1.0, lr_tensor: Optional[Tensor] = None,
                 weights: Optional[Tensor] = None) -> Tensor:
    """tree_update written into ``out`` [C, P]; returns ``out``."""
    C = _checks.tree_update_args("tree_update_", node_params, grads, offsets, parents,
                                 lr_tensor, weights, True)
    _checks.check_tree_update_out("tree_update_", out, node_params, grads, parents,
                                  lr_tensor, weights, C, True)
    with torch.no_grad():
        out.copy_(tree_update(node_params, grads, offsets, parents, lr, lr_tensor, weights))
    return out


def reptile_update_(theta: Tensor, phi: Tensor, offsets: Tensor, eps: float = 1.0,
                    eps_tensor: Optional[Tensor] = None,
                    weights: Optional[Tensor] = None) -> Tensor:
    """reptile_update applied to ``theta`` in place; returns ``theta``."""
    _checks.reptile_update_args("reptile_update_", theta, phi, offsets, eps_tensor,
                                weights, True)
    _checks.check_reptile_update_out("reptile_update_", theta, phi, eps_tensor, weights)
    with torch.no_grad():
        theta.copy_(reptile_update(theta, phi, offsets, eps, eps_tensor, weights))
    return theta
