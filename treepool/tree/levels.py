"""Validation and canonical form of the label arrays a TaskTree is built from."""

from __future__ import annotations

import numbers
from typing import List, Optional, Tuple

import numpy as np
import torch


def is_int(x) -> bool:
    return isinstance(x, (numbers.Integral, np.integer)) and not isinstance(x, (bool, np.bool_))


def to_numpy(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except Exception as exc:  # ragged nested sequences and the like
        raise TypeError(f"{name} could not be read as an array: {exc}") from None


def compact_labels(raw, name: str, num_tasks: Optional[int]) -> np.ndarray:
    """Map arbitrary int/str labels of one level to 0..C-1 (int64, [T])."""
    arr = to_numpy(raw, name)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of per-task labels, got shape {arr.shape}")
    if num_tasks is not None and arr.shape[0] != num_tasks:
        raise ValueError(f"{name} has {arr.shape[0]} labels, expected {num_tasks} (one per task)")
    if arr.dtype == bool or arr.dtype.kind not in "iuUSO":
        raise TypeError(f"{name} must contain int (or str) labels, got dtype {arr.dtype}")
    if arr.dtype.kind == "O":
        bad = [v for v in arr.tolist() if not (is_int(v) or isinstance(v, str))]
        if bad:
            raise TypeError(f"{name} must contain int (or str) labels, got {bad[0]!r}")
    try:
        _, inverse = np.unique(arr, return_inverse=True)
    except TypeError as exc:
        raise TypeError(f"{name} mixes label types that cannot be compared: {exc}") from None
    return inverse.reshape(-1).astype(np.int64)


def check_refines(levels: List[np.ndarray]) -> None:
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


def canonicalize(levels: List[np.ndarray], order: np.ndarray) -> Tuple[Tuple[np.ndarray, ...], np.ndarray]:
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


def first_appearance(lab: np.ndarray) -> np.ndarray:
    """Relabel clusters by first appearance in task order (a partition's canonical form)."""
    _, first, inverse = np.unique(lab, return_index=True, return_inverse=True)
    rank = np.empty(first.shape[0], dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(first.shape[0])
    return rank[inverse.reshape(-1)]


def per_level(value, n: int, name: str, kind: str) -> Optional[list]:
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
            if not is_int(v) or v < 1:
                raise ValueError(f"{name} must contain positive ints, got {v!r}")
        elif not isinstance(v, (numbers.Real, np.floating)) or isinstance(v, bool) or not np.isfinite(v):
            raise ValueError(f"{name} must contain finite numbers, got {v!r}")
    return [int(v) if kind == "int" else float(v) for v in vals]



def check_depth(depth, name: str = "depth") -> int:
    if not is_int(depth) or depth < 1:
        raise ValueError(f"{name} must be an int >= 1, got {depth!r}")
    return int(depth)


def check_grads(grads, num_tasks: Optional[int], name: str = "grads") -> torch.Tensor:
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




def levels_from_parents(parent) -> List[np.ndarray]:
    """Per-level labels of the tasks of a parent array (see ``TaskTree.from_parents``)."""
    arr = to_numpy(parent, "parent")
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
    return list(levels)
