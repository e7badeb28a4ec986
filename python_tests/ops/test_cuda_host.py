"""The CUDA kernels of csrc/cuda, executed on the CPU (marker ``cuda_host``).

The .cu files are compiled unchanged by g++ with the host shim of
python_tests/ops/cuda_host (every launch runs as a loop over blocks and threads, warp
shuffles as cooperating fibers) and called through the launchers of kernels.h, as
the CUDA bindings call them. Checked here, for every op, epilogue and dtype:
- the result matches treepool.ops.reference (hypothesis-drawn shapes that cross chunk
  boundaries, empty and 90%-skewed clusters, weights with zeros, rate as float / 0-d /
  [P], in-place updates, row strides, buffers misaligned by one element);
- nothing is written outside the output and the workspace (guard values), and
  every output element is written (outputs and workspace start as NaN);
- the 16-byte vector path and the scalar path give bit-identical results;
- the result does not depend on the order in which blocks, warps and lanes run;
- the emulation itself: CUDA's launch limits, the shuffles, a lane that exits while
  the others shuffle.

``pytest -m cuda_host python_tests`` runs these alone. Skipped when g++ or the CUDA
headers are missing.
"""

from __future__ import annotations

import ctypes

from . import helpers
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from .cuda_host import cases, harness, host_build
from .cuda_host.cases import OPS, REDUCE_OPS, Case
from .cuda_host.harness import Layout

pytestmark = pytest.mark.cuda_host

DTYPES = helpers.DTYPES
LAYOUTS = ["vector", "misaligned", "strided"]


@pytest.fixture(scope="module", autouse=True)
def host_library():
    try:
        harness.lib()
    except host_build.Unavailable as exc:
        pytest.skip(f"host build of the CUDA kernels unavailable: {exc}")


@pytest.fixture(autouse=True)
def forward_order():
    harness.set_order("forward")
    yield
    harness.set_order("forward")


def layout_for(kind: str, P: int, dtype: torch.dtype, pad: int) -> Layout:
    if kind == "vector":
        return harness.vector_layout(P, dtype)
    if kind == "misaligned":  # one element off: the scalar path
        return Layout(shift=1, pad=pad)
    return Layout(shift=0, pad=pad)  # strided rows, aligned start


def check_against_reference(case: Case, out: torch.Tensor) -> None:
    expected = cases.run_reference(case)
    scale, n_terms = cases.tolerance_args(case)
    helpers.assert_close(out, expected, case.dtype, scale, n_terms, what=repr(case))


def assert_bit_identical(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    same = (a == b) | (torch.isnan(a) & torch.isnan(b))
    assert a.shape == b.shape and bool(same.all()), f"{what}: results differ"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=helpers.dtype_id)
@pytest.mark.parametrize("op", OPS)
@given(data=st.data())
def test_kernel_matches_reference(op, dtype, layout, data):
    case = data.draw(cases.cases(op, dtype), label="case")
    pad = data.draw(st.integers(0, 9), label="pad")
    out = cases.run_kernel(case, layout_for(layout, case.P, dtype, pad))
    check_against_reference(case, out)


@pytest.mark.parametrize("dtype", DTYPES, ids=helpers.dtype_id)
@pytest.mark.parametrize("op", OPS)
@given(data=st.data())
def test_vector_and_scalar_paths_are_bit_identical(op, dtype, data):
    case = data.draw(cases.cases(op, dtype), label="case")
    vector = cases.run_kernel(case, harness.vector_layout(case.P, dtype))
    scalar = cases.run_kernel(case, Layout(shift=1, pad=data.draw(st.integers(0, 3))))
    assert_bit_identical(vector, scalar, f"vector vs scalar path, {case!r}")


@pytest.mark.parametrize("dtype", DTYPES, ids=helpers.dtype_id)
@pytest.mark.parametrize("op", OPS)
@given(data=st.data())
def test_result_does_not_depend_on_execution_order(op, dtype, data):
    case = data.draw(cases.cases(op, dtype), label="case")
    layout = harness.vector_layout(case.P, dtype)
    forward = cases.run_kernel(case, layout)
    harness.set_order("reverse")
    reverse = cases.run_kernel(case, layout)
    harness.set_order("shuffled", data.draw(st.integers(0, 2 ** 32), label="seed"))
    shuffled = cases.run_kernel(case, layout)
    assert_bit_identical(forward, reverse, f"forward vs reverse order, {case!r}")
    assert_bit_identical(forward, shuffled, f"forward vs shuffled order, {case!r}")


# One cluster of 90% of 2000 rows between small and empty ones: many chunks, and the
# big cluster crosses many chunk boundaries.
SKEWED = [0, 3, 1, 0, 2, 1800, 0, 5, 1, 0] + [20] * 9 + [8]


@pytest.mark.parametrize("dtype", DTYPES, ids=helpers.dtype_id)
@pytest.mark.parametrize("op", REDUCE_OPS)
@pytest.mark.parametrize("weights", ["none", "with_zeros"])
def test_skewed_reduction_crosses_chunks_and_runs_the_combine_kernel(op, dtype, weights):
    case = Case(op, dtype, SKEWED, P=5, weight_kind=weights, rate_kind="vector",
                parents=[0] * len(SKEWED), num_prev=2, seed=7)
    before = harness.launch_count()
    out = cases.run_kernel(case, Layout(shift=1))
    # A weighted mean or update first rescales the weights (cluster_weights_kernel).
    rescaled = weights != "none" and op != "segment_sum"
    assert harness.launch_count() - before == 2 + rescaled, "the combine kernel did not run"
    check_against_reference(case, out)


@pytest.mark.parametrize("mean", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=helpers.dtype_id)
def test_skewed_weighted_broadcast(dtype, mean):
    op = "segment_broadcast_mean" if mean else "segment_broadcast"
    case = Case(op, dtype, SKEWED, P=5, weight_kind="with_zeros", seed=3)
    before = harness.launch_count()
    out = cases.run_kernel(case, Layout(shift=0, pad=3))
    # The weighted mean first runs cluster_weights_kernel (warp shuffles).
    assert harness.launch_count() - before == (2 if mean else 1)
    check_against_reference(case, out)


@pytest.mark.parametrize("kind", ["tiny", "huge", "1e-45 and 3e38"])
@pytest.mark.parametrize("op", cases.MEAN_OPS)
def test_extreme_weights_give_finite_means(op, kind):
    """Weights of 1e-45 made 1 / W_c inf and weights of 3e38 made W_c inf (then NaN):
    the kernels rescale each cluster's weights by a power of two and divide."""
    case = Case(op, torch.float32, [3, 4, 0, 2], P=9, weight_kind="positive",
                rate_kind="vector", seed=11)
    if kind == "1e-45 and 3e38":  # the values, side by side in one cluster
        case.weights = torch.tensor([1e-45, 3e38, 2e-45, 1e-45, 3e38, 3e38, 1e-45, 0.0, 2e-45])
    else:
        case.weights = helpers.make_weights(kind, helpers.Level([3, 4, 0, 2], [0] * 4, 1),
                                            torch.float32, helpers.gen(3))
    assert torch.isfinite(case.weights).all()
    out = cases.run_kernel(case, harness.vector_layout(case.P, torch.float32))
    assert bool(torch.isfinite(out).all()), f"{case!r}: {out}"
    check_against_reference(case, out)


# ------------------------------------------------------- multi-tensor ops: one launch per 16


TENSORS_PER_LAUNCH = 16  # kMaxTensorsPerLaunch of csrc/cuda/kernels.h


@st.composite
def tensor_widths(draw) -> list:
    """The widths of a model's parameters: 1 to 20 tensors (more than one launch's 16),
    narrow and wide ones, some of no columns."""
    return draw(st.lists(st.one_of(st.integers(0, 40), st.integers(1, 40),
                                   st.sampled_from([127, 129, 513])), min_size=1, max_size=20))


@pytest.mark.parametrize("dtype", DTYPES, ids=helpers.dtype_id)
@pytest.mark.parametrize("op", OPS)
@given(data=st.data())
def test_multi_tensor_launch_matches_reference(op, dtype, data):
    """A list of tensors (the `*_multi` ops) runs as one launch per 16 tensors over a
    table of pointers; each tensor's result is the op's, the vector and the scalar
    paths agree bit for bit, and no buffer is written outside."""
    Ps = data.draw(tensor_widths(), label="widths")
    sizes = data.draw(cases.cluster_sizes(max(8, min(300, 12000 // max(max(Ps), 1)))),
                      label="sizes")
    parents, num_prev = data.draw(helpers.parents_for(len(sizes)), label="parents")
    kinds = cases.WEIGHT_KINDS + (cases.EXTREME_WEIGHT_KINDS if op in cases.MEAN_OPS else [])
    cs = cases.list_cases(op, dtype, sizes, Ps, data.draw(st.sampled_from(kinds)),
                          data.draw(st.sampled_from(cases.RATE_KINDS)), parents, num_prev,
                          data.draw(st.integers(0, 2 ** 31 - 1), label="seed"))
    vector = cases.run_kernels(cs, Layout(shift=0, pad=8 * (-max(Ps)) % 8 + 8))
    scalar = cases.run_kernels(cs, Layout(shift=1, pad=data.draw(st.integers(0, 3))))
    for case, got_v, got_s in zip(cs, vector, scalar):
        check_against_reference(case, got_v)
        assert_bit_identical(got_v, got_s, f"vector vs scalar path, {case!r}")


@pytest.mark.parametrize("op", REDUCE_OPS + ["segment_broadcast_mean"])
def test_twenty_tensors_take_two_launches(op):
    """20 tensors of a skewed tree: two launches of the reduction (16 + 4 tensors), each
    with its combine pass, after one rescaling of the weights (not one per tensor)."""
    Ps = [5, 1, 0, 40, 3, 129, 7, 2, 9, 33, 1, 4, 6, 8, 10, 12, 14, 16, 0, 18]
    cs = cases.list_cases(op, torch.float32, SKEWED, Ps, weight_kind="with_zeros",
                          rate_kind="vector", parents=[0] * len(SKEWED), num_prev=2, seed=5)
    before = harness.launch_count()
    outs = cases.run_kernels(cs, Layout(shift=1))
    groups = -(-len(Ps) // TENSORS_PER_LAUNCH)
    per_group = 1 if op.startswith("segment_broadcast") else 2  # + the combine pass
    rescale = 1 if op != "segment_sum" else 0
    assert harness.launch_count() - before == rescale + groups * per_group
    for case, out in zip(cs, outs):
        check_against_reference(case, out)


def test_list_with_different_clusters_is_refused():
    """The tensors of one call must share the tree level: a list whose offsets differ is
    cudaErrorInvalidValue, not a silent mix."""
    case = cases.Case("segment_mean", torch.float32, [2, 3], P=4)
    dt = harness.DTYPE_IDS[torch.float32]
    offsets = [harness.index_tensor(case.offsets), harness.index_tensor(case.offsets)]
    parents = harness.index_tensor(case.parents)
    args, guarded = [], []
    for off in offsets:  # equal values, but two tensors: the kernels cannot know
        a, _, bufs = cases.reduce_args(case, Layout(), dt, off, parents, None)
        args.append(a)
        guarded += bufs
    with pytest.raises(RuntimeError, match="cudaError 1"):
        harness.run_reduce(args, guarded)
    harness.run_reduce(args[:1], guarded)  # each alone is fine


# ----------------------------------------------------------------------------- the emulation


def mark(grid, block):
    ran = torch.zeros(grid[0] * grid[1] * block[0] * block[1], dtype=torch.int32)
    err = harness.lib().tp_selftest_mark(ctypes.c_void_p(ran.data_ptr()), *grid, *block)
    return err, ran


@pytest.mark.parametrize("order", list(harness.ORDERS))
@pytest.mark.parametrize("grid,block", [((1, 1), (1, 1)), ((3, 2), (32, 8)), ((2, 5), (33, 3)),
                                        ((1, 1), (256, 1))])
def test_every_thread_of_the_grid_runs_once(grid, block, order):
    harness.set_order(order, seed=5)
    err, ran = mark(grid, block)
    assert err == 0, harness.take_error()
    assert bool((ran == 1).all())


@pytest.mark.parametrize("grid,block,message", [
    ((1, 65536), (32, 1), "exceeds (2^31 - 1, 65535, 65535)"),
    ((1, 1), (512, 1), "exceeds the kernel's __launch_bounds__(256)"),
])
def test_launch_limits_are_enforced(grid, block, message):
    ran = torch.zeros(1, dtype=torch.int32)
    err = harness.lib().tp_selftest_mark(ctypes.c_void_p(ran.data_ptr()), *grid, *block)
    assert err != 0
    assert int(ran.sum()) == 0, "a refused launch ran threads"
    if "launch_bounds" not in message:  # that one is refused by launch.cuh, as on the device
        assert message in harness.take_error()


def test_block_of_more_than_1024_threads_is_refused():
    ran = torch.zeros(2048, dtype=torch.int32)
    err = harness.lib().tp_selftest_mark_unbounded(ctypes.c_void_p(ran.data_ptr()), 1025)
    assert err != 0 and "at most 1024" in harness.take_error()


@pytest.mark.parametrize("order", list(harness.ORDERS))
def test_warp_shuffles(order):
    harness.set_order(order, seed=11)
    out = torch.full((32 * 4,), -1, dtype=torch.int32)
    err = harness.lib().tp_selftest_shuffle(ctypes.c_void_p(out.data_ptr()), 32)
    assert err == 0, harness.take_error()
    got = out.view(32, 4)
    lanes = torch.arange(32, dtype=torch.int32)
    assert int(got[0, 0]) == sum(range(32))  # the shuffle-down tree's total, in lane 0
    assert got[:, 1].tolist() == [0] + [10 * (l - 1) for l in range(1, 32)]
    assert got[:, 2].tolist() == (10 * (lanes ^ 3)).tolist()
    assert got[:, 3].tolist() == [50] * 32


def test_lane_that_exits_while_others_shuffle_is_reported():
    out = torch.zeros(32 * 4, dtype=torch.int32)
    err = harness.lib().tp_selftest_shuffle(ctypes.c_void_p(out.data_ptr()), 16)
    assert err != 0
    assert "lane 16 has exited" in harness.take_error()
    # The emulation is usable afterwards.
    assert harness.lib().tp_selftest_shuffle(ctypes.c_void_p(out.data_ptr()), 32) == 0


def test_every_launch_states_its_kernels_launch_bounds():
    """launch<kBound>(kernel, ...) must name the kernel's own __launch_bounds__, since
    that is the bound the launch checks (nvcc and the host emulation alike)."""
    import re

    bounds, launches = {}, []
    for source in sorted(host_build.CUDA_DIR.glob("*.cu")):
        text = source.read_text()
        for bound, name in re.findall(
                r"__global__\s+void\s+__launch_bounds__\((\w+)\)\s*(\w+)\s*\(", text):
            bounds[name] = bound
        launches += re.findall(r"launch<(\w+)>\(\s*(\w+)", text)
    assert bounds and launches
    for bound, name in launches:
        assert name in bounds, f"{name} is launched but declares no __launch_bounds__"
        assert bounds[name] == bound, (
            f"{name}: __launch_bounds__({bounds[name]}) but launched with launch<{bound}>")
    assert set(bounds) == {name for _, name in launches}, "a kernel is never launched"
