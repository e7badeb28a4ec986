"""Issue 13, the items about the ops: in-place ops and autograd, extreme weights, a
trustworthy oracle, half-precision limits, and small ones (num_rows of the wrong type,
interleaved in-place buffers, "1 row")."""

from __future__ import annotations

import pytest
import torch

import treepool
from treepool.ops import reference
from .helpers import AVAILABLE_BACKENDS, BACKENDS, HALF, NATIVE, dtype_id, needs_native

params = pytest.mark.parametrize


def raised(fn):
    """(type, message) of the exception fn raises, or None."""
    try:
        fn()
    except Exception as exc:  # noqa: BLE001  (the type is what is compared)
        return type(exc), str(exc)
    return None


def expect_error(fn, exc_type, message):
    """fn raises exc_type(message) on every available backend."""
    for name in AVAILABLE_BACKENDS:
        with treepool.use_backend(name):
            assert raised(fn) == (exc_type, message), name


# --------------------------------------------------------------- 1. in-place and autograd

OFFSETS, PARENTS = torch.tensor([0, 2, 5]), torch.tensor([0, 0])


def _inplace(op, target, multi):
    """Runs a native in-place op (torch.ops, no wrapper) that writes `target` [2, 3]."""
    phi = torch.randn(5, 3)
    node = torch.randn(1, 3)
    if op == "tree_update_":
        if multi:
            return torch.ops.treepool.tree_update_multi_([target], [node], [phi], OFFSETS,
                                                         PARENTS, None, 0.1, None)
        return torch.ops.treepool.tree_update_(target, node, phi, OFFSETS, PARENTS, None, 0.1,
                                               None)
    if multi:
        return torch.ops.treepool.reptile_update_multi_([target], [phi], OFFSETS, None, 0.5, None)
    return torch.ops.treepool.reptile_update_(target, phi, OFFSETS, None, 0.5, None)


@needs_native
@params("multi", [False, True], ids=["single", "multi"])
@params("op", ["tree_update_", "reptile_update_"])
def test_native_inplace_write_bumps_the_version_counter(op, multi):
    """A tensor saved for backward and then overwritten makes backward raise (before,
    the native ops wrote it silently and backward returned a wrong gradient)."""
    leaf = torch.randn(2, 3, requires_grad=True)
    target = leaf * 1.0
    saved = target.sin()  # sin saves its input
    version = target._version
    with torch.no_grad():
        _inplace(op, target, multi)
    assert target._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.sum().backward()


@needs_native
@params("multi", [False, True], ids=["single", "multi"])
@params("op", ["tree_update_", "reptile_update_"])
def test_native_inplace_on_a_leaf_that_requires_grad_raises(op, multi):
    leaf = torch.randn(2, 3, requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        _inplace(op, leaf, multi)


@params("backend", BACKENDS)
@params("op", ["tree_update_", "reptile_update_"])
def test_public_inplace_write_makes_stale_backward_raise(op, backend):
    leaf = torch.randn(2, 3, requires_grad=True)
    target = leaf * 1.0
    saved = target.sin()
    phi = torch.randn(5, 3)
    with treepool.use_backend(backend), torch.no_grad():
        if op == "tree_update_":
            treepool.tree_update_([target], [torch.randn(1, 3)], [phi], OFFSETS, PARENTS, 0.1)
        else:
            treepool.reptile_update_(target, phi, OFFSETS, 0.5)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.sum().backward()


# --------------------------------------------------------------------- 2. extreme weights


def _weighted_mean64(x, offsets, w):
    x64, w64 = x.double(), w.double()
    out = []
    for b, e in zip(offsets[:-1].tolist(), offsets[1:].tolist()):
        out.append((w64[b:e, None] * x64[b:e]).sum(0) / w64[b:e].sum())
    return torch.stack(out)


@params("backend", BACKENDS)
@params("scale", [1e-45, 1e-40, 3e38], ids=["1e-45", "1e-40", "3e38"])
def test_extreme_weights_give_the_mean(scale, backend):
    """Weights of 1e-45 gave inf (1 / W overflowed), weights of 3e38 gave NaN (W
    overflowed); the mean does not depend on the scale of the weights."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 4, generator=g)
    offsets = torch.tensor([0, 3, 7])
    # Small integer multiples of a subnormal are exact; large weights stay below 3.4e38.
    mults = [1, 2, 1, 1, 3, 1, 2] if scale < 1 else [1.0, 1.125, 0.5, 1.0, 0.75, 1.0, 1.125]
    w = (torch.tensor(mults, dtype=torch.float64) * scale).float()
    assert torch.isfinite(w).all() and (w > 0).all()
    exact = _weighted_mean64(x, offsets, w)
    with treepool.use_backend(backend):
        mean = treepool.segment_mean(x, offsets, w)
        tree = treepool.tree_update(torch.zeros(1, 4), x, offsets, torch.tensor([0, 0]), -1.0, w)
        rep = treepool.reptile_update(torch.zeros(2, 4), x, offsets, 1.0, w)
        xg = x.clone().requires_grad_()
        (grad,) = torch.autograd.grad(treepool.segment_mean(xg, offsets, w).sum(), xg)
    for got in (mean, tree, rep):
        torch.testing.assert_close(got.double(), exact, rtol=1e-6, atol=1e-6)
    # d mean_c / d x_t = w_t / W_c, finite whatever the scale
    w64 = w.double()
    expected = w64 / torch.cat([w64[:3].sum().expand(3), w64[3:].sum().expand(4)])
    torch.testing.assert_close(grad.double(), expected[:, None].expand(7, 4), rtol=1e-6, atol=0)


@params("backend", BACKENDS)
def test_tiny_and_huge_weights_in_one_cluster(backend):
    x = torch.tensor([[1.0], [2.0]])
    w = torch.tensor([1e-45, 3e38])
    with treepool.use_backend(backend):
        out = treepool.segment_mean(x, torch.tensor([0, 2]), w)
    assert float(out) == 2.0


@params("bad", [float("inf"), float("-inf")])
@params("op", ["segment_sum", "segment_mean", "tree_update", "reptile_update",
               "segment_broadcast"])
def test_infinite_weight_is_refused(op, bad):
    x = torch.randn(5, 3)
    w = torch.ones(5)
    w[3] = bad
    calls = {
        "segment_sum": lambda: treepool.segment_sum(x, OFFSETS, w),
        "segment_mean": lambda: treepool.segment_mean(x, OFFSETS, w),
        "tree_update": lambda: treepool.tree_update(x[:1], x, OFFSETS, PARENTS, 0.1, w),
        "reptile_update": lambda: treepool.reptile_update(x[:2], x, OFFSETS, 0.1, w),
        "segment_broadcast": lambda: treepool.segment_broadcast(x[:2], OFFSETS, w, True, 5),
    }
    what = "finite" if bad > 0 else "non-negative"
    expect_error(calls[op], ValueError,
                 f"treepool.{op}: weights must be {what}, got weights[3] = {bad:g}")


# ----------------------------------------------------------------- 3. a trustworthy oracle


def test_reference_sums_2_to_the_25_float32_ones_exactly():
    """A naive float32 sum stops at 2^24 (half the answer); the oracle sums in float64."""
    T = 2 ** 25
    x = torch.ones(T, 1)
    offsets = torch.tensor([0, T])
    assert float(reference.segment_sum(x, offsets)) == float(T)
    assert float(reference.segment_mean(x, offsets)) == 1.0


def test_reference_is_more_exact_than_float32_accumulation():
    T = 10 ** 6
    x = torch.full((T, 1), 0.1)
    exact = T * float(torch.tensor(0.1))
    got = float(reference.segment_sum(x, torch.tensor([0, T])))
    assert abs(got - exact) <= 1e-7 * exact


# ------------------------------------------------------------------- 5. half precision


@params("backend", BACKENDS)
@params("dtype", [torch.float16])
def test_half_sum_overflows_unless_out_dtype_is_float32(dtype, backend):
    x = torch.full((4096, 2), 1e3, dtype=dtype)
    offsets = torch.tensor([0, 4096])
    with treepool.use_backend(backend):
        rounded = treepool.segment_sum(x, offsets)
        wide = treepool.segment_sum(x, offsets, out_dtype=torch.float32)
        wide_list = treepool.segment_sum([x, x[:, 0]], offsets, out_dtype=torch.float32)
        mean = treepool.segment_mean(x, offsets, out_dtype=torch.float32)
    assert rounded.dtype == dtype and torch.isinf(rounded).all()  # as torch.sum does
    assert wide.dtype == torch.float32 and torch.equal(wide, torch.full((1, 2), 4096e3))
    assert torch.equal(wide_list[1], torch.full((1,), 4096e3))
    assert torch.equal(mean, torch.full((1, 2), 1e3))


@params("dtype", HALF, ids=dtype_id)
def test_out_dtype_is_differentiable(dtype):
    x = torch.randn(6, 3, dtype=torch.float64).to(dtype).requires_grad_()
    out = treepool.segment_sum(x, torch.tensor([0, 2, 6]), out_dtype=torch.float32)
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert grad.dtype == dtype and torch.equal(grad, torch.ones_like(grad))


def test_out_dtype_must_be_a_float_type():
    expect_error(lambda: treepool.segment_sum(torch.randn(2, 2), torch.tensor([0, 2]),
                                              out_dtype=torch.int64),
                 TypeError, "treepool.segment_sum: out_dtype must be None, torch.float32 or "
                            "torch.float64, got torch.int64")


# ---------------------------------------------------------------------- 6. small ones


@params("num_rows", [3.0, "3", True])
def test_segment_broadcast_num_rows_of_the_wrong_type(num_rows):
    g = torch.randn(1, 2)
    expect_error(lambda: treepool.segment_broadcast(g, torch.tensor([0, 3]), num_rows=num_rows),
                 TypeError, f"treepool.segment_broadcast: num_rows must be an int or None, got "
                            f"{type(num_rows).__name__}")


@params("backend", BACKENDS)
def test_reptile_update_inplace_on_interleaved_halves_of_one_buffer(backend):
    """theta = buf[:, :P] and phi = buf[:, P:] share no element: accepted."""
    P = 3
    buf = torch.randn(2, 2 * P)
    theta, phi = buf[:, :P], buf[:, P:]
    offsets = torch.tensor([0, 1, 2])
    expected = treepool.reptile_update(theta, phi, offsets, 0.5)
    with treepool.use_backend(backend), torch.no_grad():
        treepool.reptile_update_(theta, phi, offsets, 0.5)
    torch.testing.assert_close(buf[:, :P], expected)
    # A true overlap is still refused: phi shifted by one column into theta.
    buf = torch.randn(5, 2 * P)
    with treepool.use_backend(backend), torch.no_grad():
        assert raised(lambda: treepool.reptile_update_(buf[:2, :P], buf[:, P - 1:2 * P - 1],
                                                       torch.tensor([0, 2, 5]), 0.5)) == (
            ValueError, "treepool.reptile_update_: theta must not overlap phi")


def test_one_row_is_singular_in_messages():
    expect_error(lambda: treepool.reptile_update(torch.randn(3, 2), torch.randn(4, 2),
                                                 torch.tensor([0, 4]), 0.5),
                 ValueError, "treepool.reptile_update: theta must have one row per cluster: "
                             "1 row (offsets has 2 entries), got 3")
    expect_error(lambda: treepool.tree_update(torch.randn(1, 2), torch.randn(4, 2),
                                              torch.tensor([0, 4]), torch.tensor([1]), 0.5),
                 ValueError, "treepool.tree_update: parents[0] = 1 is out of range for "
                             "node_params with 1 row")
