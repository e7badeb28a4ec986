"""Pure-PyTorch reference implementation of the treepool ops.

Written for clarity, not speed: it is the oracle of the tests and the fallback when
the compiled extension is missing. Autograd comes for free from the PyTorch ops
used here. Sums accumulate in float64 whatever the dtype (so that the oracle is the
more exact of the two backends: 2^25 float32 ones sum to 2^25, not 2^24), and the
result is rounded once to the data's dtype at the end. Means divide by the total
weight (never multiply by its reciprocal, which overflows for tiny weights).

Every op also has a list form (``*_multi``) over [N, P_i] buffers, one per model
parameter: the single-tensor op applied to each.

Layout (docs/design.md, section 2): a [T, P] buffer whose rows are tasks in DFS order;
``offsets`` [C + 1] says that cluster c owns rows offsets[c]..offsets[c+1]-1.
"""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from . import checks as _checks
from .numerics import accumulate_dtype, masked_reciprocal


def _checking() -> bool:
    # Value checks read the index tensors; under torch.compile they would break
    # the graph, and the fake kernels have already checked the metadata.
    return not torch.compiler.is_compiling()


def cluster_of_rows(offsets: Tensor, num_rows: int) -> Tensor:
    """[T] cluster index of every row: c for offsets[c] <= t < offsets[c+1]."""
    sizes = offsets[1:] - offsets[:-1]
    clusters = torch.arange(sizes.numel(), device=offsets.device)
    return torch.repeat_interleave(clusters, sizes, output_size=num_rows)


ORACLE_DTYPE = torch.float64


def _times_pow2(v: Tensor, k: Tensor) -> Tensor:
    """v * 2^k, exact, for k in [-2100, 2100] (two steps: 2^k alone would overflow)."""
    half = torch.div(k, 2, rounding_mode="trunc")
    two = torch.tensor(2.0, dtype=v.dtype, device=v.device)
    return v * torch.pow(two, half.to(v.dtype)) * torch.pow(two, (k - half).to(v.dtype))


def rescaled_weights(w: Tensor, rows: Tensor, C: int) -> Tensor:
    """w_t * 2^-k_c, with 2^(k_c - 1) <= the largest weight of t's cluster c < 2^k_c.

    A power of two per cluster is exact and leaves every weighted mean of the cluster
    as it is, and after it no sum of weights overflows (float64 weights of 1e308) nor
    loses its digits (weights of 1e-320). The native kernels do the same."""
    # The exponents are constants: no gradient flows through the choice of k_c.
    largest = torch.zeros(C, dtype=w.dtype, device=w.device).scatter_reduce(
        0, rows, w.detach(), "amax")
    return _times_pow2(w, -torch.frexp(largest).exponent[rows])


def _weighted_sums(x: Tensor, offsets: Tensor, weights: Optional[Tensor],
                   rescale: bool = False):
    """(S, W) in float64: S[c] = sum_t w_t x[t], W[c] = sum_t w_t; with `rescale` (for a
    mean) the weights are rescaled first (`rescaled_weights`)."""
    acc = ORACLE_DTYPE
    T, P = x.shape
    C = offsets.numel() - 1
    rows = cluster_of_rows(offsets, T)
    if weights is None:
        S = torch.zeros(C, P, dtype=acc, device=x.device).index_add(0, rows, x.to(acc))
        W = (offsets[1:] - offsets[:-1]).to(acc)
        return S, W
    w = weights.to(acc)
    if rescale:
        w = rescaled_weights(w, rows, C)
    S = torch.zeros(C, P, dtype=acc, device=x.device).index_add(0, rows, x.to(acc) * w[:, None])
    W = torch.zeros(C, dtype=acc, device=x.device).index_add(0, rows, w)
    return S, W


def masked_divide(S: Tensor, W: Tensor) -> Tensor:
    """S / W where W > 0, else 0 (a cluster of zero total weight has mean 0). The
    divisor is masked, not the quotient, so that the gradient is 0 there, not NaN."""
    positive = W > 0
    return torch.where(positive, S / torch.where(positive, W, torch.ones_like(W)),
                       torch.zeros_like(S))


def _mean_acc(x: Tensor, offsets: Tensor, weights: Optional[Tensor]) -> Tensor:
    """Weighted cluster means in float64; a cluster of zero weight gives 0."""
    S, W = _weighted_sums(x, offsets, weights, rescale=True)
    return masked_divide(S, W[:, None])


def _rate(rate: float, rate_tensor: Optional[Tensor]):
    return rate if rate_tensor is None else rate_tensor.to(ORACLE_DTYPE)


# ------------------------------------------------------------ the math, arguments checked


def _sum(x, offsets, weights):
    return _weighted_sums(x, offsets, weights)[0].to(x.dtype)


def _mean(x, offsets, weights):
    return _mean_acc(x, offsets, weights).to(x.dtype)


def _broadcast(g, offsets, weights, mean, num_rows):
    acc = ORACLE_DTYPE
    rows = cluster_of_rows(offsets, num_rows)
    w = torch.ones(num_rows, dtype=acc, device=g.device) if weights is None else weights.to(acc)
    if mean:
        if weights is not None:
            w = rescaled_weights(w, rows, g.shape[0])
        W = torch.zeros(g.shape[0], dtype=acc, device=g.device).index_add(0, rows, w)
        w = masked_divide(w, W[rows])
    return (g.to(acc)[rows] * w[:, None]).to(g.dtype)


def _tree_update(node_params, grads, offsets, parents, lr, lr_tensor, weights):
    pooled = _mean_acc(grads, offsets, weights)
    out = node_params.to(ORACLE_DTYPE)[parents] - _rate(lr, lr_tensor) * pooled
    return out.to(grads.dtype)


def _reptile_update(theta, phi, offsets, eps, eps_tensor, weights):
    pooled = _mean_acc(phi, offsets, weights)
    th = theta.to(ORACLE_DTYPE)
    return (th + _rate(eps, eps_tensor) * (pooled - th)).to(phi.dtype)


def _num_rows(offsets: Tensor, num_rows) -> int:
    if num_rows is None:
        _checks.check_index("segment_broadcast", "offsets", offsets, "[C + 1]")
        return int(offsets[-1]) if offsets.numel() else 0
    return num_rows


# ----------------------------------------------------------------------- single tensor


def segment_sum(x: Tensor, offsets: Tensor, weights: Optional[Tensor] = None) -> Tensor:
    """out[c] = sum_{t in c} w_t x[t]."""
    _checks.segment_args("segment_sum", "x", x, offsets, weights, _checking())
    return _sum(x, offsets, weights)


def segment_mean(x: Tensor, offsets: Tensor, weights: Optional[Tensor] = None) -> Tensor:
    """out[c] = sum_{t in c} w_t x[t] / sum_{t in c} w_t (0 for an empty or zero-weight c)."""
    _checks.segment_args("segment_mean", "x", x, offsets, weights, _checking())
    return _mean(x, offsets, weights)


def segment_broadcast(g: Tensor, offsets: Tensor, weights: Optional[Tensor] = None,
                      mean: bool = False, num_rows: Optional[int] = None) -> Tensor:
    """out[t] = s_t g[c(t)] with s_t = w_t, or w_t / W_c when ``mean`` (the adjoints
    of segment_sum and segment_mean)."""
    num_rows = _num_rows(offsets, num_rows)
    _checks.broadcast_args("segment_broadcast", g, offsets, weights, num_rows, _checking())
    return _broadcast(g, offsets, weights, mean, num_rows)


def tree_update(node_params: Tensor, grads: Tensor, offsets: Tensor, parents: Tensor,
                lr: float = 1.0, lr_tensor: Optional[Tensor] = None,
                weights: Optional[Tensor] = None) -> Tensor:
    """out[c] = node_params[parents[c]] - lr * segment_mean(grads, offsets, weights)[c]."""
    _checks.tree_update_args("tree_update", node_params, grads, offsets, parents,
                             lr_tensor, weights, _checking())
    return _tree_update(node_params, grads, offsets, parents, lr, lr_tensor, weights)


def reptile_update(theta: Tensor, phi: Tensor, offsets: Tensor, eps: float = 1.0,
                   eps_tensor: Optional[Tensor] = None,
                   weights: Optional[Tensor] = None) -> Tensor:
    """out[c] = theta[c] + eps * (segment_mean(phi, offsets, weights)[c] - theta[c])."""
    _checks.reptile_update_args("reptile_update", theta, phi, offsets, eps_tensor,
                                weights, _checking())
    return _reptile_update(theta, phi, offsets, eps, eps_tensor, weights)


def tree_update_(out: Tensor, node_params: Tensor, grads: Tensor, offsets: Tensor,
                 parents: Tensor, lr: float = 1.0, lr_tensor: Optional[Tensor] = None,
                 weights: Optional[Tensor] = None) -> Tensor:
    """tree_update written into ``out`` [C, P]; returns ``out``."""
    tree_update_multi_([out], [node_params], [grads], offsets, parents, lr,
                       None if lr_tensor is None else [lr_tensor], weights)
    return out


def reptile_update_(theta: Tensor, phi: Tensor, offsets: Tensor, eps: float = 1.0,
                    eps_tensor: Optional[Tensor] = None,
                    weights: Optional[Tensor] = None) -> Tensor:
    """reptile_update applied to ``theta`` in place; returns ``theta``."""
    reptile_update_multi_([theta], [phi], offsets, eps,
                          None if eps_tensor is None else [eps_tensor], weights)
    return theta


# ------------------------------------------------------------------------- list forms


def segment_sum_multi(xs: List[Tensor], offsets: Tensor,
                      weights: Optional[Tensor] = None) -> List[Tensor]:
    """segment_sum of every [T, P_i] buffer of xs."""
    _checks.segment_list_args("segment_sum", xs, offsets, weights, _checking())
    return [_sum(x, offsets, weights) for x in xs]


def segment_mean_multi(xs: List[Tensor], offsets: Tensor,
                       weights: Optional[Tensor] = None) -> List[Tensor]:
    """segment_mean of every [T, P_i] buffer of xs."""
    _checks.segment_list_args("segment_mean", xs, offsets, weights, _checking())
    return [_mean(x, offsets, weights) for x in xs]


def segment_broadcast_multi(gs: List[Tensor], offsets: Tensor, weights: Optional[Tensor] = None,
                            mean: bool = False, num_rows: Optional[int] = None) -> List[Tensor]:
    """segment_broadcast of every [C, P_i] buffer of gs."""
    num_rows = _num_rows(offsets, num_rows)
    _checks.broadcast_list_args("segment_broadcast", gs, offsets, weights, num_rows,
                                _checking())
    return [_broadcast(g, offsets, weights, mean, num_rows) for g in gs]


def tree_update_multi(node_params: List[Tensor], grads: List[Tensor], offsets: Tensor,
                      parents: Tensor, lr: float = 1.0,
                      lr_tensor: Optional[List[Tensor]] = None,
                      weights: Optional[Tensor] = None) -> List[Tensor]:
    """tree_update of every pair (node_params[i], grads[i]) with rate lr_tensor[i] or lr."""
    _checks.tree_update_list_args("tree_update", node_params, grads, offsets, parents,
                                  lr_tensor, weights, _checking())
    return [_tree_update(n, g, offsets, parents, lr, None if lr_tensor is None else lr_tensor[i],
                         weights) for i, (n, g) in enumerate(zip(node_params, grads))]


def reptile_update_multi(theta: List[Tensor], phi: List[Tensor], offsets: Tensor,
                         eps: float = 1.0, eps_tensor: Optional[List[Tensor]] = None,
                         weights: Optional[Tensor] = None) -> List[Tensor]:
    """reptile_update of every pair (theta[i], phi[i]) with rate eps_tensor[i] or eps."""
    _checks.reptile_update_list_args("reptile_update", theta, phi, offsets, eps_tensor,
                                     weights, _checking())
    return [_reptile_update(th, ph, offsets, eps, None if eps_tensor is None else eps_tensor[i],
                            weights) for i, (th, ph) in enumerate(zip(theta, phi))]


def tree_update_multi_(out: List[Tensor], node_params: List[Tensor], grads: List[Tensor],
                       offsets: Tensor, parents: Tensor, lr: float = 1.0,
                       lr_tensor: Optional[List[Tensor]] = None,
                       weights: Optional[Tensor] = None) -> List[Tensor]:
    """tree_update_multi written into the [C, P_i] buffers of ``out``; returns ``out``."""
    op = "tree_update_"
    C = _checks.tree_update_list_args(op, node_params, grads, offsets, parents, lr_tensor,
                                      weights, True)
    _checks.check_same_length(op, "out", out, "grads", grads)
    for i, o in enumerate(out):
        _checks.check_tree_update_out(op, o, node_params[i], grads[i], parents,
                                      None if lr_tensor is None else lr_tensor[i], weights, C,
                                      True)
        for k in range(len(out)):
            if k != i:
                for name, t in (("grads", grads[k]), ("node_params", node_params[k]),
                                ("out", out[k])):
                    _checks.check_no_overlap(op, "out", o, name, t)
    with torch.no_grad():
        new = [_tree_update(n, g, offsets, parents, lr, None if lr_tensor is None else lr_tensor[i],
                            weights) for i, (n, g) in enumerate(zip(node_params, grads))]
        for o, v in zip(out, new):
            o.copy_(v)
    return out


def reptile_update_multi_(theta: List[Tensor], phi: List[Tensor], offsets: Tensor,
                          eps: float = 1.0, eps_tensor: Optional[List[Tensor]] = None,
                          weights: Optional[Tensor] = None) -> List[Tensor]:
    """reptile_update_multi applied to the buffers of ``theta`` in place; returns theta."""
    op = "reptile_update_"
    _checks.reptile_update_list_args(op, theta, phi, offsets, eps_tensor, weights, True)
    for i, th in enumerate(theta):
        _checks.check_reptile_update_out(op, th, phi[i],
                                         None if eps_tensor is None else eps_tensor[i], weights)
        for k in range(len(theta)):
            if k != i:
                for name, t in (("phi", phi[k]), ("theta", theta[k])):
                    _checks.check_no_overlap(op, "theta", th, name, t)
    with torch.no_grad():
        new = [_reptile_update(th, ph, offsets, eps, None if eps_tensor is None else eps_tensor[i],
                               weights) for i, (th, ph) in enumerate(zip(theta, phi))]
        for th, v in zip(theta, new):
            th.copy_(v)
    return theta


def max_pool2d_indices(x: Tensor, kernel_size) -> Tensor:
    """Where each kh x kw window of x [..., H, W] (stride = kernel, no padding, floor) has
    its maximum, as the flat index r * W + c within its plane: F.max_pool2d's indices,
    every plane pooled as a 1-channel image."""
    kernel = _checks.max_pool_args("max_pool2d_indices", x, kernel_size)
    out_shape = _checks.max_pool_shape(x, kernel)
    if x.numel() == 0:
        return torch.empty(out_shape, dtype=torch.int64, device=x.device)
    planes = x.detach().reshape(-1, 1, *x.shape[-2:])
    _, idx = torch.nn.functional.max_pool2d(planes, kernel, return_indices=True)
    return idx.reshape(out_shape)


# ------------------------------------------------------------- batched products
# (treepool.ops.products): plain PyTorch, with the native ops' argument checks.

def bmm_nn(x: Tensor, y: Tensor, acc: Optional[Tensor] = None) -> Tensor:
    _checks.product_args("bmm_nn", x, y, acc)
    return torch.bmm(x, y) if acc is None else torch.baddbmm(acc, x, y)


def bmm_nt(x: Tensor, y: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    _checks.product_args("bmm_nt", x, y, bias)
    if bias is None:
        return torch.bmm(x, y.transpose(1, 2))
    return torch.baddbmm(bias.unsqueeze(1), x, y.transpose(1, 2))


def bmm_tn(x: Tensor, y: Tensor) -> Tensor:
    _checks.product_args("bmm_tn", x, y)
    return torch.bmm(x.transpose(1, 2), y)


def outer(g: Tensor, w: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    _checks.row_args("outer", g, w, bias)
    if bias is None:
        return g.unsqueeze(-1) * w.unsqueeze(1)
    return torch.addcmul(bias.unsqueeze(1), g.unsqueeze(-1), w.unsqueeze(1))


def bmm_nt_relu(x: Tensor, y: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    _checks.product_args("bmm_nt_relu", x, y, bias)
    return torch.relu(bmm_nt(x, y, bias))


def outer_relu(g: Tensor, w: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    _checks.row_args("outer_relu", g, w, bias)
    return torch.relu(outer(g, w, bias))


def row_dot(h: Tensor, w: Tensor) -> Tensor:
    _checks.row_args("row_dot", h, w)
    return (h * w.unsqueeze(1)).sum(-1)


def weighted_row_sum(g: Tensor, h: Tensor) -> Tensor:
    _checks.row_args("weighted_row_sum", g, h)
    return (h * g.unsqueeze(-1)).sum(1)
