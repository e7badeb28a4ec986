"""CUDA-only tests (skipped without a GPU): CUDA equals CPU to the dtype's rounding,
the ops on a non-default stream and inside CUDA graph capture, mixed CPU/CUDA
arguments refused with a message naming the argument (identically on both backends)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import treepool
from treepool.ops import backend as _backend
from .helpers import (
    AVAILABLE_BACKENDS, BACKENDS, DTYPES, RATE_KINDS, WEIGHT_KINDS, assert_close,
    assert_matches_exact, dtype_id, exact_mean, exact_reptile_update, exact_sums,
    exact_tree_update, gen, levels, make_rate, make_weights, max_rows_for, needs_cuda, randn,
    widths,
)

pytestmark = needs_cuda

params = pytest.mark.parametrize
over_backends = params("backend", BACKENDS)


def native_cuda():
    return treepool.native_available() and _backend.native_has_device("cuda")


def to(t, device):
    return t.to(device) if isinstance(t, torch.Tensor) else t


# ----------------------------------------------------------------------------- CUDA == CPU


@over_backends
@params("dtype", DTYPES, ids=dtype_id)
@given(data=st.data())
def test_cuda_equals_cpu(data, dtype, backend):
    P = data.draw(widths())
    lv = data.draw(levels(max_rows_for(P)))
    g = gen(data.draw(st.integers(0, 2 ** 31 - 1)))
    node = randn((lv.num_prev, P), dtype, g)
    x = randn((lv.T, P), dtype, g)
    theta = randn((lv.C, P), dtype, g)
    w = make_weights(data.draw(st.sampled_from(WEIGHT_KINDS)), lv, dtype, g)
    lr = make_rate(data.draw(st.sampled_from(RATE_KINDS)), P, dtype, g)
    offsets, parents = lv.offsets_tensor(), lv.parents_tensor()

    def run(device):
        a = [to(t, device) for t in (node, x, theta, w, lr, offsets, parents)]
        n, xx, th, ww, r, o, p = a
        out = torch.empty(lv.C, P, dtype=dtype, device=device)
        th_ = th.clone()
        return [treepool.segment_sum(xx, o, ww), treepool.segment_mean(xx, o, ww),
                treepool.segment_broadcast(th, o, ww, True, lv.T),
                treepool.tree_update(n, xx, o, p, r, ww),
                treepool.reptile_update(th, xx, o, r, ww),
                treepool.tree_update_(out, n, xx, o, p, r, ww),
                treepool.reptile_update_(th_, xx, o, r, ww)]

    with treepool.use_backend(backend):
        cpu, cuda = run("cpu"), run("cuda")
    S, _, A = exact_sums(x, lv.offsets, w)
    M, Am = exact_mean(x, lv.offsets, w)
    tu, tu_scale = exact_tree_update(node, x, lv.offsets, lv.parents, lr, w)
    ru, ru_scale = exact_reptile_update(theta, x, lv.offsets, lr, w)
    names = ["segment_sum", "segment_mean", "segment_broadcast", "tree_update",
             "reptile_update", "tree_update_", "reptile_update_"]
    scales = [A, Am, None, tu_scale, ru_scale, tu_scale, ru_scale]
    exacts = [S, M, None, tu, ru, tu, ru]
    for name, a, b, e, s in zip(names, cpu, cuda, exacts, scales):
        assert b.device.type == "cuda" and b.dtype == dtype
        if e is not None:
            assert_matches_exact(b, e, s, dtype, lv.max_size, f"{name} on CUDA")
            assert_close(b, a, dtype, s, lv.max_size, f"{name}: CUDA vs CPU")
        else:
            assert_close(b, a, dtype, a.double().abs().cpu(), lv.max_size, f"{name}: CUDA vs CPU")


@over_backends
def test_cuda_is_deterministic_on_long_clusters(backend):
    g = gen(1)
    x = randn((3000, 100), torch.float32, g, device="cuda")
    offsets = torch.tensor([0, 50, 2950, 2950, 3000], device="cuda")
    w = (torch.rand(3000, generator=g) + 0.1).cuda()
    with treepool.use_backend(backend):
        a = treepool.segment_mean(x, offsets, w)
        b = treepool.segment_mean(x, offsets, w)
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------- streams


@over_backends
def test_ops_on_a_non_default_stream(backend):
    """Inputs made and consumed on a side stream: the kernels must run on the current
    stream (not the default one), so results are complete after that stream syncs."""
    P, T = 4096, 64
    offsets = torch.tensor([0, 10, 10, 40, 64], device="cuda")
    parents = torch.tensor([0, 0, 1, 1], device="cuda")
    stream = torch.cuda.Stream()
    with treepool.use_backend(backend):
        with torch.cuda.stream(stream):
            x = torch.randn(T, P, device="cuda")
            node = torch.randn(2, P, device="cuda")
            w = torch.rand(T, device="cuda") + 0.1
            for _ in range(3):  # keep the side stream busy
                x = x * 1.0001
            out = treepool.tree_update(node, x, offsets, parents, 0.5, w)
            mean = treepool.segment_mean(x, offsets, w)
            back = treepool.segment_broadcast(mean, offsets, w, True, T)
            theta = mean.clone()
            treepool.reptile_update_(theta, x, offsets, 0.25, w)
        stream.synchronize()
    xc, nc, wc = x.cpu(), node.cpu(), w.cpu()
    M, A = exact_mean(xc, offsets.tolist(), wc)
    assert_matches_exact(mean, M, A, torch.float32, 30)
    e, s = exact_tree_update(nc, xc, offsets.tolist(), parents.tolist(), 0.5, wc)
    assert_matches_exact(out, e, s, torch.float32, 30)
    e, s = exact_reptile_update(mean.cpu(), xc, offsets.tolist(), 0.25, wc)
    assert_matches_exact(theta, e, s, torch.float32, 30)
    assert back.shape == (T, P)


# ----------------------------------------------------------------------------- graph capture


@pytest.mark.skipif(not native_cuda(), reason="treepool._C has no CUDA kernels")
def test_ops_inside_cuda_graph_capture():
    """Capture a TreeMAML step and a Reptile step in a CUDA graph (num_rows passed
    explicitly, nothing read back to the host), replay it on new values."""
    P, T = 256, 12
    offsets = torch.tensor([0, 3, 3, 9, 12], device="cuda")
    parents = torch.tensor([0, 0, 1, 1], device="cuda")
    static = dict(x=torch.randn(T, P, device="cuda"), node=torch.randn(2, P, device="cuda"),
                  w=torch.rand(T, device="cuda") + 0.1, lr=torch.rand(P, device="cuda"))
    theta = torch.randn(4, P, device="cuda")
    out_buf = torch.empty(4, P, device="cuda")

    def step():
        s = static
        nodes = treepool.tree_update(s["node"], s["x"], offsets, parents, s["lr"], s["w"])
        mean = treepool.segment_mean(s["x"], offsets, s["w"])
        summed = treepool.segment_sum(s["x"], offsets)
        back = treepool.segment_broadcast(nodes, offsets, s["w"], True, T)
        treepool.tree_update_(out_buf, s["node"], s["x"], offsets, parents, 0.1, s["w"])
        treepool.reptile_update_(theta, s["x"], offsets, 0.5, s["w"])
        rep = treepool.reptile_update(nodes, s["x"], offsets, s["lr"], s["w"])
        return nodes, mean, summed, back, rep

    with treepool.use_backend("native"):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = step()
        new = dict(x=torch.randn(T, P, device="cuda"), node=torch.randn(2, P, device="cuda"),
                   w=torch.rand(T, device="cuda") + 0.1, lr=torch.rand(P, device="cuda"))
        for k in static:
            static[k].copy_(new[k])
        theta.fill_(1.0)
        theta_before = theta.clone()
        graph.replay()
        torch.cuda.synchronize()
        theta_after, out_after = theta.clone(), out_buf.clone()
        theta.copy_(theta_before)
        expected = step()
    for a, b in zip(outs, expected):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(out_after, out_buf)
    torch.testing.assert_close(theta_after, theta)


# ----------------------------------------------------------------------------- mixed devices


def expect_same_error(fn, exc_type, message):
    seen = {}
    for name in AVAILABLE_BACKENDS:
        with treepool.use_backend(name):
            try:
                fn()
            except Exception as exc:  # noqa: BLE001
                seen[name] = (type(exc), str(exc))
            else:
                seen[name] = None
    for name, got in seen.items():
        assert got == (exc_type, message), f"{name}: {got!r}, expected {message!r}"


T, P = 5, 3


def inputs():
    return dict(x=torch.randn(T, P, device="cuda"), offsets=torch.tensor([0, 2, 5], device="cuda"),
                w=torch.ones(T, device="cuda"), node=torch.randn(2, P, device="cuda"),
                parents=torch.tensor([0, 1], device="cuda"), theta=torch.randn(2, P, device="cuda"),
                lr=torch.full((P,), 0.1, device="cuda"), out=torch.empty(2, P, device="cuda"))


CALLS = {
    "segment_sum": lambda a: treepool.segment_sum(a["x"], a["offsets"], a["w"]),
    "segment_mean": lambda a: treepool.segment_mean(a["x"], a["offsets"], a["w"]),
    "segment_broadcast": lambda a: treepool.segment_broadcast(a["theta"], a["offsets"], a["w"],
                                                              True, T),
    "tree_update": lambda a: treepool.tree_update(a["node"], a["x"], a["offsets"], a["parents"],
                                                  a["lr"], a["w"]),
    "tree_update_": lambda a: treepool.tree_update_(a["out"], a["node"], a["x"], a["offsets"],
                                                    a["parents"], a["lr"], a["w"]),
    "reptile_update": lambda a: treepool.reptile_update(a["theta"], a["x"], a["offsets"],
                                                        a["lr"], a["w"]),
    "reptile_update_": lambda a: treepool.reptile_update_(a["theta"], a["x"], a["offsets"],
                                                          a["lr"], a["w"]),
}
ROWS = {"segment_sum": "x", "segment_mean": "x", "segment_broadcast": "g",
        "tree_update": "grads", "tree_update_": "grads", "reptile_update": "phi",
        "reptile_update_": "phi"}
# which argument names each op uses, as (key in inputs(), name in the message)
ARGS = {
    "segment_sum": [("offsets", "offsets"), ("w", "weights")],
    "segment_mean": [("offsets", "offsets"), ("w", "weights")],
    "segment_broadcast": [("offsets", "offsets"), ("w", "weights")],
    "tree_update": [("offsets", "offsets"), ("w", "weights"), ("node", "node_params"),
                    ("parents", "parents"), ("lr", "lr")],
    "tree_update_": [("offsets", "offsets"), ("w", "weights"), ("node", "node_params"),
                     ("parents", "parents"), ("lr", "lr"), ("out", "out")],
    "reptile_update": [("offsets", "offsets"), ("w", "weights"), ("theta", "theta"), ("lr", "eps")],
    "reptile_update_": [("offsets", "offsets"), ("w", "weights"), ("theta", "theta"),
                        ("lr", "eps")],
}


@params("op,key,name", [(op, k, n) for op, pairs in ARGS.items() for k, n in pairs])
def test_cpu_argument_with_cuda_rows(op, key, name):
    a = inputs()
    a[key] = a[key].cpu()
    dev = str(a["x"].device)
    expect_same_error(lambda: CALLS[op](a), ValueError,
                      f"treepool.{op}: {name} is on cpu but {ROWS[op]} is on {dev}")


@params("op", list(CALLS))
def test_cpu_rows_with_cuda_offsets(op):
    a = inputs()
    a["offsets"] = a["offsets"].cuda()
    for k in ("x", "theta", "w", "node", "lr", "out", "parents"):
        a[k] = a[k].cpu()
    expect_same_error(lambda: CALLS[op](a), ValueError,
                      f"treepool.{op}: offsets is on {a['offsets'].device} but {ROWS[op]} is on cpu")


@params("dtype", [torch.float32, torch.float16], ids=dtype_id)
def test_bad_values_on_cuda_same_message(dtype):
    """Value checks (offsets, parents, weights) on CUDA index tensors: same messages."""
    a = inputs()
    a = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in a.items()}
    bad_offsets = dict(a, offsets=torch.tensor([0, 3, 2], device="cuda"))
    expect_same_error(lambda: CALLS["tree_update"](bad_offsets), ValueError,
                      "treepool.tree_update: offsets must be non-decreasing, but offsets[1] = 3 "
                      "> offsets[2] = 2")
    bad_parents = dict(a, parents=torch.tensor([0, 2], device="cuda"))
    expect_same_error(lambda: CALLS["tree_update"](bad_parents), ValueError,
                      "treepool.tree_update: parents[1] = 2 is out of range for node_params with "
                      "2 rows")
    w = a["w"].clone()
    w[3] = -2
    expect_same_error(lambda: CALLS["segment_mean"](dict(a, w=w)), ValueError,
                      "treepool.segment_mean: weights must be non-negative, got weights[3] = -2")
