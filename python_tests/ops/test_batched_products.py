"""treepool.ops.products (bmm_nn, bmm_nt, bmm_tn, outer, row_dot, weighted_row_sum and
the ReLU forms bmm_nt_relu, outer_relu) against their plain PyTorch expressions: values on random shapes, dtypes and layouts
drawn by hypothesis (both backends), first and second derivatives in float64
(gradcheck, gradgradcheck), the layout of the native gradients at both orders (the
reason these ops exist), bad input, opcheck and the fake kernels."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import treepool
from treepool.ops import products

from .helpers import AVAILABLE_BACKENDS, DTYPES, HALF, dtype_id, needs_native

params = pytest.mark.parametrize

# op: (its operands' shapes as letters, the optional third operand's name and shape,
#      the plain PyTorch expression)
OPS = {
    "bmm_nn": ("BMK", "BKN", ("acc", "BMN"),
               lambda x, y, c=None: x @ y if c is None else c + x @ y),
    "bmm_nt": ("BMK", "BNK", ("bias", "BN"),
               lambda x, y, c=None: x @ y.transpose(1, 2) + (0 if c is None else c[:, None])),
    "bmm_tn": ("BKM", "BKN", None, lambda x, y: x.transpose(1, 2) @ y),
    "outer": ("BN", "BK", ("bias", "BK"),
              lambda g, w, c=None: g[..., None] * w[:, None] + (0 if c is None else c[:, None])),
    "row_dot": ("BNK", "BK", None, lambda h, w: (h * w[:, None]).sum(-1)),
    "weighted_row_sum": ("BN", "BNK", None, lambda g, h: (g[..., None] * h).sum(1)),
    "bmm_nt_relu": ("BMK", "BNK", ("bias", "BN"),
                    lambda x, y, c=None: torch.relu(OPS["bmm_nt"][3](x, y, c))),
    "outer_relu": ("BN", "BK", ("bias", "BK"),
                   lambda g, w, c=None: torch.relu(OPS["outer"][3](g, w, c))),
}


def operands(op, sizes, dtype, third, gen, requires_grad=False):
    a, b, extra, _ = OPS[op]
    shapes = [a, b] + ([extra[1]] if third and extra else [])
    return [torch.randn([sizes[c] for c in s], generator=gen, dtype=torch.float64)
            .to(dtype).requires_grad_(requires_grad) for s in shapes]


def relayout(t, how):
    """The same values in another layout: transposed storage, or a batch expanded from
    one row (stride 0) when the values allow it."""
    if how == "transposed" and t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if how == "expanded":
        return t[:1].expand_as(t)
    return t


def plain(op, args):
    return OPS[op][3](*[a.double() for a in args])


def tol(dtype, k):
    """Sums of k products of O(1) values, rounded in dtype."""
    eps = {torch.float64: 1e-15, torch.float32: 1.2e-7, torch.float16: 1e-3,
           torch.bfloat16: 8e-3}[dtype]
    return dict(atol=4 * eps * (k + 1) ** 0.5 * 4, rtol=4 * eps)


@st.composite
def cases(draw):
    op = draw(st.sampled_from(sorted(OPS)))
    sizes = {c: draw(st.integers(0 if c != "B" else 1, 7)) for c in "BMNK"}
    dtype = draw(st.sampled_from(DTYPES))
    third = draw(st.booleans())
    layout = draw(st.sampled_from(["contiguous", "transposed", "expanded"]))
    seed = draw(st.integers(0, 2**31 - 1))
    return op, sizes, dtype, third, layout, seed


@params("backend", AVAILABLE_BACKENDS)
@given(case=cases())
def test_values_equal_the_plain_expression(backend, case):
    op, sizes, dtype, third, layout, seed = case
    gen = torch.Generator().manual_seed(seed)
    args = operands(op, sizes, dtype, third, gen)
    if layout == "expanded":
        args = [a[:1].expand_as(a).clone() for a in args]  # the values of a stride-0 batch
    laid = [relayout(a, layout) for a in args]
    before = [a.clone() for a in laid]
    with treepool.use_backend(backend):
        out = getattr(products, op)(*laid)
    want = plain(op, args)
    assert out.dtype == dtype and out.shape == want.shape
    k = max(sizes["K"], sizes["N"]) if op == "weighted_row_sum" else max(sizes["K"], 1)
    torch.testing.assert_close(out.double(), want, **tol(dtype, k))
    for a, b in zip(laid, before):  # nothing is written
        assert torch.equal(a, b)


# The CPU kernels run float32 products of at most 64 * 64 * 16 multiply-adds per matrix
# by register tiles (csrc/cpu/small_products_cpu.cpp): 4 rows x 16 / 8 / 1 columns (nn,
# tn), 2 x 5..1 dots of 8-float chunks plus a remainder (nt, at most 16 columns). These
# sizes reach every tile and remainder, and both sides of the size limits.
TILE_SIZES = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 15, 16, 17, 24, 33]


@st.composite
def small_cases(draw):
    op = draw(st.sampled_from(["bmm_nn", "bmm_nt", "bmm_tn"]))
    sizes = {c: draw(st.sampled_from(TILE_SIZES)) for c in "MNK"}
    sizes["B"] = draw(st.integers(1, 3))
    return op, sizes, draw(st.booleans()), draw(st.integers(0, 2**31 - 1))


@needs_native
@given(case=small_cases())
def test_small_float32_products_on_every_tile(case):
    op, sizes, third, seed = case
    args = operands(op, sizes, torch.float32, third, torch.Generator().manual_seed(seed))
    out = getattr(products, op)(*args)
    torch.testing.assert_close(out.double(), plain(op, args), **tol(torch.float32, sizes["K"]))


@needs_native
@params("op", ["bmm_nn", "bmm_nt", "bmm_tn"])
@params("M,N,K", [(64, 64, 16), (64, 64, 17), (16, 64, 64), (10, 10, 64), (10, 16, 64),
                  (10, 17, 64)])
def test_small_products_at_the_size_limit_and_across_threads(op, M, N, K):
    args = operands(op, dict(B=5, M=M, N=N, K=K), torch.float32, True,
                    torch.Generator().manual_seed(1))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = getattr(products, op)(*args)
        torch.set_num_threads(2)
        two = getattr(products, op)(*args)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(one.double(), plain(op, args), **tol(torch.float32, K))
    assert torch.equal(one, two)  # each matrix summed in one order, whatever the threads


def _grad_args(op, third):
    gen = torch.Generator().manual_seed(0)
    return operands(op, dict(B=3, M=4, N=5, K=2), torch.float64, third, gen,
                    requires_grad=True)


def _op_forms():
    return [(op, third) for op, spec in sorted(OPS.items())
            for third in ((False, True) if spec[2] else (False,))]


@params("backend", AVAILABLE_BACKENDS)
@params("op,third", _op_forms())
def test_first_and_second_derivatives(backend, op, third):
    args = _grad_args(op, third)
    fn = getattr(products, op)
    with treepool.use_backend(backend):
        assert torch.autograd.gradcheck(fn, args)
        assert torch.autograd.gradgradcheck(fn, args)


@needs_native
@params("op,third", _op_forms())
def test_native_gradients_equal_the_plain_ones(op, third):
    """Both orders, every operand: the native rules against autograd's on the plain
    expression (the values of a second-order meta-step's backward)."""
    args = _grad_args(op, third)
    cot = torch.randn(plain(op, args).shape, dtype=torch.float64)

    def grads(fn):
        out = fn(*args)
        first = torch.autograd.grad((out * cot).sum(), args, create_graph=True)
        second = torch.autograd.grad(sum((g * g).sum() for g in first), args,
                                     allow_unused=True, materialize_grads=True)
        return first + second

    with treepool.use_backend("native"):
        native = grads(getattr(products, op))
    for got, want in zip(native, grads(OPS[op][3])):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@needs_native
def test_native_gradients_keep_the_operands_layout():
    """A linear layer x W^T + b and its weight gradient, differentiated twice: every
    gradient of x and W is contiguous in their own layout (autograd's rule for
    torch.bmm on W.transpose(1, 2) gives W's gradient transposed)."""
    x = torch.randn(4, 10, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    with treepool.use_backend("native"):
        z = products.bmm_nt(x, w, b)
        gx, gw = torch.autograd.grad(z.square().sum(), (x, w), create_graph=True)
        hx, hw = torch.autograd.grad(gx.square().sum() + gw.square().sum(), (x, w))
    for g in (gx, gw, hx, hw):
        assert g.is_contiguous()


@needs_native
@params("op,third", _op_forms())
def test_opcheck(op, third):
    args = _grad_args(op, third)
    torch.library.opcheck(getattr(torch.ops.treepool, op), args)


@needs_native
def test_fake_kernels_give_the_shapes():
    with torch.device("meta"):
        x, w = torch.empty(2, 5, 3), torch.empty(2, 4, 3)
        assert products.bmm_nt(x, w).shape == (2, 5, 4)
        assert products.row_dot(x, torch.empty(2, 3)).shape == (2, 5)
        assert products.bmm_nt_relu(x, w, torch.empty(2, 4)).shape == (2, 5, 4)
        assert products.outer_relu(torch.empty(2, 5), torch.empty(2, 4)).shape == (2, 5, 4)


@params("backend", AVAILABLE_BACKENDS)
@params("dtype", [torch.float32] + list(HALF), ids=dtype_id)
def test_row_ops_accumulate_half_types_in_float(backend, dtype):
    h = torch.full((1, 1, 4096), 1.0, dtype=dtype)
    w = torch.full((1, 4096), 1.0, dtype=dtype)
    with treepool.use_backend(backend):
        got = products.row_dot(h, w)
    assert got.item() == 4096  # exact in float accumulation; 2048 + 1 rounds in float16


BAD = [
    ("bmm_nt", lambda: (torch.randn(2, 3, 4), torch.randn(2, 5, 3)), "y"),
    ("bmm_nt", lambda: (torch.randn(2, 3, 4), torch.randn(3, 5, 4)), "y"),
    ("bmm_nt", lambda: (torch.randn(3, 4), torch.randn(2, 5, 4)), "x"),
    ("bmm_nt", lambda: (torch.randn(2, 3, 4), torch.randn(2, 5, 4), torch.randn(2, 4)), "bias"),
    ("bmm_nn", lambda: (torch.randn(2, 3, 4), torch.randn(2, 4, 5), torch.randn(2, 3, 4)), "acc"),
    ("bmm_tn", lambda: (torch.randn(2, 3, 4), torch.randn(2, 4, 5)), "y"),
    ("bmm_nt", lambda: (torch.randn(2, 3, 4), torch.randn(2, 5, 4, dtype=torch.float64)), "y"),
    ("bmm_nt", lambda: (torch.ones(2, 3, 4, dtype=torch.long), torch.ones(2, 5, 4, dtype=torch.long)), "x"),
    ("row_dot", lambda: (torch.randn(2, 3, 4), torch.randn(2, 5)), "w"),
    ("row_dot", lambda: (torch.randn(2, 3, 4), torch.randn(3, 4)), "w"),
    ("weighted_row_sum", lambda: (torch.randn(2, 3), torch.randn(2, 4, 5)), "h"),
    ("weighted_row_sum", lambda: (torch.randn(2, 3, 1), torch.randn(2, 3, 5)), "g"),
    ("outer", lambda: (torch.randn(2, 3), torch.randn(3, 5)), "w"),
    ("outer", lambda: (torch.randn(2, 3), torch.randn(2, 5), torch.randn(2, 4)), "bias"),
    ("bmm_nt_relu", lambda: (torch.randn(2, 3, 4), torch.randn(2, 5, 3)), "y"),
    ("bmm_nt_relu", lambda: (torch.randn(2, 3, 4), torch.randn(2, 5, 4), torch.randn(2, 4)), "bias"),
    ("outer_relu", lambda: (torch.randn(2, 3, 1), torch.randn(2, 5)), "g"),
    ("outer_relu", lambda: (torch.randn(2, 3), torch.randn(2, 5), torch.randn(3, 5)), "bias"),
]


@params("backend", AVAILABLE_BACKENDS)
@params("op,make,name", BAD, ids=[f"{op}-{name}-{i}" for i, (op, _, name) in enumerate(BAD)])
def test_bad_input_names_the_argument(backend, op, make, name):
    with treepool.use_backend(backend), \
            pytest.raises((RuntimeError, ValueError, TypeError), match=rf"\b{op}\b.*\b{name}\b"):
        getattr(products, op)(*make())


@needs_native
def test_torch_compile_of_a_layer_stack_equals_eager():
    """torch.compile(fullgraph=True) of a batched 1-8-8-1 MLP on the products (the ReLU
    forms, row_dot): the same values and first derivatives as eager (opcheck's
    aot-dispatch tests cover the ops one by one)."""
    def mlp(x, w1, b1, w2, b2, w3):
        h = products.outer_relu(x, w1, b1)
        h = products.bmm_nt_relu(h, w2, b2)
        return products.row_dot(h, w3).square().sum()

    g = torch.Generator().manual_seed(3)
    shapes = [(4, 6), (4, 8), (4, 8), (4, 8, 8), (4, 8), (4, 8)]
    args = [torch.randn(s, generator=g, dtype=torch.float64, requires_grad=i > 0)
            for i, s in enumerate(shapes)]
    compiled = torch.compile(mlp, fullgraph=True)
    want, got = mlp(*args), compiled(*args)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(got, args[1:]), torch.autograd.grad(want, args[1:])):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
