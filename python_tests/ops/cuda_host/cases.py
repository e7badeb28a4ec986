"""Inputs for the host runs of the CUDA kernels, and the two ways to compute them.

A `Case` is one call of one op (dtype, clusters, width, weights, rate, parents).
`run_kernel` calls the kernels.h launcher the CUDA binding would call, on guarded
buffers placed with a `Layout`; `run_reference` calls treepool.ops.reference, the oracle.
`tolerance_args` gives the scale and term count that helpers.assert_close needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .. import helpers
import torch
from hypothesis import strategies as st

import treepool.ops.reference as ref

from . import harness
from .harness import BroadcastArgs, Guarded, Layout, ReduceArgs

OPS = ["segment_sum", "segment_mean", "segment_broadcast", "segment_broadcast_mean",
       "tree_update", "tree_update_", "reptile_update", "reptile_update_"]
REDUCE_OPS = [op for op in OPS if not op.startswith("segment_broadcast")]
RATE_OPS = ("tree_update", "tree_update_", "reptile_update", "reptile_update_")
WEIGHT_KINDS = ["none", "positive", "with_zeros", "zero_cluster"]
# Weights at the ends of the dtype's range, for the ops that divide by W_c (a sum of
# huge weights overflows by definition).
EXTREME_WEIGHT_KINDS = ["tiny", "huge"]
MEAN_OPS = ("segment_mean", "segment_broadcast_mean") + RATE_OPS
RATE_KINDS = ["float", "scalar", "vector"]  # Python float, 0-d tensor, [P] tensor


@dataclass
class Case:
    op: str
    dtype: torch.dtype
    sizes: list
    P: int
    weight_kind: str = "none"
    rate_kind: str = "float"
    parents: Optional[list] = None  # tree_update (tree_update_ uses the identity)
    num_prev: int = 1
    seed: int = 0

    def __post_init__(self):
        if self.op == "tree_update_":
            self.parents, self.num_prev = list(range(len(self.sizes))), max(len(self.sizes), 1)
        elif self.parents is None:
            self.parents, self.num_prev = [0] * len(self.sizes), 1
        level = helpers.Level(self.sizes, self.parents, self.num_prev)
        g = helpers.gen(self.seed)
        self.offsets = level.offsets
        self.T, self.C = level.T, level.C
        self.weights = helpers.make_weights(self.weight_kind, level, self.dtype, g)
        self.rate = helpers.make_rate(self.rate_kind, self.P, self.dtype, g)
        # x (grads, phi) [T, P]; g [C, P] for the broadcast; base: node_params or theta.
        self.x = helpers.randn((self.T, self.P), self.dtype, g)
        self.g = helpers.randn((self.C, self.P), self.dtype, g)
        base_rows = self.num_prev if self.op == "tree_update" else self.C
        self.base = helpers.randn((base_rows, self.P), self.dtype, g)

    def __repr__(self):  # what hypothesis prints for a failing example
        return (f"Case({self.op}, {self.dtype}, sizes={self.sizes}, P={self.P}, "
                f"weights={self.weight_kind}, rate={self.rate_kind}, parents={self.parents}, "
                f"num_prev={self.num_prev}, seed={self.seed})")


@st.composite
def cluster_sizes(draw, max_rows: int) -> list:
    """Random clusters (enough rows to cross chunk boundaries), one cluster of 90% of the
    rows among small and empty ones, singletons, only empty clusters, no cluster."""
    kind = draw(st.sampled_from(["random", "random", "skewed", "skewed", "singletons",
                                 "empty", "none"]))
    if kind == "random":
        return draw(st.lists(st.integers(0, max(1, max_rows // 6)), min_size=1, max_size=12))
    if kind == "skewed":
        total = draw(st.integers(10, max_rows))
        small = draw(st.lists(st.integers(0, 3), min_size=1, max_size=10))
        while sum(small) > total // 10:
            small.pop()
        pos = draw(st.integers(0, len(small)))
        return small[:pos] + [total - sum(small)] + small[pos:]
    if kind == "singletons":
        return [1] * draw(st.integers(1, min(40, max_rows)))
    if kind == "empty":
        return [0] * draw(st.integers(1, 4))
    return []


@st.composite
def cases(draw, op: str, dtype: torch.dtype) -> Case:
    P = draw(st.one_of(st.integers(1, 40), st.integers(1, 40),
                       st.sampled_from([127, 128, 129, 513])))
    max_rows = max(8, min(400, 24000 // P))
    sizes = draw(cluster_sizes(max_rows))
    parents, num_prev = draw(helpers.parents_for(len(sizes)))
    kinds = WEIGHT_KINDS + (EXTREME_WEIGHT_KINDS if op in MEAN_OPS else [])
    return Case(op, dtype, sizes, P, draw(st.sampled_from(kinds)),
                draw(st.sampled_from(RATE_KINDS)), parents, num_prev,
                draw(st.integers(0, 2 ** 31 - 1)))


# ----------------------------------------------------------------------------- runs


def _vector1d(t: torch.Tensor, layout: Layout) -> Guarded:
    return Guarded(t.reshape(1, -1), Layout(shift=layout.shift))


def run_kernel(case: Case, layout: Layout) -> torch.Tensor:
    """The op's result from the host-built CUDA kernels, every buffer placed by `layout`."""
    return run_kernels([case], layout)[0]


def list_cases(op: str, dtype: torch.dtype, sizes: list, Ps: list, weight_kind: str = "none",
               rate_kind: str = "float", parents: Optional[list] = None, num_prev: int = 1,
               seed: int = 0) -> list:
    """The tensors of one multi-tensor call: one Case per width in Ps, each with its own
    data and rate, all with the clusters, parents and weights of the first."""
    cs = [Case(op, dtype, sizes, P, weight_kind, rate_kind, parents, num_prev, seed + i)
          for i, P in enumerate(Ps)]
    for c in cs[1:]:
        c.weights = cs[0].weights
    return cs


def run_kernels(cs: list, layout: Layout) -> list:
    """One launcher call over a list of cases (a multi-tensor op), as the CUDA binding
    makes it: the cases share the op, dtype, clusters, parents and weights of cs[0]
    (`list_cases`). Returns each case's result."""
    first = cs[0]
    dt = harness.DTYPE_IDS[first.dtype]
    offsets = harness.index_tensor(first.offsets)
    parents = harness.index_tensor(first.parents)
    guarded = []
    weights = None
    if first.weights is not None:
        weights = _vector1d(first.weights, layout)
        guarded.append(("weights", weights))
    broadcast = first.op.startswith("segment_broadcast")
    args, outs = [], []
    for i, case in enumerate(cs):
        if broadcast:
            a, out, bufs = broadcast_args(case, layout, dt, offsets, weights)
        else:
            a, out, bufs = reduce_args(case, layout, dt, offsets, parents, weights)
        args.append(a)
        outs.append(out)
        guarded += [(f"{name}[{i}]", buf) for name, buf in bufs]
    if broadcast:
        harness.run_broadcast(args, guarded)
    else:
        harness.run_reduce(args, guarded)
    return [out.view.clone() for out in outs]


def broadcast_args(case: Case, layout: Layout, dt: int, offsets, weights):
    g = Guarded(case.g, layout)
    out = Guarded(torch.empty(case.T, case.P, dtype=case.dtype), layout, fill=float("nan"))
    a = BroadcastArgs(dtype=dt, mean=case.op.endswith("_mean"), T=case.T, P=case.P,
                      C=case.C, g=g.ptr(), g_stride=g.stride, offsets=offsets.data_ptr(),
                      weights=weights.ptr() if weights else None, out=out.ptr(),
                      out_stride=out.stride)
    return a, out, [("g", g), ("out", out)]


def reduce_args(case: Case, layout: Layout, dt: int, offsets, parents, weights):
    x = Guarded(case.x, layout)
    bufs = [("x", x)]
    epilogue = {"segment_sum": "sum", "segment_mean": "mean"}.get(
        case.op, "tree" if case.op.startswith("tree") else "reptile")
    a = ReduceArgs(dtype=dt, epilogue=harness.EPILOGUES[epilogue], T=case.T, P=case.P, C=case.C,
                   x=x.ptr(), x_stride=x.stride, offsets=offsets.data_ptr(),
                   weights=weights.ptr() if weights else None)
    if case.op in RATE_OPS:
        base = Guarded(case.base, layout)
        bufs.append(("base", base))
        a.base, a.base_stride, a.base_rows = base.ptr(), base.stride, case.base.shape[0]
        a.parents = parents.data_ptr()
        if isinstance(case.rate, torch.Tensor):
            rate = _vector1d(case.rate, layout)
            bufs.append(("rate", rate))
            a.rate_tensor, a.rate_stride = rate.ptr(), 0 if case.rate.dim() == 0 else 1
        else:
            a.rate = float(case.rate)
    if case.op.endswith("_"):  # in place: out is base itself
        out = base
    else:
        out = Guarded(torch.empty(case.C, case.P, dtype=case.dtype), layout, fill=float("nan"))
        bufs.append(("out", out))
    a.out, a.out_stride = out.ptr(), out.stride
    return a, out, bufs


def _rate_args(case: Case):
    if isinstance(case.rate, torch.Tensor):
        return 1.0, case.rate
    return float(case.rate), None


def run_reference(case: Case) -> torch.Tensor:
    """The op's result from treepool.ops.reference."""
    offsets = harness.index_tensor(case.offsets)
    parents = harness.index_tensor(case.parents)
    rate, rate_tensor = _rate_args(case)
    if case.op == "segment_sum":
        return ref.segment_sum(case.x, offsets, case.weights)
    if case.op == "segment_mean":
        return ref.segment_mean(case.x, offsets, case.weights)
    if case.op.startswith("segment_broadcast"):
        return ref.segment_broadcast(case.g, offsets, case.weights,
                                     case.op.endswith("_mean"), case.T)
    if case.op.startswith("tree_update"):
        return ref.tree_update(case.base, case.x, offsets, parents, rate, rate_tensor,
                               case.weights)
    return ref.reptile_update(case.base, case.x, offsets, rate, rate_tensor, case.weights)


def tolerance_args(case: Case):
    """(scale, n_terms) of helpers.assert_close for this case (float64 oracles)."""
    n = max(case.sizes, default=0) + 1
    if case.op in ("segment_sum", "segment_mean"):
        if case.op == "segment_sum":
            return helpers.exact_sums(case.x, case.offsets, case.weights)[2], n
        return helpers.exact_mean(case.x, case.offsets, case.weights)[1], n
    if case.op.startswith("segment_broadcast"):
        exact = helpers.exact_broadcast(case.g, case.offsets, case.weights,
                                        case.op.endswith("_mean"), case.T)
        return exact.abs(), n
    if case.op.startswith("tree_update"):
        return helpers.exact_tree_update(case.base, case.x, case.offsets, case.parents,
                                         case.rate, case.weights)[1], n
    return helpers.exact_reptile_update(case.base, case.x, case.offsets, case.rate,
                                        case.weights)[1], n
