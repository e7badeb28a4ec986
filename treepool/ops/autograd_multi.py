"""Autograd rules of the list forms (``*_multi``) of the native ops.

The equations of _autograd.py, tensor by tensor, with every segment pass a single
dispatch over the whole list: the *_multi ops themselves, whose rules are these, so
that gradients of gradients work (second-order MAML). With m_i = segment_mean(x_i),
the weight gradient gathers the terms of every tensor:
    dL/dw_t = sum_i (<dL/dm_i[c], x_i[t]> - <dL/dm_i[c], m_i[c]>) / W_c,   c = c(t).
A MAML level (no weights, one row per cluster, parents the identity) passes back
dL/dnode_i = dL/dout_i and dL/dgrads_i = -lr_i dL/dout_i: no segment pass.
"""

from __future__ import annotations

import torch

from .autograd import (broadcast_weight_grad, inv_total_per_row, is_maml_level,
                       node_grad_of_level, rate_grad, row_dots)
from .functorch import register

ops = torch.ops.treepool


def _row_dot_sum(a, b):
    """sum_i <a_i[t], b_i[t]> for every row t, shape [T, 1]."""
    total = row_dots(a[0], b[0])
    for ai, bi in zip(a[1:], b[1:]):
        total = total + row_dots(ai, bi)
    return total


def _fit(ctx, grads):
    """The gradients for the inputs the op was called with (the dispatcher drops
    trailing arguments equal to their defaults)."""
    return tuple(grads[:len(ctx.needs_input_grad)])


def _need(ctx, i):
    need = ctx.needs_input_grad
    if i >= len(need):
        return False
    return any(need[i]) if isinstance(need[i], (list, tuple)) else bool(need[i])


def _mean_backward(grad, x, offsets, weights, mean, need_x, need_w):
    """Gradients of m_i = segment_mean(x_i, offsets, weights) given dL/dm_i = grad[i]."""
    T = x[0].shape[0]
    gx = list(ops.segment_broadcast_multi(grad, offsets, weights, True, T)) if need_x else None
    gw = None
    if need_w:
        per_row = _row_dot_sum(ops.segment_broadcast_multi(grad, offsets, None, False, T), x)
        per_cluster = ops.segment_broadcast(_row_dot_sum(grad, mean), offsets, None, False, T)
        gw = ((per_row - per_cluster) * inv_total_per_row(offsets, weights, T))[:, 0]
    return gx, gw


def _nones(n, grads):
    return grads if grads is not None else [None] * n


# --------------------------------------------------------------- segment_sum / segment_mean

def _setup_segment(ctx, inputs, output):
    x, offsets, weights = inputs
    ctx.n = len(x)
    ctx.save_for_backward(offsets, weights, *x, *output)


def _reduce_backward(ctx, grad, mean):
    offsets, weights, *rest = ctx.saved_tensors
    x, out = rest[:ctx.n], rest[ctx.n:]
    need_x, need_w = _need(ctx, 0), _need(ctx, 2) and weights is not None
    T = x[0].shape[0]
    if mean:
        gx, gw = _mean_backward(grad, x, offsets, weights, out, need_x, need_w)
    else:
        gx = list(ops.segment_broadcast_multi(grad, offsets, weights, False, T)) if need_x else None
        gw = None
        if need_w:
            b = ops.segment_broadcast_multi(grad, offsets, None, False, T)
            gw = _row_dot_sum(b, x)[:, 0]
    return _fit(ctx, (_nones(ctx.n, gx), None, gw))


def _segment_sum_backward(ctx, grad):
    return _reduce_backward(ctx, grad, mean=False)


def _segment_mean_backward(ctx, grad):
    return _reduce_backward(ctx, grad, mean=True)


# ----------------------------------------------------------------------- segment_broadcast

def _setup_broadcast(ctx, inputs, output):
    g, offsets, weights, mean, num_rows = inputs
    ctx.n, ctx.mean, ctx.num_rows = len(g), mean, num_rows
    ctx.save_for_backward(offsets, weights, *g)


def _segment_broadcast_backward(ctx, grad):
    offsets, weights, *g = ctx.saved_tensors
    reduce = ops.segment_mean_multi if ctx.mean else ops.segment_sum_multi
    gg = list(reduce(grad, offsets, weights)) if _need(ctx, 0) else None
    gw = None
    if _need(ctx, 2) and weights is not None:
        T = ctx.num_rows
        d = _row_dot_sum(grad, ops.segment_broadcast_multi(g, offsets, None, False, T))
        gw = broadcast_weight_grad(d, offsets, weights, ctx.mean, T)
    return _fit(ctx, (_nones(ctx.n, gg), None, gw, None, None))


# ----------------------------------------------------------------------------- tree_update

def _setup_tree_update(ctx, inputs, output):
    node_params, grads, offsets, parents, weights, lr, lr_tensor = inputs
    ctx.n, ctx.lr, ctx.num_nodes = len(grads), lr, node_params[0].shape[0]
    ctx.has_rate = lr_tensor is not None
    ctx.identity = is_maml_level(offsets, parents, weights, grads[0].shape[0])
    ctx.save_for_backward(offsets, parents, weights, *grads, *(lr_tensor or []))


def _tree_update_backward(ctx, grad):
    offsets, parents, weights, *rest = ctx.saved_tensors
    n = ctx.n
    grads = rest[:n]
    rates = rest[n:] if ctx.has_rate else [ctx.lr] * n
    need_node, need_grads = _need(ctx, 0), _need(ctx, 1)
    need_w = _need(ctx, 4) and weights is not None
    need_lr = ctx.has_rate and _need(ctx, 6)
    g_node = g_grads = g_w = g_lr = None
    scaled = [g * (-r) for g, r in zip(grad, rates)] if (need_grads or need_w) else None
    if ctx.identity:  # a MAML level: one multiply per tensor, no segment pass
        if need_node:
            g_node = [node_grad_of_level(g, ctx.num_nodes) for g in grad]
        g_grads, mean = scaled, grads
    else:
        if need_node:
            # node j receives the sum of the gradients of its children, a contiguous range.
            nodes = torch.arange(ctx.num_nodes + 1, device=parents.device)
            g_node = list(ops.segment_sum_multi(grad, torch.searchsorted(parents, nodes), None))
        mean = ops.segment_mean_multi(grads, offsets, weights) if (need_w or need_lr) else None
        if need_grads or need_w:
            g_grads, g_w = _mean_backward(scaled, grads, offsets, weights, mean, need_grads,
                                          need_w)
    if need_lr:
        g_lr = [-rate_grad(g, m, r) for g, m, r in zip(grad, mean, rates)]
    elif ctx.has_rate:
        g_lr = [None] * n
    return _fit(ctx, (_nones(n, g_node), _nones(n, g_grads), None, None, g_w, None, g_lr))


# -------------------------------------------------------------------------- reptile_update

def _setup_reptile_update(ctx, inputs, output):
    theta, phi, offsets, weights, eps, eps_tensor = inputs
    ctx.n, ctx.eps, ctx.has_rate = len(phi), eps, eps_tensor is not None
    ctx.save_for_backward(offsets, weights, *theta, *phi, *(eps_tensor or []))


def _reptile_update_backward(ctx, grad):
    offsets, weights, *rest = ctx.saved_tensors
    n = ctx.n
    theta, phi = rest[:n], rest[n:2 * n]
    rates = rest[2 * n:] if ctx.has_rate else [ctx.eps] * n
    need_w = _need(ctx, 3) and weights is not None
    need_eps = ctx.has_rate and _need(ctx, 5)
    g_theta = [g * (1 - r) for g, r in zip(grad, rates)] if _need(ctx, 0) else None
    mean = ops.segment_mean_multi(phi, offsets, weights) if (need_w or need_eps) else None
    g_phi = g_w = None
    if _need(ctx, 1) or need_w:
        g_phi, g_w = _mean_backward([g * r for g, r in zip(grad, rates)], phi, offsets, weights,
                                    mean, _need(ctx, 1), need_w)
    g_eps = None
    if need_eps:
        g_eps = [rate_grad(g, m - t, r) for g, m, t, r in zip(grad, mean, theta, rates)]
    elif ctx.has_rate:
        g_eps = [None] * n
    return _fit(ctx, (_nones(n, g_theta), _nones(n, g_phi), None, g_w, None, g_eps))


for _name, _backward, _setup in (
        ("segment_sum_multi", _segment_sum_backward, _setup_segment),
        ("segment_mean_multi", _segment_mean_backward, _setup_segment),
        ("segment_broadcast_multi", _segment_broadcast_backward, _setup_broadcast),
        ("tree_update_multi", _tree_update_backward, _setup_tree_update),
        ("reptile_update_multi", _reptile_update_backward, _setup_reptile_update)):
    register(_name, _setup, _backward)
