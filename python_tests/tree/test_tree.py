"""Tests for treepool.tree.TaskTree: layout, constructors, validation, serialisation, learning."""

import json
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.cluster import hierarchy

from treepool.tree import TaskTree

# ---------------------------------------------------------------- helpers


def same_partition(a, b) -> bool:
    """Two label sequences define the same partition (up to renaming)."""
    a = [x for x in np.asarray(a).tolist()]
    b = [x for x in np.asarray(b).tolist()]
    pairs = set(zip(a, b))
    return len(a) == len(b) and len(pairs) == len(set(a)) == len(set(b))


def check_layout(tree: TaskTree, partitions=None) -> None:
    """Every cluster of every level is a contiguous DFS range and offsets/parents agree."""
    t = tree.num_tasks
    perm, inv = tree.perm, tree.inv_perm
    assert perm.dtype == inv.dtype == torch.int64
    assert sorted(perm.tolist()) == list(range(t))
    assert torch.equal(inv[perm], torch.arange(t))
    assert tree.depth == len(tree.clusters_per_level)
    prev_rows = None
    for level in range(1, tree.depth + 1):
        off, par, lab = tree.offsets(level), tree.parents(level), tree.labels(level)
        c = tree.num_clusters(level)
        assert off.dtype == par.dtype == lab.dtype == torch.int64
        assert off.shape == (c + 1,) and par.shape == (c,) and lab.shape == (t,)
        assert off[0] == 0 and off[-1] == t
        sizes = off[1:] - off[:-1]
        assert (sizes > 0).all()
        # rows of cluster k are exactly offsets[k]:offsets[k+1]
        rows = lab[perm]
        assert torch.equal(rows, torch.repeat_interleave(torch.arange(c), sizes))
        assert torch.equal(tree.segment_ids(level), rows)
        assert (par[1:] >= par[:-1]).all()
        if level == 1:
            assert (par == 0).all()
        else:
            # all rows of a cluster have the same level-(l-1) cluster, its parent
            assert torch.equal(prev_rows, par[rows])
            assert par.max() < tree.num_clusters(level - 1)
        if partitions is not None:
            assert same_partition(lab, partitions[level - 1]), f"level {level}"
        assert tree.cluster_sizes(level) == sizes.tolist()
        prev_rows = rows


@st.composite
def label_levels(draw, max_tasks=24, max_depth=4):
    """Random refining per-task labels (with scrambled label values)."""
    t = draw(st.integers(1, max_tasks))
    depth = draw(st.integers(1, max_depth))
    current = np.zeros(t, dtype=np.int64)
    levels = []
    for _ in range(depth):
        b = draw(st.integers(1, 4))
        sub = np.array(draw(st.lists(st.integers(0, b - 1), min_size=t, max_size=t)))
        _, current = np.unique(current * 4 + sub, return_inverse=True)
        scramble = draw(st.permutations(range(t)))
        levels.append([int(scramble[x]) * 7 + 3 for x in current.reshape(-1)])
    return levels


@st.composite
def nested_trees(draw, max_leaves=20):
    """Random nested-list trees with tasks 0..T-1 at the leaves (leaves at any depth)."""
    shape = draw(st.lists(
        st.recursive(st.just(None), lambda kids: st.lists(kids, min_size=1, max_size=3), max_leaves=max_leaves),
        min_size=1, max_size=4))
    count = [0]

    def number(node):
        if node is None:
            count[0] += 1
            return count[0] - 1
        return [number(k) for k in node]

    numbered = [number(k) for k in shape]
    ids = draw(st.permutations(range(count[0])))

    def relabel(node):
        return ids[node] if isinstance(node, int) else [relabel(k) for k in node]

    return [relabel(k) for k in numbered]


def nested_reference(nested):
    """Independent per-level partitions and leaf order of a nested tree."""
    leaves = []

    def walk(node, path):
        for j, k in enumerate(node):
            if isinstance(k, list):
                walk(k, path + (j,))
            else:
                leaves.append((k, path))

    walk(nested, ())
    depth = max(len(p) for _, p in leaves) + 1
    t = len(leaves)
    parts = []
    for lev in range(1, depth + 1):
        lab = [None] * t
        for task, path in leaves:
            lab[task] = ("node", path[:lev]) if lev <= len(path) else ("task", task)
        parts.append([hash(x) for x in lab])
    return depth, parts, [task for task, _ in leaves]


def nested_to_parents(nested, rng):
    """Parent array (tasks first, internal nodes in random order) of a nested tree."""
    internal = []
    edges = []

    def walk(node, me):
        for k in node:
            if isinstance(k, list):
                internal.append(None)
                child = ("int", len(internal) - 1)
                edges.append((child, me))
                walk(k, child)
            else:
                edges.append((("task", k), me))

    root = ("root", 0)
    walk(nested, root)
    t = sum(1 for c, _ in edges if c[0] == "task")
    ids = list(range(t, t + len(internal) + 1))
    rng.shuffle(ids)
    node_id = {("int", i): ids[i] for i in range(len(internal))}
    node_id[root] = ids[-1]
    parent = [0] * (t + len(internal) + 1)
    for child, par in edges:
        cid = child[1] if child[0] == "task" else node_id[child]
        parent[cid] = node_id[par]
    parent[node_id[root]] = -1
    return parent


# ------------------------------------------------------------- layout


@settings(deadline=None)
@given(levels=label_levels(), add_leaf=st.booleans())
def test_random_labels_give_contiguous_clusters(levels, add_leaf):
    tree = TaskTree.from_labels(levels, add_leaf_level=add_leaf)
    t = len(levels[0])
    parts = levels + ([list(range(t))] if add_leaf else [])
    assert tree.depth == len(parts)
    check_layout(tree, parts)
    if add_leaf:
        assert tree.is_complete
    # children are ordered by their smallest task id: task 0 is in row 0
    assert tree.perm[0] == 0


@settings(deadline=None)
@given(nested=nested_trees())
def test_random_nested_trees(nested):
    depth, parts, order = nested_reference(nested)
    tree = TaskTree.from_nested(nested)
    assert tree.depth == depth and tree.num_tasks == len(order)
    assert tree.is_complete
    check_layout(tree, parts)
    assert tree.perm.tolist() == order  # DFS order follows the lists
    assert TaskTree.from_nested(tree.to_nested()) == tree


@settings(deadline=None)
@given(nested=nested_trees(), seed=st.integers(0, 1000))
def test_random_parent_arrays(nested, seed):
    depth, parts, _ = nested_reference(nested)
    parent = nested_to_parents(nested, np.random.default_rng(seed))
    tree = TaskTree.from_parents(parent)
    check_layout(tree, parts)
    assert tree.same_hierarchy(TaskTree.from_nested(nested))


@settings(deadline=None)
@given(levels=label_levels(), add_leaf=st.booleans())
def test_dict_round_trip(levels, add_leaf):
    tree = TaskTree.from_labels(levels, add_leaf_level=add_leaf)
    d = tree.to_dict()
    d2 = json.loads(json.dumps(d))
    assert d2 == d
    back = TaskTree.from_dict(d2)
    assert back == tree and hash(back) == hash(tree)
    assert back.to_dict() == d


@settings(deadline=None)
@given(nested=nested_trees())
def test_dict_round_trip_keeps_nested_order(nested):
    tree = TaskTree.from_nested(nested)
    back = TaskTree.from_dict(json.loads(json.dumps(tree.to_dict())))
    assert back == tree
    assert back.perm.tolist() == tree.perm.tolist()


def test_small_tree_layout_exactly():
    tree = TaskTree.from_nested([[[0, 5], [2]], [[3, 4, 1]], 6])
    assert tree.num_tasks == 7 and tree.depth == 3
    assert tree.clusters_per_level == [3, 4, 7]
    assert tree.perm.tolist() == [0, 5, 2, 3, 4, 1, 6]
    assert tree.offsets(1).tolist() == [0, 3, 6, 7]
    assert tree.parents(1).tolist() == [0, 0, 0]
    assert tree.offsets(2).tolist() == [0, 2, 3, 6, 7]
    assert tree.parents(2).tolist() == [0, 0, 1, 2]
    assert tree.offsets(3).tolist() == list(range(8))
    assert tree.parents(3).tolist() == [0, 0, 1, 2, 2, 2, 3]
    assert tree.labels(1).tolist() == [0, 1, 0, 1, 1, 0, 2]
    assert tree.cluster_tasks(2, 2) == [3, 4, 1]
    assert tree.to_nested() == [[[0, 5], [2]], [[3, 4, 1]], [[6]]]
    assert tree.render() == "\n".join([
        "root (7 tasks, depth 3, clusters per level [3, 4, 7])",
        "+-- L1#0 (3 tasks)",
        "|   +-- L2#0 (2 tasks)",
        "|   |   +-- task 0",
        "|   |   `-- task 5",
        "|   `-- task 2",
        "+-- L1#1 (3 tasks)",
        "|   `-- L2#2 (3 tasks)",
        "|       +-- task 3",
        "|       +-- task 4",
        "|       `-- task 1",
        "`-- task 6",
    ])
    assert repr(tree) == "TaskTree(num_tasks=7, depth=3, clusters_per_level=[3, 4, 7])"


def test_constructors_agree():
    nested = TaskTree.from_nested([[0, 1], [2, 3]])
    labels = TaskTree.from_labels([[0, 0, 1, 1]])
    parents = TaskTree.from_parents([4, 4, 5, 5, 6, 6, -1])
    assert nested == labels == parents
    assert TaskTree.from_labels([["a", "a", "b", "b"]]) == nested
    assert TaskTree.from_labels([torch.tensor([5, 5, 2, 2])]) == nested
    assert TaskTree([[0, 0, 1, 1], [0, 1, 2, 3]]) == nested
    # different DFS order, same hierarchy
    other = TaskTree.from_nested([[3, 2], [1, 0]])
    assert other != nested and other.same_hierarchy(nested)
    assert not TaskTree.from_nested([[0, 2], [1, 3]]).same_hierarchy(nested)


def test_flat_tree_is_maml():
    tree = TaskTree.flat(5, depth=3)
    assert tree.depth == 3 and tree.clusters_per_level == [5, 5, 5] and tree.is_complete
    assert tree.perm.tolist() == list(range(5))
    for level in (1, 2, 3):
        assert tree.offsets(level).tolist() == list(range(6))
    assert tree.parents(1).tolist() == [0] * 5
    assert tree.parents(3).tolist() == list(range(5))
    assert TaskTree.from_nested([0, 1, 2, 3, 4]) == TaskTree.flat(5)
    assert TaskTree.from_nested([[0], [1]]) == TaskTree.flat(2, 2)


def test_single_task_and_single_cluster_levels():
    tree = TaskTree.from_nested([[[0, 1, 2]]])
    assert tree.clusters_per_level == [1, 1, 3]
    check_layout(tree)
    one = TaskTree.from_nested([0])
    assert one.num_tasks == 1 and one.depth == 1
    check_layout(one)


def test_padded_leaves():
    # task 2 sits at depth 1 and task 0 at depth 2: they stay alone below that
    tree = TaskTree.from_nested([[0, [1, 3]], 2])
    assert tree.depth == 3
    check_layout(tree, [[0, 0, 1, 0], [0, 1, 2, 1], [0, 1, 2, 3]])


def test_permute_rows_and_caching():
    tree = TaskTree.from_nested([[3, 0], [2, 1]])
    x = torch.arange(4) * 10
    assert tree.permute_rows(x).tolist() == [30, 0, 20, 10]
    assert torch.equal(tree.unpermute_rows(tree.permute_rows(x)), x)
    y = torch.randn(4, 3, 2)
    assert torch.equal(tree.unpermute_rows(tree.permute_rows(y)), y)
    assert torch.equal(tree.permute_rows(y)[tree.inv_perm], y)
    with pytest.raises(ValueError, match="must have 4 rows"):
        tree.permute_rows(torch.zeros(3, 2))
    # cached per (level, device)
    assert tree.offsets(1) is tree.offsets(1) is tree.offsets(1, "cpu")
    assert tree.parents(2, torch.device("cpu")) is tree.parents(2)
    meta = tree.offsets(1, "meta")
    assert meta.device.type == "meta" and meta.shape == (3,)
    assert tree.offsets(1, "meta") is meta
    assert tree.labels(1, "meta") is not tree.labels(1)


def test_prefix_and_leaf_level():
    tree = TaskTree.from_labels([[0, 0, 1, 1, 1], [0, 1, 2, 2, 3]])
    assert tree.prefix(2).with_leaf_level() == tree
    assert tree.prefix(1).clusters_per_level == [2]
    assert not tree.prefix(2).is_complete
    with pytest.raises(ValueError, match="to_nested needs a complete tree"):
        tree.prefix(2).to_nested()


# ---------------------------------------------------------- validation


def test_non_refining_levels_message():
    msg = "levels[1] does not refine levels[0]: tasks 1 and 2 share a cluster at level 2 but not at level 1"
    with pytest.raises(ValueError, match=re.escape(msg)):
        TaskTree.from_labels([[0, 0, 1, 1], [0, 1, 1, 2]])
    msg = "levels[2] does not refine levels[1]: tasks 3 and 7 share a cluster at level 3 but not at level 2"
    with pytest.raises(ValueError, match=re.escape(msg)):
        TaskTree.from_labels([[0] * 8, [0, 0, 0, 0, 1, 1, 1, 1], [0, 1, 2, 3, 4, 5, 6, 3]])


@settings(deadline=None)
@given(t=st.integers(2, 12), data=st.data())
def test_random_invalid_labels_are_refused_naming_the_tasks(t, data):
    up = data.draw(st.lists(st.integers(0, 3), min_size=t, max_size=t))
    down = data.draw(st.lists(st.integers(0, 3), min_size=t, max_size=t))
    refines = all(up[i] == up[j] for i in range(t) for j in range(t) if down[i] == down[j])
    if refines:
        check_layout(TaskTree.from_labels([up, down]), [up, down, list(range(t))])
        return
    with pytest.raises(ValueError, match="levels\\[1\\] does not refine levels\\[0\\]") as info:
        TaskTree.from_labels([up, down])
    a, b = map(int, re.search(r"tasks (\d+) and (\d+)", str(info.value)).groups())
    assert down[a] == down[b] and up[a] != up[b]


@pytest.mark.parametrize("levels, exc, msg", [
    ([], ValueError, "at least one level"),
    ([[0, 0, 1], [0, 1]], ValueError, re.escape("levels[1] has 2 labels, expected 3 (one per task)")),
    ([[0.0, 1.0]], TypeError, re.escape("levels[0] must contain int (or str) labels")),
    ([[True, False]], TypeError, re.escape("levels[0] must contain int (or str) labels")),
    ([[[0, 1], [1, 0]]], ValueError, re.escape("levels[0] must be a 1-D sequence")),
    ("abc", TypeError, "levels must be a sequence"),
])
def test_invalid_labels(levels, exc, msg):
    with pytest.raises(exc, match=msg):
        TaskTree.from_labels(levels, add_leaf_level=False)


@pytest.mark.parametrize("nested, exc, msg", [
    ([[0, 1], [1, 2]], ValueError, re.escape("task 1 appears twice, at nested[0][1] and nested[1][0]")),
    ([[0, 2], [3, 4]], ValueError, re.escape("nested[1][1] is task 4, but task ids must be 0..3")),
    ([[0, -1]], ValueError, re.escape("nested[0][1] is task -1")),
    ([[0, 1], []], ValueError, re.escape("nested[1] is an empty list")),
    ([[0, "1"]], TypeError, re.escape("nested[0][1] is '1'; expected an int task id or a list")),
    ([[0, True]], TypeError, re.escape("nested[0][1] is True")),
    ([], ValueError, "nested is an empty list"),
    (5, TypeError, "nested must be a list"),
])
def test_invalid_nested(nested, exc, msg):
    with pytest.raises(exc, match=msg):
        TaskTree.from_nested(nested)


@pytest.mark.parametrize("parent, msg", [
    ([4, 4, 5, 5, 6, -1, -1], "exactly one root (parent -1), found 2: nodes 5, 6"),
    ([2, 2, 3, 2], "exactly one root (parent -1), found 0"),
    ([4, 4, 5, 5, 6, 6, 7], "parent[6] = 7 is not a node id in 0..6"),
    ([1, 3, 3, -1], "node 1 has children, but nodes 0..1 must be the 2 leaves"),
    ([3, 4, 5, -1, 5, 4], "parent contains a cycle through node 1"),
    ([0, -1], "parent[0] = 0: a node cannot be its own parent"),
    ([-1], "no internal node"),
])
def test_invalid_parents(parent, msg):
    with pytest.raises(ValueError, match=re.escape(msg)):
        TaskTree.from_parents(parent)


def test_invalid_levels_and_dicts():
    tree = TaskTree.from_nested([[0, 1], [2, 3]])
    for bad in (0, 3, -1, 1.0, None):
        with pytest.raises(ValueError, match=re.escape("level must be an int in 1..2")):
            tree.offsets(bad)
    with pytest.raises(ValueError, match="cluster must be an int in 0..1"):
        tree.cluster_tasks(1, 2)
    d = tree.to_dict()
    bad = dict(d, levels=[[1, 1, 0, 0], d["levels"][1]])
    with pytest.raises(ValueError, match="not in the DFS cluster numbering"):
        TaskTree.from_dict(bad)
    with pytest.raises(ValueError, match=re.escape("d['perm'] must be a list of 4 ints")):
        TaskTree.from_dict(dict(d, perm=[0, 1, 2]))
    with pytest.raises(ValueError, match="order must be a permutation"):
        TaskTree.from_dict(dict(d, perm=[0, 0, 1, 2]))
    with pytest.raises(ValueError, match=re.escape("d is missing key(s) ['levels']")):
        TaskTree.from_dict({k: v for k, v in d.items() if k != "levels"})
    with pytest.raises(ValueError, match="does not refine"):
        TaskTree.from_dict(dict(d, levels=[[0, 0, 1, 1], [0, 1, 1, 2]]))
    with pytest.raises(ValueError, match="num_tasks must be an int >= 1"):
        TaskTree.flat(0)
    with pytest.raises(ValueError, match="depth must be an int >= 1"):
        TaskTree.flat(3, 0)


# ------------------------------------------------------------- learning


def planted(seed, sizes=(4, 4, 4), dim=400, noise=0.3, shuffle=True):
    """Gradients of a planted hierarchy: top direction + sub direction + noise at
    ``noise`` of their norm.  Returns (grads [T, dim], level-1 labels, level-2 labels)."""
    n1, n2, n3 = sizes
    gen = torch.Generator().manual_seed(seed)
    top = torch.nn.functional.normalize(torch.randn(n1, dim, generator=gen, dtype=torch.float64), dim=1)
    sub = torch.nn.functional.normalize(torch.randn(n1, n2, dim, generator=gen, dtype=torch.float64), dim=2)
    signal = (top[:, None, None, :] + sub[:, :, None, :]).expand(n1, n2, n3, dim).reshape(-1, dim)
    eps = torch.nn.functional.normalize(torch.randn(signal.shape, generator=gen, dtype=torch.float64), dim=1)
    grads = signal + noise * signal.norm(dim=1, keepdim=True) * eps
    lab1 = torch.arange(n1).repeat_interleave(n2 * n3)
    lab2 = torch.arange(n1 * n2).repeat_interleave(n3)
    if shuffle:
        order = torch.randperm(grads.shape[0], generator=gen)
        grads, lab1, lab2 = grads[order], lab1[order], lab2[order]
    scale = torch.rand(grads.shape[0], 1, generator=gen, dtype=torch.float64) * 10 + 0.1
    return (grads * scale).float(), lab1, lab2


def assert_recovers(tree, lab1, lab2):
    t = lab1.shape[0]
    assert tree.depth == 3
    assert same_partition(tree.labels(1), lab1)
    assert same_partition(tree.labels(2), lab2)
    assert tree.labels(3).tolist() == tree.inv_perm.tolist()
    assert tree.same_hierarchy(TaskTree.from_labels([lab1, lab2]))
    check_layout(tree, [lab1, lab2, list(range(t))])


def test_bar_planted_64_tasks_recovered_exactly():
    """4 clusters x 4 sub-clusters x 4 tasks, noise at 0.3 of the gradient norm."""
    grads, lab1, lab2 = planted(seed=0)
    assert grads.shape[0] == 64
    tree = TaskTree.cluster(grads, depth=3, branching=4)
    assert tree.clusters_per_level == [4, 16, 64]
    assert_recovers(tree, lab1, lab2)


@pytest.mark.parametrize("kwargs", [
    dict(),                                   # largest gaps of the dendrogram
    dict(threshold=[0.25, 0.7]),
    dict(num_clusters=[4, 16]),
    dict(branching=4, method="complete"),
    dict(branching=[4, 6], threshold=[0.25, 0.7]),  # threshold stops the splits before 6
    dict(method="weighted", chunk_size=7),
])
def test_planted_recovery_options(kwargs):
    grads, lab1, lab2 = planted(seed=1)
    assert_recovers(TaskTree.cluster(grads, depth=3, **kwargs), lab1, lab2)


@settings(deadline=None, max_examples=10)
@given(seed=st.integers(0, 10_000), sizes=st.tuples(st.integers(2, 4), st.integers(2, 4), st.integers(1, 4)))
def test_planted_recovery_random(seed, sizes):
    grads, lab1, lab2 = planted(seed, sizes=sizes)
    assert_recovers(TaskTree.cluster(grads, depth=3, branching=list(sizes[:2])), lab1, lab2)
    assert_recovers(TaskTree.cluster(grads, depth=3, threshold=[0.25, 0.7]), lab1, lab2)


def test_from_affinity_recovers_planted():
    grads, lab1, lab2 = planted(seed=2)
    g = grads.double()
    cos = (g @ g.T) / (g.norm(dim=1)[:, None] * g.norm(dim=1)[None, :])
    # any affine rescaling of the affinity gives the same tree (average linkage)
    assert_recovers(TaskTree.from_affinity(3 * cos - 5, depth=3, branching=4), lab1, lab2)
    # asymmetric affinity (e.g. transference) is symmetrized
    skew = torch.randn(64, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 1e-3
    assert_recovers(TaskTree.from_affinity((cos + skew).numpy(), depth=3, num_clusters=[4, 16]), lab1, lab2)
    with pytest.raises(ValueError, match="not symmetric"):
        TaskTree.from_affinity(cos + skew, depth=3, branching=4, symmetrize=False)


def test_cluster_is_deterministic_and_equivariant():
    grads, lab1, _ = planted(seed=3)
    a = TaskTree.cluster(grads, depth=3, branching=4)
    assert TaskTree.cluster(grads.clone(), depth=3, branching=4) == a
    order = torch.randperm(64, generator=torch.Generator().manual_seed(5))
    b = TaskTree.cluster(grads[order], depth=3, branching=4)
    for level in (1, 2):
        assert same_partition(b.labels(level), a.labels(level)[order])


def test_grow_online_one_level_per_step():
    grads, lab1, lab2 = planted(seed=4)
    step1 = grads + 0.0  # inner step 1 gradients
    step2, _, _ = planted(seed=4)
    t1 = TaskTree.grow(None, step1, branching=4)
    assert t1.depth == 1 and t1.clusters_per_level == [4] and not t1.is_complete
    assert same_partition(t1.labels(1), lab1)
    # non-binary split of every cluster into 4 children at once, by threshold
    t2 = TaskTree.grow(t1, step2, threshold=0.7)
    assert t2.depth == 2 and t2.clusters_per_level == [4, 16]
    assert t2.prefix(1).same_hierarchy(t1) and torch.equal(t2.prefix(1).perm, t2.perm)
    assert_recovers(t2.with_leaf_level(), lab1, lab2)
    # labels as prefix, and refine directly
    t2b = TaskTree.grow(lab1, step2, branching=4)
    assert t2b.same_hierarchy(t2)
    new = TaskTree.refine(lab1, step2, branching=4)
    assert new.dtype == torch.int64 and same_partition(new, lab2)
    assert torch.equal(TaskTree.refine(lab1, step2, branching=4), new)
    # a cluster may stay whole; singletons stay alone
    assert same_partition(TaskTree.refine(lab2, step2, threshold=0.5), lab2)
    assert same_partition(TaskTree.refine(lab2, step2, branching=4, threshold=-1.0), lab2)


def test_grow_respects_branching_and_threshold_limits():
    grads, lab1, lab2 = planted(seed=5)
    # branching 2 under each top cluster: at most 2 children
    t = TaskTree.grow(TaskTree.from_labels([lab1], add_leaf_level=False), grads, branching=2)
    assert t.clusters_per_level == [4, 8]
    for c in range(4):
        assert (t.parents(2) == c).sum() == 2
    # threshold 1.1 is never reached: everything is split to singletons
    assert TaskTree.refine(None, grads, threshold=1.1).unique().numel() == 64
    with pytest.raises(ValueError, match="refine needs branching, threshold or both"):
        TaskTree.refine(None, grads)
    with pytest.raises(ValueError, match="grads has 64 rows but prefix has 4 tasks"):
        TaskTree.grow(TaskTree.flat(4), grads, branching=2)


def test_from_linkage():
    points = np.array([0.0, 0.1, 10.0, 10.2, 30.0, 30.1, 30.3, 60.0])[:, None]
    Z = hierarchy.linkage(points, method="single")
    tree = TaskTree.from_linkage(Z, depth=3, heights=[15.0, 1.0])
    check_layout(tree, [[0, 0, 0, 0, 1, 1, 1, 2], [0, 0, 1, 1, 2, 2, 2, 3], list(range(8))])
    gaps = TaskTree.from_linkage(Z, depth=2)  # largest gap: between 10.2 and 29.7
    check_layout(gaps, [[0, 0, 0, 0, 1, 1, 1, 2], list(range(8))])
    binary = TaskTree.from_linkage(Z, depth=2, branching=2)
    check_layout(binary, [[0, 0, 0, 0, 0, 0, 0, 1], list(range(8))])
    counted = TaskTree.from_linkage(Z, depth=4, num_clusters=[2, 3, 4])
    check_layout(counted, [[0, 0, 0, 0, 0, 0, 0, 1], [0, 0, 0, 0, 1, 1, 1, 2],
                           [0, 0, 1, 1, 2, 2, 2, 3], list(range(8))])
    for bad, msg in [([[0, 1, -1.0, 2]], "negative"), ([[0, 5, 1.0, 2]], "only nodes 0..1 exist"),
                     ([[0, 1, 1.0, 3]], "count 3.0, expected 2"), ([[0, 1, 1, 2], [2, 0, 1, 2]], "merged twice"),
                     ([[0, 0, 1.0, 2]], "node 0 is merged twice")]:
        with pytest.raises(ValueError, match="Z is not a valid linkage matrix: .*" + msg):
            TaskTree.from_linkage(np.array(bad, dtype=float), depth=2)
    with pytest.raises(ValueError, match="Z must be a scipy linkage matrix"):
        TaskTree.from_linkage(np.zeros((3, 3)), depth=2)
    with pytest.raises(ValueError, match="heights must be non-increasing"):
        TaskTree.from_linkage(Z, depth=3, heights=[1.0, 15.0])


def test_cluster_argument_errors():
    grads = torch.randn(6, 5)
    with pytest.raises(ValueError, match="method must be one of"):
        TaskTree.cluster(grads, 2, method="ward")
    with pytest.raises(ValueError, match="branching must be a scalar or have one value per level"):
        TaskTree.cluster(grads, 3, branching=[2, 2, 2])
    with pytest.raises(ValueError, match="threshold must be non-decreasing"):
        TaskTree.cluster(grads, 3, threshold=[0.8, 0.2])
    with pytest.raises(ValueError, match="num_clusters cannot be combined"):
        TaskTree.cluster(grads, 2, num_clusters=2, branching=2)
    with pytest.raises(ValueError, match="num_clusters must be non-decreasing"):
        TaskTree.cluster(grads, 3, num_clusters=[3, 2])
    with pytest.raises(ValueError, match="features must be a 2-D"):
        TaskTree.cluster(torch.randn(6), 2)
    assert TaskTree.cluster(torch.randn(1, 5), 3) == TaskTree.flat(1, 3)
    assert TaskTree.cluster(grads, 1, branching=2) == TaskTree.flat(6, 1)
    # zero gradients do not break clustering
    zeros = torch.zeros(6, 5)
    check_layout(TaskTree.cluster(zeros, 3, branching=2))
