"""Fake (meta) kernels of the native ops: output shapes and metadata checks, no data.

torch.compile traces through them and meta tensors use them. The value checks
(offsets, parents, weights) run in the real kernels.
"""

from __future__ import annotations

import torch

from . import checks as _checks

lib = torch.library


@lib.register_fake("treepool::segment_sum")
def _segment_sum(x, offsets, weights=None):
    C = _checks.segment_args("segment_sum", "x", x, offsets, weights, values=False)
    return x.new_empty(C, x.shape[1])


@lib.register_fake("treepool::segment_mean")
def _segment_mean(x, offsets, weights=None):
    C = _checks.segment_args("segment_mean", "x", x, offsets, weights, values=False)
    return x.new_empty(C, x.shape[1])


@lib.register_fake("treepool::segment_broadcast")
def _segment_broadcast(g, offsets, weights, mean, num_rows):
    _checks.broadcast_args("segment_broadcast", g, offsets, weights, num_rows, values=False)
    return g.new_empty(num_rows, g.shape[1])


@lib.register_fake("treepool::tree_update")
def _tree_update(node_params, grads, offsets, parents, weights=None, lr=1.0, lr_tensor=None):
    C = _checks.tree_update_args("tree_update", node_params, grads, offsets, parents,
                                 lr_tensor, weights, values=False)
    return grads.new_empty(C, grads.shape[1])


@lib.register_fake("treepool::tree_update_")
def _tree_update_(out, node_params, grads, offsets, parents, weights=None, lr=1.0,
                  lr_tensor=None):
    C = _checks.tree_update_args("tree_update_", node_params, grads, offsets, parents,
                                 lr_tensor, weights, values=False)
    _checks.check_out("tree_update_", out, "out", grads, "grads", C)


@lib.register_fake("treepool::reptile_update")
def _reptile_update(theta, phi, offsets, weights=None, eps=1.0, eps_tensor=None):
    C = _checks.reptile_update_args("reptile_update", theta, phi, offsets, eps_tensor,
                                    weights, values=False)
    return phi.new_empty(C, phi.shape[1])


@lib.register_fake("treepool::reptile_update_")
def _reptile_update_(theta, phi, offsets, weights=None, eps=1.0, eps_tensor=None):
    _checks.reptile_update_args("reptile_update_", theta, phi, offsets, eps_tensor, weights,
                                values=False)


# ------------------------------------------------------------------------- list forms


@lib.register_fake("treepool::segment_sum_multi")
def _segment_sum_multi(x, offsets, weights=None):
    C = _checks.segment_list_args("segment_sum", x, offsets, weights, values=False)
    return [t.new_empty(C, t.shape[1]) for t in x]


@lib.register_fake("treepool::segment_mean_multi")
def _segment_mean_multi(x, offsets, weights=None):
    C = _checks.segment_list_args("segment_mean", x, offsets, weights, values=False)
    return [t.new_empty(C, t.shape[1]) for t in x]


@lib.register_fake("treepool::segment_broadcast_multi")
def _segment_broadcast_multi(g, offsets, weights, mean, num_rows):
    _checks.broadcast_list_args("segment_broadcast", g, offsets, weights, num_rows,
                                values=False)
    return [t.new_empty(num_rows, t.shape[1]) for t in g]


@lib.register_fake("treepool::tree_update_multi")
def _tree_update_multi(node_params, grads, offsets, parents, weights=None, lr=1.0,
                       lr_tensor=None):
    C = _checks.tree_update_list_args("tree_update", node_params, grads, offsets, parents,
                                      lr_tensor, weights, values=False)
    return [g.new_empty(C, g.shape[1]) for g in grads]


@lib.register_fake("treepool::tree_update_multi_")
def _tree_update_multi_(out, node_params, grads, offsets, parents, weights=None, lr=1.0,
                        lr_tensor=None):
    C = _checks.tree_update_list_args("tree_update_", node_params, grads, offsets, parents,
                                      lr_tensor, weights, values=False)
    _checks.check_same_length("tree_update_", "out", out, "grads", grads)
    for o, g in zip(out, grads):
        _checks.check_out("tree_update_", o, "out", g, "grads", C)


@lib.register_fake("treepool::reptile_update_multi")
def _reptile_update_multi(theta, phi, offsets, weights=None, eps=1.0, eps_tensor=None):
    C = _checks.reptile_update_list_args("reptile_update", theta, phi, offsets, eps_tensor,
                                         weights, values=False)
    return [p.new_empty(C, p.shape[1]) for p in phi]


@lib.register_fake("treepool::reptile_update_multi_")
def _reptile_update_multi_(theta, phi, offsets, weights=None, eps=1.0, eps_tensor=None):
    _checks.reptile_update_list_args("reptile_update_", theta, phi, offsets, eps_tensor,
                                     weights, values=False)


@lib.register_fake("treepool::max_pool2d_indices")
def _max_pool2d_indices(x, kernel_size):
    kernel = _checks.max_pool_args("max_pool2d_indices", x, list(kernel_size))
    return x.new_empty(_checks.max_pool_shape(x, kernel), dtype=torch.int64)


# The batched products (treepool.ops.products): the shapes of their values.
@lib.register_fake("treepool::bmm_nn")
def _bmm_nn(x, y, acc=None):
    _checks.product_args("bmm_nn", x, y, acc)
    return x.new_empty(x.shape[0], x.shape[1], y.shape[2])


def _bmm_nt_of(op):
    """bmm_nt and its ReLU form: [B, M, K] x [B, N, K] -> [B, M, N]."""
    def fake(x, y, bias=None):
        _checks.product_args(op, x, y, bias)
        return x.new_empty(x.shape[0], x.shape[1], y.shape[1])
    return fake


def _outer_of(op):
    """outer and its ReLU form: [B, N] x [B, K] -> [B, N, K]."""
    def fake(g, w, bias=None):
        _checks.row_args(op, g, w, bias)
        return g.new_empty(g.shape[0], g.shape[1], w.shape[1])
    return fake


for _op in ("bmm_nt", "bmm_nt_relu"):
    lib.register_fake(f"treepool::{_op}")(_bmm_nt_of(_op))
for _op in ("outer", "outer_relu"):
    lib.register_fake(f"treepool::{_op}")(_outer_of(_op))


@lib.register_fake("treepool::bmm_tn")
def _bmm_tn(x, y):
    _checks.product_args("bmm_tn", x, y)
    return x.new_empty(x.shape[0], x.shape[2], y.shape[2])


@lib.register_fake("treepool::row_dot")
def _row_dot(h, w):
    _checks.row_args("row_dot", h, w)
    return h.new_empty(h.shape[0], h.shape[1])


@lib.register_fake("treepool::weighted_row_sum")
def _weighted_row_sum(g, h):
    _checks.row_args("weighted_row_sum", g, h)
    return h.new_empty(h.shape[0], h.shape[2])
