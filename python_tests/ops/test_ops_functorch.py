"""torch.func over the ops: grad, jacrev, vmap (and vmap of grad, grad of grad) on the
native backend as on the reference, for every op in its single-tensor and list forms.

The native ops carry autograd.Functions that torch.func accepts and batching rules of
their own (treepool/_functorch.py); vmap must not take torch's slow per-example
fallback. Everything is float64 and compared with the reference and with plain loops.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import treepool
from .helpers import BACKENDS, NATIVE, levels

params = pytest.mark.parametrize
F64 = torch.float64
TOL = dict(rtol=1e-10, atol=1e-12)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    yield


# A level with an empty cluster and a node without children: sizes [2, 0, 3, 1].
OFFSETS = torch.tensor([0, 2, 2, 5, 6])
PARENTS = torch.tensor([0, 0, 2, 2])
T, C, C_PREV = 6, 4, 3
SHAPES = [(3,), (2, 2)]  # the list forms: one [*, 3] and one [*, 2, 2] parameter


def _rand(*shape, seed=0, positive=False):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(tuple(shape), generator=g, dtype=F64)
    return t.abs() + 0.25 if positive else t


def _case(op, listed):
    """(fn, inputs): fn(*inputs) runs the op through the public API on float64 inputs,
    every floating input (data, weights, rates) differentiable."""
    w = _rand(T, seed=1, positive=True)
    if not listed:
        if op == "segment_sum":
            return (lambda x, w: treepool.segment_sum(x, OFFSETS, w)), (_rand(T, 3, seed=2), w)
        if op == "segment_mean":
            return (lambda x, w: treepool.segment_mean(x, OFFSETS, w)), (_rand(T, 3, seed=2), w)
        if op == "segment_broadcast":
            return ((lambda g, w: treepool.segment_broadcast(g, OFFSETS, w, True, T)),
                    (_rand(C, 3, seed=3), w))
        if op == "tree_update":
            return ((lambda n, g, w, lr: treepool.tree_update(n, g, OFFSETS, PARENTS, lr, w)),
                    (_rand(C_PREV, 3, seed=4), _rand(T, 3, seed=5), w,
                     _rand(3, seed=6, positive=True)))
        return ((lambda th, ph, w, eps: treepool.reptile_update(th, ph, OFFSETS, eps, w)),
                (_rand(C, 3, seed=7), _rand(T, 3, seed=8), w, _rand(seed=9)))
    a = [_rand(T, *s, seed=10 + i) for i, s in enumerate(SHAPES)]
    if op == "segment_sum":
        return (lambda x0, x1, w: treepool.segment_sum([x0, x1], OFFSETS, w)), (*a, w)
    if op == "segment_mean":
        return (lambda x0, x1, w: treepool.segment_mean([x0, x1], OFFSETS, w)), (*a, w)
    if op == "segment_broadcast":
        g = [_rand(C, *s, seed=20 + i) for i, s in enumerate(SHAPES)]
        return ((lambda g0, g1, w: treepool.segment_broadcast([g0, g1], OFFSETS, w, False, T)),
                (*g, w))
    if op == "tree_update":
        n = [_rand(C_PREV, *s, seed=30 + i) for i, s in enumerate(SHAPES)]
        rates = (_rand(*SHAPES[0], seed=40, positive=True), _rand(seed=41))
        return ((lambda n0, n1, g0, g1, w, r0, r1:
                 treepool.tree_update([n0, n1], [g0, g1], OFFSETS, PARENTS, [r0, r1], w)),
                (*n, *a, w, *rates))
    th = [_rand(C, *s, seed=50 + i) for i, s in enumerate(SHAPES)]
    rates = (_rand(seed=60), _rand(*SHAPES[1], seed=61))
    return ((lambda t0, t1, p0, p1, w, e0, e1:
             treepool.reptile_update([t0, t1], [p0, p1], OFFSETS, [e0, e1], w)),
            (*th, *a, w, *rates))


def _loss(fn):
    """A scalar of the op's outputs with a non-zero second derivative in every input."""
    def loss(*inputs):
        outs = fn(*inputs)
        total = 0.0
        for i, o in enumerate(outs if isinstance(outs, list) else [outs]):
            total = total + (o * o).sum() * 0.5 + (o * (i + 1.5)).sum()
        return total
    return loss


OPS = ["segment_sum", "segment_mean", "segment_broadcast", "tree_update", "reptile_update"]
over_ops = params("op", OPS)
over_forms = params("listed", [False, True], ids=["tensor", "list"])
over_backends = params("backend", BACKENDS)


def _on(backend, f, *args):
    with treepool.use_backend(backend):
        return f(*args)


def _assert_close(got, want):
    got, want = torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL)


def _argnums(inputs):
    return tuple(range(len(inputs)))


@over_backends
@over_forms
@over_ops
def test_grad_matches_autograd_and_reference(op, listed, backend):
    fn, inputs = _case(op, listed)
    loss = _loss(fn)
    got = _on(backend, torch.func.grad(loss, argnums=_argnums(inputs)), *inputs)
    want = _on("reference", torch.func.grad(loss, argnums=_argnums(inputs)), *inputs)
    leaves = [t.clone().requires_grad_() for t in inputs]
    plain = _on(backend, lambda: torch.autograd.grad(loss(*leaves), leaves))
    _assert_close(got, want)
    _assert_close(got, plain)


@over_backends
@over_forms
@over_ops
def test_jacrev_matches_reference(op, listed, backend):
    fn, inputs = _case(op, listed)
    out = (lambda *a: fn(*a) if not listed else torch.cat([o.flatten() for o in fn(*a)]))
    got = _on(backend, torch.func.jacrev(out, argnums=_argnums(inputs)), *inputs)
    want = _on("reference", torch.func.jacrev(out, argnums=_argnums(inputs)), *inputs)
    _assert_close(got, want)


@over_backends
@over_forms
@over_ops
def test_grad_of_grad_matches_create_graph(op, listed, backend):
    """Second order, as second-order MAML needs: torch.func.grad of a function of a
    torch.func.grad, against torch.autograd.grad(create_graph=True) and the reference."""
    fn, inputs = _case(op, listed)
    loss = _loss(fn)
    first = torch.func.grad(loss, argnums=_argnums(inputs))

    def outer(*a):
        return sum((g * g).sum() for g in first(*a))

    got = _on(backend, torch.func.grad(outer, argnums=_argnums(inputs)), *inputs)
    want = _on("reference", torch.func.grad(outer, argnums=_argnums(inputs)), *inputs)

    def plain():
        leaves = [t.clone().requires_grad_() for t in inputs]
        gs = torch.autograd.grad(loss(*leaves), leaves, create_graph=True)
        return torch.autograd.grad(sum((g * g).sum() for g in gs), leaves)

    _assert_close(got, want)
    _assert_close(got, _on(backend, plain))


@over_backends
@over_forms
@over_ops
def test_vmap_of_grad_is_a_loop_of_grads(op, listed, backend):
    """What a meta-learner does: per-task gradients of a batch of tasks by vmap(grad)."""
    fn, inputs = _case(op, listed)
    B = 3
    # The reference reads the weights' values in its checks, which vmap cannot batch:
    # there the weights stay unbatched.
    shared = [backend == "reference" and t.shape == (T,) for t in inputs]
    batched = [t if s else torch.stack([t * (1 + 0.5 * b) for b in range(B)])
               for t, s in zip(inputs, shared)]
    dims = tuple(None if s else 0 for s in shared)
    per_task = torch.func.grad(_loss(fn), argnums=_argnums(inputs))
    with _no_fallback():
        got = _on(backend, torch.vmap(per_task, in_dims=dims), *batched)
    for on in (backend, "reference"):
        loop = [_on(on, per_task, *[t if s else t[b] for t, s in zip(batched, shared)])
                for b in range(B)]
        want = [torch.stack([loop[b][i] for b in range(B)]) for i in range(len(inputs))]
        _assert_close(list(got), want)


class _no_fallback:
    """Fails if vmap takes torch's per-example fallback for any op in the block."""

    def __enter__(self):
        self._warn = warnings.catch_warnings(record=True)
        self._log = self._warn.__enter__()
        warnings.simplefilter("always")
        torch._C._functorch._set_vmap_fallback_warning_enabled(True)

    def __exit__(self, *exc):
        torch._C._functorch._set_vmap_fallback_warning_enabled(False)
        self._warn.__exit__(*exc)
        slow = [str(w.message) for w in self._log if "fallback" in str(w.message)]
        assert not slow, slow


@pytest.mark.skipif(not NATIVE, reason="treepool._C is not built")
@over_forms
@over_ops
def test_vmap_uses_the_batching_rule(op, listed):
    fn, inputs = _case(op, listed)
    batched = [torch.stack([t, 2 * t]) for t in inputs]
    with _no_fallback(), treepool.use_backend("native"):
        torch.vmap(fn)(*batched)
        torch.func.jacrev(lambda *a: torch.utils._pytree.tree_leaves(fn(*a)))(*inputs)


@pytest.mark.skipif(not NATIVE, reason="treepool._C is not built")
def test_func_grad_runs_the_native_kernels():
    """torch.func.grad through the native tree_update runs the compiled ops, forward and
    backward (the rules are made of treepool ops), not the reference."""
    fn, inputs = _case("tree_update", False)
    with treepool.use_backend("native"), torch.autograd.profiler.profile() as prof:
        torch.func.grad(_loss(fn), argnums=(0, 1, 2, 3))(*inputs)
    names = {e.name for e in prof.function_events}
    assert "treepool::tree_update" in names
    assert "treepool::segment_broadcast" in names


# --------------------------------------------------------------- vmap against a loop


def _batched(t, dim, B, seed, positive=False):
    """A random batch of B tensors shaped like t, stacked at dim (None: t itself)."""
    if dim is None:
        return t
    d = dim % (t.dim() + 1)
    return torch.stack([_rand(*t.shape, seed=seed + b, positive=positive) for b in range(B)], d)


def _select(t, dim, b):
    return t if dim is None else t.select(dim, b)


@st.composite
def vmap_cases(draw):
    level = draw(levels(max_rows=10))
    P = draw(st.integers(0, 3))
    B = draw(st.sampled_from([1, 2, 3]))
    op = draw(st.sampled_from(OPS))
    listed = draw(st.booleans())
    data_dim = st.sampled_from([None, 0, 1, -1])
    return dict(level=level, P=P, B=B, op=op, listed=listed,
                dims=[draw(data_dim) for _ in range(4)],
                weights=draw(st.sampled_from(["none", "fixed", "batched"])),
                rate=draw(st.sampled_from(["float", "0d", "0d-batched", "P", "P-batched"])),
                index_batched=draw(st.booleans()),
                seed=draw(st.integers(0, 1000)))


@pytest.mark.skipif(not NATIVE, reason="treepool._C is not built")
@settings(max_examples=60)
@given(vmap_cases())
def test_vmap_matches_a_loop_and_the_reference(case):
    """vmap of every op, with drawn shapes, in_dims (on data, weights, rates, offsets and
    parents) and batch sizes (1 included), equals a Python loop over the batch on the
    native backend and on the reference."""
    lv, P, B, seed = case["level"], case["P"], case["B"], case["seed"]
    op, listed, dims = case["op"], case["listed"], case["dims"]
    offsets, parents = lv.offsets_tensor(), lv.parents_tensor()
    rows = {"segment_sum": (lv.T,), "segment_mean": (lv.T,), "segment_broadcast": (lv.C,),
            "tree_update": (lv.num_prev, lv.T), "reptile_update": (lv.C, lv.T)}[op]
    shapes = [(P,), (2, P)] if listed else [(P,)]
    # args: one data tensor per (row count, shape), then weights, offsets, parents, rates
    args, in_dims = [], []
    for k, r in enumerate(rows):
        for j, s in enumerate(shapes):
            dim = dims[(2 * k + j) % 4]
            args.append(_batched(_rand(r, *s), dim, B, seed + 10 * len(args)))
            in_dims.append(dim)
    w = _rand(lv.T, seed=seed + 99, positive=True)
    if case["weights"] == "none":
        w_dim, w = None, None
    else:
        w_dim = 0 if case["weights"] == "batched" else None
        w = _batched(w, w_dim, B, seed + 77, positive=True)
    args.append(w)
    in_dims.append(w_dim)
    idx_dim = 0 if case["index_batched"] else None
    if idx_dim is not None:  # the same index tensors per batch element: another in_dim
        offsets = offsets.expand(B, -1).clone()
        parents = parents.expand(B, -1).clone()
    args += [offsets, parents]
    in_dims += [idx_dim, idx_dim]
    rate_dim = 0 if case["rate"].endswith("batched") else None
    n_rates = 0
    if case["rate"] != "float" and op in ("tree_update", "reptile_update"):
        for j, s in enumerate(shapes):
            base = _rand(*(s if case["rate"].startswith("P") else ()), seed=seed + 55 + j)
            args.append(_batched(base, rate_dim, B, seed + 60 + j))
            in_dims.append(rate_dim)
            n_rates += 1
    n_data = len(rows) * len(shapes)
    if all(d is None for d in in_dims):  # vmap needs one batched input
        args[0], in_dims[0] = _batched(args[0], 0, B, seed + 5), 0

    def call(*a):
        data, (w, offsets, parents), rates = a[:n_data], a[n_data:n_data + 3], a[n_data + 3:]
        pick = (lambda k: list(data[k * len(shapes):(k + 1) * len(shapes)])) if listed else \
               (lambda k: data[k])
        rate = (list(rates) if listed else rates[0]) if rates else 0.7
        if op == "segment_sum":
            return treepool.segment_sum(pick(0), offsets, w)
        if op == "segment_mean":
            return treepool.segment_mean(pick(0), offsets, w)
        if op == "segment_broadcast":
            return treepool.segment_broadcast(pick(0), offsets, w, True, lv.T)
        if op == "tree_update":
            return treepool.tree_update(pick(0), pick(1), offsets, parents, rate, w)
        return treepool.reptile_update(pick(0), pick(1), offsets, rate, w)

    with _no_fallback(), treepool.use_backend("native"):
        got = torch.vmap(call, in_dims=tuple(in_dims))(*args)
    for backend in ("native", "reference"):
        loop = [_on(backend, call, *[_select(a, d, b) for a, d in zip(args, in_dims)])
                for b in range(B)]
        if listed:
            want = [torch.stack([loop[b][i] for b in range(B)]) for i in range(len(shapes))]
        else:
            want = torch.stack(loop)
        _assert_close(got, want)
