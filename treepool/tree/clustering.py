"""Task trees learned by agglomerative clustering (scipy.cluster.hierarchy).

The TaskTree classmethods ``from_linkage``, ``from_affinity``, ``cluster``, ``refine``
and ``grow`` are these functions; they live here so that importing treepool does not
import scipy.  ``cls`` is the TaskTree class.
"""

from __future__ import annotations

import heapq
import numbers
from typing import TYPE_CHECKING, List, Optional

import numpy as np
import torch
from scipy.cluster import hierarchy
from scipy.spatial.distance import squareform

from .levels import check_depth, check_grads, compact_labels, first_appearance, is_int, per_level, to_numpy
from .similarity import cosine_similarity_matrix

if TYPE_CHECKING:
    from .layout import TaskTree

LINKAGE_METHODS = ("average", "complete", "single", "weighted")

# --------------------------------------------------------------------------
# dendrogram cuts
# --------------------------------------------------------------------------

class Dendrogram:
    """Read-only view of a scipy linkage matrix: leaves 0..n-1, merge i is node n+i."""

    def __init__(self, Z: np.ndarray):
        self.n = Z.shape[0] + 1
        self.left = Z[:, 0].astype(np.int64)
        self.right = Z[:, 1].astype(np.int64)
        self.heights = Z[:, 2].astype(np.float64)
        self.root = 2 * self.n - 2 if self.n > 1 else 0

    def height(self, node: int) -> float:
        return float(self.heights[node - self.n]) if node >= self.n else -np.inf

    def _push(self, heap, node):
        heapq.heappush(heap, (-self.height(node), -node))

    def _expand(self, nodes: List[int], target: Optional[int], cut: Optional[float]) -> List[int]:
        """Split the highest merge first (ties: latest merge) while the frontier is
        smaller than ``target`` and the highest merge lies above ``cut``."""
        heap: list = []
        for node in nodes:
            self._push(heap, node)
        count = len(nodes)
        while heap and (target is None or count < target):
            neg_h, neg_node = heap[0]
            node = -neg_node
            if node < self.n or (cut is not None and -neg_h <= cut):
                break
            heapq.heappop(heap)
            self._push(heap, int(self.left[node - self.n]))
            self._push(heap, int(self.right[node - self.n]))
            count += 1
        return sorted(-neg_node for _, neg_node in heap)

    def split(self, node: int, branching: Optional[int], cut: Optional[float]) -> List[int]:
        return self._expand([node], branching, cut)

    def expand_to(self, frontier: List[int], total: int) -> List[int]:
        return self._expand(frontier, total, None)

    def leaves(self, node: int) -> List[int]:
        out, stack = [], [node]
        while stack:
            x = stack.pop()
            if x < self.n:
                out.append(x)
            else:
                stack.append(int(self.right[x - self.n]))
                stack.append(int(self.left[x - self.n]))
        return out

    def labels(self, frontier: List[int]) -> np.ndarray:
        lab = np.empty(self.n, dtype=np.int64)
        for i, node in enumerate(frontier):
            lab[self.leaves(node)] = i
        return lab

    def gap_cuts(self, count: int) -> List[float]:
        """``count`` cut heights at the largest gaps between successive merge heights,
        highest first; padded with -inf (cut below every merge) when there are too few gaps."""
        h = np.sort(self.heights)
        gaps = np.diff(h)
        idx = np.argsort(-gaps, kind="stable")[:count]
        cuts = sorted(((h[i] + h[i + 1]) / 2 for i in idx), reverse=True)
        return cuts + [-np.inf] * (count - len(cuts))


def check_linkage(Z: np.ndarray) -> None:
    """Check a linkage matrix row by row (merge i creates node n + i)."""
    n = Z.shape[0] + 1
    count = np.ones(2 * n - 1, dtype=np.int64)
    used = np.zeros(2 * n - 1, dtype=bool)
    for i, (a, b, h, c) in enumerate(Z):
        if not np.isfinite(Z[i]).all() or h < 0:
            raise ValueError(f"Z is not a valid linkage matrix: row {i} has a non-finite or negative entry")
        for x in (a, b):
            if x != int(x) or not 0 <= x < n + i:
                raise ValueError(f"Z is not a valid linkage matrix: row {i} merges {x}, but only nodes "
                                 f"0..{n + i - 1} exist before it")
            if used[int(x)]:
                raise ValueError(f"Z is not a valid linkage matrix: node {int(x)} is merged twice")
            used[int(x)] = True
        if a == b:
            raise ValueError(f"Z is not a valid linkage matrix: row {i} merges node {int(a)} with itself")
        count[n + i] = count[int(a)] + count[int(b)]
        if c != count[n + i]:
            raise ValueError(f"Z is not a valid linkage matrix: row {i} has count {c}, "
                             f"expected {count[n + i]}")


def check_method(method: str) -> None:
    if method not in LINKAGE_METHODS:
        raise ValueError(f"method must be one of {list(LINKAGE_METHODS)}, got {method!r} "
                         "('ward', 'centroid' and 'median' need Euclidean distances)")



def linkage_from_similarity(sim: np.ndarray, shift: float, method: str) -> np.ndarray:
    """Linkage of the distance ``shift - sim`` (diagonal ignored)."""
    dist = shift - sim
    np.fill_diagonal(dist, 0.0)
    dist = np.maximum(dist, 0.0)
    return hierarchy.linkage(squareform(dist, checks=False), method=method)



def from_linkage(cls, Z, depth: int, *, branching=None, heights=None,
                 num_clusters=None) -> "TaskTree":
    """Cut a scipy linkage matrix ``Z`` (tasks = its observations) into ``depth`` levels.

    Levels 1..depth-1 come from the dendrogram and level ``depth`` is the
    leaves.  Each level refines the previous one, choosing one of:

    * ``branching`` (int or one per level): split every cluster into at most
      that many children, highest merge first (non-binary);
    * ``heights`` (float or one per level, non-increasing): split clusters
      while their merge height exceeds the level's height (a dendrogram cut);
      with ``branching`` too, at most ``branching`` children;
    * ``num_clusters`` (one int per level, non-decreasing): split the
      highest merges of the whole level until it has that many clusters;
    * none: cut at the ``depth - 1`` largest gaps between successive merge
      heights (levels with no gap left are singletons).

    Ties are broken towards the later merge, so the result is deterministic.
    """
    Z = np.asarray(Z, dtype=np.float64)
    if Z.ndim != 2 or Z.shape[1] != 4:
        raise ValueError(f"Z must be a scipy linkage matrix of shape [T-1, 4], got shape {Z.shape}")
    check_linkage(Z)
    depth = check_depth(depth)
    dend = Dendrogram(Z)
    return from_dendrogram(cls, dend, depth, branching, heights, num_clusters, "heights")

def from_dendrogram(cls, dend: Dendrogram, depth: int, branching, heights, num_clusters,
                     heights_name: str) -> "TaskTree":
    n_cut = depth - 1
    branching = per_level(branching, n_cut, "branching", "int")
    heights = per_level(heights, n_cut, heights_name, "float")
    num_clusters = per_level(num_clusters, n_cut, "num_clusters", "int")
    if num_clusters is not None:
        if branching is not None or heights is not None:
            raise ValueError(f"num_clusters cannot be combined with branching or {heights_name}")
        if any(b > a for a, b in zip(num_clusters[1:], num_clusters)):
            raise ValueError(f"num_clusters must be non-decreasing from level 1, got {num_clusters}")
        if num_clusters and num_clusters[-1] > dend.n:
            raise ValueError(f"num_clusters cannot exceed the number of tasks {dend.n}, "
                             f"got {num_clusters[-1]}")
    if heights is not None and any(b > a for a, b in zip(heights, heights[1:])):
        what = "non-decreasing" if heights_name == "threshold" else "non-increasing"
        raise ValueError(f"{heights_name} must be {what} from level 1 to level depth-1 "
                         "so that each level refines the one above")
    if branching is None and heights is None and num_clusters is None:
        heights = dend.gap_cuts(n_cut)
    frontier = [dend.root]
    levels = []
    for lev in range(n_cut):
        if num_clusters is not None:
            frontier = dend.expand_to(frontier, num_clusters[lev])
        else:
            b = None if branching is None else branching[lev]
            h = None if heights is None else heights[lev]
            frontier = sorted(x for node in frontier for x in dend.split(node, b, h))
        levels.append(dend.labels(frontier))
    levels.append(np.arange(dend.n))
    return cls(levels)

def from_affinity(cls, affinity, depth: int, *, branching=None, threshold=None,
                  num_clusters=None, method: str = "average", symmetrize: bool = True) -> "TaskTree":
    """Tree from a [T, T] affinity matrix (larger = more alike), e.g. task transference.

    The affinity is symmetrized, ``S = (A + A^T) / 2``, turned into the
    distance ``D = max_{i != j} S_ij - S`` and clustered agglomeratively
    (``method`` linkage, scipy.cluster.hierarchy); average, complete, single
    and weighted linkage do not depend on that shift.  ``threshold`` is in
    affinity units (non-decreasing per level): a cluster is split while
    its merge affinity is below it.  ``branching`` and ``num_clusters`` as
    in :meth:`from_linkage`; with none, cut at the largest gaps.
    """
    sim = to_numpy(affinity, "affinity").astype(np.float64)
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1] or sim.shape[0] == 0:
        raise ValueError(f"affinity must be a non-empty square [T, T] matrix, got shape {sim.shape}")
    if not np.isfinite(sim).all():
        raise ValueError("affinity contains non-finite values (inf or NaN)")
    if symmetrize:
        sim = (sim + sim.T) / 2
    elif not np.allclose(sim, sim.T):
        raise ValueError("affinity is not symmetric; pass symmetrize=True to use (A + A^T) / 2")
    off = sim[~np.eye(sim.shape[0], dtype=bool)]
    shift = float(off.max()) if off.size else 0.0
    return from_similarity(cls, sim, shift, depth, branching, threshold, num_clusters, method)

def from_similarity(cls, sim: np.ndarray, shift: float, depth, branching, threshold,
                     num_clusters, method) -> "TaskTree":
    depth = check_depth(depth)
    check_method(method)
    num_tasks = sim.shape[0]
    heights = None
    if threshold is not None:
        heights = [shift - t for t in per_level(threshold, depth - 1, "threshold", "float")]
    if num_tasks == 1:
        Z = np.zeros((0, 4))
    else:
        Z = linkage_from_similarity(sim, shift, method)
    return from_dendrogram(cls, Dendrogram(Z), depth, branching, heights, num_clusters, "threshold")

def cluster(cls, features: torch.Tensor, depth: int, *, branching=None, threshold=None,
            num_clusters=None, method: str = "average", chunk_size: Optional[int] = None) -> "TaskTree":
    """Learn a tree from task gradients ``features`` [T, P] (original task order).

    Tasks are clustered agglomeratively (``method`` linkage,
    scipy.cluster.hierarchy) on the cosine distance ``1 - cos(g_i, g_j)``,
    computed in chunks of P.  The dendrogram is cut into levels
    1..depth-1 (level ``depth`` is the leaves) by ``branching`` (at most
    that many children per cluster), ``threshold`` (cosine similarity per
    level, non-decreasing: split clusters whose merge similarity is below
    it), ``num_clusters`` (clusters per level), or, with none, at the
    largest gaps between merge heights.  Deterministic for a given input.
    """
    grads = check_grads(features, None, "features")
    sim = cosine_similarity_matrix(grads, chunk_size=chunk_size).cpu().double().numpy()
    return from_similarity(cls, sim, 1.0, depth, branching, threshold, num_clusters, method)

# ------------------------------------------------------------------ online (Learned TreeMAML)

def refine(labels, grads: torch.Tensor, *, branching: Optional[int] = None,
           threshold: Optional[float] = None, method: str = "average",
           chunk_size: Optional[int] = None) -> torch.Tensor:
    """One online top-down clustering step: split every current cluster by the new gradients.

    This is the tree-building step of Learned TreeMAML (Garcia et al. 2021):
    at inner step k the level-(k-1) clusters are split by the tasks' step-k
    gradients, so the tree grows one level per step.

    ``labels`` [T] is the current cluster of each task (original order;
    ``None`` = all tasks in the root) and ``grads`` [T, P] the tasks' new
    gradients.  Inside each cluster the tasks are clustered agglomeratively
    on cosine distance and split, highest merge first, into at most
    ``branching`` children and/or until every child's merge similarity is at
    least ``threshold`` (non-binary: any number of children; a cluster may
    stay whole).  Returns the new [T] int64 labels, numbered by (parent,
    child) and refining ``labels`` (children numbered by smallest task id).
    Deterministic.  :func:`refine_similarity` is the same on a given [T, T]
    similarity.
    """
    grads = check_grads(grads, None)
    _check_split(branching, threshold, method, "refine")
    sim = cosine_similarity_matrix(grads, chunk_size=chunk_size).cpu().double().numpy()
    return refine_similarity(labels, sim, branching=branching, threshold=threshold, method=method)


def _check_split(branching, threshold, method, who: str) -> None:
    if branching is None and threshold is None:
        raise ValueError(f"{who} needs branching, threshold or both")
    if branching is not None and (not is_int(branching) or branching < 1):
        raise ValueError(f"branching must be an int >= 1, got {branching!r}")
    if threshold is not None and (not isinstance(threshold, (numbers.Real, np.floating))
                                  or isinstance(threshold, bool)
                                  or not np.isfinite(threshold)):
        raise ValueError(f"threshold must be a finite number, got {threshold!r}")
    check_method(method)


def _check_similarity(similarity, num_tasks: Optional[int] = None) -> np.ndarray:
    sim = to_numpy(similarity, "similarity").astype(np.float64)
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1] or sim.shape[0] == 0:
        raise ValueError(f"similarity must be a non-empty square [T, T] matrix, got shape {sim.shape}")
    if num_tasks is not None and sim.shape[0] != num_tasks:
        raise ValueError(f"similarity has {sim.shape[0]} rows but there are {num_tasks} tasks")
    if not np.isfinite(sim).all():
        raise ValueError("similarity contains non-finite values (inf or NaN)")
    return (sim + sim.T) / 2


def refine_similarity(labels, similarity, *, branching: Optional[int] = None,
                      threshold: Optional[float] = None, method: str = "average") -> torch.Tensor:
    """:func:`refine` on a given [T, T] similarity (cosine-like: 1 = alike; symmetrized)
    instead of the cosine similarity of gradients, e.g. one accumulated over many
    task batches (Learned TreeMAML's ``affinity_momentum``).  The distance is
    ``1 - similarity`` and ``threshold`` is in similarity units."""
    _check_split(branching, threshold, method, "refine_similarity")
    sim = _check_similarity(similarity)
    num_tasks = sim.shape[0]
    if labels is None:
        current = np.zeros(num_tasks, dtype=np.int64)
    else:
        current = compact_labels(labels, "labels", num_tasks)
    cut = None if threshold is None else 1.0 - float(threshold)
    new = np.empty(num_tasks, dtype=np.int64)
    next_id = 0
    for c in range(int(current.max()) + 1):
        idx = np.flatnonzero(current == c)
        if idx.size == 1:
            new[idx] = next_id
            next_id += 1
            continue
        Z = linkage_from_similarity(sim[np.ix_(idx, idx)], 1.0, method)
        dend = Dendrogram(Z)
        sub = first_appearance(dend.labels(dend.split(dend.root, branching, cut)))
        new[idx] = next_id + sub
        next_id += int(sub.max()) + 1
    return torch.from_numpy(new)

def grow(cls, prefix, grads: torch.Tensor, *, branching: Optional[int] = None,
         threshold: Optional[float] = None, method: str = "average",
         chunk_size: Optional[int] = None) -> "TaskTree":
    """Add one level to ``prefix`` by :meth:`refine` on new gradients (Learned TreeMAML).

    ``prefix`` is ``None`` (only the root: the result has depth 1), a
    TaskTree (its last level is split) or a [T] label sequence (a one-level
    tree).  Call once per inner step k with the gradients of step k to grow
    a depth-K tree; finish with :meth:`with_leaf_level` if the last step
    should be per task.  The prefix's DFS order is kept.
    """
    grads = check_grads(grads, None)
    num_tasks = grads.shape[0]
    if prefix is None:
        new = refine(None, grads, branching=branching, threshold=threshold,
                         method=method, chunk_size=chunk_size)
        return cls([new])
    if not isinstance(prefix, cls):
        prefix = cls([prefix])
    if prefix.num_tasks != num_tasks:
        raise ValueError(f"grads has {num_tasks} rows but prefix has {prefix.num_tasks} tasks")
    new = refine(prefix._levels[-1], grads, branching=branching, threshold=threshold,
                     method=method, chunk_size=chunk_size)
    return cls(list(prefix._levels) + [new.numpy()], order=prefix._perm)

def grow_similarity(cls, prefix, similarity, *, branching: Optional[int] = None,
                    threshold: Optional[float] = None, method: str = "average") -> "TaskTree":
    """:func:`grow` from a given [T, T] similarity (see :func:`refine_similarity`)."""
    new = refine_similarity(None if prefix is None else
                            (prefix._levels[-1] if isinstance(prefix, cls) else prefix),
                            similarity, branching=branching, threshold=threshold, method=method)
    if prefix is None:
        return cls([new])
    if not isinstance(prefix, cls):
        prefix = cls([prefix])
    if prefix.num_tasks != new.shape[0]:
        raise ValueError(f"similarity has {new.shape[0]} rows but prefix has {prefix.num_tasks} tasks")
    return cls(list(prefix._levels) + [new.numpy()], order=prefix._perm)

# ------------------------------------------------------ serialisation

