"""The list forms of the ops (one tensor per model parameter, one dispatch for all).

Every list form is checked against the float64 oracles of helpers.py tensor by
tensor, on both backends, with hypothesis-drawn trees, trailing shapes (1-D, 2-D,
3-D and wider), dtypes, weights and rates (float, 0-d, per-tensor lists); then
gradcheck/gradgradcheck, opcheck of the *_multi schemas, the MAML-level fast path
against the segment path, and thread-count independence.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.autograd import gradcheck, gradgradcheck

import treepool
from .helpers import (BACKENDS, DTYPES, HALF, WEIGHT_KINDS, assert_matches_exact, exact_broadcast,
                     exact_mean, exact_reptile_update, exact_sums, exact_tree_update, gen, levels,
                     make_weights, needs_native)

params = pytest.mark.parametrize

TRAILING = st.sampled_from([(), (1,), (3,), (2, 2), (2, 1, 3), (7,)])
RATES = ["float", "scalar", "list"]
OPS = ["segment_sum", "segment_mean", "segment_broadcast", "tree_update", "tree_update_",
       "reptile_update", "reptile_update_"]


def randn(shape, dtype, g):
    """Values drawn in float64 and rounded once to dtype; any shape, () included."""
    return torch.randn(tuple(shape), generator=g, dtype=torch.float64).to(dtype)


def flat(t):
    """[N, *shape] as [N, numel(shape)], what the oracles take."""
    return t.reshape(t.shape[0], math.prod(t.shape[1:]))


def make_rate(kind, shapes, dtype, g):
    """lr / eps of a list form: a float, one 0-d tensor, or a list (0-d or shape_i each)."""
    if kind == "float":
        return float(torch.empty(()).uniform_(-1.5, 1.5, generator=g))
    if kind == "scalar":
        return torch.empty((), dtype=torch.float64).uniform_(-1.5, 1.5, generator=g).to(dtype)
    out = []
    for i, s in enumerate(shapes):
        shape = () if i % 2 else s
        out.append(torch.empty(shape, dtype=torch.float64).uniform_(-1.5, 1.5, generator=g).to(dtype))
    return out


def rate_of(rate, i):
    """The rate of tensor i as the oracle takes it (a float or a 0-d / flat tensor)."""
    if isinstance(rate, list):
        return rate[i].reshape(-1) if rate[i].dim() else rate[i]
    return rate


@given(level=levels(max_rows=24), shapes=st.lists(TRAILING, min_size=1, max_size=4),
       dtype=st.sampled_from(DTYPES), wkind=st.sampled_from(WEIGHT_KINDS),
       rkind=st.sampled_from(RATES), seed=st.integers(0, 2 ** 16))
@params("op", OPS)
@params("backend", BACKENDS)
def test_list_form_matches_oracle(op, backend, level, shapes, dtype, wkind, rkind, seed):
    g = gen(seed)
    T, C, offsets = level.T, level.C, level.offsets_tensor()
    weights = make_weights(wkind, level, dtype, g)
    rows = C if op == "segment_broadcast" else T
    x = [randn((rows, *s), dtype, g) for s in shapes]
    node = [randn((level.num_prev, *s), dtype, g) for s in shapes]
    theta = [randn((C, *s), dtype, g) for s in shapes]
    rate = make_rate(rkind, shapes, dtype, g)
    before = [t.clone() for t in x + node]
    theta0 = [t.clone() for t in theta]
    n_terms = max(level.max_size, 1)
    with treepool.use_backend(backend), torch.no_grad():
        if op == "segment_sum":
            out = treepool.segment_sum(x, offsets, weights)
        elif op == "segment_mean":
            out = treepool.segment_mean(tuple(x), offsets, weights)
        elif op == "segment_broadcast":
            out = treepool.segment_broadcast(x, offsets, weights, mean=bool(seed % 2), num_rows=T)
        elif op == "tree_update":
            out = treepool.tree_update(node, x, offsets, level.parents_tensor(), rate, weights)
        elif op == "tree_update_":
            out = [torch.full((C, *s), float("nan"), dtype=dtype) for s in shapes]
            assert treepool.tree_update_(out, node, x, offsets, level.parents_tensor(), rate,
                                         weights) is out
        elif op == "reptile_update":
            out = treepool.reptile_update(theta, x, offsets, rate, weights)
        else:
            out = theta
            assert treepool.reptile_update_(theta, x, offsets, rate, weights) is theta
    assert isinstance(out, list) and len(out) == len(shapes)
    for i, s in enumerate(shapes):
        if op == "segment_sum":
            exact, _, scale = exact_sums(flat(x[i]), level.offsets, weights)
        elif op == "segment_mean":
            exact, scale = exact_mean(flat(x[i]), level.offsets, weights)
        elif op == "segment_broadcast":
            exact = exact_broadcast(flat(x[i]), level.offsets, weights, bool(seed % 2), T)
            scale = exact.abs()
        elif op.startswith("tree_update"):
            exact, scale = exact_tree_update(flat(node[i]), flat(x[i]), level.offsets,
                                             level.parents, rate_of(rate, i), weights)
        else:
            exact, scale = exact_reptile_update(flat(theta0[i]), flat(x[i]),
                                                level.offsets, rate_of(rate, i), weights)
        assert tuple(out[i].shape) == (exact.shape[0], *s), f"{op}[{i}]: shape {out[i].shape}"
        assert_matches_exact(flat(out[i]), exact, scale, dtype, n_terms, f"{op}[{i}] {backend}")
    for b, a in zip(before + (theta0 if op != "reptile_update_" else []),
                    x + node + (theta if op != "reptile_update_" else [])):
        assert torch.equal(b, a), f"{op} modified an input"


# ----------------------------------------------------------------------------- gradients


def _grad_inputs(seed=0, dtype=torch.float64):
    """A level with an empty cluster and a childless node, three tensors of trailing
    shapes (), (2,) and (1, 2), weights and a per-tensor rate list, all requiring grad."""
    g = gen(seed)
    offsets, parents, num_prev = torch.tensor([0, 2, 2, 5]), torch.tensor([0, 0, 2]), 3
    shapes = [(), (2,), (1, 2)]

    def leaf(*shape, low=None):
        t = randn(shape, dtype, g) if low is None else torch.rand(*shape, generator=g,
                                                                  dtype=dtype) + low
        return t.requires_grad_()

    x = [leaf(5, *s) for s in shapes]
    node = [leaf(num_prev, *s) for s in shapes]
    theta = [leaf(3, *s) for s in shapes]
    rate = [leaf(*s) for s in shapes]
    w = leaf(5, low=0.2)
    return offsets, parents, x, node, theta, rate, w


def _grad_fn(op, offsets, parents, n):
    """op as a function of flat tensors (x..., node..., theta..., rate..., w)."""
    def split(args):
        return [list(args[k * n:(k + 1) * n]) for k in range(4)] + [args[-1]]

    def f(*args):
        x, node, theta, rate, w = split(args)
        if op == "segment_sum":
            return tuple(treepool.segment_sum(x, offsets, w))
        if op == "segment_mean":
            return tuple(treepool.segment_mean(x, offsets, w))
        if op == "segment_broadcast":
            return tuple(treepool.segment_broadcast(theta, offsets, w, mean=True, num_rows=5))
        if op == "tree_update":
            return tuple(treepool.tree_update(node, x, offsets, parents, rate, w))
        return tuple(treepool.reptile_update(theta, x, offsets, rate, w))
    return f


@params("op", ["segment_sum", "segment_mean", "segment_broadcast", "tree_update",
               "reptile_update"])
@params("backend", BACKENDS)
def test_list_form_gradcheck_and_gradgradcheck(op, backend):
    offsets, parents, x, node, theta, rate, w = _grad_inputs()
    args = (*x, *node, *theta, *rate, w)
    f = _grad_fn(op, offsets, parents, len(x))
    with treepool.use_backend(backend):
        assert gradcheck(f, args)
        assert gradgradcheck(f, args)


@params("backend", BACKENDS)
def test_list_form_float_rate_gradgradcheck(backend):
    """A float lr (no rate tensor) and no weights, the plain MAML call."""
    offsets, parents, x, node, _, _, _ = _grad_inputs(seed=3)
    n = len(x)

    def f(*args):
        return tuple(treepool.tree_update(list(args[n:]), list(args[:n]), offsets, parents, 0.3))
    with treepool.use_backend(backend):
        assert gradgradcheck(f, (*x, *node))


# ----------------------------------------------------------------------------- opcheck


def _multi_samples():
    offsets, parents, x, node, theta, rate, w = _grad_inputs(seed=5, dtype=torch.float32)
    xs, ns, ts = [flat(t) for t in x], [flat(t) for t in node], [flat(t) for t in theta]
    rs = [r.reshape(-1) if r.dim() else r for r in rate]
    plain = [t.detach().clone() for t in ts]
    ident = torch.arange(6)
    return [
        ("segment_sum_multi", (xs, offsets, w)),
        ("segment_mean_multi", (xs, offsets, None)),
        ("segment_broadcast_multi", (ts, offsets, w, True, 5)),
        ("tree_update_multi", (ns, xs, offsets, parents, w, 1.0, rs)),
        ("tree_update_multi", (ns, xs, offsets, parents, None, 0.4, None)),
        ("tree_update_multi", ([t.detach()[:1].expand(5, -1).clone().requires_grad_() for t in ns],
                               xs, ident, ident[:5], None, 0.4, None)),
        ("tree_update_multi_", ([p.clone() for p in plain], [n.detach() for n in ns],
                                [t.detach() for t in xs], offsets, parents, None, 0.4, None)),
        ("reptile_update_multi", (ts, xs, offsets, w, 1.0, rs)),
        ("reptile_update_multi_", ([p.clone() for p in plain], [t.detach() for t in xs],
                                   offsets, None, 0.5, [r.detach() for r in rs])),
    ]


@needs_native
@params("index", range(len(_multi_samples())))
def test_opcheck_multi(index):
    torch.set_num_threads(1)
    name, args = _multi_samples()[index]
    torch.library.opcheck(getattr(torch.ops.treepool, name).default, args)


# ----------------------------------------------------------------------------- MAML level


@params("form", ["list", "single"])
@params("backend", BACKENDS)
@params("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_maml_level_fast_path_equals_segment_path(backend, dtype, form):
    """One row per cluster and identity parents (plus a childless node): the fast path
    (no weights) gives bitwise what the segment path gives (weights of one)."""
    T = 6
    offsets, parents = torch.arange(T + 1), torch.arange(T)
    shapes = [(), (3,), (2, 2)] if form == "list" else [(5,)]
    grad_req = dtype != torch.bfloat16

    def make():
        x = [randn((T, *s), dtype, gen(2)).requires_grad_(grad_req) for s in shapes]
        node = [randn((T + 1, *s), dtype, gen(3)).requires_grad_(grad_req) for s in shapes]
        lr = [randn(s, dtype, gen(4)).requires_grad_(grad_req) for s in shapes]
        return x, node, lr

    results = []
    for weights in (None, torch.ones(T, dtype=dtype)):
        x, node, lr = make()
        with treepool.use_backend(backend):
            if form == "list":
                out = treepool.tree_update(node, x, offsets, parents, lr, weights)
            else:
                out = [treepool.tree_update(node[0], x[0], offsets, parents, lr[0], weights)]
            grads = []
            if grad_req:
                g = gen(1)
                loss = sum((o * randn(o.shape, dtype, g)).sum() for o in out)
                grads = torch.autograd.grad(loss, x + node + lr)
        results.append((out, grads))
    (fast, fast_grads), (seg, seg_grads) = results
    for a, b in zip(fast + list(fast_grads), seg + list(seg_grads)):
        assert torch.equal(a, b)


@needs_native
def test_maml_level_backward_runs_no_segment_pass(monkeypatch):
    """The backward of a MAML level calls no treepool op at all (single and list form)."""
    import treepool.ops.autograd as single
    import treepool.ops.autograd_multi as multi

    class NoSegmentPass:
        def __getattr__(self, name):
            raise AssertionError(f"the backward of a MAML level ran treepool.{name}")

    monkeypatch.setattr(single, "ops", NoSegmentPass())
    monkeypatch.setattr(multi, "ops", NoSegmentPass())
    T = 4
    offsets, parents = torch.arange(T + 1), torch.arange(T)
    node = [torch.randn(T, 3, requires_grad=True), torch.randn(T, requires_grad=True)]
    x = [torch.randn(T, 3, requires_grad=True), torch.randn(T, requires_grad=True)]
    lr = [torch.rand(3, requires_grad=True), torch.rand((), requires_grad=True)]
    out = treepool.tree_update(node, x, offsets, parents, lr)
    out += [treepool.tree_update(node[0], x[0], offsets, parents, lr[0])]
    grads = torch.autograd.grad(sum(o.sum() for o in out), node + x + lr)
    assert torch.equal(grads[0], torch.full((T, 3), 2.0))
    assert torch.equal(grads[2], -2 * lr[0].detach().expand(T, 3))


def test_maml_level_is_detected_exactly():
    from treepool.ops.autograd import is_maml_level
    ar = torch.arange(5)
    assert is_maml_level(ar, ar[:4], None, 4)
    assert not is_maml_level(ar, ar[:4], torch.ones(4), 4)  # weights: segment path
    assert not is_maml_level(ar, torch.tensor([0, 1, 1, 3]), None, 4)
    assert not is_maml_level(torch.tensor([0, 1, 2, 2, 4]), ar[:4], None, 4)
    assert not is_maml_level(torch.tensor([0, 2, 4]), ar[:2], None, 4)


# ----------------------------------------------------------------------------- threads


@needs_native
@params("op", ["segment_mean", "tree_update", "segment_broadcast"])
def test_list_form_is_deterministic_across_thread_counts(op):
    """Long clusters and narrow tensors, so that rows are cut into chunks (the second
    pass runs): the result is bitwise the same on 1 and 2 threads."""
    T, g = 20000, gen(7)
    offsets = torch.tensor([0, 3, 15000, 15001, T])
    x = [randn((T, *s), torch.float32, g) for s in [(), (3,), (2, 2)]]
    node = [randn((1, *s), torch.float32, g) for s in [(), (3,), (2, 2)]]
    parents = torch.zeros(4, dtype=torch.int64)
    w = torch.rand(T, generator=g)

    def run():
        if op == "segment_mean":
            return treepool.segment_mean(x, offsets, w)
        if op == "tree_update":
            return treepool.tree_update(node, x, offsets, parents, 0.1, w)
        return treepool.segment_broadcast([t[:4] for t in x], offsets, w, True, T)

    outs = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        outs.append(run())
    for a, b in zip(*outs):
        assert torch.equal(a, b)


_THREAD_PROBE = """
import os, torch, treepool
torch.set_num_threads(4)
def threads():
    return len(os.listdir('/proc/self/task'))
x = [torch.randn(8, 3), torch.randn(8)]
o = torch.tensor([0, 3, 8])
start = threads()
for _ in range(3):
    treepool.segment_mean(x, o)
    treepool.tree_update([t[:1] for t in x], x, o, torch.tensor([0, 0]), 0.1)
    treepool.segment_broadcast([t[:2] for t in x], o, None, True, 8)
small = threads()
big = torch.randn(4096, 64)
treepool.segment_sum([big], torch.tensor([0, 4096]))
print(start, small, threads())
"""


@needs_native
@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc")
def test_small_ops_run_on_the_calling_thread():
    """A small op opens no parallel region, so no worker thread is ever started (the
    big op at the end shows that the probe sees the workers when they are)."""
    env = dict(os.environ, OMP_NUM_THREADS="4")
    out = subprocess.run([sys.executable, "-c", _THREAD_PROBE], capture_output=True, text=True,
                         env=env, cwd=os.path.dirname(os.path.dirname(treepool.__file__)),
                         timeout=120)
    assert out.returncode == 0, out.stderr
    start, small, big = map(int, out.stdout.split())
    assert small == start
    assert big > start
