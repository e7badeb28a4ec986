"""TaskTree: a hierarchy of clusters over T tasks, laid out for the treepool ops.

TreeMAML (Garcia et al. 2021, "Meta-learning with MAML on trees") puts the
tasks at the leaves of a tree of depth K.  Inner step k uses the clusters of
level k: every task in cluster c takes the same step

    theta_c = theta_{parent(c)} - lr * mean_{t in c} grad_t,

so level 1 is the first split under the root (level 0, one node) and level K
is the leaves, where every task is its own cluster.

Conventions used everywhere in this module:

* Levels are numbered 1..depth; ``depth == K`` is the number of inner steps.
  Every constructor except ``from_labels(..., add_leaf_level=False)``,
  ``grow`` and ``prefix`` gives a *complete* tree, whose level ``depth`` is
  all singletons (``is_complete``).  A partial tree (last level not
  singletons) is what Learned TreeMAML holds while it grows a tree one level
  per inner step.
* Tasks are numbered 0..T-1 in their *original* order.  The ops work on a
  row-major [T, P] buffer whose rows are in *DFS order* of the tree, so that
  every cluster at every level is a contiguous range of rows.
  ``perm[row] = task`` and ``inv_perm[task] = row``; ``permute_rows`` and
  ``unpermute_rows`` convert between the two orders.
* Clusters of a level are numbered 0..C_l-1 in DFS order, so cluster c of
  level l owns rows ``offsets(l)[c] : offsets(l)[c+1]`` and its parent is
  cluster ``parents(l)[c]`` of level l-1 (level 1's parents are the root, 0).
* Each level must refine the one above: two tasks in the same cluster at level
  l are in the same cluster at level l-1.

A TaskTree is immutable; tensors it hands out are cached, do not modify them
in place.
"""

from __future__ import annotations

import heapq
import numbers
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from scipy.cluster import hierarchy
from scipy.spatial.distance import squareform

from .similarity import cosine_similarity_matrix

__all__ = ["TaskTree"]

_LINKAGE_METHODS = ("average", "complete", "single", "weighted")
_DICT_TYPE = "treepool.TaskTree"
_DICT_VERSION = 1


# --------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------

def _is_int(x) -> bool:
    return isinstance(x, (numbers.Integral, np.integer)) and not isinstance(x, (bool, np.bool_))


def _to_numpy(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except Exception as exc:  # ragged nested sequences and the like
        raise TypeError(f"{name} could not be read as an array: {exc}") from None


def _compact_labels(raw, name: str, num_tasks: Optional[int]) -> np.ndarray:
    """Map arbitrary int/str labels of one level to 0..C-1 (int64, [T])."""
    arr = _to_numpy(raw, name)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of per-task labels, got shape {arr.shape}")
    if num_tasks is not None and arr.shape[0] != num_tasks:
        raise ValueError(f"{name} has {arr.shape[0]} labels, expected {num_tasks} (one per task)")
    if arr.dtype == bool or arr.dtype.kind not in "iuUSO":
        raise TypeError(f"{name} must contain int (or str) labels, got dtype {arr.dtype}")
    if arr.dtype.kind == "O":
        bad = [v for v in arr.tolist() if not (_is_int(v) or isinstance(v, str))]
        if bad:
            raise TypeError(f"{name} must contain int (or str) labels, got {bad[0]!r}")
    try:
        _, inverse = np.unique(arr, return_inverse=True)
    except TypeError as exc:
        raise TypeError(f"{name} mixes label types that cannot be compared: {exc}") from None
    return inverse.reshape(-1).astype(np.int64)


def _check_refines(levels: List[np.ndarray]) -> None:
    """Raise if some level does not refine the one above it."""
    for i in range(1, len(levels)):
        child, parent = levels[i], levels[i - 1]
        _, first = np.unique(child, return_index=True)
        # parent label of the first task of each child cluster, spread to all tasks
        expected = parent[first][child]
        bad = np.flatnonzero(expected != parent)
        if bad.size:
            b = int(bad[0])
            a = int(first[child[b]])
            a, b = min(a, b), max(a, b)
            raise ValueError(
                f"levels[{i}] does not refine levels[{i - 1}]: tasks {a} and {b} share a "
                f"cluster at level {i + 1} but not at level {i}")


def _canonicalize(levels: List[np.ndarray], order: np.ndarray) -> Tuple[Tuple[np.ndarray, ...], np.ndarray]:
    """DFS permutation and DFS cluster numbering of a validated hierarchy.

    Children are ordered by the first position (in ``order``) of any of their
    tasks; tasks inside a deepest cluster keep their order in ``order``.
    """
    num_tasks = order.shape[0]
    pos = np.empty(num_tasks, dtype=np.int64)
    pos[order] = np.arange(num_tasks)
    keys = [pos]
    for lab in reversed(levels):
        rank = np.full(int(lab.max()) + 1, num_tasks, dtype=np.int64)
        np.minimum.at(rank, lab, pos)
        keys.append(rank[lab])
    perm = np.lexsort(keys).astype(np.int64)  # last key is the primary one
    out = []
    for lab in levels:
        along = lab[perm]
        starts = np.ones(num_tasks, dtype=bool)
        starts[1:] = along[1:] != along[:-1]
        dfs = np.empty(num_tasks, dtype=np.int64)
        dfs[perm] = np.cumsum(starts) - 1
        dfs.setflags(write=False)
        out.append(dfs)
    perm.setflags(write=False)
    return tuple(out), perm


def _first_appearance(lab: np.ndarray) -> np.ndarray:
    """Relabel clusters by first appearance in task order (a partition's canonical form)."""
    _, first, inverse = np.unique(lab, return_index=True, return_inverse=True)
    rank = np.empty(first.shape[0], dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(first.shape[0])
    return rank[inverse.reshape(-1)]


def _per_level(value, n: int, name: str, kind: str) -> Optional[list]:
    """Broadcast a scalar or check a sequence of ``n`` per-level values."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, (list, tuple, np.ndarray)):
        vals = list(value)
        if len(vals) != n:
            raise ValueError(f"{name} must be a scalar or have one value per level 1..depth-1 "
                             f"({n} values), got {len(vals)}")
    else:
        vals = [value] * n
    for v in vals:
        if kind == "int":
            if not _is_int(v) or v < 1:
                raise ValueError(f"{name} must contain positive ints, got {v!r}")
        elif not isinstance(v, (numbers.Real, np.floating)) or isinstance(v, bool) or not np.isfinite(v):
            raise ValueError(f"{name} must contain finite numbers, got {v!r}")
    return [int(v) if kind == "int" else float(v) for v in vals]


# --------------------------------------------------------------------------
# dendrogram cuts
# --------------------------------------------------------------------------

class _Dendrogram:
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


def _check_linkage(Z: np.ndarray) -> None:
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


def _check_method(method: str) -> None:
    if method not in _LINKAGE_METHODS:
        raise ValueError(f"method must be one of {list(_LINKAGE_METHODS)}, got {method!r} "
                         "('ward', 'centroid' and 'median' need Euclidean distances)")


def _check_depth(depth, name: str = "depth") -> int:
    if not _is_int(depth) or depth < 1:
        raise ValueError(f"{name} must be an int >= 1, got {depth!r}")
    return int(depth)


def _check_grads(grads, num_tasks: Optional[int], name: str = "grads") -> torch.Tensor:
    if isinstance(grads, np.ndarray):
        grads = torch.from_numpy(grads)
    if not isinstance(grads, torch.Tensor):
        raise TypeError(f"{name} must be a [T, P] tensor, got {type(grads).__name__}")
    if grads.dim() != 2:
        raise ValueError(f"{name} must be a 2-D [T, P] tensor, got shape {tuple(grads.shape)}")
    if not grads.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {grads.dtype}")
    if grads.shape[0] < 1:
        raise ValueError(f"{name} must have at least one row (task)")
    if num_tasks is not None and grads.shape[0] != num_tasks:
        raise ValueError(f"{name} has {grads.shape[0]} rows, expected {num_tasks} (one per task)")
    return grads


def _linkage_from_similarity(sim: np.ndarray, shift: float, method: str) -> np.ndarray:
    """Linkage of the distance ``shift - sim`` (diagonal ignored)."""
    dist = shift - sim
    np.fill_diagonal(dist, 0.0)
    dist = np.maximum(dist, 0.0)
    return hierarchy.linkage(squareform(dist, checks=False), method=method)


# --------------------------------------------------------------------------
# TaskTree
# --------------------------------------------------------------------------

class TaskTree:
    """Hierarchy of clusters over ``num_tasks`` tasks, with the DFS layout the ops need.

    ``TaskTree(levels, order=None)`` takes per-task labels for levels 1..K
    (exactly as :meth:`from_labels` with ``add_leaf_level=False``) and an
    optional preferred task order: children are placed in DFS order by the
    first position of their tasks in ``order`` (default: by smallest task id).
    Prefer the named constructors.
    """

    def __init__(self, levels: Sequence, order: Optional[Sequence[int]] = None):
        if isinstance(levels, (str, bytes)) or not hasattr(levels, "__len__"):
            raise TypeError(f"levels must be a sequence of per-task label sequences, got {type(levels).__name__}")
        if len(levels) == 0:
            raise ValueError("levels must contain at least one level")
        first = _to_numpy(levels[0], "levels[0]")
        num_tasks = int(first.shape[0]) if first.ndim == 1 else None
        if num_tasks == 0:
            raise ValueError("levels[0] is empty: a TaskTree needs at least one task")
        compact = [_compact_labels(lab, f"levels[{i}]", num_tasks) for i, lab in enumerate(levels)]
        _check_refines(compact)
        if order is None:
            order_arr = np.arange(num_tasks, dtype=np.int64)
        else:
            order_arr = _to_numpy(order, "order")
            if order_arr.ndim != 1 or order_arr.shape[0] != num_tasks or order_arr.dtype.kind not in "iu" \
                    or not np.array_equal(np.sort(order_arr), np.arange(num_tasks)):
                raise ValueError(f"order must be a permutation of the task ids 0..{num_tasks - 1}")
            order_arr = order_arr.astype(np.int64)
        self._levels, self._perm = _canonicalize(compact, order_arr)
        self._num_tasks = num_tasks
        inv = np.empty(num_tasks, dtype=np.int64)
        inv[self._perm] = np.arange(num_tasks)
        inv.setflags(write=False)
        self._inv_perm = inv
        self._offsets = []
        self._parents = []
        for i, lab in enumerate(self._levels):
            counts = np.bincount(lab)
            offs = np.zeros(counts.shape[0] + 1, dtype=np.int64)
            np.cumsum(counts, out=offs[1:])
            if i == 0:
                par = np.zeros(counts.shape[0], dtype=np.int64)
            else:
                par = self._levels[i - 1][self._perm[offs[:-1]]]
            offs.setflags(write=False)
            par.setflags(write=False)
            self._offsets.append(offs)
            self._parents.append(par)
        self._cache: Dict[tuple, torch.Tensor] = {}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_cache"] = {}  # device tensors are rebuilt on demand
        return state

    # ---------------------------------------------------------------- basics

    @property
    def num_tasks(self) -> int:
        """Number of tasks T."""
        return self._num_tasks

    @property
    def depth(self) -> int:
        """Number of levels below the root, K (= TreeMAML inner steps)."""
        return len(self._levels)

    @property
    def clusters_per_level(self) -> List[int]:
        """``[C_1, ..., C_K]``."""
        return [len(p) for p in self._parents]

    def num_clusters(self, level: int) -> int:
        """Number of clusters C_l at ``level`` (1..depth)."""
        return len(self._parents[self._level_index(level)])

    @property
    def is_complete(self) -> bool:
        """True when the last level is all singletons (every task its own cluster)."""
        return self.clusters_per_level[-1] == self._num_tasks

    def _level_index(self, level) -> int:
        if not _is_int(level) or not 1 <= level <= self.depth:
            raise ValueError(f"level must be an int in 1..{self.depth}, got {level!r}")
        return int(level) - 1

    def _tensor(self, key: str, level: int, array: np.ndarray, device) -> torch.Tensor:
        dev = torch.device("cpu") if device is None else torch.device(device)
        ck = (key, level, dev)
        t = self._cache.get(ck)
        if t is None:
            t = torch.tensor(array, dtype=torch.int64, device=dev)
            self._cache[ck] = t
        return t

    @property
    def perm(self) -> torch.Tensor:
        """[T] int64: ``perm[row]`` is the original id of the task at DFS row ``row``."""
        return self._tensor("perm", 0, self._perm, None)

    @property
    def inv_perm(self) -> torch.Tensor:
        """[T] int64: ``inv_perm[task]`` is the DFS row of ``task``."""
        return self._tensor("inv_perm", 0, self._inv_perm, None)

    def perm_on(self, device=None) -> torch.Tensor:
        """``perm`` on ``device`` (cached)."""
        return self._tensor("perm", 0, self._perm, device)

    def inv_perm_on(self, device=None) -> torch.Tensor:
        """``inv_perm`` on ``device`` (cached)."""
        return self._tensor("inv_perm", 0, self._inv_perm, device)

    def offsets(self, level: int, device=None) -> torch.Tensor:
        """[C_l + 1] int64 CSR offsets: cluster c owns DFS rows ``offsets[c]:offsets[c+1]``."""
        i = self._level_index(level)
        return self._tensor("offsets", i + 1, self._offsets[i], device)

    def parents(self, level: int, device=None) -> torch.Tensor:
        """[C_l] int64, non-decreasing: parent cluster (at level l-1) of each cluster; zeros at level 1."""
        i = self._level_index(level)
        return self._tensor("parents", i + 1, self._parents[i], device)

    def labels(self, level: int, device=None) -> torch.Tensor:
        """[T] int64 task-to-cluster map in ORIGINAL task order, clusters in DFS numbering."""
        i = self._level_index(level)
        return self._tensor("labels", i + 1, self._levels[i], device)

    def segment_ids(self, level: int, device=None) -> torch.Tensor:
        """[T] int64 cluster of each DFS row (``labels(level)[perm]``, non-decreasing)."""
        i = self._level_index(level)
        return self._tensor("segments", i + 1, self._levels[i][self._perm], device)

    def cluster_sizes(self, level: int) -> List[int]:
        """Number of tasks in each cluster of ``level``, in DFS order."""
        return np.diff(self._offsets[self._level_index(level)]).tolist()

    def cluster_tasks(self, level: int, cluster: int) -> List[int]:
        """Original ids of the tasks in ``cluster`` of ``level``, in DFS order."""
        i = self._level_index(level)
        c = len(self._parents[i])
        if not _is_int(cluster) or not 0 <= cluster < c:
            raise ValueError(f"cluster must be an int in 0..{c - 1} at level {level}, got {cluster!r}")
        offs = self._offsets[i]
        return self._perm[offs[cluster]:offs[cluster + 1]].tolist()

    # ------------------------------------------------------------ row orders

    def _check_rows(self, x, name: str) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[0] != self._num_tasks:
            raise ValueError(f"{name} must have {self._num_tasks} rows (one per task), "
                             f"got shape {tuple(x.shape)}")
        return x

    def permute_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Reorder a [T, ...] tensor from original task order to DFS row order: ``x[perm]``."""
        x = self._check_rows(x, "x")
        return x.index_select(0, self.perm_on(x.device))

    def unpermute_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`permute_rows`: ``x[inv_perm]``."""
        x = self._check_rows(x, "x")
        return x.index_select(0, self.inv_perm_on(x.device))

    # ------------------------------------------------------------ comparison

    def __eq__(self, other) -> bool:
        if not isinstance(other, TaskTree):
            return NotImplemented
        return (self._num_tasks == other._num_tasks and self.depth == other.depth
                and np.array_equal(self._perm, other._perm)
                and all(np.array_equal(a, b) for a, b in zip(self._levels, other._levels)))

    def __hash__(self) -> int:
        return hash((self._num_tasks, self._perm.tobytes()) + tuple(lab.tobytes() for lab in self._levels))

    def same_hierarchy(self, other: "TaskTree") -> bool:
        """True when both trees have the same partition at every level (ignoring
        cluster numbering and DFS order)."""
        if not isinstance(other, TaskTree):
            raise TypeError(f"other must be a TaskTree, got {type(other).__name__}")
        return (self._num_tasks == other._num_tasks and self.depth == other.depth
                and all(np.array_equal(_first_appearance(a), _first_appearance(b))
                        for a, b in zip(self._levels, other._levels)))

    # ------------------------------------------------------- derived trees

    def prefix(self, depth: int) -> "TaskTree":
        """The tree made of levels 1..``depth`` (same DFS order)."""
        depth = _check_depth(depth)
        if depth > self.depth:
            raise ValueError(f"depth must be in 1..{self.depth}, got {depth}")
        return TaskTree(list(self._levels[:depth]), order=self._perm)

    def with_leaf_level(self) -> "TaskTree":
        """This tree with one more level in which every task is alone."""
        return TaskTree(list(self._levels) + [np.arange(self._num_tasks)], order=self._perm)

    # --------------------------------------------------------- constructors

    @classmethod
    def from_labels(cls, levels: Sequence, add_leaf_level: bool = True) -> "TaskTree":
        """Tree from per-task cluster labels, level 1 (first split under the root) first.

        ``levels[i][t]`` is the cluster of task t at level i+1; labels may be any
        ints or strings, only equality matters.  With ``add_leaf_level=True``
        (default) a level of singletons is appended, so ``depth ==
        len(levels) + 1`` and the tree is complete; with ``False`` the levels are
        used as given (``depth == len(levels)``).  Children are ordered by
        their smallest task id.
        """
        if isinstance(levels, (str, bytes)) or not hasattr(levels, "__len__"):
            raise TypeError(f"levels must be a sequence of per-task label sequences, got {type(levels).__name__}")
        levels = list(levels)
        if add_leaf_level:
            if not levels:
                raise ValueError("levels must contain at least one level")
            n = _to_numpy(levels[0], "levels[0]").shape[0]
            levels.append(np.arange(n))
        return cls(levels)

    @classmethod
    def flat(cls, num_tasks: int, depth: int = 1) -> "TaskTree":
        """Plain MAML: every task is its own cluster at every one of ``depth`` levels."""
        if not _is_int(num_tasks) or num_tasks < 1:
            raise ValueError(f"num_tasks must be an int >= 1, got {num_tasks!r}")
        depth = _check_depth(depth)
        return cls([np.arange(num_tasks)] * depth)

    @classmethod
    def from_nested(cls, nested: Sequence) -> "TaskTree":
        """Tree from nested lists of task ids, e.g. ``[[[0, 1], [2]], [[3, 4, 5]]]``.

        The outer list is the root; each inner list is a cluster and each int a
        task (a leaf).  Tasks must be exactly 0..T-1, each once.  ``depth`` is
        the deepest nesting of a task (``[[0, 1], [2, 3]]`` has depth 2).  A
        task at a shallower depth stays its own singleton cluster on the levels
        below it.  DFS order follows the order of the lists.
        """
        if not isinstance(nested, (list, tuple)):
            raise TypeError(f"nested must be a list of task ids and lists, got {type(nested).__name__}")
        if len(nested) == 0:
            raise ValueError("nested is an empty list: a TaskTree needs at least one task")
        leaves: List[Tuple[int, List[int], str]] = []  # (task, path of node ids, location)
        node_count = [0]

        def walk(node, path, where):
            for j, child in enumerate(node):
                loc = f"{where}[{j}]"
                if isinstance(child, (list, tuple)):
                    if len(child) == 0:
                        raise ValueError(f"{loc} is an empty list; every cluster needs at least one task")
                    node_count[0] += 1
                    walk(child, path + [node_count[0]], loc)
                elif _is_int(child):
                    leaves.append((int(child), path, loc))
                else:
                    raise TypeError(f"{loc} is {child!r}; expected an int task id or a list")

        walk(nested, [], "nested")
        num_tasks = len(leaves)
        seen: Dict[int, str] = {}
        for task, _, loc in leaves:
            if task < 0 or task >= num_tasks:
                raise ValueError(f"{loc} is task {task}, but task ids must be 0..{num_tasks - 1} "
                                 f"({num_tasks} tasks)")
            if task in seen:
                raise ValueError(f"task {task} appears twice, at {seen[task]} and {loc}; "
                                 "every task must be a leaf exactly once")
            seen[task] = loc
        depth = max(len(path) for _, path, _ in leaves) + 1
        levels = np.empty((depth, num_tasks), dtype=np.int64)
        for task, path, _ in leaves:
            for lev in range(depth):
                # internal nodes are ids 1..; a task alone on a level is -(task+1)
                levels[lev, task] = path[lev] if lev < len(path) else -(task + 1)
        order = [task for task, _, _ in leaves]
        return cls(list(levels), order=order)

    def to_nested(self) -> list:
        """Nested lists for a complete tree, in DFS order; ``from_nested`` inverts it exactly."""
        if not self.is_complete:
            raise ValueError("to_nested needs a complete tree (last level all singletons); "
                             "call with_leaf_level() first")

        def build(level: int, lo: int, hi: int) -> list:
            # children at `level` of the node covering rows lo:hi
            if level == self.depth:
                return [int(t) for t in self._perm[lo:hi]]
            offs = self._offsets[level - 1]
            c0, c1 = np.searchsorted(offs, [lo, hi])
            return [build(level + 1, int(offs[c]), int(offs[c + 1])) for c in range(c0, c1)]

        return build(1, 0, self._num_tasks)

    @classmethod
    def from_parents(cls, parent: Sequence[int]) -> "TaskTree":
        """Tree from a parent array over the nodes of a rooted tree.

        Format: ``parent[i]`` is the parent of node i, and -1 for the single
        root.  Nodes 0..T-1 must be exactly the leaves (the tasks, T = number
        of leaves); nodes T..n-1 are the internal nodes, the root among them.
        The depth of a task is its number of edges from the root and ``depth``
        is the largest; a task at a shallower depth stays its own singleton
        cluster on the levels below it.  Children are ordered by smallest task id.

        Example: ``[4, 4, 5, 5, 6, 6, -1]`` is the root 6 with children 4 = {0, 1}
        and 5 = {2, 3}: depth 2.
        """
        arr = _to_numpy(parent, "parent")
        if arr.ndim != 1 or arr.shape[0] == 0:
            raise ValueError(f"parent must be a non-empty 1-D sequence of ints, got shape {arr.shape}")
        if arr.dtype.kind not in "iu":
            raise TypeError(f"parent must contain ints, got dtype {arr.dtype}")
        arr = arr.astype(np.int64)
        n = arr.shape[0]
        bad = np.flatnonzero((arr < -1) | (arr >= n))
        if bad.size:
            i = int(bad[0])
            raise ValueError(f"parent[{i}] = {arr[i]} is not a node id in 0..{n - 1} (or -1 for the root)")
        selfloop = np.flatnonzero(arr == np.arange(n))
        if selfloop.size:
            raise ValueError(f"parent[{selfloop[0]}] = {selfloop[0]}: a node cannot be its own parent")
        roots = np.flatnonzero(arr == -1)
        if roots.size != 1:
            which = ", ".join(str(int(r)) for r in roots[:5])
            raise ValueError(f"parent must have exactly one root (parent -1), found {roots.size}"
                             + (f": nodes {which}" if roots.size else ""))
        root = int(roots[0])
        has_child = np.zeros(n, dtype=bool)
        has_child[arr[arr >= 0]] = True
        num_tasks = int((~has_child).sum())
        if num_tasks == n:
            raise ValueError("parent has no internal node: the root must have the tasks below it")
        internal_task = np.flatnonzero(has_child[:num_tasks])
        if internal_task.size:
            i = int(internal_task[0])
            raise ValueError(f"node {i} has children, but nodes 0..{num_tasks - 1} must be the "
                             f"{num_tasks} leaves (the tasks) and internal nodes must come after them")
        # depth of every node, detecting cycles
        depth_of = np.full(n, -1, dtype=np.int64)
        depth_of[root] = 0
        for start in range(n):
            path = []
            x = start
            while depth_of[x] < 0:
                path.append(x)
                x = int(arr[x])
                if len(path) > n:
                    raise ValueError(f"parent contains a cycle through node {start}: it does not reach the root")
            d = depth_of[x]
            for y in reversed(path):
                d += 1
                depth_of[y] = d
        depth = int(depth_of[:num_tasks].max())
        levels = np.empty((depth, num_tasks), dtype=np.int64)
        for t in range(num_tasks):
            chain = []
            x = t
            while x != root:
                chain.append(x)
                x = int(arr[x])
            chain.reverse()  # chain[l-1] = ancestor at depth l (the task itself last)
            for lev in range(depth):
                levels[lev, t] = chain[lev] if lev < len(chain) else t
        return cls(list(levels))

    @classmethod
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
        _check_linkage(Z)
        depth = _check_depth(depth)
        dend = _Dendrogram(Z)
        return cls._from_dendrogram(dend, depth, branching, heights, num_clusters, "heights")

    @classmethod
    def _from_dendrogram(cls, dend: _Dendrogram, depth: int, branching, heights, num_clusters,
                         heights_name: str) -> "TaskTree":
        n_cut = depth - 1
        branching = _per_level(branching, n_cut, "branching", "int")
        heights = _per_level(heights, n_cut, heights_name, "float")
        num_clusters = _per_level(num_clusters, n_cut, "num_clusters", "int")
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

    @classmethod
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
        sim = _to_numpy(affinity, "affinity").astype(np.float64)
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
        return cls._from_similarity(sim, shift, depth, branching, threshold, num_clusters, method)

    @classmethod
    def _from_similarity(cls, sim: np.ndarray, shift: float, depth, branching, threshold,
                         num_clusters, method) -> "TaskTree":
        depth = _check_depth(depth)
        _check_method(method)
        num_tasks = sim.shape[0]
        heights = None
        if threshold is not None:
            heights = [shift - t for t in _per_level(threshold, depth - 1, "threshold", "float")]
        if num_tasks == 1:
            Z = np.zeros((0, 4))
        else:
            Z = _linkage_from_similarity(sim, shift, method)
        return cls._from_dendrogram(_Dendrogram(Z), depth, branching, heights, num_clusters, "threshold")

    @classmethod
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
        grads = _check_grads(features, None, "features")
        sim = cosine_similarity_matrix(grads, chunk_size=chunk_size).cpu().double().numpy()
        return cls._from_similarity(sim, 1.0, depth, branching, threshold, num_clusters, method)

    # ----------------------------------------------- online (Learned TreeMAML)

    @staticmethod
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
        Deterministic.
        """
        grads = _check_grads(grads, None)
        num_tasks = grads.shape[0]
        if branching is None and threshold is None:
            raise ValueError("refine needs branching, threshold or both")
        if branching is not None and (not _is_int(branching) or branching < 1):
            raise ValueError(f"branching must be an int >= 1, got {branching!r}")
        if threshold is not None and (not isinstance(threshold, (numbers.Real, np.floating))
                                      or isinstance(threshold, bool)
                                      or not np.isfinite(threshold)):
            raise ValueError(f"threshold must be a finite number, got {threshold!r}")
        _check_method(method)
        if labels is None:
            current = np.zeros(num_tasks, dtype=np.int64)
        else:
            current = _compact_labels(labels, "labels", num_tasks)
        sim = cosine_similarity_matrix(grads, chunk_size=chunk_size).cpu().double().numpy()
        cut = None if threshold is None else 1.0 - float(threshold)
        new = np.empty(num_tasks, dtype=np.int64)
        next_id = 0
        for c in range(int(current.max()) + 1):
            idx = np.flatnonzero(current == c)
            if idx.size == 1:
                new[idx] = next_id
                next_id += 1
                continue
            Z = _linkage_from_similarity(sim[np.ix_(idx, idx)], 1.0, method)
            dend = _Dendrogram(Z)
            sub = _first_appearance(dend.labels(dend.split(dend.root, branching, cut)))
            new[idx] = next_id + sub
            next_id += int(sub.max()) + 1
        return torch.from_numpy(new)

    @classmethod
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
        grads = _check_grads(grads, None)
        num_tasks = grads.shape[0]
        if prefix is None:
            new = cls.refine(None, grads, branching=branching, threshold=threshold,
                             method=method, chunk_size=chunk_size)
            return cls([new])
        if not isinstance(prefix, TaskTree):
            prefix = cls([prefix])
        if prefix.num_tasks != num_tasks:
            raise ValueError(f"grads has {num_tasks} rows but prefix has {prefix.num_tasks} tasks")
        new = cls.refine(prefix._levels[-1], grads, branching=branching, threshold=threshold,
                         method=method, chunk_size=chunk_size)
        return cls(list(prefix._levels) + [new.numpy()], order=prefix._perm)

    # ------------------------------------------------------ serialisation

    def to_dict(self) -> Dict[str, Any]:
        """JSON-safe dict (str keys, ints and lists); ``from_dict(to_dict()) == self``."""
        return {
            "type": _DICT_TYPE,
            "version": _DICT_VERSION,
            "num_tasks": self._num_tasks,
            "perm": self._perm.tolist(),
            "levels": [lab.tolist() for lab in self._levels],
        }

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TaskTree":
        """Inverse of :meth:`to_dict`; checks that the dict is consistent."""
        if not isinstance(d, dict):
            raise TypeError(f"d must be a dict from TaskTree.to_dict, got {type(d).__name__}")
        missing = [k for k in ("type", "version", "num_tasks", "perm", "levels") if k not in d]
        if missing:
            raise ValueError(f"d is missing key(s) {missing}")
        if d["type"] != _DICT_TYPE:
            raise ValueError(f"d['type'] must be {_DICT_TYPE!r}, got {d['type']!r}")
        if d["version"] != _DICT_VERSION:
            raise ValueError(f"d['version'] {d['version']!r} is not supported (expected {_DICT_VERSION})")
        num_tasks = d["num_tasks"]
        if not _is_int(num_tasks) or num_tasks < 1:
            raise ValueError(f"d['num_tasks'] must be an int >= 1, got {num_tasks!r}")
        perm = d["perm"]
        if not isinstance(perm, list) or len(perm) != num_tasks or not all(_is_int(v) for v in perm):
            raise ValueError(f"d['perm'] must be a list of {num_tasks} ints")
        levels = d["levels"]
        if not isinstance(levels, list) or not levels:
            raise ValueError("d['levels'] must be a non-empty list of per-task label lists")
        for i, lab in enumerate(levels):
            if not isinstance(lab, list) or len(lab) != num_tasks or not all(_is_int(v) for v in lab):
                raise ValueError(f"d['levels'][{i}] must be a list of {num_tasks} ints")
        tree = cls(levels, order=perm)
        if not all(np.array_equal(a, np.asarray(b)) for a, b in zip(tree._levels, levels)):
            raise ValueError("d['levels'] are not in the DFS cluster numbering implied by d['perm']")
        return tree

    # ----------------------------------------------------------- rendering

    def __repr__(self) -> str:
        return (f"TaskTree(num_tasks={self._num_tasks}, depth={self.depth}, "
                f"clusters_per_level={self.clusters_per_level})")

    def render(self) -> str:
        """Readable ASCII drawing of the tree, one line per cluster, in DFS order.

        ``L2#3`` is cluster 3 of level 2; a cluster with one task is shown as
        ``task t`` (it stays alone on the levels below).
        """
        lines = [f"root ({self._num_tasks} tasks, depth {self.depth}, "
                 f"clusters per level {self.clusters_per_level})"]

        def visit(level: int, lo: int, hi: int, indent: str) -> None:
            offs = self._offsets[level - 1]
            c0, c1 = np.searchsorted(offs, [lo, hi])
            for c in range(c0, c1):
                last = c == c1 - 1
                a, b = int(offs[c]), int(offs[c + 1])
                branch = "`-- " if last else "+-- "
                if b - a == 1:
                    lines.append(f"{indent}{branch}task {int(self._perm[a])}")
                    continue
                if level == self.depth:
                    tasks = ", ".join(str(int(t)) for t in self._perm[a:b])
                    lines.append(f"{indent}{branch}L{level}#{c} ({b - a} tasks: {tasks})")
                    continue
                lines.append(f"{indent}{branch}L{level}#{c} ({b - a} tasks)")
                visit(level + 1, a, b, indent + ("    " if last else "|   "))

        visit(1, 0, self._num_tasks, "")
        return "\n".join(lines)
