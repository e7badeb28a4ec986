"""Sequential MLPs on batched parameters by plain batched products, without vmap.

For a batch of tasks (or tree nodes) c with their own parameters, a linear layer is

    z[c] = h[c] W[c]^T + b[c]            (one torch.baddbmm over the batch)

and an elementwise activation applies to the whole batch as it is.  That is what a
user writes by hand for the usual few-shot regression net (sine regression's
1-40-40-1 MLP of Finn et al., 2017).  Under ``torch.func.vmap`` the same forward
costs a fixed ~33 us per call and ~30 us per layer in the batching rule of
``F.linear`` (CPU, 8 tasks x 5 rows x 40 features: 66 us against an 8 us baddbmm),
more than the products themselves at meta-learning sizes, and the batching rule's
views and scalings add nodes that the backward and double backward run again.

:class:`BatchedMLP` recognises an ``nn.Sequential`` (nested ones flattened) of
``nn.Linear`` layers and parameter-free elementwise activations, with no hooks; every
other model runs through vmap (``ModelFunctions``).  The batched layers run treepool's
batched products (:mod:`treepool.ops.products`: ``bmm_nt``, and on the CPU ``outer``
and ``row_dot`` for a layer with one input or one output feature, where ATen's bmm
runs such degenerate matrices per matrix; ``functional._ThinLinears`` does the same
under vmap with elementwise products), whose gradients keep every operand's layout.
"""

from __future__ import annotations

from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import products

__all__ = ["BatchedMLP", "LayerRule", "per_task_losses"]

# elementwise activations without parameters: applied to the batch as they are
_ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
                nn.Mish, nn.Tanh, nn.Sigmoid, nn.Softplus, nn.Softsign, nn.Hardtanh,
                nn.Hardswish, nn.Hardsigmoid, nn.LogSigmoid, nn.Tanhshrink, nn.Identity)


def _flatten(model: nn.Module, prefix: str, out: List[Tuple[str, nn.Module]]) -> bool:
    if type(model) is nn.Sequential:
        return all(_flatten(m, f"{prefix}{name}.", out) for name, m in model.named_children())
    if type(model) is nn.Linear or type(model) in _ELEMENTWISE:
        out.append((prefix[:-1], model))
        return True
    return False


_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _hooked(module: nn.Module) -> bool:
    """Whether calling the module would run more than its class's forward."""
    return "forward" in module.__dict__ or any(getattr(module, h, None) for h in _HOOKS)


class LayerRule(NamedTuple):
    """A linear layer given to :meth:`BatchedMLP.first_order_grads` by its forward,
    ``[B, R, in] -> [B, R, out]``, and its input gradient ``dL/dz -> dL/dh``."""
    forward: Callable[[Tensor], Tensor]
    input_grad: Callable[[Tensor], Tensor]


class BatchedMLP:
    """The layers of ``model`` when it is a plain sequential MLP (see the module
    docstring); :meth:`of` returns None for any other model."""

    def __init__(self, model: nn.Module, layers: List[Tuple[str, nn.Module]]):
        self.model = model
        self.layers = layers

    @classmethod
    def of(cls, model: nn.Module) -> Optional["BatchedMLP"]:
        layers: List[Tuple[str, nn.Module]] = []
        if not _flatten(model, "", layers) or not any(isinstance(m, nn.Linear) for _, m in layers):
            return None
        return cls(model, layers)

    def usable(self) -> bool:
        """False while a hook or a patched forward (registered after construction)
        would make the module's call differ from the batched layers, or while global
        module hooks are set."""
        from torch.nn.modules import module as module_impl
        if any(getattr(module_impl, f"_global{h}", None) for h in _HOOKS):
            return False
        return not any(_hooked(m) for m in self.model.modules())

    def first_order_grads(self, params: Dict[str, Tensor], x: Tensor, y: Tensor, loss_fn,
                          shared: bool, depth: int, weights: Optional[Tensor] = None,
                          rules: Optional[Dict[str, "LayerRule"]] = None):
        """``{name: [B, *shape]}``: for every row b of the batch (a task, or a node of
        ``depth`` 2 with its m tasks), the gradient of its loss at its parameters
        (``shared``: one unbatched set for all rows), by backpropagation written out
        here, with no autograd graph: the first-order inner step.  The loss of row b is
        ``L_b`` (depth 1), ``mean_j L_bj`` (depth 2) or ``sum_j weights[b, j] L_bj``;
        ``x`` is ``[B, ..., in]``.

        For a layer z = h W^T + b and an activation y = f(z) with incoming gradient G:

            dW_b = G_b^T h_b,   db_b = sum_rows G_b,   dh = G W,   dz = G * f'(z)

        with f'(z) written from y (:data:`_FROM_OUTPUT`), so that an activation after a
        linear layer runs in place on the layer's output and its derivative in place on
        the incoming gradient: no autograd nodes and half the activation-sized
        temporaries of the autograd pass.  None when an activation has no such rule
        (the caller then takes the autograd pass).

        ``rules``: linear layers whose forward and input gradient are given
        (:class:`LayerRule`: the factored and in-place layers of
        :mod:`treepool.meta.factored`); then this returns ``(grads, seen)`` with
        ``seen[name] = (dL/dz, the layer's input)``, both ``[B, R, features]``."""
        rules = rules or {}
        if any(type(m) is not nn.Linear and type(m) not in _FROM_OUTPUT for _, m in self.layers):
            return None
        if any(type(m) is nn.LeakyReLU and m.negative_slope < 0 for _, m in self.layers):
            return None
        adapted = [name in rules or any(f"{name}.{p}" in params for p in ("weight", "bias"))
                   if type(m) is nn.Linear else False for name, m in self.layers]
        if True not in adapted:
            return None
        first = adapted.index(True)  # no layer before it needs a backward
        lead = 0 if shared else 1
        B = x.shape[0]
        with torch.no_grad():
            h, fresh = x.reshape(B, -1, x.shape[-1]), False
            saved: List[Tensor] = []  # each layer's input (linear) or output (activation)
            for name, m in self.layers:
                if type(m) is nn.Linear:
                    saved.append(h)
                    h = rules[name].forward(h) if name in rules else \
                        _linear(h, *self._weights(params, name, m), lead)
                    fresh = True
                else:
                    h = _FROM_OUTPUT[type(m)][0 if fresh else 1](m, h)
                    saved.append(h)
                    fresh = False
            out = h.reshape(*x.shape[:-1], h.shape[-1])
            g = _loss_grad(loss_fn, out, y, depth, weights).reshape(h.shape)
            fresh = False
            grads: Dict[str, Tensor] = {}
            seen: Dict[str, Tuple[Tensor, Tensor]] = {}
            for i in reversed(range(first, len(self.layers))):
                name, m = self.layers[i]
                if type(m) is not nn.Linear:
                    g = _FROM_OUTPUT[type(m)][2](m, g, saved[i], fresh)
                    continue
                if name in rules:
                    seen[name] = (g, saved[i])
                    if i > first:
                        g, fresh = rules[name].input_grad(g), True
                    continue
                weight, _ = self._weights(params, name, m)
                grads.update(_linear_grads(name, g, saved[i], weight, params, B))
                if i > first:
                    g, fresh = _input_grad(g, weight, B), True
        if any(n not in grads for n in params):
            return None
        grads = {n: grads[n] for n in params}
        return (grads, seen) if rules else grads

    @staticmethod
    def _weights(params: Dict[str, Tensor], name: str, m: nn.Module):
        prefix = f"{name}." if name else ""
        return params.get(f"{prefix}weight", m.weight), params.get(f"{prefix}bias", m.bias)

    def __call__(self, params: Dict[str, Tensor], x: Tensor, lead: int,
                 linears: Optional[Dict[str, Callable[[Tensor], Tensor]]] = None) -> Tensor:
        """The outputs for ``x`` ``[B, *rest]`` with the adapted ``params`` batched over
        ``lead`` (0 or 1) leading dimensions: unbatched (every row of ``x`` uses the
        same parameters) or ``[B, *shape]``, each parameter row owning its block of x
        (any further leading dims of x, e.g. the tasks of a node, share it).
        ``linears``: the batched forward of some linear layers, by name (the factored
        layers of :mod:`treepool.meta.factored`)."""
        h = x
        for name, m in self.layers:
            if linears and name in linears:
                h = linears[name](h)
            elif type(m) is nn.Linear:
                prefix = f"{name}." if name else ""
                h = _linear(h, params.get(f"{prefix}weight", m.weight),
                            params.get(f"{prefix}bias", m.bias), lead)
            else:
                h = m(h)
        return h


def _linear(h: Tensor, weight: Tensor, bias: Optional[Tensor], lead: int) -> Tensor:
    """``h W^T + b`` with W and b unbatched or batched over the first dimension of h.
    Batched, it runs treepool's batched products (:mod:`treepool.ops.products`), whose
    gradients keep every operand's layout at every order."""
    w_batched = lead == 1 and weight.dim() == 3
    b_batched = lead == 1 and bias is not None and bias.dim() == 2
    if not w_batched:
        out = F.linear(h, weight, None if b_batched else bias)
        return _add_rowwise(out, bias) if b_batched else out
    B, out_features, in_features = weight.shape
    rows = h if h.dim() == 3 else h.reshape(B, -1, in_features)
    fused_bias = bias if b_batched else None          # added by the product itself
    # squeeze, not [..., 0]: a view whose gradient is a view (select's writes zeros)
    if h.device.type == "cpu" and in_features == 1:   # [B, N] outer [B, out] (+ b)
        z = products.outer(rows.squeeze(-1), weight.squeeze(-1), fused_bias)
    elif h.device.type == "cpu" and out_features == 1:
        z = products.row_dot(rows, weight.squeeze(1)).unsqueeze(-1)
        fused_bias = None
    else:
        z = products.bmm_nt(rows, weight, fused_bias)
    if h.dim() != 3:
        z = z.reshape(*h.shape[:-1], out_features)
    if bias is None or fused_bias is not None:
        return z
    return _add_rowwise(z, bias) if b_batched else z + bias


def _linear_grads(name: str, g: Tensor, h: Tensor, weight: Tensor, params: Dict[str, Tensor],
                  B: int) -> Dict[str, Tensor]:
    """The adapted ones of a linear layer's per-row gradients, dW_b = g_b^T h_b and
    db_b = sum_rows g_b, for g [B, R, out] and its input h [B, R, in]."""
    prefix = f"{name}." if name else ""
    out: Dict[str, Tensor] = {}
    if f"{prefix}weight" in params:
        out_features, in_features = weight.shape[-2:]
        if in_features == 1:
            dw = products.weighted_row_sum(h.squeeze(-1), g).unsqueeze(-1)
        elif out_features == 1:
            dw = products.weighted_row_sum(g.squeeze(-1), h).unsqueeze(1)
        else:
            dw = products.bmm_tn(g, h)
        out[f"{prefix}weight"] = dw
    if f"{prefix}bias" in params:
        out[f"{prefix}bias"] = g.sum(1)
    return out


def _input_grad(g: Tensor, weight: Tensor, B: int) -> Tensor:
    """``g W`` [B, R, in]: the gradient of a linear layer's input (W [out, in] shared by
    every row or [B, out, in])."""
    out_features, in_features = weight.shape[-2:]
    if in_features == 1:
        w = weight.squeeze(-1).expand(B, out_features)
        return products.row_dot(g, w).unsqueeze(-1)
    if out_features == 1:
        w = weight.squeeze(-2).expand(B, in_features)
        return products.outer(g.squeeze(-1), w)
    if weight.dim() == 2:
        return g @ weight
    return products.bmm_nn(g, weight)


def _loss_grad(loss_fn, out: Tensor, y: Tensor, depth: int, weights: Optional[Tensor]) -> Tensor:
    """d/d out of sum_b c_b L_b(out_b, y_b) over the ``depth`` leading dims (c: 1 for
    depth 1, 1 / m for a node's m tasks, or ``weights``): written out for the mean
    squared error, 2 c (out - y) / numel, else one autograd pass over the loss alone."""
    lead = out.shape[:depth]
    if weights is not None:
        scale = weights.to(out.dtype)
    elif depth == 2:
        scale = torch.full((), 1.0 / lead[1], dtype=out.dtype, device=out.device)
    else:
        scale = None
    if loss_fn is F.mse_loss and out.shape == y.shape:
        count = out[(0,) * depth].numel()
        g = torch.sub(out, y).mul_(2.0 / count)
        return g if scale is None else g.mul_(scale.reshape(*scale.shape, *[1] * (g.dim() - scale.dim())))
    with torch.enable_grad():
        leaf = out.detach().requires_grad_()
        losses = per_task_losses(loss_fn, leaf, y, depth)
        total = (losses if scale is None else losses * scale).sum()
        return torch.autograd.grad(total, leaf)[0]


def _relu_grad(m: nn.Module, g: Tensor, y: Tensor, own: bool) -> Tensor:
    if own:
        return torch.ops.aten.threshold_backward.grad_input(g, y, 0, grad_input=g)
    return torch.ops.aten.threshold_backward(g, y, 0)


def _leaky_relu_grad(m: nn.Module, g: Tensor, y: Tensor, own: bool) -> Tensor:
    # y > 0 exactly where z > 0 for a slope >= 0 (first_order_grads refuses others)
    return torch.ops.aten.leaky_relu_backward(g, y, m.negative_slope, True)


# Activations y = f(z) whose derivative is a function of y: (in place on a tensor of
# our own, out of place, g * f'(z) from (g, y); ``own``: g may be written).
_FROM_OUTPUT = {
    nn.ReLU: (lambda m, z: torch.relu_(z), lambda m, z: torch.relu(z), _relu_grad),
    nn.LeakyReLU: (lambda m, z: F.leaky_relu_(z, m.negative_slope),
                   lambda m, z: F.leaky_relu(z, m.negative_slope), _leaky_relu_grad),
    nn.Tanh: (lambda m, z: torch.tanh_(z), lambda m, z: torch.tanh(z),
              lambda m, g, y, own: torch.ops.aten.tanh_backward(g, y)),
    nn.Sigmoid: (lambda m, z: torch.sigmoid_(z), lambda m, z: torch.sigmoid(z),
                 lambda m, g, y, own: torch.ops.aten.sigmoid_backward(g, y)),
    nn.Identity: (lambda m, z: z, lambda m, z: z, lambda m, g, y, own: g),
}


def _add_rowwise(z: Tensor, bias: Tensor) -> Tensor:
    """z [B, ..., out] + bias [B, out], row b of the bias added to block b of z."""
    return z + bias.reshape(bias.shape[0], *([1] * (z.dim() - 2)), bias.shape[1])


def per_task_losses(loss_fn, out: Tensor, y: Tensor, depth: int) -> Tensor:
    """``loss_fn(out[i], y[i])`` for every index i of the ``depth`` leading dims: one
    ``F.mse_loss(reduction='none')`` and a mean per task for the mean squared error of
    equal shapes, else ``loss_fn`` under vmap (whose fixed cost, ~33 us a level, is
    what BatchedMLP saves)."""
    if loss_fn is F.mse_loss and out.shape == y.shape:
        return F.mse_loss(out, y, reduction="none").flatten(depth).mean(-1)
    for _ in range(depth):
        loss_fn = torch.func.vmap(loss_fn)
    return loss_fn(out, y)
