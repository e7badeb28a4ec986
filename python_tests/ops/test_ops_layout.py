"""Layout and reproducibility: determinism (same call twice, any thread count, also on
the CPU kernel's row-splitting path), non-contiguous and sliced inputs, the in-place
ops and aliasing between arguments."""

from __future__ import annotations

import pytest
import torch

import treepool
from .helpers import (
    BACKENDS, DEVICES, assert_matches_exact, assert_unchanged, clones, exact_broadcast,
    exact_mean, exact_reptile_update, exact_sums, exact_tree_update, gen, randn,
)

params = pytest.mark.parametrize
over_backends = params("backend", BACKENDS)
over_devices = params("device", DEVICES)

OPS = ["segment_sum", "segment_mean", "segment_broadcast", "tree_update", "reptile_update",
       "tree_update_", "reptile_update_"]


def sizes_to_offsets(sizes):
    o = [0]
    for s in sizes:
        o.append(o[-1] + s)
    return o


class Problem:
    """Inputs of every op for one level: sizes of the clusters, P, dtype."""

    def __init__(self, sizes, P, dtype=torch.float32, device="cpu", seed=0, parents=None,
                 num_prev=None, rate="vector"):
        g = gen(seed)
        self.sizes, self.P, self.dtype, self.device = sizes, P, dtype, device
        self.offsets_list = sizes_to_offsets(sizes)
        self.T, self.C = self.offsets_list[-1], len(sizes)
        self.parents_list = parents if parents is not None else [c // 2 for c in range(self.C)]
        self.num_prev = num_prev if num_prev is not None else max(self.parents_list, default=0) + 1
        self.x = randn((self.T, P), dtype, g, device=device)
        self.w = (torch.rand(self.T, generator=g, dtype=torch.float64) + 0.1).to(dtype).to(device)
        self.node = randn((self.num_prev, P), dtype, g, device=device)
        self.theta = randn((self.C, P), dtype, g, device=device)
        self.g = randn((self.C, P), dtype, g, device=device)
        if rate == "vector":
            self.lr = (torch.rand(P, generator=g, dtype=torch.float64) - 0.3).to(dtype).to(device)
        else:
            self.lr = 0.3
        self.offsets = torch.tensor(self.offsets_list, device=device)
        self.parents = torch.tensor(self.parents_list, dtype=torch.int64, device=device)

    def run(self, op, x=None, w="default", node=None, theta=None, g=None, lr=None,
            offsets=None, parents=None, out=None):
        x = self.x if x is None else x
        w = self.w if isinstance(w, str) else w
        node = self.node if node is None else node
        theta = self.theta if theta is None else theta
        g = self.g if g is None else g
        lr = self.lr if lr is None else lr
        offsets = self.offsets if offsets is None else offsets
        parents = self.parents if parents is None else parents
        if op == "segment_sum":
            return treepool.segment_sum(x, offsets, w)
        if op == "segment_mean":
            return treepool.segment_mean(x, offsets, w)
        if op == "segment_broadcast":
            return treepool.segment_broadcast(g, offsets, w, mean=True)
        if op == "tree_update":
            return treepool.tree_update(node, x, offsets, parents, lr, w)
        if op == "reptile_update":
            return treepool.reptile_update(theta, x, offsets, lr, w)
        if op == "tree_update_":
            out = torch.empty(self.C, self.P, dtype=self.dtype, device=self.device) if out is None else out
            return treepool.tree_update_(out, node, x, offsets, parents, lr, w)
        if op == "reptile_update_":
            theta = theta.clone(memory_format=torch.contiguous_format) if out is None else out
            return treepool.reptile_update_(theta, x, offsets, lr, w)
        raise AssertionError(op)

    def exact(self, op, w="default"):
        """(exact, scale) of op on this problem's values."""
        w = self.w if isinstance(w, str) else w
        o = self.offsets_list
        if op == "segment_sum":
            S, _, A = exact_sums(self.x, o, w)
            return S, A
        if op == "segment_mean":
            return exact_mean(self.x, o, w)
        if op == "segment_broadcast":
            e = exact_broadcast(self.g, o, w, True, self.T)
            return e, e.abs()
        if op.startswith("tree_update"):
            return exact_tree_update(self.node, self.x, o, self.parents_list, self.lr, w)
        return exact_reptile_update(self.theta, self.x, o, self.lr, w)

    def check(self, op, out, w="default"):
        exact, scale = self.exact(op, w)
        assert_matches_exact(out, exact, scale, self.dtype, max(self.sizes, default=0), op)


# ----------------------------------------------------------------------------- determinism

SHAPES = {
    "small": ([3, 0, 1, 5, 2], 37),
    "row-split": ([50, 2900, 0, 1, 49], 100),     # T = 3000, P = 100: long clusters are cut
    "column-blocks": ([7, 150, 3, 40], 5000),     # three column blocks, rows still cut
}


@over_devices
@over_backends
@params("shape", list(SHAPES))
@params("op", OPS)
def test_same_call_twice_is_bitwise_equal(op, shape, backend, device):
    sizes, P = SHAPES[shape]
    pb = Problem(sizes, P, device=device)
    with treepool.use_backend(backend):
        first = pb.run(op).clone()
        second = pb.run(op).clone()
    assert torch.equal(first, second)


@over_backends
@params("shape", ["row-split", "column-blocks"])
@params("op", OPS)
def test_result_independent_of_thread_count(op, shape, backend):
    sizes, P = SHAPES[shape]
    pb = Problem(sizes, P)
    results = []
    with treepool.use_backend(backend):
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(pb.run(op).clone())
    for r in results[1:]:
        assert torch.equal(results[0], r)
    pb.check(op, results[0])


@over_devices
@over_backends
@params("dtype", [torch.float32, torch.float16], ids=str)
def test_backward_is_deterministic(dtype, backend, device):
    sizes, P = SHAPES["row-split"]
    pb = Problem(sizes, P, dtype=dtype, device=device)

    def grads():
        node = pb.node.clone().requires_grad_(True)
        x = pb.x.clone().requires_grad_(True)
        w = pb.w.clone().requires_grad_(True)
        lr = pb.lr.clone().requires_grad_(True)
        out = treepool.tree_update(node, x, pb.offsets, pb.parents, lr, w)
        out.backward(torch.ones_like(out))
        return [t.grad.clone() for t in (node, x, w, lr)]

    with treepool.use_backend(backend):
        first, second = grads(), grads()
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- strided inputs


def strided(t, kind):
    """A view with t's values and another layout."""
    if t.dim() == 1:
        if kind == "contiguous":
            return t
        big = torch.empty(2 * t.shape[0] + 1, dtype=t.dtype, device=t.device)
        big[1::2] = t
        return big[1::2]
    rows, cols = t.shape
    if kind == "contiguous":
        return t
    if kind == "column-step":
        big = torch.full((rows, 2 * cols), float("nan"), dtype=t.dtype, device=t.device)
        big[:, ::2] = t
        return big[:, ::2]
    if kind == "transposed":
        return t.t().contiguous().t()
    if kind == "row-slice":
        big = torch.full((rows + 3, cols), float("nan"), dtype=t.dtype, device=t.device)
        big[2:rows + 2] = t
        return big[2:rows + 2]
    if kind == "row-step":
        big = torch.full((2 * rows, cols), float("nan"), dtype=t.dtype, device=t.device)
        big[::2] = t
        return big[::2]
    if kind == "padded-columns":
        big = torch.full((rows, cols + 5), float("nan"), dtype=t.dtype, device=t.device)
        big[:, 3:cols + 3] = t
        return big[:, 3:cols + 3]
    raise AssertionError(kind)


LAYOUTS = ["column-step", "transposed", "row-slice", "row-step", "padded-columns"]


@over_devices
@over_backends
@params("dtype", [torch.float32, torch.bfloat16], ids=str)
@params("layout", LAYOUTS)
@params("op", OPS)
def test_strided_inputs(op, layout, dtype, backend, device):
    """Every tensor argument (x, weights, node_params/theta/g, lr, offsets, parents) as a
    non-contiguous view at once: the answer is the same as for contiguous inputs."""
    pb = Problem([3, 0, 1, 6, 2, 1], 19, dtype=dtype, device=device)
    args = dict(x=strided(pb.x, layout), w=strided(pb.w, layout),
                node=strided(pb.node, layout), theta=strided(pb.theta, layout),
                g=strided(pb.g, layout), lr=strided(pb.lr, layout),
                offsets=strided(pb.offsets, layout), parents=strided(pb.parents, layout))
    for name in ("x", "node", "theta", "g", "w", "lr", "offsets", "parents"):
        assert not args[name].is_contiguous() or args[name].storage_offset() > 0
    before = clones(*args.values())
    with treepool.use_backend(backend):
        out = pb.run(op, **args)
        reference_layout = pb.run(op)
    pb.check(op, out)
    assert_unchanged(before, list(args.values()))
    pb.check(op, reference_layout)


@over_devices
@over_backends
def test_column_slice_of_every_other_column(backend, device):
    """x[:, ::2] of a buffer whose odd columns hold NaN: only the selected columns count."""
    base = torch.randn(9, 40, device=device)
    base[:, 1::2] = float("nan")
    x = base[:, ::2]
    offsets = torch.tensor([0, 4, 4, 9], device=device)
    with treepool.use_backend(backend):
        out = treepool.segment_mean(x, offsets)
    M, A = exact_mean(x, [0, 4, 4, 9], None)
    assert_matches_exact(out, M, A, torch.float32, 5)


@over_devices
@over_backends
@params("op", ["segment_sum", "segment_mean", "tree_update", "reptile_update"])
def test_expanded_inputs(op, backend, device):
    """Stride-0 views: every row of x the same row, weights one value expanded, lr one
    value expanded to [P]."""
    P = 11
    pb = Problem([2, 3, 0, 4], P, device=device)
    row = torch.randn(1, P, device=device)
    x = row.expand(pb.T, P)
    w = torch.tensor(0.25, device=device).expand(pb.T)
    lr = torch.tensor(0.5, device=device).expand(P)
    pb.x, pb.w, pb.lr = x.contiguous(), w.contiguous(), lr.contiguous()
    with treepool.use_backend(backend):
        out = pb.run(op, x=x, w=w, lr=lr)
    pb.check(op, out, w=pb.w)


@over_devices
@over_backends
def test_strided_out_and_theta(backend, device):
    """tree_update_ into rows of a wider buffer, reptile_update_ on such rows: the padding
    columns are untouched."""
    pb = Problem([2, 0, 5, 1], 13, device=device)
    with treepool.use_backend(backend):
        buf = torch.full((pb.C, 20), 7.0, device=device)
        out = buf[:, 4:17]
        assert treepool.tree_update_(out, pb.node, pb.x, pb.offsets, pb.parents, pb.lr, pb.w) is out
        pb.check("tree_update_", out)
        assert (buf[:, :4] == 7).all() and (buf[:, 17:] == 7).all()

        buf = torch.full((pb.C, 20), 7.0, device=device)
        theta = buf[:, 4:17]
        theta.copy_(pb.theta)
        assert treepool.reptile_update_(theta, pb.x, pb.offsets, pb.lr, pb.w) is theta
        pb.check("reptile_update_", theta)
        assert (buf[:, :4] == 7).all() and (buf[:, 17:] == 7).all()


# ----------------------------------------------------------------------------- in place, aliasing


@over_devices
@over_backends
def test_tree_update_inplace_into_node_params_through_a_view(backend, device):
    """out and node_params are different Python objects over the same memory (same shape
    and strides): allowed with parents == arange(C)."""
    C, P = 4, 9
    pb = Problem([1, 3, 0, 2], P, device=device, parents=list(range(C)), num_prev=C)
    original = pb.node.clone()
    with treepool.use_backend(backend):
        expected = treepool.tree_update(original, pb.x, pb.offsets, pb.parents, pb.lr, pb.w)
        out = pb.node.view(C, P)
        assert out is not pb.node
        treepool.tree_update_(out, pb.node, pb.x, pb.offsets, pb.parents, pb.lr, pb.w)
    assert torch.equal(pb.node, expected)
    pb.node = original
    pb.check("tree_update_", out)


@over_devices
@over_backends
def test_reptile_update_inplace_sequence(backend, device):
    """Three Reptile steps in place equal three out-of-place steps; phi is never touched."""
    pb = Problem([3, 2, 4], 17, device=device)
    phi = pb.x
    before = clones(phi, pb.offsets, pb.w)
    with treepool.use_backend(backend):
        theta_inplace = pb.theta.clone()
        theta = pb.theta.clone()
        for eps in (0.5, 0.25, torch.tensor(0.1, device=device)):
            treepool.reptile_update_(theta_inplace, phi, pb.offsets, eps, pb.w)
            theta = treepool.reptile_update(theta, phi, pb.offsets, eps, pb.w)
            assert torch.equal(theta_inplace, theta)
    assert_unchanged(before, [phi, pb.offsets, pb.w])


@over_devices
@over_backends
def test_tree_update_grads_alias_node_params(backend, device):
    """Out of place, the same tensor may be node_params and grads (and the inplace form
    may read both while writing a separate out)."""
    P = 6
    buf = torch.randn(4, P, device=device)
    offsets = torch.tensor([0, 1, 3, 4], device=device)
    parents = torch.tensor([0, 1, 3], device=device)
    exact, scale = exact_tree_update(buf, buf, [0, 1, 3, 4], [0, 1, 3], 0.5, None)
    before = buf.clone()
    with treepool.use_backend(backend):
        out = treepool.tree_update(buf, buf, offsets, parents, 0.5)
        out2 = torch.empty(3, P, device=device)
        treepool.tree_update_(out2, buf, buf, offsets, parents, 0.5)
    assert torch.equal(buf, before)
    assert_matches_exact(out, exact, scale, torch.float32, 2)
    assert torch.equal(out, out2)


@over_devices
@over_backends
def test_reptile_update_theta_alias_phi(backend, device):
    """Out of place, theta may be (a slice of) phi."""
    phi = torch.randn(5, 4, device=device)
    offsets = torch.tensor([0, 1, 2, 5], device=device)
    theta = phi[:3]
    exact, scale = exact_reptile_update(theta, phi, [0, 1, 2, 5], 0.3, None)
    before = phi.clone()
    with treepool.use_backend(backend):
        out = treepool.reptile_update(theta, phi, offsets, 0.3)
    assert torch.equal(phi, before)
    assert_matches_exact(out, exact, scale, torch.float32, 3)


@over_devices
@over_backends
def test_weights_alias_rows(backend, device):
    """weights may be a column of x itself (non-negative values)."""
    x = torch.rand(6, 3, device=device)
    w = x[:, 1]
    offsets = torch.tensor([0, 2, 6], device=device)
    with treepool.use_backend(backend):
        out = treepool.segment_mean(x, offsets, w)
    M, A = exact_mean(x, [0, 2, 6], w)
    assert_matches_exact(out, M, A, torch.float32, 4)


@over_devices
@over_backends
@params("op", ["segment_sum", "segment_mean", "segment_broadcast", "tree_update",
               "reptile_update"])
def test_out_of_place_returns_fresh_tensor(op, backend, device):
    """The result shares no memory with any input."""
    pb = Problem([2, 2], 5, device=device, parents=[0, 1], num_prev=2)
    with treepool.use_backend(backend):
        out = pb.run(op)
    for t in (pb.x, pb.w, pb.node, pb.theta, pb.g, pb.lr):
        assert out.untyped_storage().data_ptr() != t.untyped_storage().data_ptr()
