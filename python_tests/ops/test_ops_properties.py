"""Property tests of every op against an independent float64 computation (helpers.py:
Python loops over clusters), on both backends, every dtype, and on random nested
trees: empty clusters, clusters of size 1, one cluster holding almost all tasks,
T = 1, T = 0, no cluster at all; P from 1 to a few thousand; weights absent, present,
partly zero, zero over a whole cluster or everywhere; lr/eps as a float, an int, a 0-d
tensor or a [P] tensor.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import treepool
from .helpers import (
    AVAILABLE_BACKENDS, BACKENDS, DEVICES, DTYPES, HALF, NATIVE, RATE_KINDS, WEIGHT_KINDS,
    assert_close, assert_matches_exact, assert_unchanged, clones, dtype_id, exact_broadcast,
    exact_mean, exact_reptile_update, exact_sums, exact_tree_update, gen, levels, make_rate,
    make_weights, max_rows_for, nested_trees, randn, widths,
)

SEEDS = st.integers(0, 2 ** 31 - 1)


def scales(dtype):
    # Half types keep magnitudes where cluster sums cannot overflow float16.
    if dtype in HALF:
        return st.sampled_from([1.0, 0.01])
    return st.sampled_from([1.0, 1e-3, 1e3])


@st.composite
def cases(draw, dtype, large=True):
    P = draw(widths(large))
    level = draw(levels(max_rows_for(P)))
    # shift: rows with a common offset make long sums grow, where an accumulator of the
    # wrong precision shows.
    return dict(P=P, level=level, weights=draw(st.sampled_from(WEIGHT_KINDS)),
                rate=draw(st.sampled_from(RATE_KINDS)), seed=draw(SEEDS),
                scale=draw(scales(dtype)), shift=draw(st.sampled_from([0.0, 0.0, 3.0])))


params = pytest.mark.parametrize
over_dtypes = params("dtype", DTYPES, ids=dtype_id)
over_backends = params("backend", BACKENDS)
over_devices = params("device", DEVICES)


# ----------------------------------------------------------------------------- reductions


@over_devices
@over_backends
@over_dtypes
@given(data=st.data())
def test_segment_sum_matches_float64(data, dtype, backend, device):
    case = data.draw(cases(dtype))
    lv, g = case["level"], gen(case["seed"])
    x = randn((lv.T, case["P"]), dtype, g, case["scale"], device, case["shift"])
    w = make_weights(case["weights"], lv, dtype, g, device)
    offsets = lv.offsets_tensor(device)
    before = clones(x, offsets, w)
    with treepool.use_backend(backend):
        out = treepool.segment_sum(x, offsets, w)
    assert out.device == x.device
    S, _, A = exact_sums(x, lv.offsets, w)
    assert_matches_exact(out, S, A, dtype, lv.max_size, "segment_sum")
    assert_unchanged(before, [x, offsets, w])


@over_devices
@over_backends
@over_dtypes
@given(data=st.data())
def test_segment_mean_matches_float64(data, dtype, backend, device):
    case = data.draw(cases(dtype))
    lv, g = case["level"], gen(case["seed"])
    x = randn((lv.T, case["P"]), dtype, g, case["scale"], device, case["shift"])
    w = make_weights(case["weights"], lv, dtype, g, device)
    offsets = lv.offsets_tensor(device)
    before = clones(x, offsets, w)
    with treepool.use_backend(backend):
        out = treepool.segment_mean(x, offsets, w)
    assert out.device == x.device
    M, A = exact_mean(x, lv.offsets, w)
    assert_matches_exact(out, M, A, dtype, lv.max_size, "segment_mean")
    assert_unchanged(before, [x, offsets, w])


@over_devices
@over_backends
@over_dtypes
@given(data=st.data(), mean=st.booleans(), explicit_rows=st.booleans())
def test_segment_broadcast_matches_float64(data, mean, explicit_rows, dtype, backend, device):
    case = data.draw(cases(dtype))
    lv, gn = case["level"], gen(case["seed"])
    g = randn((lv.C, case["P"]), dtype, gn, case["scale"], device)
    w = make_weights(case["weights"], lv, dtype, gn, device)
    offsets = lv.offsets_tensor(device)
    before = clones(g, offsets, w)
    kwargs = dict(num_rows=lv.T) if explicit_rows else {}
    with treepool.use_backend(backend):
        out = treepool.segment_broadcast(g, offsets, w, mean=mean, **kwargs)
    assert out.device == g.device
    exact = exact_broadcast(g, lv.offsets, w, mean, lv.T)
    assert_matches_exact(out, exact, exact.abs(), dtype, lv.max_size, "segment_broadcast")
    assert_unchanged(before, [g, offsets, w])


# ----------------------------------------------------------------------------- updates


def _tree_update_inputs(case, dtype, device):
    lv, g = case["level"], gen(case["seed"])
    P = case["P"]
    node = randn((lv.num_prev, P), dtype, g, case["scale"], device)
    grads = randn((lv.T, P), dtype, g, case["scale"], device, case["shift"])
    w = make_weights(case["weights"], lv, dtype, g, device)
    lr = make_rate(case["rate"], P, dtype, g, device)
    return lv, node, grads, lv.offsets_tensor(device), lv.parents_tensor(device), lr, w


@over_devices
@over_backends
@over_dtypes
@given(data=st.data())
def test_tree_update_matches_float64(data, dtype, backend, device):
    lv, node, grads, offsets, parents, lr, w = _tree_update_inputs(data.draw(cases(dtype)),
                                                                   dtype, device)
    before = clones(node, grads, offsets, parents, lr, w)
    with treepool.use_backend(backend):
        out = treepool.tree_update(node, grads, offsets, parents, lr, w)
    assert out.device == grads.device
    exact, scale = exact_tree_update(node, grads, lv.offsets, lv.parents, lr, w)
    assert_matches_exact(out, exact, scale, dtype, lv.max_size, "tree_update")
    assert_unchanged(before, [node, grads, offsets, parents, lr, w])


@over_devices
@over_backends
@over_dtypes
@given(data=st.data())
def test_tree_update_inplace_matches_float64(data, dtype, backend, device):
    lv, node, grads, offsets, parents, lr, w = _tree_update_inputs(data.draw(cases(dtype)),
                                                                   dtype, device)
    before = clones(node, grads, offsets, parents, lr, w)
    out = torch.full((lv.C, grads.shape[1]), float("nan"), dtype=dtype, device=device)
    with treepool.use_backend(backend):
        ret = treepool.tree_update_(out, node, grads, offsets, parents, lr, w)
        fresh = treepool.tree_update(node, grads, offsets, parents, lr, w)
    assert ret is out
    exact, scale = exact_tree_update(node, grads, lv.offsets, lv.parents, lr, w)
    assert_matches_exact(out, exact, scale, dtype, lv.max_size, "tree_update_")
    assert torch.equal(out, fresh), "tree_update_ differs from tree_update"
    assert_unchanged(before, [node, grads, offsets, parents, lr, w])


@over_devices
@over_backends
@over_dtypes
@given(data=st.data())
def test_tree_update_inplace_on_node_params_with_identity_parents(data, dtype, backend, device):
    case = data.draw(cases(dtype))
    C = case["level"].C
    lv = dataclasses.replace(case["level"], parents=list(range(C)), num_prev=C)
    case = dict(case, level=lv)
    _, node, grads, offsets, parents, lr, w = _tree_update_inputs(case, dtype, device)
    original = node.clone()
    before = clones(grads, offsets, parents, lr, w)
    with treepool.use_backend(backend):
        expected = treepool.tree_update(node, grads, offsets, parents, lr, w)
        ret = treepool.tree_update_(node, node, grads, offsets, parents, lr, w)
    assert ret is node
    exact, scale = exact_tree_update(original, grads, lv.offsets, lv.parents, lr, w)
    assert_matches_exact(node, exact, scale, dtype, lv.max_size, "tree_update_(node, node)")
    assert torch.equal(node, expected)
    assert_unchanged(before, [grads, offsets, parents, lr, w])


def _reptile_inputs(case, dtype, device):
    lv, g = case["level"], gen(case["seed"])
    P = case["P"]
    theta = randn((lv.C, P), dtype, g, case["scale"], device)
    phi = randn((lv.T, P), dtype, g, case["scale"], device, case["shift"])
    w = make_weights(case["weights"], lv, dtype, g, device)
    eps = make_rate(case["rate"], P, dtype, g, device)
    return lv, theta, phi, lv.offsets_tensor(device), eps, w


@over_devices
@over_backends
@over_dtypes
@given(data=st.data())
def test_reptile_update_matches_float64(data, dtype, backend, device):
    lv, theta, phi, offsets, eps, w = _reptile_inputs(data.draw(cases(dtype)), dtype, device)
    before = clones(theta, phi, offsets, eps, w)
    with treepool.use_backend(backend):
        out = treepool.reptile_update(theta, phi, offsets, eps, w)
    assert out.device == phi.device
    exact, scale = exact_reptile_update(theta, phi, lv.offsets, eps, w)
    assert_matches_exact(out, exact, scale, dtype, lv.max_size, "reptile_update")
    assert_unchanged(before, [theta, phi, offsets, eps, w])


@over_devices
@over_backends
@over_dtypes
@given(data=st.data())
def test_reptile_update_inplace_matches_float64(data, dtype, backend, device):
    lv, theta, phi, offsets, eps, w = _reptile_inputs(data.draw(cases(dtype)), dtype, device)
    original = theta.clone()
    before = clones(phi, offsets, eps, w)
    with treepool.use_backend(backend):
        expected = treepool.reptile_update(theta, phi, offsets, eps, w)
        ret = treepool.reptile_update_(theta, phi, offsets, eps, w)
    assert ret is theta
    exact, scale = exact_reptile_update(original, phi, lv.offsets, eps, w)
    assert_matches_exact(theta, exact, scale, dtype, lv.max_size, "reptile_update_")
    assert torch.equal(theta, expected), "reptile_update_ differs from reptile_update"
    assert_unchanged(before, [phi, offsets, eps, w])


# ----------------------------------------------------------------------------- cross-check


@pytest.mark.skipif(not NATIVE, reason="treepool._C is not built")
@over_devices
@over_dtypes
@given(data=st.data())
def test_native_equals_reference(data, dtype, device):
    case = data.draw(cases(dtype))
    lv, node, grads, offsets, parents, lr, w = _tree_update_inputs(case, dtype, device)
    theta = randn((lv.C, case["P"]), dtype, gen(case["seed"] + 1), case["scale"], device)
    results = {}
    for name in AVAILABLE_BACKENDS:
        with treepool.use_backend(name):
            results[name] = [
                treepool.segment_sum(grads, offsets, w),
                treepool.segment_mean(grads, offsets, w),
                treepool.segment_broadcast(theta, offsets, w, mean=True),
                treepool.tree_update(node, grads, offsets, parents, lr, w),
                treepool.reptile_update(theta, grads, offsets, lr, w),
            ]
    S, _, A = exact_sums(grads, lv.offsets, w)
    _, Am = exact_mean(grads, lv.offsets, w)
    _, tu_scale = exact_tree_update(node, grads, lv.offsets, lv.parents, lr, w)
    _, ru_scale = exact_reptile_update(theta, grads, lv.offsets, lr, w)
    bc = exact_broadcast(theta, lv.offsets, w, True, lv.T).abs()
    for i, (scale, what) in enumerate([(A, "segment_sum"), (Am, "segment_mean"),
                                       (bc, "segment_broadcast"), (tu_scale, "tree_update"),
                                       (ru_scale, "reptile_update")]):
        assert_close(results["native"][i], results["reference"][i], dtype, scale,
                     lv.max_size, what)


# ----------------------------------------------------------------------------- edge cases


@over_devices
@over_backends
@over_dtypes
def test_no_clusters(dtype, backend, device):
    """T = 0 with offsets = [0]: C = 0, every output has 0 rows."""
    P = 5
    x = torch.empty(0, P, dtype=dtype, device=device)
    offsets = torch.zeros(1, dtype=torch.int64, device=device)
    none = torch.empty(0, dtype=torch.int64, device=device)
    node = torch.randn(2, P, device=device).to(dtype)
    with treepool.use_backend(backend):
        for out in (treepool.segment_sum(x, offsets), treepool.segment_mean(x, offsets),
                    treepool.segment_sum(x, offsets, x.new_empty(0)),
                    treepool.segment_broadcast(x, offsets),
                    treepool.segment_broadcast(x, offsets, mean=True, num_rows=0),
                    treepool.tree_update(node, x, offsets, none, 0.1),
                    treepool.reptile_update(x, x, offsets, 0.5)):
            assert out.shape == (0, P) and out.dtype == dtype and out.device == x.device
        out = torch.empty(0, P, dtype=dtype, device=device)
        assert treepool.tree_update_(out, node, x, offsets, none, 0.1) is out
        theta = torch.empty(0, P, dtype=dtype, device=device)
        assert treepool.reptile_update_(theta, x, offsets, 0.5) is theta


@over_devices
@over_backends
@over_dtypes
def test_empty_clusters(dtype, backend, device):
    """Clusters without rows: sum and mean 0, tree_update gives the parent, reptile_update
    moves theta towards 0 (the mean of an empty cluster), broadcast skips them."""
    P = 7
    offsets = torch.tensor([0, 0, 2, 2, 2, 3], device=device)
    x = torch.arange(1, 3 * P + 1, dtype=torch.float64).reshape(3, P).to(dtype).to(device)
    node = torch.arange(2 * P, dtype=torch.float64).reshape(2, P).to(dtype).to(device)
    parents = torch.tensor([0, 0, 1, 1, 1], device=device)
    theta = torch.ones(5, P, dtype=dtype, device=device)
    x64 = x.double().cpu()
    zero = torch.zeros(P, dtype=torch.float64)
    with treepool.use_backend(backend):
        s = treepool.segment_sum(x, offsets).double().cpu()
        m = treepool.segment_mean(x, offsets).double().cpu()
        tu = treepool.tree_update(node, x, offsets, parents, 0.5).double().cpu()
        ru = treepool.reptile_update(theta, x, offsets, 0.5).double().cpu()
        bc = treepool.segment_broadcast(node.new_ones(5, P) * 3, offsets).double().cpu()
    for c in (0, 2, 3):
        assert torch.equal(s[c], zero) and torch.equal(m[c], zero)
        assert torch.equal(tu[c], node[parents[c]].double().cpu())
        assert torch.equal(ru[c], torch.full((P,), 0.5, dtype=torch.float64))
    assert torch.equal(s[1], x64[0] + x64[1]) and torch.equal(s[4], x64[2])
    assert torch.equal(m[4], x64[2])
    assert torch.equal(bc, torch.full((3, P), 3.0, dtype=torch.float64))


@over_devices
@over_backends
@over_dtypes
def test_zero_columns(dtype, backend, device):
    """P = 0: outputs of shape [C, 0] (and [T, 0] for the broadcast)."""
    offsets = torch.tensor([0, 2, 2, 5], device=device)
    x = torch.empty(5, 0, dtype=dtype, device=device)
    node = torch.empty(2, 0, dtype=dtype, device=device)
    parents = torch.tensor([0, 1, 1], device=device)
    w = torch.ones(5, dtype=dtype, device=device)
    lr_p = torch.empty(0, dtype=dtype, device=device)
    with treepool.use_backend(backend):
        for out in (treepool.segment_sum(x, offsets, w), treepool.segment_mean(x, offsets),
                    treepool.tree_update(node, x, offsets, parents, 0.1, w),
                    treepool.tree_update(node, x, offsets, parents, lr_p),
                    treepool.reptile_update(x[:3], x, offsets, 0.1, w)):
            assert out.shape == (3, 0) and out.dtype == dtype
        assert treepool.segment_broadcast(x[:3], offsets, w, mean=True).shape == (5, 0)
        out = torch.empty(3, 0, dtype=dtype, device=device)
        assert treepool.tree_update_(out, node, x, offsets, parents, 0.1) is out
        theta = torch.empty(3, 0, dtype=dtype, device=device)
        assert treepool.reptile_update_(theta, x, offsets, 0.1) is theta


@over_devices
@over_backends
def test_nodes_without_children(backend, device):
    """Nodes of the level above that no cluster descends from are simply not read."""
    P = 3
    node = torch.tensor([[1.0] * P, [float("nan")] * P, [3.0] * P, [float("inf")] * P],
                        dtype=torch.float64, device=device)
    offsets = torch.tensor([0, 1, 2], device=device)
    parents = torch.tensor([0, 2], device=device)
    grads = torch.tensor([[2.0] * P, [4.0] * P], dtype=torch.float64, device=device)
    with treepool.use_backend(backend):
        out = treepool.tree_update(node, grads, offsets, parents, 0.5).cpu()
    assert torch.equal(out, torch.tensor([[0.0] * P, [1.0] * P], dtype=torch.float64))


@over_devices
@over_backends
@over_dtypes
def test_all_zero_weights_give_zero(dtype, backend, device):
    """A cluster whose weights are all zero has mean 0, not NaN; its rows' weighted sum is 0."""
    offsets = torch.tensor([0, 3, 5], device=device)
    x = torch.randn(5, 4, device=device).to(dtype)
    w = torch.tensor([0.0, 0.0, 0.0, 1.0, 3.0], dtype=dtype, device=device)
    with treepool.use_backend(backend):
        m = treepool.segment_mean(x, offsets, w).double().cpu()
        s = treepool.segment_sum(x, offsets, w).double().cpu()
        b = treepool.segment_broadcast(m.to(dtype).to(device), offsets, w, mean=True)
    assert torch.equal(m[0], torch.zeros(4, dtype=torch.float64))
    assert torch.equal(s[0], torch.zeros(4, dtype=torch.float64))
    assert torch.equal(b[:3].double().cpu(), torch.zeros(3, 4, dtype=torch.float64))
    exact, scale = exact_mean(x, [0, 3, 5], w)
    assert_matches_exact(m.to(dtype), exact, scale, dtype, 3, "segment_mean")


@over_backends
def test_long_cluster_row_split(backend):
    """T = 3000, P = 100, one cluster of 2900 rows: the CPU kernel splits its rows into
    chunks (few column blocks); the result must still be the weighted mean."""
    g = gen(7)
    sizes = [40, 2900, 0, 1, 59]
    offsets = [0]
    for s in sizes:
        offsets.append(offsets[-1] + s)
    x = randn((3000, 100), torch.float32, g)
    w = (torch.rand(3000, generator=g, dtype=torch.float64) + 0.1).float()
    o = torch.tensor(offsets)
    with treepool.use_backend(backend):
        m = treepool.segment_mean(x, o, w)
        s = treepool.segment_sum(x, o)
    M, A = exact_mean(x, offsets, w)
    assert_matches_exact(m, M, A, torch.float32, 2900, "segment_mean")
    S, _, A = exact_sums(x, offsets, None)
    assert_matches_exact(s, S, A, torch.float32, 2900, "segment_sum")


# ----------------------------------------------------------------------------- nested trees


@over_devices
@over_backends
@params("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=dtype_id)
@given(tree=nested_trees(), P=st.integers(1, 70), seed=SEEDS,
       weight_kind=st.sampled_from(["none", "positive", "with_zeros"]),
       rate_kind=st.sampled_from(RATE_KINDS))
def test_treemaml_inner_loop_on_nested_tree(tree, P, seed, weight_kind, rate_kind, dtype,
                                            backend, device):
    """TreeMAML's inner loop: from the root, one tree_update per level, each level's
    node parameters computed from the level above. Checked level by level against the
    float64 update applied to the op's own previous level (errors do not compound)."""
    g = gen(seed)
    T = tree[0].T
    params_ = randn((1, P), dtype, g, device=device)
    w = make_weights(weight_kind, tree[0], dtype, g, device)
    for k, lv in enumerate(tree):
        assert lv.T == T and lv.offsets[-1] == T
        assert all(a <= b for a, b in zip(lv.parents, lv.parents[1:]))
        grads = randn((T, P), dtype, g, device=device)
        lr = make_rate(rate_kind, P, dtype, g, device)
        with treepool.use_backend(backend):
            new = treepool.tree_update(params_, grads, lv.offsets_tensor(device),
                                       lv.parents_tensor(device), lr, w)
            pooled = treepool.segment_mean(grads, lv.offsets_tensor(device), w)
        exact, scale = exact_tree_update(params_, grads, lv.offsets, lv.parents, lr, w)
        assert_matches_exact(new, exact, scale, dtype, lv.max_size, f"level {k + 1}")
        M, A = exact_mean(grads, lv.offsets, w)
        assert_matches_exact(pooled, M, A, dtype, lv.max_size, f"pooled, level {k + 1}")
        params_ = new
    assert params_.shape == (tree[-1].C, P)
