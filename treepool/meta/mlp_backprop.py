"""Backpropagation through a plain MLP written out, without an autograd graph: the
learners' first-order inner steps on :class:`~treepool.meta.batched_mlp.BatchedMLP`
models.

For a batch of rows b (tasks, or tree nodes with their m tasks), each with its own
parameters (or one shared set), the gradient of row b's loss is, layer by layer from
the output, for a linear layer z = h W^T + c and an activation y = f(z) with incoming
gradient G (Rumelhart et al. 1986):

    dW = G^T h,   dc = sum_rows G,   G_in = G W,   dz = G * f'(z)

with f'(z) written from the activation's output y (:data:`ACTIVATIONS`), so that the
activation runs in place on the layer's output and its derivative in place on G.
Against autograd's pass over the same batched products (first order: the gradients
are constants of the meta-gradient) this saves the graph, the zero probes and
stride-0 parameter copies of :func:`~treepool.meta.functional.batched_grads`, and
half the activation-sized temporaries: bench_meta's first-order MLP cells take
0.80-0.92x the time (bench/RESULTS_meta.md).
"""

from __future__ import annotations

from typing import Callable, Dict, List, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import products
from .batched_mlp import BatchedMLP, LayerRule, batched_linear, linear_params, per_task_losses

__all__ = ["ACTIVATIONS", "first_order_grads", "written_out"]


class Activation(NamedTuple):
    """An activation y = f(z) written from its output: ``in_place(m, z)``,
    ``apply(m, z)`` and ``grad(m, g, y, own)`` = g * f'(z) (in place into g when
    ``own``)."""
    in_place: Callable
    apply: Callable
    grad: Callable


def _relu_grad(m: nn.Module, g: Tensor, y: Tensor, own: bool) -> Tensor:
    if own:
        return torch.ops.aten.threshold_backward.grad_input(g, y, 0, grad_input=g)
    return torch.ops.aten.threshold_backward(g, y, 0)


ACTIVATIONS = {
    nn.ReLU: Activation(lambda m, z: torch.relu_(z), lambda m, z: torch.relu(z), _relu_grad),
    # y > 0 exactly where z > 0 for a slope >= 0 (written_out refuses the others)
    nn.LeakyReLU: Activation(lambda m, z: F.leaky_relu_(z, m.negative_slope),
                             lambda m, z: F.leaky_relu(z, m.negative_slope),
                             lambda m, g, y, own: torch.ops.aten.leaky_relu_backward(
                                 g, y, m.negative_slope, True)),
    nn.Tanh: Activation(lambda m, z: torch.tanh_(z), lambda m, z: torch.tanh(z),
                        lambda m, g, y, own: torch.ops.aten.tanh_backward(g, y)),
    nn.Sigmoid: Activation(lambda m, z: torch.sigmoid_(z), lambda m, z: torch.sigmoid(z),
                           lambda m, g, y, own: torch.ops.aten.sigmoid_backward(g, y)),
    nn.Identity: Activation(lambda m, z: z, lambda m, z: z, lambda m, g, y, own: g),
}


def written_out(mlp: BatchedMLP) -> bool:
    """Whether every activation of ``mlp`` has a derivative written from its output."""
    return all(type(m) is nn.Linear or (type(m) in ACTIVATIONS and not (
        type(m) is nn.LeakyReLU and m.negative_slope < 0)) for _, m in mlp.layers)


def _backprop(mlp: BatchedMLP, params: Dict[str, Tensor], x: Tensor, y: Tensor, loss_fn,
              lead: int, depth: int, scale: Union[float, Tensor],
              wanted: Dict[str, Tuple[bool, bool]], rules: Dict[str, LayerRule], first: int):
    """One forward and backward, no graph: ({layer: (dW, dc) per row}, {rule layer:
    (dL/dz, input)})."""
    B = x.shape[0]
    h, fresh = x.reshape(B, -1, x.shape[-1]), False
    saved: List[Tensor] = []
    for name, m in mlp.layers:
        if type(m) is nn.Linear:
            saved.append(h)
            h = rules[name].forward(h) if name in rules else \
                batched_linear(h, *linear_params(params, name, m), lead)
            fresh = True
        else:
            h = (ACTIVATIONS[type(m)].in_place if fresh else ACTIVATIONS[type(m)].apply)(m, h)
            saved.append(h)
            fresh = False
    out = h.reshape(*x.shape[:-1], h.shape[-1])
    g, fresh = _loss_grad(loss_fn, out, y, depth, scale).reshape(h.shape), False
    grads: Dict[str, Tuple[Optional[Tensor], Optional[Tensor]]] = {}
    seen: Dict[str, Tuple[Tensor, Tensor]] = {}
    for i in reversed(range(first, len(mlp.layers))):
        name, m = mlp.layers[i]
        if type(m) is not nn.Linear:
            g = ACTIVATIONS[type(m)].grad(m, g, saved[i], fresh)
            continue
        if name in rules:
            seen[name] = (g, saved[i])
            if i > first:
                g, fresh = rules[name].input_grad(g), True
            continue
        weight, bias = linear_params(params, name, m)
        grads[name] = (_per_row_outer(g, saved[i]) if wanted[name][0] else None,
                       g.sum(1) if wanted[name][1] and bias is not None else None)
        if i > first:
            g, fresh = _input_grad(g, weight, lead), True
    return grads, seen


def _plan(mlp: BatchedMLP, params: Dict[str, Tensor], rules: Dict[str, LayerRule]):
    """({linear layer: (weight wanted, bias wanted)}, the first layer the backward
    reaches), or None when no layer has anything to differentiate."""
    wanted = {}
    for name, m in mlp.layers:
        if type(m) is nn.Linear:
            prefix = f"{name}." if name else ""
            wanted[name] = (f"{prefix}weight" in params, f"{prefix}bias" in params)
    for i, (name, m) in enumerate(mlp.layers):
        if name in rules or any(wanted.get(name, ())):
            return wanted, i
    return None


def _scale(x: Tensor, depth: int, weights: Optional[Tensor]) -> Union[float, Tensor]:
    """The tasks' loss weights: 1 (depth 1), 1 / m for a node's m tasks, or ``weights``."""
    if weights is not None:
        return weights.to(x.dtype)
    return 1.0 / x.shape[1] if depth == 2 else 1.0


def _named(mlp: BatchedMLP, params: Dict[str, Tensor], grads) -> Optional[Dict[str, Tensor]]:
    out = {}
    for name, (dw, dc) in grads.items():
        prefix = f"{name}." if name else ""
        for key, g in ((f"{prefix}weight", dw), (f"{prefix}bias", dc)):
            if g is not None:
                out[key] = g
    if any(n not in out for n in params):
        return None
    return {n: out[n] for n in params}


def first_order_grads(mlp: BatchedMLP, params: Dict[str, Tensor], x: Tensor, y: Tensor, loss_fn,
                      shared: bool, depth: int, weights: Optional[Tensor] = None,
                      rules: Optional[Dict[str, LayerRule]] = None):
    """``{name: [B, *shape]}``: for every row b of the batch (a task, or a node of
    ``depth`` 2 with its m tasks), the gradient of its loss at its parameters
    (``shared``: one unbatched set for all rows), with no autograd graph: the
    first-order inner step.  The loss of row b is ``L_b`` (depth 1), ``mean_j L_bj``
    (depth 2) or ``sum_j weights[b, j] L_bj``; ``x`` is ``[B, ..., in]``.  None when an
    activation has no written-out derivative (the caller then takes autograd's pass).

    ``rules``: linear layers given as :class:`LayerRule` (the factored and in-place
    layers of :mod:`treepool.meta.factored`); then this returns ``(grads, seen)`` with
    ``seen[name] = (dL/dz, the layer's input)``, both ``[B, R, features]``."""
    rules = rules or {}
    plan = _plan(mlp, params, rules)
    if not written_out(mlp) or plan is None:
        return None
    with torch.no_grad():
        grads, seen = _backprop(mlp, params, x, y, loss_fn, 0 if shared else 1, depth,
                                _scale(x, depth, weights), plan[0], rules, plan[1])
    named = _named(mlp, params, grads)
    if named is None:
        return None
    return (named, seen) if rules else named


def _loss_grad(loss_fn, out: Tensor, y: Tensor, depth: int, scale: Union[float, Tensor]) -> Tensor:
    """d/d out of sum_i scale_i L_i(out_i, y_i) over the ``depth`` leading dims:
    written out for the mean squared error, 2 scale (out - y) / numel, else one
    autograd pass over the loss alone."""
    if loss_fn is F.mse_loss and out.shape == y.shape:
        count = out[(0,) * depth].numel()
        if not isinstance(scale, Tensor):
            return torch.sub(out, y).mul_(2.0 * scale / count)
        g = torch.sub(out, y).mul_(2.0 / count)
        return g.mul_(scale.reshape(*scale.shape, *[1] * (g.dim() - scale.dim())))
    with torch.enable_grad():
        leaf = out.detach().requires_grad_()
        losses = per_task_losses(loss_fn, leaf, y, depth)
        return torch.autograd.grad((losses * scale).sum(), leaf)[0]


def _per_row_outer(g: Tensor, h: Tensor) -> Tensor:
    """``g_b^T h_b`` [B, out, in] for g [B, R, out] and h [B, R, in] (a linear layer's
    weight gradient per row)."""
    if h.shape[-1] == 1:
        return products.weighted_row_sum(h.squeeze(-1), g).unsqueeze(-1)
    if g.shape[-1] == 1:
        return products.weighted_row_sum(g.squeeze(-1), h).unsqueeze(1)
    return products.bmm_tn(g, h)


def _input_grad(g: Tensor, weight: Tensor, lead: int) -> Tensor:
    """``g W`` [B, R, in]: the gradient of a linear layer's input, W [out, in] shared by
    every row or [B, out, in] (``lead`` 1)."""
    B = g.shape[0]
    out_features, in_features = weight.shape[-2:]
    batched = lead == 1 and weight.dim() == 3
    if in_features == 1:
        w = weight.reshape(-1, out_features) if batched else weight.reshape(1, -1)
        return products.row_dot(g, w.expand(B, out_features)).unsqueeze(-1)
    if out_features == 1:
        w = weight.reshape(-1, in_features) if batched else weight.reshape(1, -1)
        return products.outer(g.squeeze(-1), w.expand(B, in_features))
    if not batched:
        return g @ weight
    return products.bmm_nn(g, weight)
