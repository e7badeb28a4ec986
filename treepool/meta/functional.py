"""A model as pure functions of its parameters, batched over tasks with torch.func.

Parameters are dicts ``{name: tensor}`` in the parameter-major layout of
docs/design.md: every parameter of a batch of N tasks (or tree nodes) is its own
contiguous ``[N, *shape]`` tensor, never a column slice of one ``[N, P]`` buffer
(whose backward would rebuild a zero-filled ``[N, P]`` gradient per parameter).

Only the *adapted* parameters are arguments; every other parameter and buffer is the
model's own tensor, read by ``functional_call`` from the module, so a shared
parameter (ANIL's body) is meta-learned by ordinary autograd and a constant buffer
just works.  BatchNorm in training mode normalises each task by its own batch
statistics and leaves the running statistics untouched (:func:`batch_statistics`).
A plain sequential MLP skips vmap: its layers run as batched products over the tasks
(:mod:`treepool.meta.batched_mlp`).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterator, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .batched_mlp import BatchedMLP, per_task_losses
from . import mlp_backprop
from .max_pool import FastMaxPool

LossFn = Callable[[Tensor, Tensor], Tensor]
Params = Dict[str, Tensor]
Inputs = Union[Tensor, Tuple[Tensor, ...]]

__all__ = ["LossFn", "ModelFunctions", "Params", "batch_statistics", "batched_grads", "check_inputs",
           "exact_norms", "num_tasks_of", "take_rows"]


@contextlib.contextmanager
def batch_statistics(model: nn.Module) -> Iterator[None]:
    """BatchNorm layers in training mode use the batch's statistics and update no
    running statistics while inside (inner steps and the query loss of a task batch
    are not a training batch of the model's running averages)."""
    changed = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats:
            m.track_running_stats = False
            changed.append(m)
    try:
        yield
    finally:
        for m in changed:
            m.track_running_stats = True


def _batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
                momentum=0.1, eps=1e-5):
    shape = [1, -1] + [1] * (input.dim() - 2)
    if training or running_mean is None:
        dims = [0] + list(range(2, input.dim()))
        mean = input.mean(dims, keepdim=True)
        var = (input - mean).pow(2).mean(dims, keepdim=True)
    else:
        mean, var = running_mean.view(shape), running_var.view(shape)
    return _affine((input - mean) * torch.rsqrt(var + eps), weight, bias, shape)


def _layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    dims = list(range(input.dim() - len(tuple(normalized_shape)), input.dim()))
    mean = input.mean(dims, keepdim=True)
    var = (input - mean).pow(2).mean(dims, keepdim=True)
    return _affine((input - mean) * torch.rsqrt(var + eps), weight, bias, None)


def _group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):
    g = input.reshape(input.shape[0], num_groups, -1)
    mean = g.mean(-1, keepdim=True)
    var = (g - mean).pow(2).mean(-1, keepdim=True)
    out = ((g - mean) * torch.rsqrt(var + eps)).reshape(input.shape)
    return _affine(out, weight, bias, [1, -1] + [1] * (input.dim() - 2))


def _affine(out, weight, bias, shape):
    if weight is not None:
        out = out * (weight if shape is None else weight.view(shape))
    if bias is not None:
        out = out + (bias if shape is None else bias.view(shape))
    return out


def _updates_running_stats(input, running_mean, running_var, weight=None, bias=None,
                           training=False, momentum=0.1, eps=1e-5) -> bool:
    return bool(training) and running_mean is not None


class _ExactNorms(torch.overrides.TorchFunctionMode):
    """F.batch_norm / layer_norm / group_norm as compositions of elementary ops.

    The vmap batching rules of the fused norm backwards give a wrong second-order
    derivative when the norm has an affine weight (pytorch/functorch#534: about 1e-2
    relative error in MAML's meta-gradient of a BatchNorm net); the composition is
    differentiated exactly."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm and not _updates_running_stats(*args, **kwargs):
            return _batch_norm(*args, **kwargs)
        if func is F.layer_norm:
            return _layer_norm(*args, **kwargs)
        if func is F.group_norm:
            return _group_norm(*args, **kwargs)
        return func(*args, **kwargs)


_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


def exact_norms(model: nn.Module):
    """A context in which the model's norm layers are differentiated exactly to second
    order under vmap (see :class:`_ExactNorms`); a no-op for a model without them."""
    if any(isinstance(m, _NORMS) for m in model.modules()):
        return _ExactNorms()
    return contextlib.nullcontext()


def _thin_linear(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``F.linear`` (``y = x W^T + b``) of a layer with one input or one output feature
    as elementwise ops: ``y = x * W[:, 0] + b`` (one input: an outer product by
    broadcasting) or ``y = sum_i x_i W[0, i] + b`` (one output)."""
    if weight.shape[1] == 1:
        if bias is not None:
            return torch.addcmul(bias, input, weight[:, 0])
        out = input * weight[:, 0]
    else:
        out = (input * weight[0]).sum(-1, keepdim=True)
    return out if bias is None else out + bias


class _ThinLinears(torch.overrides.TorchFunctionMode):
    """CPU ``F.linear`` with one input or one output feature as :func:`_thin_linear`.

    Under vmap a batched weight makes such a layer a batched matrix product of T
    degenerate matrices (sine regression's 1-40-40-1 net has two such layers).  ATen's
    CPU bmm runs a product of fewer than 400 multiply-adds per matrix in a scalar loop,
    about 3 ns per output: 39 us for 64 tasks x 5 rows x 40 outputs, where the
    broadcast multiply takes 10 us; their backward and double backward follow suit.
    Exact (the same products, summed in another order); on the demo's MAML step
    0.89x (15 interleaved repetitions)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            if weight.dim() == 2 and 1 in weight.shape and weight.device.type == "cpu":
                return _thin_linear(*args, **kwargs)
        return func(*args, **kwargs)


def as_tuple(x: Inputs) -> Tuple[Tensor, ...]:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def num_tasks_of(x: Inputs) -> int:
    return int(as_tuple(x)[0].shape[0])


def take_rows(x: Inputs, index: Optional[Tensor]) -> Inputs:
    """``x[index]`` along the task dimension (of every tensor of a tuple); None: x."""
    if index is None:
        return x
    if isinstance(x, (tuple, list)):
        return tuple(t.index_select(0, index.to(t.device)) for t in x)
    return x.index_select(0, index.to(x.device))


def reshape_rows(x: Inputs, groups: int) -> Inputs:
    """[T, ...] -> [groups, T / groups, ...] (of every tensor of a tuple)."""
    if isinstance(x, (tuple, list)):
        return tuple(t.reshape(groups, -1, *t.shape[1:]) for t in x)
    return x.reshape(groups, -1, *x.shape[1:])


def check_inputs(name: str, x, num_tasks: Optional[int], dtype: Optional[torch.dtype] = None,
                 min_dim: int = 2) -> int:
    """A task batch ``[T, n, ...]`` (or a tuple of them): returns T; ValueError naming ``name``."""
    parts = as_tuple(x)
    if not parts:
        raise ValueError(f"{name} is an empty tuple; pass a tensor [T, n, ...] or a tuple of them")
    T = num_tasks
    for i, t in enumerate(parts):
        label = name if len(parts) == 1 and not isinstance(x, (tuple, list)) else f"{name}[{i}]"
        if not isinstance(t, Tensor):
            raise TypeError(f"{label} must be a tensor [T, n, ...], got {type(t).__name__}")
        if t.dim() < min_dim:
            raise ValueError(f"{label} must have a task and an example dimension [T, n, ...], "
                             f"got shape {tuple(t.shape)}")
        if t.shape[0] == 0:
            raise ValueError(f"{label} has no tasks (shape {tuple(t.shape)})")
        if t.shape[1] == 0:
            raise ValueError(f"{label} has no examples per task (shape {tuple(t.shape)}): "
                             "at least one shot is needed")
        if T is not None and t.shape[0] != T:
            raise ValueError(f"{label} has {t.shape[0]} tasks (dim 0) but {T} were expected")
        T = int(t.shape[0])
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            raise ValueError(f"{label} is {t.dtype} but the model's parameters are {dtype}: "
                             f"cast the data (e.g. {name}.to({dtype})) or the model")
    return T


def batched_grads(params: Params, create_graph: bool, total: Callable[[Params], Tensor],
                  shared_rows: Optional[int] = None, has_aux: bool = False):
    """``d total / d params`` by one reverse pass of plain autograd over the batched
    tensors (the forward is vmapped; the backward is not, so it dispatches each op once
    on the whole batch instead of through torch.func's per-level wrappers).

    ``total`` sums independent per-task (or per-node) losses, so the gradient with
    respect to batched parameters ``[N, *shape]`` is every task's own gradient.
    ``shared_rows``: ``params`` are one unbatched set shared by that many tasks (or
    nodes), expanded as stride-0 views so that each gets its own gradient row without
    a copy.
    ``create_graph``: the gradients are differentiable (second order); else they are
    computed at detached parameters, with no graph, in any grad mode.  ``has_aux``:
    ``total`` returns ``(scalar, aux)`` and this returns ``(grads, aux)``.
    """
    names = list(params)
    inputs = []
    with torch.enable_grad():
        for p in params.values():
            if not (create_graph and p.requires_grad):
                p = p.detach().requires_grad_()
            if shared_rows is not None:
                p = p.expand(shared_rows, *p.shape)
            inputs.append(p)
        out = total(dict(zip(names, inputs)))
        out, aux = out if has_aux else (out, None)
        grads = torch.autograd.grad(out, inputs, create_graph=create_graph, allow_unused=True)
    grads = {n: torch.zeros_like(p) if g is None else g for n, p, g in zip(names, inputs, grads)}
    return (grads, aux) if has_aux else grads


class ModelFunctions:
    """``model`` as functions of its adapted parameters, batched over tasks.

    Args:
        model: the module (its other parameters and buffers are used as they are).
        names: the adapted parameters (the inner loop's variables).
        randomness: ``torch.func.vmap`` randomness for Dropout and friends
            ('different': every task draws its own mask; 'same'; 'error').
    """

    def __init__(self, model: nn.Module, names: Sequence[str], randomness: str = "different"):
        self.model = model
        self.names = tuple(names)
        self.randomness = randomness
        # A batched convolution weight makes the batch's convolution a grouped one (one
        # group per task); at shared parameters the step keeps one convolution over
        # every task's inputs instead (see _shared_grads).
        self.adapts_conv = any(isinstance(m, nn.modules.conv._ConvNd)
                               and (f"{prefix}.weight" if prefix else "weight") in self.names
                               for prefix, m in model.named_modules())
        # Linear layers with one input or one output feature run as elementwise ops
        # (see _ThinLinears)
        self.thin_linears = any(isinstance(m, nn.Linear) and 1 in (m.in_features, m.out_features)
                                for m in model.modules())
        # a plain sequential MLP runs as batched products, without vmap (BatchedMLP),
        # and its first-order steps by the backpropagation of mlp_backprop (False:
        # autograd's pass, as for any other model; bench/ab_meta.py switches it off)
        self.mlp = BatchedMLP.of(model)
        self.written_out = True
        # CPU 2 x 2 max pooling as a gather at treepool's indices (treepool.meta.max_pool)
        self.max_pools = any(isinstance(m, nn.MaxPool2d) for m in model.modules())

    def __call__(self, params: Params, x: Inputs) -> Tensor:
        with contextlib.ExitStack() as modes:
            if self.thin_linears:
                modes.enter_context(_ThinLinears())
            if self.max_pools:
                modes.enter_context(FastMaxPool())
            return torch.func.functional_call(self.model, params, as_tuple(x))

    def task_loss(self, loss_fn: LossFn) -> Callable[[Params, Inputs, Tensor], Tensor]:
        def loss(params, x, y):
            return loss_fn(self(params, x), y)
        return loss

    def node_loss(self, loss_fn: LossFn) -> Callable[[Params, Inputs, Tensor], Tensor]:
        """Mean loss of a node's m tasks ([m, n, ...] data) at the node's parameters."""
        per_task = self._vmap(self.task_loss(loss_fn), in_dims=(None, 0, 0))

        def loss(params, xs, ys):
            return per_task(params, xs, ys).mean()
        return loss

    def _vmap(self, fn, in_dims=0):
        """``torch.func.vmap`` with this model's randomness."""
        return torch.func.vmap(fn, in_dims=in_dims, randomness=self.randomness)

    def _shared_grads(self, loss, params: Params, x: Inputs, y: Tensor,
                      create_graph: bool) -> Params:
        """``vmap(grad(loss))`` with ``params`` unbatched: for a model with adapted
        convolutions at shared parameters, where the batch's convolution then stays one
        convolution over every task's inputs; the autograd pass over stride-0 copies
        makes it a grouped one, one group per task.  bench_meta's conv net, 16 and 32
        tasks, second order, interleaved: TreeMAML 0.92-0.97x, MAML 0.98-0.99x of the
        step with the autograd pass here; first order and 4 tasks 0.99-1.01x.  Linear
        layers keep the autograd pass (this measured 1.03-1.05x on the demo)."""
        grads = self._vmap(torch.func.grad(loss), in_dims=(None, 0, 0))
        if create_graph:
            with torch.enable_grad():
                return grads(params, x, y)
        with torch.no_grad():
            return grads({n: p.detach() for n, p in params.items()}, x, y)

    def batched_mlp(self, x: Inputs) -> Optional[BatchedMLP]:
        """The model as batched products for inputs ``x`` (one tensor), or None where it
        must go through vmap: not a plain sequential MLP, several inputs, or a hook."""
        if self.mlp is None or isinstance(x, (tuple, list)) or not self.mlp.usable():
            return None
        return self.mlp

    def _losses(self, loss_fn: LossFn, params: Params, x: Inputs, y: Tensor, lead: int,
                depth: int) -> Tensor:
        """The loss of every task, ``[*x.shape[:depth]]``: x and y hold ``depth`` leading
        task dimensions (1: ``[T]``; 2: ``[C, m]``, the m tasks of node c), ``params``
        ``lead`` of them (0: one set for all; 1: a set per row of the first).  A plain
        sequential MLP runs as batched products (:class:`BatchedMLP`), any other model
        through vmap."""
        mlp = self.batched_mlp(x)
        if mlp is not None:
            return per_task_losses(loss_fn, mlp(params, x, lead), y, depth)
        fn = self.task_loss(loss_fn)
        for level in range(depth):
            fn = self._vmap(fn, in_dims=(0 if level >= depth - lead else None, 0, 0))
        return fn(params, x, y)

    def _batch_grads(self, loss_fn: LossFn, params: Params, x: Inputs, y: Tensor, shared: bool,
                     create_graph: bool, depth: int, weights: Optional[Tensor] = None) -> Params:
        """Gradients, per row of the batch, of the (weighted) mean loss of its tasks."""
        if shared and self.adapts_conv and weights is None:
            loss = self.task_loss(loss_fn) if depth == 1 else self.node_loss(loss_fn)
            return self._shared_grads(loss, params, x, y, create_graph)
        mlp = None if create_graph or not self.written_out else self.batched_mlp(x)
        if mlp is not None:  # first order on a plain MLP: backpropagation written out
            grads = mlp_backprop.first_order_grads(mlp, params, x, y, loss_fn, shared, depth,
                                                   weights)
            if grads is not None:
                return grads

        def total(p):
            out = self._losses(loss_fn, p, x, y, 1, depth)
            if weights is not None:
                return (out * weights.to(out.dtype)).sum()
            return (out.mean(1) if depth == 2 else out).sum()
        return batched_grads(params, create_graph, total, num_tasks_of(x) if shared else None)

    def task_grads(self, params: Params, x: Inputs, y: Tensor, loss_fn: LossFn,
                   shared: bool = False, create_graph: bool = False) -> Params:
        """``{name: [T, *shape]}``: each task's gradient at its own parameters
        (``shared``: one set of parameters, unbatched, for every task)."""
        return self._batch_grads(loss_fn, params, x, y, shared, create_graph, depth=1)

    def node_grads(self, params: Params, xs: Inputs, ys: Tensor, loss_fn: LossFn,
                   shared: bool = False, create_graph: bool = False) -> Params:
        """``{name: [C, *shape]}``: for every node c, the gradient of the mean loss of its
        tasks (data ``[C, m, n, ...]``) at the node's parameters, which equals the mean
        of their per-task gradients (the pooled gradient of TreeMAML)."""
        return self._batch_grads(loss_fn, params, xs, ys, shared, create_graph, depth=2)

    def weighted_node_grads(self, params: Params, xs: Inputs, ys: Tensor, weights: Tensor,
                            loss_fn: LossFn, shared: bool = False,
                            create_graph: bool = False) -> Params:
        """:meth:`node_grads` of ``sum_j weights[c, j] * L_j`` (``weights`` [C, m]; zero
        for the padding rows of a ragged node)."""
        return self._batch_grads(loss_fn, params, xs, ys, shared, create_graph, depth=2,
                                 weights=weights)

    def losses(self, params: Params, x: Inputs, y: Tensor, loss_fn: LossFn,
               shared: bool = False) -> Tensor:
        """[T] losses, task t at its parameters on (x[t], y[t])."""
        return self._losses(loss_fn, params, x, y, 0 if shared else 1, 1)

    def predict(self, params: Params, x: Inputs, shared: bool = False) -> Tensor:
        """[T, ...] outputs, task t's model on x[t]."""
        mlp = self.batched_mlp(x)
        if mlp is not None:
            return mlp(params, x, 0 if shared else 1)
        return self._vmap(self, (None if shared else 0, 0))(params, x)

    def diagnose(self, name: str, params: Params, x: Inputs, error: Exception) -> None:
        """Re-raise a failure of the batched call as a ValueError naming ``name`` when
        one task's data do not fit the model (the usual cause); else return."""
        first = {k: v[0] for k, v in params.items()}
        sample = tuple(t[0] for t in as_tuple(x))
        shapes = ", ".join(str(tuple(t.shape)) for t in sample)
        try:
            with torch.no_grad():
                torch.func.functional_call(self.model, first, sample)
        except Exception as probe:  # noqa: BLE001 - any failure of the model on the data
            raise ValueError(
                f"{name} does not fit the model: one task's input has shape(s) {shapes} "
                f"({len(sample)} input(s)), and {type(self.model).__name__} failed on it with "
                f"{type(probe).__name__}: {probe}") from error
