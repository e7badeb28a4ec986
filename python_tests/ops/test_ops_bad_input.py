"""Every bad-input rule (treepool/ops/checks.py, csrc/checks.cpp, treepool/ops) as one table.

Each row of ``BAD_INPUTS`` is (op, argument, bad value, exception type, message): the
op is called with valid inputs except that argument, and must raise exactly that
exception with exactly that message (``treepool.<op>: `` prefixed), on every available
backend, identically between the native and the reference backend: "raises an exception
whose message names the argument and the problem, identically on both backends".
TypeError for a wrong dtype (or a non-tensor), ValueError for everything else,
RuntimeError for an in-place op asked to record gradients.

The bad value is a function of the valid inputs (so that it is made on the device under
test); a ``With`` carries the other arguments the case needs (``num_rows`` so that
segment_broadcast does not read offsets itself, a matching ``theta``, a second view of
a shared buffer...). ``{dev}`` in a message is the device under test.

Mixed devices are provoked with the 'meta' device, which exists on every machine. The
two checks that are not a bad input (the in-place ops run under no_grad; a refused call
changes nothing) are separate tests at the end.
"""

from __future__ import annotations

import pytest
import torch

import treepool

from .helpers import AVAILABLE_BACKENDS, DEVICES

ALL_OPS = ["segment_sum", "segment_mean", "segment_broadcast", "tree_update", "tree_update_",
           "reptile_update", "reptile_update_"]
TREE_OPS = ["tree_update", "tree_update_"]
REPTILE_OPS = ["reptile_update", "reptile_update_"]

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
RATE_OPS = list(RATE_NAME)


def rows_key(op):
    """The keyword of Inputs.call that holds op's [T, P] input (or [C, P] g)."""
    return "g" if op == "segment_broadcast" else "x"


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


def msg(op, text):
    return f"treepool.{op}: {text}"


# ----------------------------------------------------------------------------- the table


class With:
    """A bad value and the other arguments its case needs."""

    def __init__(self, value, **others):
        self.value, self.others = value, others


def row(op, arg, bad, exc, message, case="", dtype=torch.float32):
    """One case: op(..., arg=bad(inputs), ...) raises exc(treepool.<op>: message).

    ``bad`` maps the valid Inputs to the bad value (or a With); ``dtype`` is the dtype of
    the valid inputs."""
    ident = "-".join(s for s in (op, arg, case) if s)
    return pytest.param(op, arg, bad, exc, message, dtype, id=ident)


def _rows():
    r = []
    add = r.append
    NO_GRAD = ("in-place ops do not record gradients; call it under torch.no_grad() or use "
               "the out-of-place form")
    ALIAS = ("out may alias node_params only when it is the same tensor and parents[c] == c "
             "for every c; otherwise pass a separate buffer")
    FLOATING = "must have a floating dtype (float32, float64, float16 or bfloat16), got"

    for op in ALL_OPS:
        rows, key = ROWS_NAME[op], rows_key(op)
        n = C if op == "segment_broadcast" else T  # rows of the [., P] input

        # x / grads / phi / g
        for case, shape in [("1d", (n * P,)), ("3d", (n, P, 1))]:
            add(row(op, key, lambda b, s=shape: torch.zeros(s, device=b.device), ValueError,
                    f"{rows} must be a 2-D tensor [rows, P], got {len(shape)}-D", case))
        for dtype in [torch.int64, torch.int32, torch.bool, torch.complex64]:
            add(row(op, key, lambda b, n=n, t=dtype: torch.zeros(n, P, dtype=t, device=b.device),
                    TypeError, f"{rows} {FLOATING} {dtype}", str(dtype)))
        if not op.endswith("_"):
            # A list is the list form (one tensor per parameter): its rows are not tensors.
            add(row(op, key, lambda b, k=key: getattr(b, k).tolist(), TypeError,
                    f"{rows}[0] must be a tensor, got list", "list"))
        add(row(op, key, lambda b, k=key: With(getattr(b, k).to("meta"), num_rows=T),
                ValueError, f"offsets is on {{dev}} but {rows} is on meta", "meta"))

        # offsets
        add(row(op, "offsets", lambda b: With(list(OFFSETS), num_rows=T), TypeError,
                "offsets must be a tensor, got list", "list"))
        for case, value in [("2d", [[0, 2, 5]]), ("0d", 0)]:
            add(row(op, "offsets", lambda b, v=value: With(torch.tensor(v, device=b.device),
                                                           num_rows=T),
                    ValueError, f"offsets must be a 1-D tensor [C + 1], got {case[0]}-D", case))
        for dtype in [torch.int32, torch.float32]:
            add(row(op, "offsets",
                    lambda b, t=dtype: With(torch.tensor(OFFSETS, dtype=t, device=b.device),
                                            num_rows=T),
                    TypeError, f"offsets must have dtype torch.int64, got {dtype}", str(dtype)))
        add(row(op, "offsets", lambda b: With(b.offsets.to("meta"), num_rows=T), ValueError,
                f"offsets is on meta but {rows} is on {{dev}}", "meta"))
        add(row(op, "offsets",
                lambda b: With(torch.zeros(0, dtype=torch.int64, device=b.device), num_rows=T),
                ValueError, "offsets must have at least one element (offsets[0] = 0)", "empty"))
        add(row(op, "offsets", lambda b: torch.tensor([1, 2, 5], device=b.device), ValueError,
                "offsets[0] must be 0, got 1", "start"))
        add(row(op, "offsets",
                lambda b: With(torch.tensor([0, 4, 2, 5], device=b.device),
                               theta=torch.zeros(3, P, device=b.device),
                               g=torch.zeros(3, P, device=b.device),
                               parents=torch.tensor([0, 0, 1], device=b.device),
                               out=torch.empty(3, P, device=b.device), num_rows=T),
                ValueError, "offsets must be non-decreasing, but offsets[1] = 4 > offsets[2] = 2",
                "decreasing"))
        what = "the output" if op == "segment_broadcast" else rows
        for last in [4, 6]:
            add(row(op, "offsets",
                    lambda b, v=last: With(torch.tensor([0, 2, v], device=b.device), num_rows=T),
                    ValueError,
                    f"offsets[-1] must equal the number of rows of {what} ({T}), got {last}",
                    f"end{last}"))

        # weights
        add(row(op, "weights", lambda b: [1.0] * T, TypeError,
                "weights must be a tensor or None, got list", "list"))
        per_row = ("(one per output row)" if op == "segment_broadcast"
                   else f"(one per row of {rows})")
        for case, shape in [("short", (T - 1,)), ("long", (T + 1,)), ("2d", (T, 1))]:
            add(row(op, "weights", lambda b, s=shape: With(torch.ones(s, device=b.device),
                                                           num_rows=T),
                    ValueError, f"weights must have shape [T] = [{T}] {per_row}, got {list(shape)}",
                    case))
        add(row(op, "weights",
                lambda b: With(torch.ones(T, dtype=torch.float64, device=b.device), num_rows=T),
                TypeError, f"weights has dtype torch.float64 but {rows} has dtype torch.float32",
                "float64"))
        add(row(op, "weights", lambda b: With(torch.ones(T, device="meta"), num_rows=T),
                ValueError, f"weights is on meta but {rows} is on {{dev}}", "meta"))
        for dtype in [torch.float32, torch.float16]:
            add(row(op, "weights",
                    lambda b: torch.tensor([1.0, 0.0, -0.5, 2.0, 1.0], dtype=b.dtype,
                                           device=b.device),
                    ValueError, "weights must be non-negative, got weights[2] = -0.5",
                    f"negative-{dtype}", dtype=dtype))
        add(row(op, "weights",
                lambda b: torch.tensor([1.0, 1.0, 1.0, -float("inf"), 1.0], device=b.device),
                ValueError, "weights must be non-negative, got weights[3] = -inf", "-inf"))
        add(row(op, "weights",
                lambda b: torch.tensor([1.0, float("nan"), 1.0, 1.0, 1.0], device=b.device),
                ValueError, "weights must be non-negative, got weights[1] = nan", "nan"))
        # A NaN made by arithmetic (0/0 on x86 sets the sign bit) is reported the same way:
        # the message must not depend on the backend's way of printing a negative NaN.
        add(row(op, "weights", _nan_by_arithmetic, ValueError,
                "weights must be non-negative, got weights[1] = nan", "nan-0/0"))

    # segment_broadcast: without num_rows the op reads offsets[-1] itself; a 2-D offsets
    # must still get the checker's message, not an error from int().
    add(row("segment_broadcast", "offsets", lambda b: torch.tensor([[0, 2, 5]], device=b.device),
            ValueError, "offsets must be a 1-D tensor [C + 1], got 2-D", "2d-without-num_rows"))
    for rows_ in [1, 3]:
        add(row("segment_broadcast", "g", lambda b, n=rows_: torch.zeros(n, P, device=b.device),
                ValueError, f"g must have one row per cluster: {C} rows (offsets has {C + 1} "
                            f"entries), got {rows_}", f"rows{rows_}"))

    for op in TREE_OPS:
        # node_params
        add(row(op, "node_params", lambda b: b.node[0], ValueError,
                "node_params must be a 2-D tensor [rows, P], got 1-D", "1d"))
        add(row(op, "node_params", lambda b: torch.zeros(2, P, dtype=torch.int64, device=b.device),
                TypeError, f"node_params {FLOATING} torch.int64", "int64"))
        add(row(op, "node_params", lambda b: b.node.double(), TypeError,
                "node_params has dtype torch.float64 but grads has dtype torch.float32", "float64"))
        add(row(op, "node_params", lambda b: b.node.to("meta"), ValueError,
                "node_params is on meta but grads is on {dev}", "meta"))
        add(row(op, "node_params", lambda b: torch.zeros(2, P + 1, device=b.device), ValueError,
                f"node_params has {P + 1} columns but grads has {P}", "columns"))
        add(row(op, "node_params", lambda b: b.node.tolist(), TypeError,
                "node_params must be a tensor, got list", "list"))
        # parents
        add(row(op, "parents", lambda b: [0, 1], TypeError, "parents must be a tensor, got list",
                "list"))
        add(row(op, "parents", lambda b: b.parents[None], ValueError,
                "parents must be a 1-D tensor [C], got 2-D", "2d"))
        add(row(op, "parents", lambda b: b.parents.int(), TypeError,
                "parents must have dtype torch.int64, got torch.int32", "int32"))
        add(row(op, "parents", lambda b: b.parents.to("meta"), ValueError,
                "parents is on meta but grads is on {dev}", "meta"))
        for case, parents in [("short", [0]), ("long", [0, 1, 1])]:
            add(row(op, "parents", lambda b, p=parents: torch.tensor(p, device=b.device),
                    ValueError, f"parents must have shape [C] = [{C}] (one per cluster of "
                                f"offsets), got [{len(parents)}]", case))
        for case, parents, index, value in [("equal-to-rows", [0, 2], 1, 2),
                                            ("negative", [-1, 0], 0, -1), ("far", [0, 99], 1, 99)]:
            add(row(op, "parents", lambda b, p=parents: torch.tensor(p, device=b.device),
                    ValueError, f"parents[{index}] = {value} is out of range for node_params "
                                f"with 2 rows", case))
        add(row(op, "parents", lambda b: torch.tensor([1, 0], device=b.device), ValueError,
                "parents must be non-decreasing (clusters in DFS order), but parents[0] = 1 > "
                "parents[1] = 0", "decreasing"))

    for op in REPTILE_OPS:
        for rows_ in [1, 3]:
            add(row(op, "theta", lambda b, n=rows_: torch.zeros(n, P, device=b.device), ValueError,
                    f"theta must have one row per cluster: {C} rows (offsets has {C + 1} "
                    f"entries), got {rows_}", f"rows{rows_}"))
        add(row(op, "theta", lambda b: torch.zeros(C, P + 2, device=b.device), ValueError,
                f"theta has {P + 2} columns but phi has {P}", "columns"))
        add(row(op, "theta", lambda b: torch.zeros(C * P, device=b.device), ValueError,
                "theta must be a 2-D tensor [rows, P], got 1-D", "1d"))
        add(row(op, "theta", lambda b: b.theta.to(torch.bfloat16), TypeError,
                "theta has dtype torch.bfloat16 but phi has dtype torch.float32", "bfloat16"))
        add(row(op, "theta", lambda b: b.theta.to("meta"), ValueError,
                "theta is on meta but phi is on {dev}", "meta"))

    for op in RATE_OPS:  # lr / eps, given as the lr keyword of Inputs.call
        name, rows = RATE_NAME[op], ROWS_NAME[op]
        for case, shape in [("long", (P + 1,)), ("one", (1,)), ("row", (1, P)),
                            ("column", (P, 1))]:
            add(row(op, "lr", lambda b, s=shape: torch.full(s, 0.1, device=b.device), ValueError,
                    f"{name} must be a float, a 0-d tensor or a tensor of shape [P] = [{P}], "
                    f"got shape {list(shape)}", case))
        add(row(op, "lr", lambda b: torch.tensor(0.1, dtype=torch.float64, device=b.device),
                TypeError, f"{name} has dtype torch.float64 but {rows} has dtype torch.float32",
                "float64"))
        add(row(op, "lr", lambda b: torch.full((P,), 0.1, device="meta"), ValueError,
                f"{name} is on meta but {rows} is on {{dev}}", "meta"))
        for case, rate, type_name in [("list", [0.1], "list"), ("none", None, "NoneType"),
                                      ("bool", True, "bool"), ("str", "0.1", "str"),
                                      ("complex", 1 + 2j, "complex")]:
            add(row(op, "lr", lambda b, v=rate: v, TypeError,
                    f"{name} must be a float or a tensor, got {type_name}", case))

    # tree_update_'s out
    op = "tree_update_"
    add(row(op, "out", lambda b: b.out.tolist(), TypeError, "out must be a tensor, got list",
            "list"))
    for case, shape in [("rows", (C + 1, P)), ("columns", (C, P + 1)), ("1d", (C * P,)),
                        ("3d", (C, P, 1))]:
        add(row(op, "out", lambda b, s=shape: torch.empty(s, device=b.device), ValueError,
                f"out must have shape [C, P] = [{C}, {P}], got {list(shape)}", case))
    add(row(op, "out", lambda b: b.out.double(), TypeError,
            "out has dtype torch.float64 but grads has dtype torch.float32", "float64"))
    add(row(op, "out", lambda b: b.out.to("meta"), ValueError,
            "out is on meta but grads is on {dev}", "meta"))
    add(row(op, "out", lambda b: torch.empty(C, 2 * P, device=b.device)[:, ::2], ValueError,
            "out must have unit stride along its last dimension", "column-stride"))
    add(row(op, "out", lambda b: torch.empty(P, C, device=b.device).t(), ValueError,
            "out must have unit stride along its last dimension", "transposed"))
    for case, stride0 in [("expanded", 0), ("one", 1), ("short", P - 1)]:
        add(row(op, "out",
                lambda b, s=stride0: torch.empty(C * P, device=b.device).as_strided((C, P), (s, 1)),
                ValueError, "out has rows that overlap each other", f"rows-overlap-{case}"))
    add(row(op, "out", lambda b: b.x[1:3], ValueError, "out must not overlap grads",
            "overlaps-grads"))
    add(row(op, "out", _out_overlapping_lr, ValueError, "out must not overlap lr", "overlaps-lr"))
    add(row(op, "out", _out_overlapping_weights, ValueError, "out must not overlap weights",
            "overlaps-weights"))
    for case, parents in [("shared", [0, 0]), ("shifted", [1, 1]), ("more-clusters", [0, 0, 1])]:
        add(row(op, "out", lambda b, p=parents: _out_is_node_params(b, p), ValueError, ALIAS,
                f"is-node_params-{case}"))
    add(row(op, "out", _out_overlapping_node_params_partly, ValueError, ALIAS,
            "overlaps-node_params-partly"))
    add(row(op, "out", _out_same_pointer_other_strides, ValueError, ALIAS,
            "node_params-other-strides"))

    # reptile_update_'s theta
    op = "reptile_update_"
    add(row(op, "theta", lambda b: torch.zeros(C, 2 * P, device=b.device)[:, ::2], ValueError,
            "theta must have unit stride along its last dimension", "column-stride"))
    for case, stride0 in [("expanded", 0), ("short", 2)]:
        add(row(op, "theta",
                lambda b, s=stride0: torch.zeros(C * P, device=b.device).as_strided((C, P), (s, 1)),
                ValueError, "theta has rows that overlap each other", f"rows-overlap-{case}"))
    add(row(op, "theta", lambda b: b.x[3:5], ValueError, "theta must not overlap phi",
            "overlaps-phi"))
    add(row(op, "theta", _theta_overlapping_eps, ValueError, "theta must not overlap eps",
            "overlaps-eps"))
    add(row(op, "theta", _theta_overlapping_weights, ValueError, "theta must not overlap weights",
            "overlaps-weights"))

    # in-place ops asked to record gradients: one argument requires grad, all tensors
    for arg in ["out", "node_params", "x", "lr", "weights"]:
        add(row("tree_update_", arg, lambda b, a=arg: _requiring_grad(b, a, tree=True),
                RuntimeError, NO_GRAD, "requires_grad"))
    for arg in ["theta", "x", "lr", "weights"]:
        add(row("reptile_update_", arg, lambda b, a=arg: _requiring_grad(b, a, tree=False),
                RuntimeError, NO_GRAD, "requires_grad"))
    return r


def _nan_by_arithmetic(b):
    w = torch.ones(T, device=b.device)
    w[1] = torch.zeros((), device=b.device) / torch.zeros((), device=b.device)
    return w


def _out_overlapping_lr(b):
    buf = torch.full((C * P + P,), 0.1, device=b.device)
    return With(buf[:C * P].view(C, P), lr=buf[C * P - 1:C * P - 1 + P])


def _out_overlapping_weights(b):
    buf = torch.ones(C * P + T, device=b.device)
    return With(buf[:C * P].view(C, P), weights=buf[C * P - 2:C * P - 2 + T])


def _out_is_node_params(b, parents):
    """out is node_params itself, but parents are not the identity."""
    n = len(parents)
    offsets = torch.tensor([0, 2, 5] if n == 2 else [0, 2, 4, 5], device=b.device)
    node = torch.randn(2 if n == 2 else 3, P, device=b.device)
    return With(node, node_params=node, offsets=offsets,
                parents=torch.tensor(parents, device=b.device))


def _out_overlapping_node_params_partly(b):
    """Identity parents, but out is a shifted window of node_params' storage."""
    buf = torch.randn((C + 1) * P, device=b.device)
    return With(buf[P:].view(C, P), node_params=buf[:C * P].view(C, P))


def _out_same_pointer_other_strides(b):
    """Same data pointer and shape as node_params but other strides: not the same tensor."""
    buf = torch.randn(C * P + 4, device=b.device)
    return With(buf.as_strided((C, P), (P, 1)), node_params=buf.as_strided((C, P), (P + 2, 1)))


def _theta_overlapping_eps(b):
    buf = torch.full((C * P + P,), 0.5, device=b.device)
    return With(buf[P:].view(C, P), lr=buf[1:P + 1])


def _theta_overlapping_weights(b):
    buf = torch.ones(C * P + T, device=b.device)
    return With(buf[T - 1:T - 1 + C * P].view(C, P), weights=buf[:T])


def _requiring_grad(b, arg, tree):
    """All tensor arguments given, `arg` a copy that requires grad."""
    if tree:
        values = dict(out=b.out, node_params=b.node, x=b.x,
                      lr=torch.full((P,), 0.1, device=b.device), weights=b.weights)
    else:
        values = dict(theta=b.theta, x=b.x, lr=torch.tensor(0.5, device=b.device),
                      weights=b.weights)
    bad = values.pop(arg).clone().requires_grad_(True)
    return With(bad, **values)


BAD_INPUTS = _rows()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op,arg,bad,exc,message,dtype", BAD_INPUTS)
def test_bad_input(op, arg, bad, exc, message, dtype, device):
    b = Inputs(device, dtype)
    value = bad(b)
    over = {arg: value.value, **value.others} if isinstance(value, With) else {arg: value}
    expect_error(lambda: b.call(op, **over), exc, msg(op, message.format(dev=b.dev)))


# ----------------------------------------------------------------------------- not a table row


@pytest.mark.parametrize("device", DEVICES)
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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ALL_OPS)
def test_failed_call_modifies_nothing(op, device):
    """An in-place call refused by a value check leaves out/theta untouched."""
    b = Inputs(device)
    b.out.copy_(torch.arange(C * P, dtype=torch.float32).view(C, P))
    before_out, before_theta = b.out.clone(), b.theta.clone()
    for name in AVAILABLE_BACKENDS:
        with treepool.use_backend(name), pytest.raises(ValueError):
            b.call(op, offsets=torch.tensor([0, 2, 4], device=device), num_rows=T)
    assert torch.equal(b.out, before_out) and torch.equal(b.theta, before_theta)
