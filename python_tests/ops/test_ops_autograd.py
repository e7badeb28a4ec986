"""Autograd of every op: torch.autograd.gradcheck and gradgradcheck in float64 for every
differentiable input (x/grads/phi/g, node_params, theta, weights, lr, eps) on both
backends; zero-weight clusters pass back 0, never NaN; gradients in every dtype match
the float64 gradients of an independent, differentiable oracle written with torch ops.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import treepool
from .helpers import (
    AVAILABLE_BACKENDS, BACKENDS, DEVICES, DTYPES, HALF, NATIVE, dtype_id, gen, levels,
    make_weights, max_rows_for,
)

params = pytest.mark.parametrize


@pytest.fixture(autouse=True)
def _one_thread():
    """These checks are about the math, not threading (test_ops_layout.py covers thread
    counts). With 2 threads the CPU kernels open an OpenMP region even for the tiny
    inputs used here (the second pass of segment_reduce has grain 1), which costs
    milliseconds per call on a busy machine and made these tests 20x slower."""
    torch.set_num_threads(1)
    yield

over_backends = params("backend", BACKENDS)
over_devices = params("device", DEVICES)

F64 = torch.float64

# (cluster sizes, parents, number of nodes of the level above, P)
LAYOUTS = {
    "mixed": ([2, 0, 3, 1], [0, 0, 2, 2], 3, 3),     # an empty cluster, a childless node
    "one-cluster": ([4], [0], 1, 2),
    "singletons": ([1, 1, 1], [0, 1, 2], 3, 2),
}


def offsets_of(sizes):
    o = [0]
    for s in sizes:
        o.append(o[-1] + s)
    return o


class Config:
    """One op with a set of differentiable inputs; `call(**inputs)` runs it."""

    def __init__(self, name, inputs, call):
        self.name, self.inputs, self.call = name, inputs, call


def make_config(kind, layout, device, seed=0):
    sizes, parents, num_prev, P = LAYOUTS[layout]
    g = gen(seed)
    T, C = sum(sizes), len(sizes)
    offsets = torch.tensor(offsets_of(sizes), device=device)
    par = torch.tensor(parents, device=device)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=F64).to(device)

    # Weights away from 0: the numerical derivative must stay in the domain w >= 0 and
    # away from the kink of an all-zero cluster.
    w = (torch.rand(T, generator=g, dtype=F64) + 0.5).to(device)
    op, _, variant = kind.partition(":")
    if op in ("segment_sum", "segment_mean"):
        fn = getattr(treepool, op)
        if variant == "unweighted":
            return Config(kind, dict(x=rnd(T, P)), lambda x: fn(x, offsets))
        return Config(kind, dict(x=rnd(T, P), w=w), lambda x, w: fn(x, offsets, w))
    if op == "segment_broadcast":
        mean = variant.startswith("mean")
        if variant.endswith("unweighted"):
            return Config(kind, dict(g=rnd(C, P)),
                          lambda g: treepool.segment_broadcast(g, offsets, None, mean, T))
        return Config(kind, dict(g=rnd(C, P), w=w),
                      lambda g, w: treepool.segment_broadcast(g, offsets, w, mean, T))
    if op == "tree_update":
        inputs = dict(node=rnd(num_prev, P), grads=rnd(T, P), w=w)
        if variant == "float":
            return Config(kind, inputs, lambda node, grads, w:
                          treepool.tree_update(node, grads, offsets, par, 0.7, w))
        inputs["lr"] = rnd(P) if variant == "vector" else rnd(())
        return Config(kind, inputs, lambda node, grads, w, lr:
                      treepool.tree_update(node, grads, offsets, par, lr, w))
    if op == "reptile_update":
        inputs = dict(theta=rnd(C, P), phi=rnd(T, P), w=w)
        if variant == "float":
            return Config(kind, inputs, lambda theta, phi, w:
                          treepool.reptile_update(theta, phi, offsets, 0.3, w))
        inputs["eps"] = rnd(P) if variant == "vector" else rnd(())
        return Config(kind, inputs, lambda theta, phi, w, eps:
                      treepool.reptile_update(theta, phi, offsets, eps, w))
    raise AssertionError(kind)


KINDS = ["segment_sum", "segment_sum:unweighted", "segment_mean", "segment_mean:unweighted",
         "segment_broadcast:sum", "segment_broadcast:mean", "segment_broadcast:mean-unweighted",
         "tree_update:float", "tree_update:scalar", "tree_update:vector",
         "reptile_update:float", "reptile_update:scalar", "reptile_update:vector"]


def run_check(check, cfg, grad_names, backend, fast_mode=False):
    names = list(cfg.inputs)
    inputs = [cfg.inputs[n].detach().clone().requires_grad_(n in grad_names) for n in names]

    def fn(*args):
        return cfg.call(**dict(zip(names, args)))

    with treepool.use_backend(backend):
        assert check(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=fast_mode)


@over_devices
@over_backends
@params("layout", list(LAYOUTS))
@params("kind", KINDS)
def test_gradcheck_all_inputs(kind, layout, backend, device):
    cfg = make_config(kind, layout, device)
    run_check(torch.autograd.gradcheck, cfg, set(cfg.inputs), backend)


def _single_inputs(kinds=KINDS):
    for kind in kinds:
        cfg = make_config(kind, "mixed", "cpu")
        for name in cfg.inputs:
            yield kind, name


@over_devices
@over_backends
@params("kind,name", list(_single_inputs()))
def test_gradcheck_each_input(kind, name, backend, device):
    """Only one input requires grad: the backward must not assume the others do (fast
    mode: a random projection of the Jacobian; the full Jacobians are checked above)."""
    cfg = make_config(kind, "mixed", device)
    run_check(torch.autograd.gradcheck, cfg, {name}, backend, fast_mode=True)


@over_devices
@over_backends
@params("layout", ["mixed", "one-cluster"])
@params("kind", KINDS)
def test_gradgradcheck_all_inputs(kind, layout, backend, device):
    """Second order (second-order MAML differentiates through the backward); the full
    Jacobian of the backward on the mixed layout, a random projection on the other."""
    cfg = make_config(kind, layout, device, seed=1)
    run_check(torch.autograd.gradgradcheck, cfg, set(cfg.inputs), backend,
              fast_mode=layout != "mixed")


@over_devices
@over_backends
@params("kind,name", list(_single_inputs()))
def test_gradgradcheck_each_input(kind, name, backend, device):
    cfg = make_config(kind, "mixed", device, seed=2)
    run_check(torch.autograd.gradgradcheck, cfg, {name}, backend, fast_mode=True)


# ----------------------------------------------------------------------------- zero weights


@over_devices
@over_backends
@params("op", ["segment_mean", "segment_broadcast", "tree_update", "reptile_update"])
def test_zero_weight_cluster_passes_back_zero(op, backend, device):
    """A cluster whose weights are all 0 has output 0 (its mean) and passes back exactly
    0 to its rows and weights, also at second order: no NaN anywhere."""
    P = 4
    offsets = torch.tensor([0, 3, 5, 5], device=device)
    x = torch.randn(5, P, dtype=F64, device=device, requires_grad=True)
    w = torch.tensor([0.0, 0.0, 0.0, 1.0, 2.0], dtype=F64, device=device, requires_grad=True)
    node = torch.randn(2, P, dtype=F64, device=device, requires_grad=True)
    lr = torch.rand(P, dtype=F64, device=device, requires_grad=True)
    theta = torch.randn(3, P, dtype=F64, device=device, requires_grad=True)
    g = torch.randn(3, P, dtype=F64, device=device, requires_grad=True)
    with treepool.use_backend(backend):
        if op == "segment_mean":
            out, inputs = treepool.segment_mean(x, offsets, w), [x, w]
            assert torch.equal(out[0].detach().cpu(), torch.zeros(P, dtype=F64))
        elif op == "segment_broadcast":
            out, inputs = treepool.segment_broadcast(g, offsets, w, True, 5), [g, w]
            assert torch.equal(out[:3].detach().cpu(), torch.zeros(3, P, dtype=F64))
        elif op == "tree_update":
            out = treepool.tree_update(node, x, offsets, torch.tensor([0, 1, 1], device=device),
                                       lr, w)
            inputs = [node, x, w, lr]
            assert torch.equal(out[0].detach(), node[0].detach())
        else:
            out, inputs = treepool.reptile_update(theta, x, offsets, lr, w), [theta, x, w, lr]
        upstream = torch.randn_like(out)
        grads = torch.autograd.grad(out, inputs, upstream, create_graph=True)
        for t in grads:
            assert torch.isfinite(t).all()
        if op != "segment_broadcast":
            ids = [id(t) for t in inputs]
            gx, gw = grads[ids.index(id(x))], grads[ids.index(id(w))]
            assert torch.equal(gx[:3].detach().cpu(), torch.zeros(3, P, dtype=F64))
            assert torch.equal(gw[:3].detach().cpu(), torch.zeros(3, dtype=F64))
        else:
            gw = grads[1]
            assert torch.equal(gw[:3].detach().cpu(), torch.zeros(3, dtype=F64))
        second = torch.autograd.grad(sum((t * torch.randn_like(t)).sum() for t in grads),
                                     inputs, allow_unused=True)
        for t in second:
            assert t is None or torch.isfinite(t).all()


@over_devices
@over_backends
@params("op", ["segment_sum", "segment_mean", "tree_update", "reptile_update"])
def test_all_weights_zero_or_no_tasks(op, backend, device):
    """Every weight 0, and a level without tasks: outputs and gradients finite."""
    P = 3
    for offsets_list, w_list in (([0, 2, 4], [0.0] * 4), ([0, 0, 0], [])):
        offsets = torch.tensor(offsets_list, device=device)
        T = offsets_list[-1]
        x = torch.randn(T, P, dtype=F64, device=device, requires_grad=True)
        w = torch.tensor(w_list, dtype=F64, device=device).requires_grad_(True)
        node = torch.randn(1, P, dtype=F64, device=device, requires_grad=True)
        lr = torch.tensor(0.5, dtype=F64, device=device, requires_grad=True)
        with treepool.use_backend(backend):
            if op == "tree_update":
                inputs = [x, w, node, lr]
                out = treepool.tree_update(node, x, offsets, torch.tensor([0, 0], device=device),
                                           lr, w)
            elif op == "reptile_update":
                inputs = [x, w, node, lr]
                out = treepool.reptile_update(node.expand(2, P), x, offsets, lr, w)
            else:
                inputs = [x, w]
                out = getattr(treepool, op)(x, offsets, w)
            grads = torch.autograd.grad(out.sum(), inputs, allow_unused=True)
        assert torch.isfinite(out).all()
        if op in ("segment_sum", "segment_mean"):
            assert torch.equal(out.detach().cpu(), torch.zeros(2, P, dtype=F64))
        for t in grads:
            assert t is None or torch.isfinite(t).all()


@over_devices
@over_backends
def test_weight_gradient_at_zero_weight(backend, device):
    """d mean_c / d w_t at w_t = 0 (cluster weight still positive) is (x_t - mean_c) / W_c:
    the one-sided limit, checked against the formula and a forward difference."""
    offsets = torch.tensor([0, 3], device=device)
    x = torch.randn(3, 2, dtype=F64, device=device)
    w = torch.tensor([0.0, 1.0, 3.0], dtype=F64, device=device, requires_grad=True)
    with treepool.use_backend(backend):
        out = treepool.segment_mean(x, offsets, w)
        (gw,) = torch.autograd.grad(out.sum(), w)
        h = 1e-7
        bumped = treepool.segment_mean(x, offsets, w.detach() + torch.tensor([h, 0, 0], dtype=F64,
                                                                             device=device))
    mean = (x[1] + 3 * x[2]) / 4
    expected = float(((x[0] - mean) / 4).sum())
    assert abs(float(gw[0]) - expected) < 1e-9
    assert abs(float(gw[0]) - float((bumped - out).sum()) / h) < 1e-5


@over_devices
@over_backends
def test_backward_of_empty_shapes(backend, device):
    """C = 0, T = 0, P = 0: backward runs and gives gradients of the inputs' shapes."""
    for T, P, offsets_list in ((0, 3, [0]), (0, 3, [0, 0]), (4, 0, [0, 1, 4])):
        offsets = torch.tensor(offsets_list, device=device)
        C = len(offsets_list) - 1
        x = torch.randn(T, P, dtype=F64, device=device, requires_grad=True)
        w = torch.ones(T, dtype=F64, device=device, requires_grad=True)
        node = torch.randn(1, P, dtype=F64, device=device, requires_grad=True)
        lr = torch.ones(P, dtype=F64, device=device, requires_grad=True)
        theta = torch.randn(C, P, dtype=F64, device=device, requires_grad=True)
        with treepool.use_backend(backend):
            outs = [treepool.segment_sum(x, offsets, w), treepool.segment_mean(x, offsets, w),
                    treepool.segment_broadcast(theta, offsets, w, True, T),
                    treepool.tree_update(node, x, offsets, torch.zeros(C, dtype=torch.int64,
                                                                      device=device), lr, w),
                    treepool.reptile_update(theta, x, offsets, lr, w)]
            loss = sum(o.sum() for o in outs)
            grads = torch.autograd.grad(loss, [x, w, node, lr, theta], allow_unused=True)
        for t, inp in zip(grads, [x, w, node, lr, theta]):
            assert t is None or (t.shape == inp.shape and torch.isfinite(t).all())


# ----------------------------------------------------------------------------- every dtype


def oracle_tree_update(node, grads, offsets, parents, lr, w):
    """tree_update written with differentiable torch ops, one cluster at a time."""
    rows = []
    for c, p in enumerate(parents):
        b, e = offsets[c], offsets[c + 1]
        ws = torch.ones(e - b, dtype=grads.dtype) if w is None else w[b:e]
        W = ws.sum()
        if e > b and float(W) > 0:
            pooled = (ws[:, None] * grads[b:e]).sum(0) / W
        else:
            pooled = torch.zeros(grads.shape[1], dtype=grads.dtype) * W
        rows.append(node[p] - lr * pooled)
    if not rows:
        return node[:0] + 0 * lr
    return torch.stack(rows)


def oracle_reptile_update(theta, phi, offsets, eps, w):
    rows = []
    for c in range(theta.shape[0]):
        b, e = offsets[c], offsets[c + 1]
        ws = torch.ones(e - b, dtype=phi.dtype) if w is None else w[b:e]
        W = ws.sum()
        if e > b and float(W) > 0:
            pooled = (ws[:, None] * phi[b:e]).sum(0) / W
        else:
            pooled = torch.zeros(phi.shape[1], dtype=phi.dtype) * W
        rows.append(theta[c] + eps * (pooled - theta[c]))
    if not rows:
        return theta + 0 * eps
    return torch.stack(rows)


# Relative tolerance of a gradient entry against the magnitude of the terms it sums.
_GRAD_RTOL = {torch.float64: 1e-11, torch.float32: 5e-5, torch.float16: 1e-2,
              torch.bfloat16: 5e-2}


def gradient_magnitudes(up, values, offsets, w, rate, base, parents=None):
    """Sum of the absolute values of the terms of every gradient entry (float64), the
    scale of its rounding error. values: [T, P] pooled rows; base: node_params (tree
    update, with parents) or theta (Reptile); rate: lr/eps (0-d or [P])."""
    T, P = values.shape
    C = len(offsets) - 1
    wt = torch.ones(T, dtype=F64) if w is None else w
    r = rate.abs() * torch.ones(P, dtype=F64)
    A = torch.zeros(C, P, dtype=F64)        # sum_t w_t |x_t| / W_c
    inv = torch.zeros(C, dtype=F64)
    for c in range(C):
        b, e = offsets[c], offsets[c + 1]
        W = float(wt[b:e].sum())
        if W > 0:
            inv[c] = 1 / W
            A[c] = (wt[b:e, None] * values[b:e].abs()).sum(0) / W
    rows = [c for c in range(C) for _ in range(offsets[c], offsets[c + 1])]
    G = up.abs()
    m_values = torch.stack([r * G[c] * wt[t] * inv[c] for t, c in enumerate(rows)]) \
        if rows else torch.zeros(0, P, dtype=F64)
    m_w = torch.stack([(r * G[c] * (values[t].abs() + A[c])).sum() * inv[c]
                       for t, c in enumerate(rows)]) if rows else torch.zeros(0, dtype=F64)
    if parents is not None:
        m_base = torch.zeros_like(base)
        for c, p in enumerate(parents):
            m_base[p] += G[c]
        rate_terms = G * A
    else:
        m_base = G * (1 + r)
        rate_terms = G * (A + base.abs())
    m_rate = rate_terms.sum() if rate.dim() == 0 else rate_terms.sum(0)
    return [m_base, m_values, m_rate, m_w]


def assert_grad_close(got, exact, magnitude, dtype, what):
    got64 = got.detach().double().cpu()
    # float16 gradients may land among its subnormals (spacing 2**-24), rounded a few times
    floor = 2.0 ** -21 if dtype == torch.float16 else 1e-300
    tol = _GRAD_RTOL[dtype] * (exact.abs() + magnitude) + floor
    bad = ~((got64 - exact).abs() <= tol)
    if bool(bad.any()):
        i = tuple(int(k) for k in bad.nonzero()[0]) if bad.dim() else ()
        raise AssertionError(f"{what} ({dtype}): at {i} got {float(got64[i])!r}, exact "
                             f"{float(exact[i])!r}, magnitude {float(magnitude[i]):.3g}")


@over_devices
@over_backends
@params("dtype", DTYPES, ids=dtype_id)
@given(data=st.data())
def test_gradients_match_float64_oracle(data, dtype, backend, device):
    """tree_update and reptile_update backward in every dtype against the float64 autograd
    of oracle_tree_update / oracle_reptile_update (random trees, weights, rates)."""
    P = data.draw(st.integers(1, 40))
    lv = data.draw(levels(max_rows_for(P) if dtype not in HALF else 24))
    g = gen(data.draw(st.integers(0, 2 ** 31 - 1)))
    weight_kind = data.draw(st.sampled_from(["none", "positive", "zero_cluster"]))
    rate_shape = data.draw(st.sampled_from([(), (P,)]))

    def rnd(*shape):
        return torch.randn(shape, generator=g, dtype=F64).to(dtype).double()

    node, grads, theta = rnd(lv.num_prev, P), rnd(lv.T, P), rnd(lv.C, P)
    lr = rnd(*rate_shape)
    w = make_weights(weight_kind, lv, dtype, g)
    w = None if w is None else w.double()
    up_tree, up_rep = rnd(lv.C, P), rnd(lv.C, P)
    o = lv.offsets

    def oracle_grads(fn, base, up):
        leaves = [t.clone().requires_grad_(True) for t in (base, grads, lr)]
        wl = None if w is None else w.clone().requires_grad_(True)
        args = (leaves[0], leaves[1], o, lv.parents, leaves[2], wl) if fn is oracle_tree_update \
            else (leaves[0], leaves[1], o, leaves[2], wl)
        out = fn(*args)
        res = torch.autograd.grad(out, leaves + ([wl] if wl is not None else []), up,
                                  allow_unused=True)
        return [torch.zeros_like(t) if r is None else r for r, t in zip(res, leaves + [wl])]

    exp_tree = oracle_grads(oracle_tree_update, node, up_tree)
    exp_rep = oracle_grads(oracle_reptile_update, theta, up_rep)
    mag_tree = gradient_magnitudes(up_tree, grads, o, w, lr, node, lv.parents)
    mag_rep = gradient_magnitudes(up_rep, grads, o, w, lr, theta)

    def cast(t):
        return t.to(dtype).to(device).requires_grad_(True)

    n, gr, r, th = (cast(t) for t in (node, grads, lr, theta))
    wd = None if w is None else cast(w)
    off, par = lv.offsets_tensor(device), lv.parents_tensor(device)
    extra = [wd] if wd is not None else []
    with treepool.use_backend(backend):
        out = treepool.tree_update(n, gr, off, par, r, wd)
        got_tree = torch.autograd.grad(out, [n, gr, r] + extra, up_tree.to(dtype).to(device),
                                       allow_unused=True)
        out = treepool.reptile_update(th, gr, off, r, wd)
        got_rep = torch.autograd.grad(out, [th, gr, r] + extra, up_rep.to(dtype).to(device),
                                      allow_unused=True)
    for op, names, got, exp, mag in (
            ("tree_update", ["node_params", "grads", "lr", "weights"], got_tree, exp_tree, mag_tree),
            ("reptile_update", ["theta", "phi", "eps", "weights"], got_rep, exp_rep, mag_rep)):
        for name, gt, ex, mg in zip(names, got, exp, mag):
            if gt is None:
                gt = torch.zeros_like(ex)
            else:
                assert gt.dtype == dtype and gt.shape == ex.shape, f"{op} d/d{name}"
            assert_grad_close(gt, ex, mg, dtype, f"{op} d/d{name}")


@pytest.mark.skipif(not NATIVE, reason="treepool._C is not built")
@over_devices
@params("dtype", [torch.float32, torch.float16], ids=dtype_id)
def test_native_and_reference_gradients_agree(dtype, device):
    """Cross-check of the two backward implementations on a skewed tree."""
    g = gen(3)
    sizes, P = [1, 40, 0, 2, 1], 33
    offsets = torch.tensor(offsets_of(sizes), device=device)
    parents = torch.tensor([0, 0, 1, 1, 3], device=device)
    base = [torch.randn(4, P, generator=g), torch.randn(44, P, generator=g),
            torch.rand(44, generator=g) + 0.1, torch.randn(P, generator=g),
            torch.randn(5, P, generator=g)]
    results = {}
    for name in AVAILABLE_BACKENDS:
        node, x, w, lr, th = (t.to(dtype).to(device).requires_grad_(True) for t in base)
        with treepool.use_backend(name):
            loss = (treepool.tree_update(node, x, offsets, parents, lr, w).float().square().sum()
                    + treepool.reptile_update(th, x, offsets, lr, w).float().square().sum()
                    + treepool.segment_sum(x, offsets, w).float().sum()
                    + treepool.segment_broadcast(th, offsets, w, True).float().square().sum())
            results[name] = torch.autograd.grad(loss, [node, x, w, lr, th])
    for a, b in zip(results["native"], results["reference"]):
        scale = b.double().abs().max().item()
        tol = (1e-4 if dtype == torch.float32 else 2e-2) * (scale + b.double().abs())
        assert ((a.double() - b.double()).abs() <= tol).all()


# ----------------------------------------------------------------------------- second-order MAML


def _maml_outer_loss(theta, lr, a, b, levels, update, broadcast):
    """Second-order TreeMAML on a two-level tree: at every level each task takes the
    gradient of its inner loss sum(b_t (phi - a_t)^2) at its current node's parameters
    (create_graph=True), the clusters pool them and update; the outer loss is a function
    of the leaves' parameters."""
    params_ = theta
    num_rows = a.shape[0]
    above = torch.tensor([0, num_rows], device=theta.device)  # theta: one root node
    for offsets, parents in levels:
        per_task = broadcast(params_, above, num_rows)  # each task at its current node
        inner = (b * (per_task - a) ** 2).sum()
        (g,) = torch.autograd.grad(inner, per_task, create_graph=True)
        params_ = update(params_, g, offsets, parents, lr)
        above = offsets
    return (params_ ** 2).sum() + params_.sum()


def _levels(device):
    """Levels 1..3 of a tree of 7 tasks: the root, two clusters, four (one empty)."""
    return [(torch.tensor([0, 7], device=device), torch.tensor([0], device=device)),
            (torch.tensor([0, 3, 7], device=device), torch.tensor([0, 0], device=device)),
            (torch.tensor([0, 1, 3, 3, 7], device=device), torch.tensor([0, 0, 1, 1], device=device))]


@over_devices
@over_backends
def test_second_order_maml_matches_oracle(backend, device):
    g = gen(5)
    P = 3
    theta = torch.randn(1, P, generator=g, dtype=F64).to(device).requires_grad_(True)
    lr = (torch.rand(P, generator=g, dtype=F64) * 0.3).to(device).requires_grad_(True)
    a = torch.randn(7, P, generator=g, dtype=F64).to(device)
    b = (torch.rand(7, 1, generator=g, dtype=F64) + 0.5).to(device)
    levels_ = _levels(device)

    def tp_update(p, grads, o, par, r):
        return treepool.tree_update(p, grads, o, par, r)

    def tp_broadcast(p, o, n):
        return treepool.segment_broadcast(p, o, None, False, n)

    def oracle_update(p, grads, o, par, r):
        return oracle_tree_update(p, grads, o.tolist(), par.tolist(), r, None)

    def oracle_broadcast(p, o, n):
        ol = o.tolist()
        return torch.cat([p[c:c + 1].expand(ol[c + 1] - ol[c], -1) for c in range(len(ol) - 1)])

    with treepool.use_backend(backend):
        loss = _maml_outer_loss(theta, lr, a, b, levels_, tp_update, tp_broadcast)
        got = torch.autograd.grad(loss, [theta, lr], create_graph=True)
        hvp = torch.autograd.grad(got[0].sum() + got[1].sum(), [theta, lr])
    exp_loss = _maml_outer_loss(theta, lr, a, b, levels_, oracle_update, oracle_broadcast)
    exp = torch.autograd.grad(exp_loss, [theta, lr], create_graph=True)
    exp_hvp = torch.autograd.grad(exp[0].sum() + exp[1].sum(), [theta, lr])
    torch.testing.assert_close(loss, exp_loss, rtol=1e-12, atol=1e-12)
    for x, y in zip(got + hvp, exp + exp_hvp):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)


@over_devices
@over_backends
def test_second_order_maml_gradcheck(backend, device):
    g = gen(6)
    P = 2
    theta = torch.randn(1, P, generator=g, dtype=F64).to(device).requires_grad_(True)
    lr = (torch.rand(P, generator=g, dtype=F64) * 0.3).to(device).requires_grad_(True)
    a = torch.randn(7, P, generator=g, dtype=F64).to(device)
    b = (torch.rand(7, 1, generator=g, dtype=F64) + 0.5).to(device)
    levels_ = _levels(device)

    def fn(theta, lr):
        return _maml_outer_loss(
            theta, lr, a, b, levels_,
            lambda p, grads, o, par, r: treepool.tree_update(p, grads, o, par, r),
            lambda p, o, n: treepool.segment_broadcast(p, o, None, False, n))

    with treepool.use_backend(backend):
        assert torch.autograd.gradcheck(fn, (theta, lr))
        assert torch.autograd.gradgradcheck(fn, (theta, lr))
