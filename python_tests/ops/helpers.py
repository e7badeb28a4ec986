"""Shared strategies, oracles and tolerances of the op tests.

The oracles here are independent of treepool: plain Python loops over clusters and
rows in float64, written from the definitions in docs/design.md, section 3.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence

import pytest
import torch
from hypothesis import strategies as st

import treepool

# ----------------------------------------------------------------------------- parameters

NATIVE = treepool.native_available()
CUDA = torch.cuda.is_available()

BACKENDS = [
    pytest.param("native", marks=pytest.mark.skipif(not NATIVE, reason="treepool._C is not built")),
    "reference",
]
AVAILABLE_BACKENDS = [b for b in ("native", "reference") if b != "native" or NATIVE]

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="CUDA is not available")),
]

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
HALF = (torch.float16, torch.bfloat16)

needs_native = pytest.mark.skipif(not NATIVE, reason="treepool._C is not built")
needs_cuda = pytest.mark.skipif(not CUDA, reason="CUDA is not available")


def dtype_id(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


# ----------------------------------------------------------------------------- tree levels


@dataclasses.dataclass
class Level:
    """One tree level: cluster sizes, and parents into a previous level of C_prev nodes."""

    sizes: List[int]
    parents: List[int]
    num_prev: int

    @property
    def offsets(self) -> List[int]:
        o = [0]
        for s in self.sizes:
            o.append(o[-1] + s)
        return o

    @property
    def T(self) -> int:
        return sum(self.sizes)

    @property
    def C(self) -> int:
        return len(self.sizes)

    @property
    def max_size(self) -> int:
        return max(self.sizes, default=0)

    def offsets_tensor(self, device="cpu") -> torch.Tensor:
        return torch.tensor(self.offsets, dtype=torch.int64, device=device)

    def parents_tensor(self, device="cpu") -> torch.Tensor:
        return torch.tensor(self.parents, dtype=torch.int64, device=device)

    def cluster_of_row(self) -> List[int]:
        return [c for c, s in enumerate(self.sizes) for _ in range(s)]


@st.composite
def cluster_sizes(draw, max_rows: int = 64) -> List[int]:
    """Sizes of the clusters of one level, covering the shapes that matter: empty
    clusters, clusters of size 1, one cluster holding almost all tasks, T = 1, T = 0
    with empty clusters, and no cluster at all (offsets = [0])."""
    kind = draw(st.sampled_from(["random", "random", "singletons", "giant", "one_task",
                                 "no_tasks", "no_clusters"]))
    if kind == "random":
        return draw(st.lists(st.integers(0, min(8, max_rows)), min_size=1, max_size=12))
    if kind == "singletons":
        return [1] * draw(st.integers(1, min(24, max_rows)))
    if kind == "giant":
        small = draw(st.lists(st.integers(0, 1), max_size=6))
        big = draw(st.integers(min(10, max_rows), max_rows))
        pos = draw(st.integers(0, len(small)))
        return small[:pos] + [big] + small[pos:]
    if kind == "one_task":
        return [0] * draw(st.integers(0, 2)) + [1] + [0] * draw(st.integers(0, 2))
    if kind == "no_tasks":
        return [0] * draw(st.integers(1, 4))
    return []


@st.composite
def parents_for(draw, C: int):
    """(parents, C_prev): a non-decreasing map of C clusters into C_prev >= 1 nodes of the
    level above; nodes without children are allowed."""
    kind = draw(st.sampled_from(["random", "random", "root", "identity"]))
    if kind == "identity":
        return list(range(C)), max(C, 1)
    if kind == "root":
        return [0] * C, 1
    num_prev = draw(st.integers(1, C + 3))
    parents = sorted(draw(st.lists(st.integers(0, num_prev - 1), min_size=C, max_size=C)))
    return parents, num_prev


@st.composite
def levels(draw, max_rows: int = 64) -> Level:
    sizes = draw(cluster_sizes(max_rows))
    parents, num_prev = draw(parents_for(len(sizes)))
    return Level(sizes, parents, num_prev)


@st.composite
def nested_trees(draw, max_tasks: int = 40, max_depth: int = 4) -> List[Level]:
    """A task tree of depth K as its levels 1..K, every level refining the one above:
    level 1 is the root cluster of all T tasks; each cluster is cut into child clusters
    (possibly empty ones, a single child, or one child holding almost everything); a
    cluster without tasks may have no children. level[k].parents index level k-1
    (the root level's parents index a single meta-parameter row)."""
    T = draw(st.integers(0, max_tasks))
    depth = draw(st.integers(1, max_depth))
    levels_out = [Level([T], [0], 1)]
    for _ in range(depth - 1):
        above = levels_out[-1]
        sizes, parents = [], []
        for c, size in enumerate(above.sizes):
            if size == 0 and draw(st.booleans()):
                continue  # a node without children
            kind = draw(st.sampled_from(["cuts", "cuts", "singletons", "one"]))
            if kind == "one" or size == 0:
                parts = [size] + [0] * draw(st.integers(0, 1))
            elif kind == "singletons":
                parts = [1] * size
            else:
                cuts = sorted(draw(st.lists(st.integers(0, size), max_size=4)))
                parts = [b - a for a, b in zip([0] + cuts, cuts + [size])]
            sizes += parts
            parents += [c] * len(parts)
        levels_out.append(Level(sizes, parents, above.C))
    return levels_out


# P from 1 to a few thousand; the large values straddle the CPU kernel's column block.
def widths(large: bool = True):
    small = st.one_of(st.integers(1, 8), st.integers(9, 300))
    if not large:
        return small
    return st.one_of(small, small, st.sampled_from([2047, 2048, 2049, 3001]))


def max_rows_for(P: int) -> int:
    """Keeps T * P small enough for a quick example."""
    return int(max(10, min(200, 60000 // max(P, 1))))


WEIGHT_KINDS = ["none", "positive", "with_zeros", "zero_cluster", "all_zero"]
RATE_KINDS = ["float", "int", "scalar", "vector"]


# ----------------------------------------------------------------------------- tensors


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(shape, dtype, g, scale=1.0, device="cpu", shift=0.0) -> torch.Tensor:
    """Values drawn in float64, rounded once to dtype (on the CPU, then moved)."""
    x = torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift * scale
    return x.to(dtype).to(device)


def make_weights(kind: str, level: Level, dtype, g, device="cpu") -> Optional[torch.Tensor]:
    if kind == "none":
        return None
    T = level.T
    w = torch.rand(T, generator=g, dtype=torch.float64) * 2 + 0.05
    if kind == "with_zeros":
        w = w * (torch.rand(T, generator=g, dtype=torch.float64) > 0.3)
    elif kind == "zero_cluster":
        nonempty = [c for c, s in enumerate(level.sizes) if s > 0]
        if nonempty:
            c = nonempty[int(torch.randint(len(nonempty), (1,), generator=g))]
            o = level.offsets
            w[o[c]:o[c + 1]] = 0
    elif kind == "all_zero":
        w = torch.zeros(T, dtype=torch.float64)
    elif kind == "tiny":  # subnormal in the dtype: 1 / W_c overflows
        w = w * (torch.finfo(dtype).tiny * 2.0 ** -8)
    elif kind == "huge":  # near the dtype's largest: W_c overflows
        w = w * (torch.finfo(dtype).max / 4)
    return w.to(dtype).to(device)


def make_rate(kind: str, P: int, dtype, g, device="cpu"):
    """lr / eps as a float, an int, a 0-d tensor or a [P] tensor."""
    if kind == "float":
        return float(torch.empty(()).uniform_(-1.5, 1.5, generator=g))
    if kind == "int":
        return int(torch.randint(-1, 3, (), generator=g))
    if kind == "scalar":
        return torch.empty((), dtype=torch.float64).uniform_(-1.5, 1.5, generator=g).to(dtype).to(device)
    return torch.empty(P, dtype=torch.float64).uniform_(-1.5, 1.5, generator=g).to(dtype).to(device)


def rate64(rate, P: int) -> torch.Tensor:
    """The rate as the float64 [P] (or scalar) the oracle multiplies with."""
    if isinstance(rate, torch.Tensor):
        return rate.detach().double().cpu()
    return torch.tensor(float(rate), dtype=torch.float64)


# ----------------------------------------------------------------------------- oracles
# Plain loops over clusters and rows in float64.


def _w64(weights, T):
    if weights is None:
        return [1.0] * T
    return [float(v) for v in weights.detach().double().cpu()]


def _normalised(w: torch.Tensor) -> torch.Tensor:
    """One cluster's float64 weights divided by the largest (a mean does not change),
    so that weights near the dtype's limits neither overflow nor underflow here."""
    largest = float(w.max()) if w.numel() else 0.0
    return w / largest if largest > 0 else w


def exact_sums(x: torch.Tensor, offsets: Sequence[int], weights, normalise: bool = False):
    """(S [C, P], W [C], A [C, P]) in float64: S[c] = sum w_t x[t], W[c] = sum w_t,
    A[c] = sum |w_t x[t]| (the magnitude the rounding errors scale with). With
    `normalise` (for means), each cluster's weights are divided by the largest first."""
    x64 = x.detach().double().cpu()
    T, P = x64.shape
    w = (torch.ones(T, dtype=torch.float64) if weights is None
         else weights.detach().double().cpu())
    C = len(offsets) - 1
    S = torch.zeros(C, P, dtype=torch.float64)
    A = torch.zeros(C, P, dtype=torch.float64)
    W = torch.zeros(C, dtype=torch.float64)
    for c in range(C):
        b, e = offsets[c], offsets[c + 1]
        if e > b:
            wc = _normalised(w[b:e]) if normalise else w[b:e]
            terms = wc[:, None] * x64[b:e]
            S[c] = terms.sum(0)
            A[c] = terms.abs().sum(0)
            W[c] = wc.sum()
    return S, W, A


def exact_mean(x, offsets, weights):
    """(mean [C, P], A/W [C, P]): the weighted mean, 0 for a cluster of zero weight."""
    S, W, A = exact_sums(x, offsets, weights, normalise=True)
    M = torch.zeros_like(S)
    scale = torch.zeros_like(A)
    for c in range(len(offsets) - 1):
        if W[c] > 0:
            M[c] = S[c] / W[c]
            scale[c] = A[c] / W[c]
    return M, scale


def exact_broadcast(g, offsets, weights, mean, num_rows):
    g64 = g.detach().double().cpu()
    P = g64.shape[1]
    w = _w64(weights, num_rows)
    out = torch.zeros(num_rows, P, dtype=torch.float64)
    for c in range(len(offsets) - 1):
        b, e = offsets[c], offsets[c + 1]
        s = torch.tensor(w[b:e], dtype=torch.float64)
        if mean:
            s = _normalised(s)
            W = float(s.sum())
            s = s / W if W > 0 else torch.zeros_like(s)
        out[b:e] = s[:, None] * g64[c]
    return out


def exact_tree_update(node_params, grads, offsets, parents, lr, weights):
    M, A = exact_mean(grads, offsets, weights)
    node = node_params.detach().double().cpu()
    P = grads.shape[1]
    r = rate64(lr, P)
    out = torch.zeros_like(M)
    scale = torch.zeros_like(M)
    for c, p in enumerate(parents):
        out[c] = node[p] - r * M[c]
        scale[c] = node[p].abs() + r.abs() * A[c]
    return out, scale


def exact_reptile_update(theta, phi, offsets, eps, weights):
    M, A = exact_mean(phi, offsets, weights)
    th = theta.detach().double().cpu()
    e = rate64(eps, phi.shape[1])
    out = th + e * (M - th)
    scale = th.abs() + e.abs() * (A + th.abs())
    return out, scale


# ----------------------------------------------------------------------------- tolerances

# Rounding unit of the output dtype (with a factor 2 of margin over half an ulp) and of
# the accumulation dtype (float32 for the half types).
_U_OUT = {torch.float64: 2.0 ** -52, torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10,
          torch.bfloat16: 2.0 ** -7}
# float16 has subnormals below 2**-14 with an absolute spacing of 2**-24.
_FLOOR = {torch.float64: 0.0, torch.float32: 1e-38, torch.float16: 2.0 ** -24,
          torch.bfloat16: 1e-38}


def tolerance(dtype, exact, scale, n_terms):
    """|out - exact| allowed: the output rounded once to dtype (relative to |exact|) plus
    the accumulation error of n_terms products in the accumulation dtype, which scales
    with `scale` (sum |w x| / W for a mean; the float64 oracle counts as well)."""
    u_acc = 2.0 ** -52 if dtype == torch.float64 else 2.0 ** -23
    u_out = _U_OUT[dtype]
    k = 8 * (n_terms + 3)
    # |round(v) - exact| <= u_out |v| + |v - exact|, |v - exact| <= k u_acc scale: the
    # output's rounding is relative to the result, not to the magnitude of the terms (a
    # half-precision accumulator would blow this bound).
    return u_out * exact.abs() + (1 + u_out) * k * u_acc * scale + _FLOOR[dtype]


def assert_matches_exact(out, exact, scale, dtype, n_terms, what=""):
    assert out.dtype == dtype, f"{what}: dtype {out.dtype}, expected {dtype}"
    assert tuple(out.shape) == tuple(exact.shape), f"{what}: shape {tuple(out.shape)}, expected {tuple(exact.shape)}"
    out64 = out.detach().double().cpu()
    tol = tolerance(dtype, exact, scale, n_terms)
    err = (out64 - exact).abs()
    bad = ~(err <= tol)  # NaN and inf fail
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} entries off; first at {idx}: "
            f"got {float(out64[idx])!r}, exact {float(exact[idx])!r}, tolerance "
            f"{float(tol[idx]):.3g} (dtype {dtype}, {n_terms} terms)")


def assert_close(a, b, dtype, scale, n_terms, what=""):
    """Two computed results (e.g. native and reference) within twice the tolerance."""
    a64, b64 = a.detach().double().cpu(), b.detach().double().cpu()
    tol = 2 * tolerance(dtype, b64, scale, n_terms) + 2 * _U_OUT[dtype] * a64.abs()
    bad = ~((a64 - b64).abs() <= tol)
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise AssertionError(f"{what}: first mismatch at {idx}: {float(a64[idx])!r} vs "
                             f"{float(b64[idx])!r} (tolerance {float(tol[idx]):.3g})")


# ----------------------------------------------------------------------------- misc


def clones(*tensors):
    return [None if t is None or not isinstance(t, torch.Tensor) else t.detach().clone()
            for t in tensors]


def assert_unchanged(before, after, what="input"):
    for i, (b, a) in enumerate(zip(before, after)):
        if b is None or not isinstance(a, torch.Tensor):
            continue
        assert torch.equal(b, a.detach()), f"{what} #{i} was modified"
