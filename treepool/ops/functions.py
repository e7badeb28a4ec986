"""The public treepool ops.

Rows of a [T, P] buffer are tasks (or tree nodes) in DFS order; ``offsets`` [C + 1]
(int64) groups them into clusters: cluster c owns rows offsets[c] .. offsets[c+1]-1.
``weights`` [T] are optional non-negative per-row weights.

Every op runs on the compiled kernels (``torch.ops.treepool.*``) when the native
backend is active and has kernels for the tensors' device, else on the pure-PyTorch
reference (:mod:`treepool.reference`). Both are differentiable in every floating
input, lr and eps included, twice over (second-order MAML needs it), and work under
torch.compile.

List forms: wherever an op takes a data tensor it also takes a list (or tuple) of
tensors [N, *shape_i], one per model parameter (any trailing shape, 1-D [N] included;
all share N, dtype and device), and then returns a list of [C, *shape_i] (the in-place
forms write into the given list). All of them go through one dispatch: one parallel
region on the CPU. A rate (lr, eps) of a list form is a float, a 0-d tensor, or a list
of tensors each 0-d or of shape shape_i (per-parameter rates, as in Meta-SGD).

Precision: sums and means accumulate in float32 for half types (float64 for float64)
but the result has the data's dtype: a float16 sum of 4096 rows of 1e3 overflows to
inf, as torch.sum does. ``out_dtype=torch.float32`` returns the float32 result.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
from torch import Tensor

from . import checks as _checks
from . import reference
from .backend import runs_native

Rate = Union[float, Tensor, Sequence[Tensor]]
Data = Union[Tensor, Sequence[Tensor]]
_ops = torch.ops.treepool


def _rows(op: str, name: str, ts):
    """Checks a list form and returns its [N, numel_i] buffers and trailing shapes."""
    _checks.check_list(op, name, ts)
    return [_checks.rows_of(t) for t in ts], [tuple(t.shape[1:]) for t in ts]


def _shaped(outs, shapes) -> List[Tensor]:
    """The [C, numel_i] results of a list form as [C, *shape_i]."""
    return [o.reshape(o.shape[0], *s) for o, s in zip(outs, shapes)]


def _with_dtype(op: str, x: Data, weights, out_dtype):
    """x and weights in out_dtype (a wider float than x's), for segment_sum/mean."""
    if out_dtype is None:
        return x, weights
    if out_dtype not in (torch.float32, torch.float64):
        raise TypeError(f"treepool.{op}: out_dtype must be None, torch.float32 or "
                        f"torch.float64, got {out_dtype}")
    cast = (lambda t: t.to(out_dtype) if isinstance(t, Tensor) and t.is_floating_point() else t)
    xs = [cast(t) for t in x] if _checks.is_list(x) else cast(x)
    return xs, cast(weights)


def _reduce(op: str, x: Data, offsets: Tensor, weights, out_dtype):
    x, weights = _with_dtype(op, x, weights, out_dtype)
    if _checks.is_list(x):
        _checks.check_types(op, [("offsets", offsets)], [("weights", weights)])
        xs, shapes = _rows(op, "x", x)
        if runs_native(xs[0]):
            outs = getattr(_ops, op + "_multi")(xs, offsets, weights)
        else:
            outs = getattr(reference, op + "_multi")(xs, offsets, weights)
        return _shaped(outs, shapes)
    _checks.check_types(op, [("x", x), ("offsets", offsets)], [("weights", weights)])
    if runs_native(x):
        return getattr(_ops, op)(x, offsets, weights)
    return getattr(reference, op)(x, offsets, weights)


def segment_sum(x: Data, offsets: Tensor, weights: Optional[Tensor] = None,
                out_dtype: Optional[torch.dtype] = None):
    """Weighted sum of every cluster's rows: ``out[c] = sum_{t in c} w_t x[t]``.

    x: [T, P] float32/float64/float16/bfloat16, or a list of [T, *shape_i]; offsets:
    [C + 1] int64; weights: [T]. Returns [C, P] (a list of [C, *shape_i]); an empty
    cluster gives 0. Half types accumulate in float32 but are rounded to the half type
    (which overflows past 65504 for float16): ``out_dtype=torch.float32`` returns the
    float32 sums instead.
    """
    return _reduce("segment_sum", x, offsets, weights, out_dtype)


def segment_mean(x: Data, offsets: Tensor, weights: Optional[Tensor] = None,
                 out_dtype: Optional[torch.dtype] = None):
    """Weighted mean of every cluster's rows:
    ``out[c] = sum_{t in c} w_t x[t] / sum_{t in c} w_t``.

    The pooled gradient of TreeMAML (Garcia et al. 2021). A cluster that is empty or
    whose weights are all zero gives 0 (and passes back a zero gradient). x may be a
    list of [T, *shape_i]; ``out_dtype`` as for :func:`segment_sum`.
    """
    return _reduce("segment_mean", x, offsets, weights, out_dtype)


def segment_broadcast(g: Data, offsets: Tensor, weights: Optional[Tensor] = None,
                      mean: bool = False, num_rows: Optional[int] = None):
    """Adjoint of segment_sum (``mean=False``) and segment_mean (``mean=True``):
    ``out[t] = w_t g[c(t)]``, divided by ``W_c = sum_{u in c} w_u`` when ``mean``.

    g: [C, P] (or a list of [C, *shape_i]); returns [T, P] (a list of [T, *shape_i])
    with T = ``num_rows`` (default ``offsets[-1]``, which reads the offsets: pass it
    explicitly on CUDA or under torch.compile).
    """
    op = "segment_broadcast"
    listed = _checks.is_list(g)
    _checks.check_types(op, [] if listed else [("g", g)], [("weights", weights)])
    _checks.check_types(op, [("offsets", offsets)])
    if num_rows is None:
        _checks.check_index(op, "offsets", offsets, "[C + 1]")
        num_rows = int(offsets[-1]) if offsets.numel() else 0
    elif isinstance(num_rows, bool) or not isinstance(num_rows, (int, torch.SymInt)):
        raise TypeError(f"treepool.{op}: num_rows must be an int or None, got "
                        f"{type(num_rows).__name__}")
    if listed:
        gs, shapes = _rows(op, "g", g)
        if runs_native(gs[0]):
            outs = _ops.segment_broadcast_multi(gs, offsets, weights, mean, num_rows)
        else:
            outs = reference.segment_broadcast_multi(gs, offsets, weights, mean, num_rows)
        return _shaped(outs, shapes)
    if runs_native(g):
        return _ops.segment_broadcast(g, offsets, weights, mean, num_rows)
    return reference.segment_broadcast(g, offsets, weights, mean, num_rows)


def _paired_lists(op: str, base_name: str, base, data_name: str, data, rate, rate_name: str):
    """The list form of an update as the kernels take it: the data as [rows, numel_i]
    buffers, their trailing shapes, and the rate as (float, list of 0-d / [numel_i]
    tensors); ``base`` (node_params or theta) is checked to pair with ``data``."""
    ds, shapes = _rows(op, data_name, data)
    _checks.check_same_length(op, base_name, base, data_name, data)
    _checks.check_list(op, base_name, base)
    _checks.check_trailing_shapes(op, base_name, base, data_name, data)
    rate_value, rate_tensor = _checks.as_rate_list(rate, rate_name, op, data, data_name)
    return ds, shapes, rate_value, rate_tensor


def _tree_update_lists(op: str, node_params, grads, lr):
    """:func:`_paired_lists` of a tree update, with node_params as [rows, numel_i] too."""
    gs, shapes, lr_value, lr_tensor = _paired_lists(op, "node_params", node_params, "grads",
                                                    grads, lr, "lr")
    return [_checks.rows_of(n) for n in node_params], gs, shapes, lr_value, lr_tensor


def tree_update(node_params: Data, grads: Data, offsets: Tensor, parents: Tensor,
                lr: Rate, weights: Optional[Tensor] = None):
    """One TreeMAML inner step for every cluster of a tree level (Garcia et al. 2021):

        out[c] = node_params[parents[c]] - lr * segment_mean(grads, offsets, weights)[c]

    node_params: [C_prev, P], the parameters of the level above; grads: [T, P], each
    task's gradient at its current node; parents: [C] int64, non-decreasing, the node
    of the level above that cluster c descends from. lr: a float, a 0-d tensor, or a
    [P] tensor (a per-parameter rate as in Meta-SGD, Li et al. 2017). Returns [C, P].

    List form: node_params [C_prev, *shape_i] and grads [T, *shape_i], one pair per
    model parameter; lr a float, a 0-d tensor or a list of tensors (0-d or shape_i).
    Returns a list of [C, *shape_i]. When every cluster is one row and parents is the
    identity (a MAML level), forward and backward are one multiply-add per tensor.
    """
    op = "tree_update"
    if _checks.is_list(grads):
        _checks.check_types(op, [("offsets", offsets), ("parents", parents)],
                            [("weights", weights)])
        ns, gs, shapes, lr_value, lr_tensor = _tree_update_lists(op, node_params, grads, lr)
        if runs_native(gs[0]):
            outs = _ops.tree_update_multi(ns, gs, offsets, parents, weights, lr_value, lr_tensor)
        else:
            outs = reference.tree_update_multi(ns, gs, offsets, parents, lr_value, lr_tensor,
                                               weights)
        return _shaped(outs, shapes)
    lr_value, lr_tensor = _checks.as_rate(lr, "lr", op)
    _checks.check_types(op, [("grads", grads), ("offsets", offsets),
                             ("node_params", node_params), ("parents", parents)],
                        [("weights", weights)])
    if runs_native(grads):
        return _ops.tree_update(node_params, grads, offsets, parents, weights, lr_value,
                                lr_tensor)
    return reference.tree_update(node_params, grads, offsets, parents, lr_value, lr_tensor,
                                 weights)


def reptile_update(theta: Data, phi: Data, offsets: Tensor, eps: Rate,
                   weights: Optional[Tensor] = None):
    """Reptile's outer step for every cluster (Nichol et al. 2018):

        out[c] = theta[c] + eps * (segment_mean(phi, offsets, weights)[c] - theta[c])

    theta: [C, P], one meta-parameter vector per cluster (C = 1 for plain Reptile);
    phi: [T, P], the tasks' adapted parameters; eps: float, 0-d or [P] tensor.
    List form: theta [C, *shape_i], phi [T, *shape_i]; eps a float, a 0-d tensor or a
    list of tensors (0-d or shape_i); returns a list of [C, *shape_i].
    """
    op = "reptile_update"
    if _checks.is_list(phi):
        _checks.check_types(op, [("offsets", offsets)], [("weights", weights)])
        ps, shapes, eps_value, eps_tensor = _paired_lists(op, "theta", theta, "phi", phi, eps,
                                                          "eps")
        ts = [_checks.rows_of(t) for t in theta]
        if runs_native(ps[0]):
            outs = _ops.reptile_update_multi(ts, ps, offsets, weights, eps_value, eps_tensor)
        else:
            outs = reference.reptile_update_multi(ts, ps, offsets, eps_value, eps_tensor,
                                                  weights)
        return _shaped(outs, shapes)
    eps_value, eps_tensor = _checks.as_rate(eps, "eps", op)
    _checks.check_types(op, [("phi", phi), ("offsets", offsets), ("theta", theta)],
                        [("weights", weights)])
    if runs_native(phi):
        return _ops.reptile_update(theta, phi, offsets, weights, eps_value, eps_tensor)
    return reference.reptile_update(theta, phi, offsets, eps_value, eps_tensor, weights)


def _refuse_autograd(op: str, *tensors) -> None:
    flat = []
    for t in tensors:
        flat.extend(t if _checks.is_list(t) else [t])
    if torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in flat):
        raise RuntimeError(
            f"treepool.{op}: in-place ops do not record gradients; call it under "
            f"torch.no_grad() or use the out-of-place form")


def tree_update_(out: Data, node_params: Data, grads: Data, offsets: Tensor,
                 parents: Tensor, lr: Rate, weights: Optional[Tensor] = None):
    """:func:`tree_update` written into the caller's ``out`` [C, P]; returns ``out``.

    For loops that need no autograd (first-order inner loops): it saves a fresh
    [C, P] allocation per step. ``out`` may be ``node_params`` itself only when
    parents[c] == c for every c (an inner step that stays on the same level).
    List form: ``out`` is a list of [C, *shape_i] written in place (and returned).
    """
    op = "tree_update_"
    if _checks.is_list(grads):
        _checks.check_types(op, [("offsets", offsets), ("parents", parents)],
                            [("weights", weights)])
        ns, gs, shapes, lr_value, lr_tensor = _tree_update_lists(op, node_params, grads, lr)
        _checks.check_same_length(op, "out", out, "grads", grads)
        _checks.check_list(op, "out", out)
        _checks.check_trailing_shapes(op, "out", out, "grads", grads)
        outs = [_checks.rows_view_of(op, "out", i, o) for i, o in enumerate(out)]
        _refuse_autograd(op, out, node_params, grads, lr_tensor, weights)
        if runs_native(gs[0]):
            _ops.tree_update_multi_(outs, ns, gs, offsets, parents, weights, lr_value, lr_tensor)
        else:
            reference.tree_update_multi_(outs, ns, gs, offsets, parents, lr_value, lr_tensor,
                                         weights)
        return out
    lr_value, lr_tensor = _checks.as_rate(lr, "lr", op)
    _checks.check_types(op, [("grads", grads), ("offsets", offsets),
                             ("node_params", node_params), ("parents", parents),
                             ("out", out)], [("weights", weights)])
    _refuse_autograd(op, out, node_params, grads, lr_tensor, weights)
    if runs_native(grads):
        _ops.tree_update_(out, node_params, grads, offsets, parents, weights, lr_value,
                          lr_tensor)
        return out
    return reference.tree_update_(out, node_params, grads, offsets, parents, lr_value,
                                  lr_tensor, weights)


def reptile_update_(theta: Data, phi: Data, offsets: Tensor, eps: Rate,
                    weights: Optional[Tensor] = None):
    """:func:`reptile_update` applied to ``theta`` in place; returns ``theta`` (a list
    of [C, *shape_i] in the list form)."""
    op = "reptile_update_"
    if _checks.is_list(phi):
        _checks.check_types(op, [("offsets", offsets)], [("weights", weights)])
        ps, shapes, eps_value, eps_tensor = _paired_lists(op, "theta", theta, "phi", phi, eps,
                                                          "eps")
        ts = [_checks.rows_view_of(op, "theta", i, t) for i, t in enumerate(theta)]
        _refuse_autograd(op, theta, phi, eps_tensor, weights)
        if runs_native(ps[0]):
            _ops.reptile_update_multi_(ts, ps, offsets, weights, eps_value, eps_tensor)
        else:
            reference.reptile_update_multi_(ts, ps, offsets, eps_value, eps_tensor, weights)
        return theta
    eps_value, eps_tensor = _checks.as_rate(eps, "eps", op)
    _checks.check_types(op, [("phi", phi), ("offsets", offsets), ("theta", theta)],
                        [("weights", weights)])
    _refuse_autograd(op, theta, phi, eps_tensor, weights)
    if runs_native(phi):
        _ops.reptile_update_(theta, phi, offsets, weights, eps_value, eps_tensor)
        return theta
    return reference.reptile_update_(theta, phi, offsets, eps_value, eps_tensor, weights)


def max_pool2d_indices(x: Tensor, kernel_size) -> Tensor:
    """Where each window of a max pooling of x takes its maximum: int64 [..., H // kh,
    W // kw] of flat indices ``r * W + c`` within each plane of x [..., H, W], for
    windows kh x kw with stride = kernel, no padding, floor mode (``kernel_size`` an int
    or (kh, kw)). Exactly ``F.max_pool2d(x, kernel_size, return_indices=True)[1]``: the
    first maximum in row-major order, the last NaN where there are NaNs. Gathering x at
    these indices gives the pooled values, and autograd then differentiates that gather
    as max pooling (treepool's learners do so on the CPU, where ATen's channels-first
    max pooling runs 3-4x slower than this kernel). Not differentiable (the indices
    are integers); x is read, never written.
    """
    op = "max_pool2d_indices"
    kh, kw = _checks.max_pool_args(op, x, kernel_size)
    if runs_native(x):
        return _ops.max_pool2d_indices(x.detach(), [kh, kw])
    return reference.max_pool2d_indices(x, (kh, kw))
