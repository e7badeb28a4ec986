"""One test per bad-input rule (treepool/_checks.py, csrc/checks.cpp, treepool/ops.py).

Each case runs on every available backend; the exception type and the full message
must be the expected ones, and identical between the backends: "raises an exception
whose message names the argument and the problem, identically on both backends".
TypeError for a wrong dtype (or a non-tensor), ValueError for everything else.

Mixed devices are provoked with the 'meta' device, which exists on every machine.
"""

from __future__ import annotations

import pytest
import torch

import treepool
from .helpers import AVAILABLE_BACKENDS, DEVICES

ALL_OPS = ["segment_sum", "segment_mean", "segment_broadcast", "tree_update", "tree_update_",
           "reptile_update", "reptile_update_"]

T, P, C = 5, 3, 2
OFFSETS = [0, 2, 5]


class Inputs:
    """Valid inputs of every op (T = 5 rows, P = 3 columns, C = 2 clusters), on `device`."""

    def __init__(self, device, dtype=torch.float32):
        self.device = torch.device(device)
        self.dtype = dtype
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(T, P, generator=g).to(dtype).to(device)
        self.offsets = torch.tensor(OFFSETS, device=device)
        self.weights = torch.ones(T, dtype=dtype, device=device)
        self.node = torch.randn(2, P, generator=g).to(dtype).to(device)
        self.parents = torch.tensor([0, 1], device=device)
        self.theta = torch.randn(C, P, generator=g).to(dtype).to(device)
        self.g = torch.randn(C, P, generator=g).to(dtype).to(device)
        self.out = torch.empty(C, P, dtype=dtype, device=device)
        self.lr = 0.1

    @property
    def dev(self) -> str:
        return str(self.x.device)

    def call(self, op, **override):
        """Calls the public op with the valid inputs, some of them replaced."""
        a = dict(x=self.x, offsets=self.offsets, weights=None, node_params=self.node,
                 parents=self.parents, theta=self.theta, g=self.g, out=self.out,
                 lr=self.lr, mean=False, num_rows=None)
        a.update(override)
        if op in ("segment_sum", "segment_mean"):
            return getattr(treepool, op)(a["x"], a["offsets"], a["weights"])
        if op == "segment_broadcast":
            kw = {} if a["num_rows"] is None else dict(num_rows=a["num_rows"])
            return treepool.segment_broadcast(a["g"], a["offsets"], a["weights"], a["mean"], **kw)
        if op == "tree_update":
            return treepool.tree_update(a["node_params"], a["x"], a["offsets"], a["parents"],
                                        a["lr"], a["weights"])
        if op == "tree_update_":
            return treepool.tree_update_(a["out"], a["node_params"], a["x"], a["offsets"],
                                         a["parents"], a["lr"], a["weights"])
        if op == "reptile_update":
            return treepool.reptile_update(a["theta"], a["x"], a["offsets"], a["lr"], a["weights"])
        if op == "reptile_update_":
            return treepool.reptile_update_(a["theta"], a["x"], a["offsets"], a["lr"], a["weights"])
        raise AssertionError(op)


# The name each op gives its [T, P] input, its rate, and the wording of offsets[-1].
ROWS_NAME = {"segment_sum": "x", "segment_mean": "x", "segment_broadcast": "g",
             "tree_update": "grads", "tree_update_": "grads", "reptile_update": "phi",
             "reptile_update_": "phi"}
RATE_NAME = {"tree_update": "lr", "tree_update_": "lr", "reptile_update": "eps",
             "reptile_update_": "eps"}


def outcome(fn):
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the type is what is under test
        return type(exc), str(exc)
    return None


def expect_error(fn, exc_type, message):
    """fn raises exc_type(message) on every available backend, the same on each."""
    seen = {}
    for name in AVAILABLE_BACKENDS:
        with treepool.use_backend(name):
            seen[name] = outcome(fn)
    for name, got in seen.items():
        assert got is not None, f"{name} backend: no exception, expected {exc_type.__name__}: {message}"
        assert (got[0], got[1]) == (exc_type, message), (
            f"{name} backend raised {got[0].__name__}: {got[1]!r}\n"
            f"expected {exc_type.__name__}: {message!r}")
    if len(seen) > 1:
        assert seen["native"] == seen["reference"], f"backends disagree: {seen}"


params = pytest.mark.parametrize
over_devices = params("device", DEVICES)
over_ops = params("op", ALL_OPS)
over_rate_ops = params("op", list(RATE_NAME))


def msg(op, text):
    return f"treepool.{op}: {text}"


# ----------------------------------------------------------------------------- x / grads / phi / g


@over_devices
@over_ops
@params("shape", [(T * P,), (T, P, 1)], ids=["1d", "3d"])
def test_rows_wrong_rank(op, shape, device):
    b = Inputs(device)
    name = ROWS_NAME[op]
    bad = torch.zeros(shape, device=device)
    if op == "segment_broadcast":
        bad = torch.zeros((C * P,) if len(shape) == 1 else (C, P, 1), device=device)
    key = "g" if op == "segment_broadcast" else "x"
    expect_error(lambda: b.call(op, **{key: bad}), ValueError,
                 msg(op, f"{name} must be a 2-D tensor [rows, P], got {bad.dim()}-D"))


@over_devices
@over_ops
@params("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64], ids=str)
def test_rows_not_floating(op, dtype, device):
    b = Inputs(device)
    name = ROWS_NAME[op]
    key = "g" if op == "segment_broadcast" else "x"
    rows = C if op == "segment_broadcast" else T
    bad = torch.zeros(rows, P, dtype=dtype, device=device)
    expect_error(lambda: b.call(op, **{key: bad}), TypeError,
                 msg(op, f"{name} must have a floating dtype (float32, float64, float16 or "
                         f"bfloat16), got {dtype}"))


@over_devices
@params("op", ["segment_sum", "segment_mean", "segment_broadcast", "tree_update",
               "reptile_update"])
def test_rows_not_a_tensor(op, device):
    b = Inputs(device)
    key = "g" if op == "segment_broadcast" else "x"
    bad = b.g.tolist() if op == "segment_broadcast" else b.x.tolist()
    # A list is the list form (one tensor per parameter): its rows are not tensors.
    expect_error(lambda: b.call(op, **{key: bad}), TypeError,
                 msg(op, f"{ROWS_NAME[op]}[0] must be a tensor, got list"))


# ----------------------------------------------------------------------------- offsets


@over_devices
@over_ops
def test_offsets_not_a_tensor(op, device):
    b = Inputs(device)
    expect_error(lambda: b.call(op, offsets=list(OFFSETS), num_rows=T), TypeError,
                 msg(op, "offsets must be a tensor, got list"))


@over_devices
@over_ops
@params("bad", [[[0, 2, 5]], 0], ids=["2d", "0d"])
def test_offsets_wrong_rank(op, bad, device):
    b = Inputs(device)
    offsets = torch.tensor(bad, device=device)
    expect_error(lambda: b.call(op, offsets=offsets, num_rows=T), ValueError,
                 msg(op, f"offsets must be a 1-D tensor [C + 1], got {offsets.dim()}-D"))


@over_devices
def test_segment_broadcast_offsets_wrong_rank_without_num_rows(device, op="segment_broadcast"):
    """Without num_rows the op reads offsets[-1] itself; a 2-D offsets must still get the
    checker's message, not an error from int()."""
    b = Inputs(device)
    offsets = torch.tensor([[0, 2, 5]], device=device)
    expect_error(lambda: b.call(op, offsets=offsets), ValueError,
                 msg(op, "offsets must be a 1-D tensor [C + 1], got 2-D"))


@over_devices
@over_ops
@params("dtype", [torch.int32, torch.float32], ids=str)
def test_offsets_wrong_dtype(op, dtype, device):
    b = Inputs(device)
    offsets = torch.tensor(OFFSETS, dtype=dtype, device=device)
    expect_error(lambda: b.call(op, offsets=offsets, num_rows=T), TypeError,
                 msg(op, f"offsets must have dtype torch.int64, got {dtype}"))


@over_devices
@over_ops
def test_offsets_on_another_device(op, device):
    b = Inputs(device)
    offsets = b.offsets.to("meta")
    expect_error(lambda: b.call(op, offsets=offsets, num_rows=T), ValueError,
                 msg(op, f"offsets is on meta but {ROWS_NAME[op]} is on {b.dev}"))


@over_devices
@over_ops
def test_rows_on_another_device(op, device):
    """The [T, P] input on meta, everything else on the device: offsets is named."""
    b = Inputs(device)
    key = "g" if op == "segment_broadcast" else "x"
    over = {key: getattr(b, key).to("meta")}
    expect_error(lambda: b.call(op, num_rows=T, **over), ValueError,
                 msg(op, f"offsets is on {b.dev} but {ROWS_NAME[op]} is on meta"))


@over_devices
@over_ops
def test_offsets_empty(op, device):
    b = Inputs(device)
    offsets = torch.zeros(0, dtype=torch.int64, device=device)
    expect_error(lambda: b.call(op, offsets=offsets, num_rows=T), ValueError,
                 msg(op, "offsets must have at least one element (offsets[0] = 0)"))


@over_devices
@over_ops
def test_offsets_not_starting_at_zero(op, device):
    b = Inputs(device)
    offsets = torch.tensor([1, 2, 5], device=device)
    expect_error(lambda: b.call(op, offsets=offsets), ValueError,
                 msg(op, "offsets[0] must be 0, got 1"))


@over_devices
@over_ops
def test_offsets_decreasing(op, device):
    b = Inputs(device)
    offsets = torch.tensor([0, 4, 2, 5], device=device)
    over = dict(theta=torch.zeros(3, P, device=device), g=torch.zeros(3, P, device=device),
                parents=torch.tensor([0, 0, 1], device=device),
                out=torch.empty(3, P, device=device), num_rows=T)
    expect_error(lambda: b.call(op, offsets=offsets, **over), ValueError,
                 msg(op, "offsets must be non-decreasing, but offsets[1] = 4 > offsets[2] = 2"))


@over_devices
@over_ops
@params("last", [4, 6])
def test_offsets_not_ending_at_T(op, last, device):
    b = Inputs(device)
    offsets = torch.tensor([0, 2, last], device=device)
    what = "the output" if op == "segment_broadcast" else ROWS_NAME[op]
    expect_error(lambda: b.call(op, offsets=offsets, num_rows=T), ValueError,
                 msg(op, f"offsets[-1] must equal the number of rows of {what} ({T}), "
                         f"got {last}"))


# ----------------------------------------------------------------------------- weights


@over_devices
@over_ops
def test_weights_not_a_tensor(op, device):
    b = Inputs(device)
    expect_error(lambda: b.call(op, weights=[1.0] * T), TypeError,
                 msg(op, "weights must be a tensor or None, got list"))


@over_devices
@over_ops
@params("shape", [(T - 1,), (T + 1,), (T, 1)], ids=["short", "long", "2d"])
def test_weights_wrong_shape(op, shape, device):
    b = Inputs(device)
    w = torch.ones(shape, device=device)
    if op == "segment_broadcast":
        text = f"weights must have shape [T] = [{T}] (one per output row), got {list(shape)}"
    else:
        text = (f"weights must have shape [T] = [{T}] (one per row of {ROWS_NAME[op]}), "
                f"got {list(shape)}")
    expect_error(lambda: b.call(op, weights=w, num_rows=T), ValueError,
                 msg(op, text.replace("'", "")))


@over_devices
@over_ops
def test_weights_wrong_dtype(op, device):
    b = Inputs(device)
    w = torch.ones(T, dtype=torch.float64, device=device)
    expect_error(lambda: b.call(op, weights=w, num_rows=T), TypeError,
                 msg(op, f"weights has dtype torch.float64 but {ROWS_NAME[op]} has dtype "
                         f"torch.float32"))


@over_devices
@over_ops
def test_weights_on_another_device(op, device):
    b = Inputs(device)
    w = torch.ones(T, device="meta")
    expect_error(lambda: b.call(op, weights=w, num_rows=T), ValueError,
                 msg(op, f"weights is on meta but {ROWS_NAME[op]} is on {b.dev}"))


@over_devices
@over_ops
@params("dtype", [torch.float32, torch.float16], ids=str)
def test_weights_negative(op, dtype, device):
    b = Inputs(device, dtype)
    w = torch.tensor([1.0, 0.0, -0.5, 2.0, 1.0], dtype=dtype, device=device)
    expect_error(lambda: b.call(op, weights=w), ValueError,
                 msg(op, "weights must be non-negative, got weights[2] = -0.5"))


@over_devices
@over_ops
def test_weights_negative_infinity(op, device):
    b = Inputs(device)
    w = torch.tensor([1.0, 1.0, 1.0, -float("inf"), 1.0], device=device)
    expect_error(lambda: b.call(op, weights=w), ValueError,
                 msg(op, "weights must be non-negative, got weights[3] = -inf"))


@over_devices
@over_ops
def test_weights_nan(op, device):
    b = Inputs(device)
    w = torch.tensor([1.0, float("nan"), 1.0, 1.0, 1.0], device=device)
    expect_error(lambda: b.call(op, weights=w), ValueError,
                 msg(op, "weights must be non-negative, got weights[1] = nan"))


@over_devices
@over_ops
def test_weights_nan_from_arithmetic(op, device):
    """A NaN made by arithmetic (0/0 on x86 sets the sign bit) is reported the same way:
    the message must not depend on the backend's way of printing a negative NaN."""
    b = Inputs(device)
    w = torch.ones(T, device=device)
    w[1] = (torch.zeros((), device=device) / torch.zeros((), device=device))
    expect_error(lambda: b.call(op, weights=w), ValueError,
                 msg(op, "weights must be non-negative, got weights[1] = nan"))


# ----------------------------------------------------------------------------- node_params, parents


@over_devices
@params("op", ["tree_update", "tree_update_"])
def test_node_params_wrong_rank(op, device):
    b = Inputs(device)
    expect_error(lambda: b.call(op, node_params=b.node[0]), ValueError,
                 msg(op, "node_params must be a 2-D tensor [rows, P], got 1-D"))


@over_devices
@params("op", ["tree_update", "tree_update_"])
def test_node_params_not_floating(op, device):
    b = Inputs(device)
    bad = torch.zeros(2, P, dtype=torch.int64, device=device)
    expect_error(lambda: b.call(op, node_params=bad), TypeError,
                 msg(op, "node_params must have a floating dtype (float32, float64, float16 or "
                         "bfloat16), got torch.int64"))


@over_devices
@params("op", ["tree_update", "tree_update_"])
def test_node_params_wrong_dtype(op, device):
    b = Inputs(device)
    expect_error(lambda: b.call(op, node_params=b.node.double()), TypeError,
                 msg(op, "node_params has dtype torch.float64 but grads has dtype torch.float32"))


@over_devices
@params("op", ["tree_update", "tree_update_"])
def test_node_params_on_another_device(op, device):
    b = Inputs(device)
    expect_error(lambda: b.call(op, node_params=b.node.to("meta")), ValueError,
                 msg(op, f"node_params is on meta but grads is on {b.dev}"))


@over_devices
@params("op", ["tree_update", "tree_update_"])
def test_node_params_wrong_columns(op, device):
    b = Inputs(device)
    expect_error(lambda: b.call(op, node_params=torch.zeros(2, P + 1, device=device)),
                 ValueError, msg(op, f"node_params has {P + 1} columns but grads has {P}"))


@over_devices
@params("op", ["tree_update", "tree_update_"])
def test_node_params_not_a_tensor(op, device):
    b = Inputs(device)
    expect_error(lambda: b.call(op, node_params=b.node.tolist()), TypeError,
                 msg(op, "node_params must be a tensor, got list"))


@over_devices
@params("op", ["tree_update", "tree_update_"])
def test_parents_not_a_tensor(op, device):
    b = Inputs(device)
    expect_error(lambda: b.call(op, parents=[0, 1]), TypeError,
                 msg(op, "parents must be a tensor, got list"))


@over_devices
@params("op", ["tree_update", "tree_update_"])
def test_parents_wrong_rank(op, device):
    b = Inputs(device)
    expect_error(lambda: b.call(op, parents=b.parents[None]), ValueError,
                 msg(op, "parents must be a 1-D tensor [C], got 2-D"))


@over_devices
@params("op", ["tree_update", "tree_update_"])
def test_parents_wrong_dtype(op, device):
    b = Inputs(device)
    expect_error(lambda: b.call(op, parents=b.parents.int()), TypeError,
                 msg(op, "parents must have dtype torch.int64, got torch.int32"))


@over_devices
@params("op", ["tree_update", "tree_update_"])
def test_parents_on_another_device(op, device):
    b = Inputs(device)
    expect_error(lambda: b.call(op, parents=b.parents.to("meta")), ValueError,
                 msg(op, f"parents is on meta but grads is on {b.dev}"))


@over_devices
@params("op", ["tree_update", "tree_update_"])
@params("parents", [[0], [0, 1, 1]], ids=["short", "long"])
def test_parents_wrong_length(op, parents, device):
    b = Inputs(device)
    expect_error(lambda: b.call(op, parents=torch.tensor(parents, device=device)), ValueError,
                 msg(op, f"parents must have shape [C] = [{C}] (one per cluster of offsets), "
                         f"got [{len(parents)}]"))


@over_devices
@params("op", ["tree_update", "tree_update_"])
@params("parents,index,value", [([0, 2], 1, 2), ([-1, 0], 0, -1), ([0, 99], 1, 99)],
        ids=["equal-to-rows", "negative", "far"])
def test_parents_out_of_range(op, parents, index, value, device):
    b = Inputs(device)
    expect_error(lambda: b.call(op, parents=torch.tensor(parents, device=device)), ValueError,
                 msg(op, f"parents[{index}] = {value} is out of range for node_params with 2 rows"))


@over_devices
@params("op", ["tree_update", "tree_update_"])
def test_parents_decreasing(op, device):
    b = Inputs(device)
    expect_error(lambda: b.call(op, parents=torch.tensor([1, 0], device=device)), ValueError,
                 msg(op, "parents must be non-decreasing (clusters in DFS order), but "
                         "parents[0] = 1 > parents[1] = 0"))


# ----------------------------------------------------------------------------- theta


@over_devices
@params("op", ["reptile_update", "reptile_update_"])
@params("rows", [1, 3])
def test_theta_wrong_rows(op, rows, device):
    b = Inputs(device)
    expect_error(lambda: b.call(op, theta=torch.zeros(rows, P, device=device)), ValueError,
                 msg(op, f"theta must have one row per cluster: {C} rows (offsets has {C + 1} "
                         f"entries), got {rows}"))


@over_devices
@params("op", ["reptile_update", "reptile_update_"])
def test_theta_wrong_columns(op, device):
    b = Inputs(device)
    expect_error(lambda: b.call(op, theta=torch.zeros(C, P + 2, device=device)), ValueError,
                 msg(op, f"theta has {P + 2} columns but phi has {P}"))


@over_devices
@params("op", ["reptile_update", "reptile_update_"])
def test_theta_wrong_rank(op, device):
    b = Inputs(device)
    expect_error(lambda: b.call(op, theta=torch.zeros(C * P, device=device)), ValueError,
                 msg(op, "theta must be a 2-D tensor [rows, P], got 1-D"))


@over_devices
@params("op", ["reptile_update", "reptile_update_"])
def test_theta_wrong_dtype(op, device):
    b = Inputs(device)
    expect_error(lambda: b.call(op, theta=b.theta.to(torch.bfloat16)), TypeError,
                 msg(op, "theta has dtype torch.bfloat16 but phi has dtype torch.float32"))


@over_devices
@params("op", ["reptile_update", "reptile_update_"])
def test_theta_on_another_device(op, device):
    b = Inputs(device)
    expect_error(lambda: b.call(op, theta=b.theta.to("meta")), ValueError,
                 msg(op, f"theta is on meta but phi is on {b.dev}"))


# ----------------------------------------------------------------------------- g (broadcast)


@over_devices
@params("rows", [1, 3])
def test_broadcast_g_wrong_rows(rows, device, op="segment_broadcast"):
    b = Inputs(device)
    expect_error(lambda: b.call(op, g=torch.zeros(rows, P, device=device)), ValueError,
                 msg(op, f"g must have one row per cluster: {C} rows (offsets has {C + 1} "
                         f"entries), got {rows}"))


# ----------------------------------------------------------------------------- lr / eps


@over_devices
@over_rate_ops
@params("shape", [(P + 1,), (1,), (1, P), (P, 1)], ids=["long", "one", "row", "column"])
def test_rate_wrong_shape(op, shape, device):
    b = Inputs(device)
    name = RATE_NAME[op]
    rate = torch.full(shape, 0.1, device=device)
    expect_error(lambda: b.call(op, lr=rate), ValueError,
                 msg(op, f"{name} must be a float, a 0-d tensor or a tensor of shape [P] = "
                         f"[{P}], got shape {list(shape)}".replace("'", "")))


@over_devices
@over_rate_ops
def test_rate_wrong_dtype(op, device):
    b = Inputs(device)
    name, rows = RATE_NAME[op], ROWS_NAME[op]
    rate = torch.tensor(0.1, dtype=torch.float64, device=device)
    expect_error(lambda: b.call(op, lr=rate), TypeError,
                 msg(op, f"{name} has dtype torch.float64 but {rows} has dtype torch.float32"))


@over_devices
@over_rate_ops
def test_rate_on_another_device(op, device):
    b = Inputs(device)
    name, rows = RATE_NAME[op], ROWS_NAME[op]
    rate = torch.full((P,), 0.1, device="meta")
    expect_error(lambda: b.call(op, lr=rate), ValueError,
                 msg(op, f"{name} is on meta but {rows} is on {b.dev}"))


@over_devices
@over_rate_ops
@params("rate,type_name", [([0.1], "list"), (None, "NoneType"), (True, "bool"),
                           ("0.1", "str"), (1 + 2j, "complex")],
        ids=["list", "none", "bool", "str", "complex"])
def test_rate_not_a_number(op, rate, type_name, device):
    b = Inputs(device)
    expect_error(lambda: b.call(op, lr=rate), TypeError,
                 msg(op, f"{RATE_NAME[op]} must be a float or a tensor, got {type_name}"))


# ----------------------------------------------------------------------------- tree_update_ out


@over_devices
def test_out_not_a_tensor(device, op="tree_update_"):
    b = Inputs(device)
    expect_error(lambda: b.call(op, out=b.out.tolist()), TypeError,
                 msg(op, "out must be a tensor, got list"))


@over_devices
@params("shape", [(C + 1, P), (C, P + 1), (C * P,), (C, P, 1)],
        ids=["rows", "columns", "1d", "3d"])
def test_out_wrong_shape(shape, device, op="tree_update_"):
    b = Inputs(device)
    out = torch.empty(shape, device=device)
    expect_error(lambda: b.call(op, out=out), ValueError,
                 msg(op, f"out must have shape [C, P] = [{C}, {P}], got {list(shape)}"
                     .replace("'", "")))


@over_devices
def test_out_wrong_dtype(device, op="tree_update_"):
    b = Inputs(device)
    expect_error(lambda: b.call(op, out=b.out.double()), TypeError,
                 msg(op, "out has dtype torch.float64 but grads has dtype torch.float32"))


@over_devices
def test_out_on_another_device(device, op="tree_update_"):
    b = Inputs(device)
    expect_error(lambda: b.call(op, out=b.out.to("meta")), ValueError,
                 msg(op, f"out is on meta but grads is on {b.dev}"))


@over_devices
def test_out_column_stride(device, op="tree_update_"):
    b = Inputs(device)
    out = torch.empty(C, 2 * P, device=device)[:, ::2]
    expect_error(lambda: b.call(op, out=out), ValueError,
                 msg(op, "out must have unit stride along its last dimension"))


@over_devices
def test_out_transposed(device, op="tree_update_"):
    b = Inputs(device)
    out = torch.empty(P, C, device=device).t()
    expect_error(lambda: b.call(op, out=out), ValueError,
                 msg(op, "out must have unit stride along its last dimension"))


@over_devices
@params("stride0", [0, 1, P - 1], ids=["expanded", "one", "short"])
def test_out_rows_overlap(stride0, device, op="tree_update_"):
    b = Inputs(device)
    out = torch.empty(C * P, device=device).as_strided((C, P), (stride0, 1))
    expect_error(lambda: b.call(op, out=out), ValueError,
                 msg(op, "out has rows that overlap each other"))


@over_devices
def test_out_overlaps_grads(device, op="tree_update_"):
    b = Inputs(device)
    expect_error(lambda: b.call(op, out=b.x[1:3]), ValueError,
                 msg(op, "out must not overlap grads"))


@over_devices
def test_out_overlaps_lr(device, op="tree_update_"):
    b = Inputs(device)
    buf = torch.full((C * P + P,), 0.1, device=device)
    out, lr = buf[:C * P].view(C, P), buf[C * P - 1:C * P - 1 + P]
    expect_error(lambda: b.call(op, out=out, lr=lr), ValueError,
                 msg(op, "out must not overlap lr"))


@over_devices
def test_out_overlaps_weights(device, op="tree_update_"):
    b = Inputs(device)
    buf = torch.ones(C * P + T, device=device)
    out, w = buf[:C * P].view(C, P), buf[C * P - 2:C * P - 2 + T]
    expect_error(lambda: b.call(op, out=out, weights=w), ValueError,
                 msg(op, "out must not overlap weights"))


ALIAS_MESSAGE = ("out may alias node_params only when it is the same tensor and parents[c] == c "
                 "for every c; otherwise pass a separate buffer")


@over_devices
@params("parents", [[0, 0], [1, 1], [0, 0, 1]], ids=["shared", "shifted", "more-clusters"])
def test_out_is_node_params_without_identity_parents(parents, device, op="tree_update_"):
    b = Inputs(device)
    n = len(parents)
    offsets = torch.tensor([0, 2, 5] if n == 2 else [0, 2, 4, 5], device=device)
    node = torch.randn(2 if n == 2 else 3, P, device=device)
    expect_error(lambda: b.call(op, out=node, node_params=node, offsets=offsets,
                                parents=torch.tensor(parents, device=device)),
                 ValueError, msg(op, ALIAS_MESSAGE))


@over_devices
def test_out_overlaps_node_params_partly(device, op="tree_update_"):
    """Identity parents, but out is a shifted window of node_params' storage."""
    b = Inputs(device)
    buf = torch.randn((C + 1) * P, device=device)
    node, out = buf[:C * P].view(C, P), buf[P:].view(C, P)
    expect_error(lambda: b.call(op, out=out, node_params=node), ValueError,
                 msg(op, ALIAS_MESSAGE))


@over_devices
def test_out_is_node_params_transposed_copy_of_view(device, op="tree_update_"):
    """Same data pointer and shape as node_params but other strides: not the same tensor."""
    b = Inputs(device)
    buf = torch.randn(C * P + 4, device=device)
    node = buf.as_strided((C, P), (P + 2, 1))
    out = buf.as_strided((C, P), (P, 1))
    expect_error(lambda: b.call(op, out=out, node_params=node), ValueError,
                 msg(op, ALIAS_MESSAGE))


# ----------------------------------------------------------------------------- reptile_update_ theta


@over_devices
def test_theta_inplace_column_stride(device, op="reptile_update_"):
    b = Inputs(device)
    theta = torch.zeros(C, 2 * P, device=device)[:, ::2]
    expect_error(lambda: b.call(op, theta=theta), ValueError,
                 msg(op, "theta must have unit stride along its last dimension"))


@over_devices
@params("stride0", [0, 2], ids=["expanded", "short"])
def test_theta_inplace_rows_overlap(stride0, device, op="reptile_update_"):
    b = Inputs(device)
    theta = torch.zeros(C * P, device=device).as_strided((C, P), (stride0, 1))
    expect_error(lambda: b.call(op, theta=theta), ValueError,
                 msg(op, "theta has rows that overlap each other"))


@over_devices
def test_theta_inplace_overlaps_phi(device, op="reptile_update_"):
    b = Inputs(device)
    expect_error(lambda: b.call(op, theta=b.x[3:5]), ValueError,
                 msg(op, "theta must not overlap phi"))


@over_devices
def test_theta_inplace_overlaps_eps(device, op="reptile_update_"):
    b = Inputs(device)
    buf = torch.full((C * P + P,), 0.5, device=device)
    theta, eps = buf[P:].view(C, P), buf[1:P + 1]
    expect_error(lambda: b.call(op, theta=theta, lr=eps), ValueError,
                 msg(op, "theta must not overlap eps"))


@over_devices
def test_theta_inplace_overlaps_weights(device, op="reptile_update_"):
    b = Inputs(device)
    buf = torch.ones(C * P + T, device=device)
    theta, w = buf[T - 1:T - 1 + C * P].view(C, P), buf[:T]
    expect_error(lambda: b.call(op, theta=theta, weights=w), ValueError,
                 msg(op, "theta must not overlap weights"))


# ----------------------------------------------------------------------------- autograd in place


@over_devices
@params("arg", ["out", "node_params", "x", "lr", "weights"])
def test_tree_update_inplace_refuses_requires_grad(arg, device, op="tree_update_"):
    b = Inputs(device)
    values = dict(out=b.out, node_params=b.node, x=b.x,
                  lr=torch.full((P,), 0.1, device=device), weights=b.weights)
    values[arg] = values[arg].clone().requires_grad_(True)
    expect_error(lambda: b.call(op, **values), RuntimeError,
                 msg(op, "in-place ops do not record gradients; call it under torch.no_grad() "
                         "or use the out-of-place form"))


@over_devices
@params("arg", ["theta", "x", "lr", "weights"])
def test_reptile_update_inplace_refuses_requires_grad(arg, device, op="reptile_update_"):
    b = Inputs(device)
    values = dict(theta=b.theta, x=b.x, lr=torch.tensor(0.5, device=device), weights=b.weights)
    values[arg] = values[arg].clone().requires_grad_(True)
    expect_error(lambda: b.call(op, **values), RuntimeError,
                 msg(op, "in-place ops do not record gradients; call it under torch.no_grad() "
                         "or use the out-of-place form"))


@over_devices
def test_inplace_with_requires_grad_allowed_under_no_grad(device):
    """The refusal is about recording gradients: under no_grad the ops run."""
    b = Inputs(device)
    node = b.node.clone().requires_grad_(True)
    theta = b.theta.clone().requires_grad_(True)
    for name in AVAILABLE_BACKENDS:
        with treepool.use_backend(name), torch.no_grad():
            out = torch.empty(C, P, device=device)
            treepool.tree_update_(out, node, b.x, b.offsets, b.parents, 0.1)
            expected = treepool.tree_update(node, b.x, b.offsets, b.parents, 0.1)
            assert torch.equal(out, expected)
            th = theta.clone()
            treepool.reptile_update_(th, b.x, b.offsets, 0.5)
            assert torch.equal(th, treepool.reptile_update(theta, b.x, b.offsets, 0.5))


# ----------------------------------------------------------------------------- no side effects


@over_devices
@over_ops
def test_failed_call_modifies_nothing(op, device):
    """An in-place call refused by a value check leaves out/theta untouched."""
    b = Inputs(device)
    before_out, before_theta = b.out.clone(), b.theta.clone()
    b.out.copy_(torch.arange(C * P, dtype=torch.float32).view(C, P))
    before_out = b.out.clone()
    for name in AVAILABLE_BACKENDS:
        with treepool.use_backend(name), pytest.raises(ValueError):
            b.call(op, offsets=torch.tensor([0, 2, 4], device=device), num_rows=T)
    assert torch.equal(b.out, before_out) and torch.equal(b.theta, before_theta)
