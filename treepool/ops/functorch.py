"""Autograd and vmap of the native ops in a form that torch.func accepts.

``torch.library.register_autograd`` builds an autograd.Function without a
``setup_context``, which torch.func (grad, jacrev, vmap of grad, ...) refuses. So each
functional op gets here:

- a new-style ``torch.autograd.Function`` (``forward`` without ctx, ``setup_context``,
  ``backward``, ``vmap``) whose forward runs the op below autograd. Its setup and
  backward are the rules of _autograd.py / _autograd_multi.py, made of the ops
  themselves, so gradients of gradients work, under torch.func too;
- an ``Autograd`` kernel (Python) that applies the Function when a gradient may be
  needed, else runs the op below autograd (the plain-autograd path);
- a ``FuncTorchDynamicLayerFrontMode`` kernel that applies the Function whenever a
  torch.func transform is active. It must sit there, at the entry of the transforms,
  and not in the Autograd kernel: by the time functorch's C++ fallback reaches an
  Autograd kernel it has masked the functorch keys, and ``Function.apply`` (which
  goes through the ``custom_function_call`` higher-order op) finds no transform to
  dispatch to. Outside torch.func that key is not set, so this costs nothing there;
- a batching rule (``torch.library.register_vmap``, also the Function's ``vmap``):
  the columns P of every op are independent, so a batch dimension of the data tensors
  (x, g, grads, node_params, theta, phi, and per-column rates) folds into the columns,
  [T, B, P] -> [T, B * P], for one kernel call per batch. A batched offsets, parents or
  weights cannot fold: the rule then calls the op once per batch element.

List forms pass their tensors flat through the Function (autograd.Function tracks
only top-level tensors) and are folded tensor by tensor.
"""

from __future__ import annotations

import torch

ops = torch.ops.treepool
_lib = torch.library.Library("treepool", "IMPL")  # noqa: TOR901


def _flatten(args):
    """The op's arguments with every list spread out, and the list lengths (None for
    an argument that is not a list) to undo it."""
    flat, spec = [], []
    for a in args:
        if isinstance(a, (list, tuple)):
            spec.append(len(a))
            flat.extend(a)
        else:
            spec.append(None)
            flat.append(a)
    return flat, tuple(spec)


def _unflatten(flat, spec):
    out, i = [], 0
    for s in spec:
        if s is None:
            out.append(flat[i])
            i += 1
        else:
            out.append(list(flat[i:i + s]))
            i += s
    return out


def _defaults(op):
    return [a.default_value if a.has_default_value() else None for a in op._schema.arguments]


def _full(args, defaults):
    """args with the trailing defaults the dispatcher dropped put back."""
    return tuple(args) + tuple(defaults[len(args):])


class _OpCtx:
    """The ctx the backward rules expect: needs_input_grad per op argument (a tuple per
    list argument) rather than per flattened argument."""

    def __init__(self, ctx, needs):
        self._ctx, self.needs_input_grad = ctx, needs

    def __getattr__(self, name):
        return getattr(self._ctx, name)


# ------------------------------------------------------------------------ batching rules

def _fold(t, bdim, B):
    """[rows, B, P] folded to [rows, B * P] (an unbatched t is repeated B times)."""
    if bdim is None:
        t = t.unsqueeze(1).expand(t.shape[0], B, *t.shape[1:])
    else:
        t = t.movedim(bdim, 1)
    return t.reshape(t.shape[0], t.shape[1:].numel())


def _fold_rate(r, bdim, B, P):
    """A rate (0-d or [P], batched or not) for the folded [*, B * P] columns."""
    if r is None or (bdim is None and r.dim() == 0):
        return r
    if bdim is not None:
        r = r.movedim(bdim, 0)
        if r.dim() == 1:
            r = r[:, None]
    return r.expand(B, P).reshape(B * P)


def _select(a, d, b):
    if isinstance(a, list):
        return [_select(t, di, b) for t, di in zip(a, d)]
    return a if d is None else a.select(d, b)


def _any_batched(d):
    if isinstance(d, (list, tuple)):
        return any(x is not None for x in d)
    return d is not None


def _make_rule(op, data, rate, index, multi):
    """The batching rule of op. data: positions of the data tensors (or lists), rate:
    position of the rate tensor (or list) or None, index: positions of offsets,
    parents and weights, which cannot fold."""
    defaults = _defaults(op)

    def rule(info, in_dims, *args):
        args = list(_full(args, defaults))
        in_dims = list(in_dims) + [None] * (len(args) - len(in_dims))
        B = info.batch_size
        if any(_any_batched(in_dims[i]) for i in index):
            outs = [op(*[_select(a, d, b) for a, d in zip(args, in_dims)]) for b in range(B)]
            if multi:
                return [torch.stack(list(o)) for o in zip(*outs)], 0
            return torch.stack(outs), 0
        ref = data[-1]  # grads / phi / x / g: its columns are the op's P
        if multi:
            widths = [t.shape[-1] for t in _select(args[ref], in_dims[ref], 0)]
            for i in data:
                args[i] = [_fold(t, d, B) for t, d in zip(args[i], in_dims[i])]
            if rate is not None and args[rate] is not None:
                args[rate] = [_fold_rate(r, d, B, P)
                              for r, d, P in zip(args[rate], in_dims[rate], widths)]
            outs = op(*args)
            return [o.reshape(o.shape[0], B, P) for o, P in zip(outs, widths)], 1
        P = _select(args[ref], in_dims[ref], 0).shape[-1]
        for i in data:
            args[i] = _fold(args[i], in_dims[i], B)
        if rate is not None:
            args[rate] = _fold_rate(args[rate], in_dims[rate], B, P)
        out = op(*args)
        return out.reshape(out.shape[0], B, P), 1

    return rule


# ---------------------------------------------------------------------- the registration

def _make_function(op, setup, backward, rule, multi):
    class Fn(torch.autograd.Function):
        @staticmethod
        def forward(spec, *flat):
            with torch._C._AutoDispatchBelowAutograd():
                out = op(*_unflatten(flat, spec))
            return tuple(out) if multi else out

        @staticmethod
        def setup_context(ctx, inputs, output):
            spec, *flat = inputs
            ctx.spec = spec
            setup(ctx, tuple(_unflatten(flat, spec)), list(output) if multi else output)

        @staticmethod
        def backward(ctx, *grads):
            spec = ctx.spec
            needs = []
            for n, s in zip(_unflatten(ctx.needs_input_grad[1:], ctx.spec), spec):
                needs.append(tuple(n) if s is not None else n)
            got = backward(_OpCtx(ctx, tuple(needs)), list(grads) if multi else grads[0])
            got = list(got) + [None] * (len(spec) - len(got))
            flat = [None]
            for g, s in zip(got, spec):
                if s is None:
                    flat.append(g)
                else:
                    flat.extend(g if g is not None else [None] * s)
            return tuple(flat)

        @staticmethod
        def vmap(info, in_dims, spec, *flat):
            out, out_dims = rule(info, _unflatten(in_dims[1:], spec), *_unflatten(flat, spec))
            return (tuple(out), out_dims) if multi else (out, out_dims)

    Fn.__name__ = Fn.__qualname__ = "".join(p.title() for p in op._schema.name.split("::")[1]
                                            .split("_")) + "Function"
    return Fn


# Which arguments of each op are data, rate and index tensors (positions in the schema).
_ROLES = {
    "segment_sum": ((0,), None, (1, 2)),
    "segment_mean": ((0,), None, (1, 2)),
    "segment_broadcast": ((0,), None, (1, 2)),
    "tree_update": ((0, 1), 6, (2, 3, 4)),
    "reptile_update": ((0, 1), 5, (2, 3)),
}


def register(name, setup, backward):
    """Registers the Autograd kernel and the batching rule of treepool::<name>, whose
    gradient is given by setup(ctx, inputs, output) and backward(ctx, grad)."""
    multi = name.endswith("_multi")
    op = getattr(ops, name).default
    data, rate, index = _ROLES[name[:-len("_multi")] if multi else name]
    rule = _make_rule(op, data, rate, index, multi)
    fn = _make_function(op, setup, backward, rule, multi)
    defaults = _defaults(op)

    def apply(*args):
        flat, spec = _flatten(_full(args, defaults))
        out = fn.apply(spec, *flat)
        return list(out) if multi else out

    def autograd_kernel(*args):
        if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
            return apply(*args)
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)

    _lib.impl(name, autograd_kernel, "Autograd")
    _lib.impl(name, apply, "FuncTorchDynamicLayerFrontMode")
    # Under torch.func the Function's vmap runs the rule; registered on the op as well,
    # it also serves a vmap that reaches the op's batched key directly.
    torch.library.register_vmap(f"treepool::{name}", rule, lib=_lib)
    return fn


# ---------------------------------------------------------------------- max_pool2d_indices

def _max_pool_indices_below_autograd(x, kernel_size):
    """Integer indices: nothing to differentiate, so the op runs below autograd."""
    with torch._C._AutoDispatchBelowAutograd():
        return ops.max_pool2d_indices(x, kernel_size)


def _max_pool_indices_rule(info, in_dims, x, kernel_size):
    """Every plane [H, W] of x is pooled alone: a batch dimension among the leading
    dimensions stays where it is (no copy); one of the last two moves to the front."""
    dim = in_dims[0]
    if dim is None:
        return ops.max_pool2d_indices(x, kernel_size), None
    if dim < x.dim() - 2:
        return ops.max_pool2d_indices(x, kernel_size), dim
    return ops.max_pool2d_indices(x.movedim(dim, 0), kernel_size), 0


_lib.impl("max_pool2d_indices", _max_pool_indices_below_autograd, "Autograd")
torch.library.register_vmap("treepool::max_pool2d_indices", _max_pool_indices_rule, lib=_lib)
