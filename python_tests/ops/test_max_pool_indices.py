"""treepool.ops.max_pool2d_indices against ATen's max pooling (F.max_pool2d's indices):
exact equality on random planes with ties, NaN and infinities, every dtype and kernel,
any leading dimensions and layout; bad input; vmap; opcheck and the fake kernel."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import treepool
from treepool import ops

from .helpers import AVAILABLE_BACKENDS, DTYPES, dtype_id, needs_native

params = pytest.mark.parametrize
OP = "treepool.max_pool2d_indices"


def aten_indices(x, kernel):
    """F.max_pool2d's indices, each plane of x [..., H, W] pooled as a 1-channel image
    (float16 through float32: ATen's CPU pooling compares half types in float32)."""
    kh, kw = kernel
    planes = x.reshape(-1, 1, *x.shape[-2:])
    if x.dtype == torch.float16:
        planes = planes.float()
    _, idx = F.max_pool2d(planes, (kh, kw), return_indices=True)
    return idx.reshape(*x.shape[:-2], *idx.shape[-2:])


@st.composite
def planes(draw):
    """(x, (kh, kw)): x [..., H, W] whose values tie often (a few small integers) and hold
    NaN and +-inf, with the kernel no larger than a plane."""
    lead = draw(st.lists(st.integers(1, 3), min_size=0, max_size=3))
    H, W = draw(st.integers(1, 11)), draw(st.integers(1, 11))
    kh, kw = draw(st.integers(1, min(H, 4))), draw(st.integers(1, min(W, 4)))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-2, 3, (*lead, H, W), generator=g).to(torch.float64)
    if draw(st.booleans()):
        x = x + torch.rand(x.shape, generator=g, dtype=torch.float64)
    special = torch.rand(x.shape, generator=g)
    x[special < 0.05] = float("nan")
    x[(special >= 0.05) & (special < 0.08)] = float("inf")
    x[(special >= 0.08) & (special < 0.11)] = -float("inf")
    return x.to(dtype), (kh, kw)


@params("backend", AVAILABLE_BACKENDS)
@given(case=planes())
def test_equals_aten(backend, case):
    x, kernel = case
    before = x.clone()
    with treepool.use_backend(backend):
        idx = ops.max_pool2d_indices(x, kernel)
    assert idx.dtype == torch.int64
    assert torch.equal(idx, aten_indices(x, kernel))
    assert torch.equal(x.isnan(), before.isnan()) and torch.equal(x.nan_to_num(), before.nan_to_num())


@params("backend", AVAILABLE_BACKENDS)
@params("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_large_planes_use_threads_and_agree(backend, dtype):
    """Enough planes for several threads' tasks, the 2 x 2 kernel and another one."""
    torch.manual_seed(0)
    x = torch.relu(torch.randn(6, 64, 28, 28, dtype=dtype))   # relu: many tied zeros
    for kernel in [(2, 2), (3, 3), (2, 4)]:
        with treepool.use_backend(backend):
            assert torch.equal(ops.max_pool2d_indices(x, kernel), aten_indices(x, kernel))


@params("backend", AVAILABLE_BACKENDS)
@params("layout", ["transposed", "sliced", "channels_last", "expanded"])
def test_any_layout(backend, layout):
    torch.manual_seed(1)
    base = torch.randn(4, 3, 8, 10)
    x = {"transposed": base.transpose(0, 1),
         "sliced": base[:, :, 1:7, ::2],
         "channels_last": base.contiguous(memory_format=torch.channels_last),
         "expanded": base[:1].expand(4, 3, 8, 10)}[layout]
    with treepool.use_backend(backend):
        assert torch.equal(ops.max_pool2d_indices(x, 2), aten_indices(x.contiguous(), (2, 2)))


@params("backend", AVAILABLE_BACKENDS)
def test_no_planes(backend):
    with treepool.use_backend(backend):
        idx = ops.max_pool2d_indices(torch.empty(0, 3, 4, 4), 2)
    assert idx.shape == (0, 3, 2, 2) and idx.dtype == torch.int64


@params("backend", AVAILABLE_BACKENDS)
@params("x,kernel,kind,message", [
    (torch.zeros(4, 4, dtype=torch.int64), 2, TypeError, "floating dtype"),
    (torch.zeros(4), 2, ValueError, "at least 2 dimensions"),
    (torch.zeros(3, 4), 4, ValueError, "smaller than the kernel"),
    (torch.zeros(4, 4), 0, ValueError, "must be positive"),
    (torch.zeros(4, 4), (2, 2, 2), TypeError, "kernel_size must be an int or 2 ints"),
    (torch.zeros(4, 4), 2.0, TypeError, "kernel_size must be an int or 2 ints"),
    ([[1.0, 2.0]], 1, TypeError, "x must be a tensor"),
])
def test_bad_input(backend, x, kernel, kind, message):
    with treepool.use_backend(backend), pytest.raises(kind, match=f"{OP}: .*{message}"):
        ops.max_pool2d_indices(x, kernel)


@needs_native
@params("x,kernel,kind,message", [
    (torch.zeros(4, 4, dtype=torch.int64), [2, 2], TypeError, "floating dtype"),
    (torch.zeros(3, 4), [4, 4], ValueError, "smaller than the kernel"),
    (torch.zeros(4, 4), [2, 0], ValueError, "must be positive"),
])
def test_kernel_checks_its_arguments(x, kernel, kind, message):
    """The compiled op called directly raises what the Python checks raise."""
    with pytest.raises(kind, match=f"{OP}: .*{message}"):
        torch.ops.treepool.max_pool2d_indices(x, kernel)


@params("backend", AVAILABLE_BACKENDS)
@params("in_dim", [0, 1, 2, 3])
def test_vmap(backend, in_dim):
    """A batch dimension anywhere, the last two included, gives the per-example loop."""
    torch.manual_seed(2)
    x = torch.randn(3, 4, 6, 8)
    with treepool.use_backend(backend):
        got = torch.func.vmap(lambda t: ops.max_pool2d_indices(t, 2), in_dims=in_dim)(x)
        want = torch.stack([ops.max_pool2d_indices(t, 2) for t in x.unbind(in_dim)])
    assert torch.equal(got, want)


@params("backend", AVAILABLE_BACKENDS)
def test_not_differentiable_and_usable_under_grad(backend):
    """Integer indices; under torch.func.grad (and vmap of it) gathering x at them gives
    max pooling's gradient."""
    torch.manual_seed(3)
    x = torch.randn(5, 2, 6, 6, dtype=torch.float64, requires_grad=True)

    def pooled_sum(t):
        idx = ops.max_pool2d_indices(t, 2)
        return (t.flatten(-2).gather(-1, idx.flatten(-2)) ** 2).sum()

    with treepool.use_backend(backend):
        assert not ops.max_pool2d_indices(x, 2).requires_grad
        per_example = torch.func.vmap(torch.func.grad(pooled_sum))(x)
    want = torch.autograd.grad((F.max_pool2d(x, 2) ** 2).sum(), x)[0]
    assert torch.equal(per_example, want)


@needs_native
def test_opcheck():
    torch.manual_seed(4)
    for x in [torch.randn(2, 3, 6, 7), torch.randn(5, 4, dtype=torch.float64)]:
        torch.library.opcheck(torch.ops.treepool.max_pool2d_indices.default, (x, [2, 2]))


@needs_native
def test_fake_kernel():
    out = torch.ops.treepool.max_pool2d_indices(torch.empty(2, 3, 9, 7, device="meta"), [2, 3])
    assert out.shape == (2, 3, 4, 2) and out.dtype == torch.int64 and out.device.type == "meta"


@params("backend", AVAILABLE_BACKENDS)
def test_torch_compile(backend):
    """fullgraph torch.compile traces the op (its fake kernel) and the gather of the
    values; forward and gradient equal F.max_pool2d's."""
    torch.manual_seed(5)
    x = torch.randn(2, 3, 8, 6, requires_grad=True)

    def pooled(t):
        idx = ops.max_pool2d_indices(t, 2)
        return t.flatten(-2).gather(-1, idx.flatten(-2)).view(idx.shape)

    torch._dynamo.reset()
    with treepool.use_backend(backend):
        out = torch.compile(pooled, fullgraph=True, backend="aot_eager")(x)
    assert torch.equal(out, F.max_pool2d(x, 2))
    g = torch.randn_like(out)
    assert torch.equal(torch.autograd.grad(out, x, g)[0],
                       torch.autograd.grad(F.max_pool2d(x, 2), x, g)[0])
