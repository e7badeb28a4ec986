"""The batched products of the learners' plain-MLP path (a batch B of tasks or tree
nodes, each with its own matrices), as treepool ops:

    bmm_nn(x, y, acc=None)      acc[b] + x[b] y[b]          x [B, M, K], y [B, K, N]
    bmm_nt(x, y, bias=None)     x[b] y[b]^T + bias[b]       x [B, M, K], y [B, N, K]
    bmm_tn(x, y)                x[b]^T y[b]                 x [B, K, M], y [B, K, N]
    outer(g, w, bias=None)      g[b, n] w[b, k] + bias[b, k]    g [B, N], w [B, K]
    row_dot(h, w)               sum_k h[b, n, k] w[b, k]        h [B, N, K], w [B, K]
    weighted_row_sum(g, h)      sum_n g[b, n] h[b, n, k]        g [B, N], h [B, N, K]
    bmm_nt_relu(x, y, bias=None)    relu(bmm_nt(x, y, bias))    a hidden layer and its ReLU
    outer_relu(g, w, bias=None)     relu(outer(g, w, bias))

The values are torch.bmm's (and for the row ops a product and a sum); what differs is
autograd. The native ops' backward (csrc/batched_products.cpp) computes every gradient
as one of these ops on contiguous operands, at every order: torch.bmm on a transposed
view (``x @ W.transpose(1, 2)``, a linear layer) returns the view's gradient in the
transposed layout, and in a second-order meta-step that gradient meets contiguous ones
in strided adds and slow small-product orientations (bench/RESULTS_meta.md). The row
ops are the layers with one input or one output feature, one pass on the CPU where
ATen multiplies, writes a temporary and sums it. The ReLU forms apply ReLU in place on
the product's fresh output (one pass and one autograd node less than ``torch.relu``
after it) and differentiate ``g 1[h > 0]`` again without autograd's zero tensor for h:
1-5% of a second-order meta-step (bench/RESULTS_meta.md).

Each function runs the native op when the native backend has kernels for the device,
else the plain PyTorch expression (:mod:`treepool.ops.reference`), whose values and
derivatives are the same. Every argument is read, never written. Not for torch.func
transforms (no batching rule): the learners use them where they run without vmap.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import reference
from .backend import runs_native

_ops = torch.ops.treepool


def bmm_nn(x: Tensor, y: Tensor, acc: Optional[Tensor] = None) -> Tensor:
    """``acc + x @ y`` per batch (``torch.baddbmm(acc, x, y)``, or bmm without acc)."""
    if runs_native(x):
        return _ops.bmm_nn(x, y, acc)
    return reference.bmm_nn(x, y, acc)


def bmm_nt(x: Tensor, y: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``x @ y^T + bias[:, None]`` per batch: a linear layer whose weight y [B, N, K]
    and bias [B, N] belong to the batch."""
    if runs_native(x):
        return _ops.bmm_nt(x, y, bias)
    return reference.bmm_nt(x, y, bias)


def bmm_tn(x: Tensor, y: Tensor) -> Tensor:
    """``x^T @ y`` per batch: e.g. a layer's weight gradient ``G^T h``."""
    if runs_native(x):
        return _ops.bmm_tn(x, y)
    return reference.bmm_tn(x, y)


def outer(g: Tensor, w: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``g[..., None] * w[:, None] + bias[:, None]``: [B, N, K], a linear layer with one
    input feature (g the inputs [B, N], w its weight column [B, K])."""
    if runs_native(g):
        return _ops.outer(g, w, bias)
    return reference.outer(g, w, bias)


def row_dot(h: Tensor, w: Tensor) -> Tensor:
    """``(h * w[:, None]).sum(-1)``: [B, N], a linear layer with one output feature."""
    if runs_native(h):
        return _ops.row_dot(h, w)
    return reference.row_dot(h, w)


def weighted_row_sum(g: Tensor, h: Tensor) -> Tensor:
    """``(g[..., None] * h).sum(1)``: [B, K], the rows of h weighted by g and summed."""
    if runs_native(g):
        return _ops.weighted_row_sum(g, h)
    return reference.weighted_row_sum(g, h)


def bmm_nt_relu(x: Tensor, y: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``relu(x @ y^T + bias[:, None])`` per batch: a hidden linear layer and its ReLU."""
    if runs_native(x):
        return _ops.bmm_nt_relu(x, y, bias)
    return reference.bmm_nt_relu(x, y, bias)


def outer_relu(g: Tensor, w: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``relu(g[..., None] * w[:, None] + bias[:, None])``: a layer with one input
    feature and its ReLU."""
    if runs_native(g):
        return _ops.outer_relu(g, w, bias)
    return reference.outer_relu(g, w, bias)
