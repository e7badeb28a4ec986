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
under vmap with elementwise products), whose gradients keep every operand's layout;
a linear layer followed by ``nn.ReLU`` runs the product's ReLU form (``bmm_nt_relu``,
``outer_relu``). The rows of a parameter row's block (a node's tasks and their
shots) are one dimension from the first layer to the last.
"""

from __future__ import annotations

from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import products

__all__ = ["BatchedMLP", "LayerRule", "batched_linear", "linear_params", "per_task_losses"]

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
    """A linear layer given to :func:`treepool.meta.mlp_backprop.first_order_grads` by
    its forward, ``[B, R, in] -> [B, R, out]``, and its input gradient
    ``dL/dz -> dL/dh``."""
    forward: Callable[[Tensor], Tensor]
    input_grad: Callable[[Tensor], Tensor]


class BatchedMLP:
    """The layers of ``model`` when it is a plain sequential MLP (see the module
    docstring); :meth:`of` returns None for any other model."""

    def __init__(self, model: nn.Module, layers: List[Tuple[str, nn.Module]]):
        self.model = model
        self.layers = layers
        # a batched linear layer followed by nn.ReLU runs the product's ReLU form; False:
        # the product, then torch.relu (the same values; bench/ab_meta.py --off relu-forms)
        self.relu_forms = True

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

    def __call__(self, params: Dict[str, Tensor], x: Tensor, lead: int,
                 linears: Optional[Dict[str, Callable[[Tensor], Tensor]]] = None) -> Tensor:
        """The outputs for ``x`` ``[B, *rest]`` with the adapted ``params`` batched over
        ``lead`` (0 or 1) leading dimensions: unbatched (every row of ``x`` uses the
        same parameters) or ``[B, *shape]``, each parameter row owning its block of x
        (any further leading dims of x, e.g. the tasks of a node, share it).
        ``linears``: the batched forward of some linear layers, by name (the factored
        layers of :mod:`treepool.meta.factored`)."""
        # batched with rows of rank 2 or more (a node's tasks and their shots): the rows
        # of a parameter row's block as one dim, [B, R, features], from the first layer
        # to the last (two reshapes, not two per layer)
        lead_shape = x.shape[:-1]
        h = x if lead == 0 or x.dim() <= 3 else x.reshape(x.shape[0], -1, x.shape[-1])
        fused = False  # the previous linear layer applied this ReLU
        for i, (name, m) in enumerate(self.layers):
            if fused:
                fused = False
            elif linears and name in linears:
                h = linears[name](h)
            elif type(m) is nn.Linear:
                fused = (self.relu_forms and i + 1 < len(self.layers)
                         and type(self.layers[i + 1][1]) is nn.ReLU)
                h = batched_linear(h, *linear_params(params, name, m), lead, relu=fused)
            else:
                h = m(h)
        return h if h.shape[:-1] == lead_shape else h.reshape(*lead_shape, h.shape[-1])


def linear_params(params: Dict[str, Tensor], name: str,
                  m: nn.Linear) -> Tuple[Tensor, Optional[Tensor]]:
    """(weight, bias) of linear layer ``name``: the adapted ones in ``params``, else the
    module's own."""
    prefix = f"{name}." if name else ""
    return params.get(f"{prefix}weight", m.weight), params.get(f"{prefix}bias", m.bias)


def batched_linear(h: Tensor, weight: Tensor, bias: Optional[Tensor], lead: int,
                   relu: bool = False) -> Tensor:
    """``h W^T + b`` (``relu(h W^T + b)`` with ``relu``) with W and b unbatched or
    batched over the first dimension of h. Batched, it runs treepool's batched products
    (:mod:`treepool.ops.products`), whose gradients keep every operand's layout at
    every order, with the ReLU in the product where it has a ReLU form."""
    w_batched = lead == 1 and weight.dim() == 3
    b_batched = lead == 1 and bias is not None and bias.dim() == 2
    if not w_batched:
        out = F.linear(h, weight, None if b_batched else bias)
        out = _add_rowwise(out, bias) if b_batched else out
        return torch.relu(out) if relu else out
    B, out_features, in_features = weight.shape
    rows = h if h.dim() == 3 else h.reshape(B, -1, in_features)
    fused_bias = bias if b_batched else None          # added by the product itself
    fused_relu = relu and (bias is None or b_batched)  # nothing to add after the ReLU
    # squeeze, not [..., 0]: a view whose gradient is a view (select's writes zeros)
    if h.device.type == "cpu" and in_features == 1:   # [B, N] outer [B, out] (+ b)
        outer = products.outer_relu if fused_relu else products.outer
        z = outer(rows.squeeze(-1), weight.squeeze(-1), fused_bias)
    elif h.device.type == "cpu" and out_features == 1:
        z = products.row_dot(rows, weight.squeeze(1)).unsqueeze(-1)
        fused_bias, fused_relu = None, False
    else:
        z = (products.bmm_nt_relu if fused_relu else products.bmm_nt)(rows, weight, fused_bias)
    if h.dim() != 3:
        z = z.reshape(*h.shape[:-1], out_features)
    if bias is not None and fused_bias is None:
        z = _add_rowwise(z, bias) if b_batched else z + bias
    return torch.relu(z) if relu and not fused_relu else z


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
