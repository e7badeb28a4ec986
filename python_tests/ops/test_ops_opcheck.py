"""torch.library.opcheck on every registered op (schema and mutation annotations,
autograd registration, fake/meta kernel, AOT dispatch with dynamic shapes)."""

from __future__ import annotations

import pytest
import torch

from .helpers import DEVICES, needs_native

pytestmark = needs_native

params = pytest.mark.parametrize


@pytest.fixture(autouse=True)
def _one_thread():
    """These checks are about the math, not threading (test_ops_layout.py covers thread
    counts). With 2 threads the CPU kernels open an OpenMP region even for the tiny
    inputs used here (the second pass of segment_reduce has grain 1), which costs
    milliseconds per call on a busy machine and made these tests 20x slower."""
    torch.set_num_threads(1)
    yield



def ops():
    return torch.ops.treepool


def _layout(kind):
    if kind == "mixed":
        return [0, 2, 2, 5, 6], [0, 0, 2, 2], 3     # empty cluster, childless node
    if kind == "one":
        return [0, 7], [0], 1
    return [0, 0, 0], [0, 0], 1                     # no tasks


def samples(op, device):
    """(id, args) of op for a few layouts, dtypes, weights and rates."""
    out = []
    for kind in ("mixed", "one", "empty"):
        offsets_list, parents_list, num_prev = _layout(kind)
        T, C = offsets_list[-1], len(offsets_list) - 1
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            if dtype == torch.bfloat16 and kind != "mixed":
                continue
            P = 5
            g = torch.Generator().manual_seed(len(out))

            def rnd(*shape, grad=False):
                t = torch.randn(shape, generator=g).to(dtype).to(device)
                return t.requires_grad_(grad and dtype != torch.bfloat16)

            offsets = torch.tensor(offsets_list, device=device)
            parents = torch.tensor(parents_list, device=device)
            w = (torch.rand(T, generator=g) + 0.1).to(dtype).to(device)
            wg = w.clone().requires_grad_(dtype != torch.bfloat16)
            tag = f"{kind}-{str(dtype)[6:]}"
            if op in ("segment_sum", "segment_mean"):
                out += [(f"{tag}-unweighted", (rnd(T, P, grad=True), offsets, None)),
                        (f"{tag}-weighted", (rnd(T, P, grad=True), offsets, wg)),
                        (f"{tag}-nograd", (rnd(T, P), offsets, w))]
            elif op == "segment_broadcast":
                out += [(f"{tag}-sum", (rnd(C, P, grad=True), offsets, wg, False, T)),
                        (f"{tag}-mean", (rnd(C, P, grad=True), offsets, wg, True, T)),
                        (f"{tag}-mean-unweighted", (rnd(C, P, grad=True), offsets, None, True, T))]
            elif op == "tree_update":
                out += [(f"{tag}-float", (rnd(num_prev, P, grad=True), rnd(T, P, grad=True),
                                          offsets, parents, None, 0.3, None)),
                        (f"{tag}-scalar", (rnd(num_prev, P, grad=True), rnd(T, P, grad=True),
                                           offsets, parents, wg, 1.0, rnd(grad=True))),
                        (f"{tag}-vector", (rnd(num_prev, P), rnd(T, P, grad=True), offsets,
                                           parents, w, 1.0, rnd(P, grad=True)))]
            elif op == "tree_update_":
                out += [(f"{tag}-float", (rnd(C, P), rnd(num_prev, P), rnd(T, P), offsets,
                                          parents, None, 0.3, None)),
                        (f"{tag}-vector", (rnd(C, P), rnd(num_prev, P), rnd(T, P), offsets,
                                           parents, w, 1.0, rnd(P)))]
            elif op == "reptile_update":
                out += [(f"{tag}-float", (rnd(C, P, grad=True), rnd(T, P, grad=True), offsets,
                                          wg, 0.5, None)),
                        (f"{tag}-scalar", (rnd(C, P), rnd(T, P, grad=True), offsets, None, 1.0,
                                           rnd(grad=True))),
                        (f"{tag}-vector", (rnd(C, P, grad=True), rnd(T, P), offsets, w, 1.0,
                                           rnd(P, grad=True)))]
            elif op == "reptile_update_":
                out += [(f"{tag}-float", (rnd(C, P), rnd(T, P), offsets, w, 0.5, None)),
                        (f"{tag}-vector", (rnd(C, P), rnd(T, P), offsets, None, 1.0, rnd(P)))]
    return out


OPS = ["segment_sum", "segment_mean", "segment_broadcast", "tree_update", "tree_update_",
       "reptile_update", "reptile_update_"]


def _cases():
    for op in OPS:
        for sid, _ in samples(op, "cpu"):
            yield op, sid


@params("device", DEVICES)
@params("op,sample", list(_cases()))
def test_opcheck(op, sample, device):
    args = dict(samples(op, device))[sample]
    torch.library.opcheck(getattr(ops(), op).default, args)


@params("device", DEVICES)
def test_every_op_has_a_fake_kernel(device):
    """Meta tensors go through the fake kernels: right shapes, no data read."""
    T, P = 6, 4
    x = torch.empty(T, P, device="meta")
    offsets = torch.empty(4, dtype=torch.int64, device="meta")
    parents = torch.empty(3, dtype=torch.int64, device="meta")
    node = torch.empty(2, P, device="meta")
    assert ops().segment_sum(x, offsets).shape == (3, P)
    assert ops().segment_mean(x, offsets, torch.empty(T, device="meta")).shape == (3, P)
    assert ops().segment_broadcast(node[:0].new_empty(3, P), offsets, None, True, T).shape == (T, P)
    assert ops().tree_update(node, x, offsets, parents, None, 0.1, None).shape == (3, P)
    assert ops().reptile_update(x[:3], x, offsets, None, 0.1, None).shape == (3, P)
    out = torch.empty(3, P, device="meta")
    ops().tree_update_(out, node, x, offsets, parents, None, 0.1, None)
    ops().reptile_update_(out, x, offsets, None, 0.1, None)
