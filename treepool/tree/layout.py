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

from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .levels import (canonicalize, check_depth, check_refines, compact_labels,
                     first_appearance, is_int, levels_from_parents, to_numpy)

__all__ = ["TaskTree"]

_DICT_TYPE = "treepool.TaskTree"
_DICT_VERSION = 1


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
        first = to_numpy(levels[0], "levels[0]")
        num_tasks = int(first.shape[0]) if first.ndim == 1 else None
        if num_tasks == 0:
            raise ValueError("levels[0] is empty: a TaskTree needs at least one task")
        compact = [compact_labels(lab, f"levels[{i}]", num_tasks) for i, lab in enumerate(levels)]
        check_refines(compact)
        if order is None:
            order_arr = np.arange(num_tasks, dtype=np.int64)
        else:
            order_arr = to_numpy(order, "order")
            if order_arr.ndim != 1 or order_arr.shape[0] != num_tasks or order_arr.dtype.kind not in "iu" \
                    or not np.array_equal(np.sort(order_arr), np.arange(num_tasks)):
                raise ValueError(f"order must be a permutation of the task ids 0..{num_tasks - 1}")
            order_arr = order_arr.astype(np.int64)
        self._levels, self._perm = canonicalize(compact, order_arr)
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
        if not is_int(level) or not 1 <= level <= self.depth:
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
        if not is_int(cluster) or not 0 <= cluster < c:
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
                and all(np.array_equal(first_appearance(a), first_appearance(b))
                        for a, b in zip(self._levels, other._levels)))

    # ------------------------------------------------------- derived trees

    def prefix(self, depth: int) -> "TaskTree":
        """The tree made of levels 1..``depth`` (same DFS order)."""
        depth = check_depth(depth)
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
            n = to_numpy(levels[0], "levels[0]").shape[0]
            levels.append(np.arange(n))
        return cls(levels)

    @classmethod
    def flat(cls, num_tasks: int, depth: int = 1) -> "TaskTree":
        """Plain MAML: every task is its own cluster at every one of ``depth`` levels."""
        if not is_int(num_tasks) or num_tasks < 1:
            raise ValueError(f"num_tasks must be an int >= 1, got {num_tasks!r}")
        depth = check_depth(depth)
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
                elif is_int(child):
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
        return cls(levels_from_parents(parent))


    @classmethod
    def from_linkage(cls, Z, depth: int, *, branching=None, heights=None,
                     num_clusters=None) -> "TaskTree":
        """Cut a scipy linkage matrix ``Z`` (tasks = its observations) into ``depth`` levels.

        See :func:`treepool.tree.clustering.from_linkage`.
        """
        from . import clustering  # scipy is imported on first use

        return clustering.from_linkage(cls, Z, depth, branching=branching, heights=heights, num_clusters=num_clusters)

    @classmethod
    def from_affinity(cls, affinity, depth: int, *, branching=None, threshold=None,
                      num_clusters=None, method: str = "average", symmetrize: bool = True) -> "TaskTree":
        """Tree from a [T, T] affinity matrix (larger = more alike), e.g. task transference.

        See :func:`treepool.tree.clustering.from_affinity`.
        """
        from . import clustering  # scipy is imported on first use

        return clustering.from_affinity(cls, affinity, depth, branching=branching, threshold=threshold, num_clusters=num_clusters, method=method, symmetrize=symmetrize)

    @classmethod
    def cluster(cls, features: torch.Tensor, depth: int, *, branching=None, threshold=None,
                num_clusters=None, method: str = "average", chunk_size: Optional[int] = None) -> "TaskTree":
        """Learn a tree from task gradients ``features`` [T, P] (original task order).

        See :func:`treepool.tree.clustering.cluster`.
        """
        from . import clustering  # scipy is imported on first use

        return clustering.cluster(cls, features, depth, branching=branching, threshold=threshold, num_clusters=num_clusters, method=method, chunk_size=chunk_size)

    @staticmethod
    def refine(labels, grads: torch.Tensor, *, branching: Optional[int] = None,
               threshold: Optional[float] = None, method: str = "average",
               chunk_size: Optional[int] = None) -> torch.Tensor:
        """One online top-down clustering step: split every current cluster by the new gradients.

        See :func:`treepool.tree.clustering.refine`.
        """
        from . import clustering  # scipy is imported on first use

        return clustering.refine(labels, grads, branching=branching, threshold=threshold, method=method, chunk_size=chunk_size)

    @classmethod
    def grow(cls, prefix, grads: torch.Tensor, *, branching: Optional[int] = None,
             threshold: Optional[float] = None, method: str = "average",
             chunk_size: Optional[int] = None) -> "TaskTree":
        """Add one level to ``prefix`` by :meth:`refine` on new gradients (Learned TreeMAML).

        See :func:`treepool.tree.clustering.grow`.
        """
        from . import clustering  # scipy is imported on first use

        return clustering.grow(cls, prefix, grads, branching=branching, threshold=threshold, method=method, chunk_size=chunk_size)

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
        if not is_int(num_tasks) or num_tasks < 1:
            raise ValueError(f"d['num_tasks'] must be an int >= 1, got {num_tasks!r}")
        perm = d["perm"]
        if not isinstance(perm, list) or len(perm) != num_tasks or not all(is_int(v) for v in perm):
            raise ValueError(f"d['perm'] must be a list of {num_tasks} ints")
        levels = d["levels"]
        if not isinstance(levels, list) or not levels:
            raise ValueError("d['levels'] must be a non-empty list of per-task label lists")
        for i, lab in enumerate(levels):
            if not isinstance(lab, list) or len(lab) != num_tasks or not all(is_int(v) for v in lab):
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
