"""Learned TreeMAML finds a planted hierarchy, and its clustering options are checked.

The family is the demo's (4 x 4 x 4 tasks, scales 1, 1, 0.6, 0.15).  One batch's
gradients barely show its tree (adjusted Rand index about 0.1 per level); the centered
similarity of the gradients at theta, accumulated over batches (``affinity_momentum``),
recovers it.  Thresholds are measured ones with margin: after 60 batches at the
untrained 1-16-16-1 network, levels 1 / 2 reach 1.0 / 0.89-1.0 (5 seeds, both signals;
seed 0, the one tested: 1.0 / 1.0).
"""

from __future__ import annotations

import pytest
import torch

from treepool.demo import FamilyConfig, HierarchicalRegression, adjusted_rand_index, make_net
from treepool.meta import LearnedTreeMAML
from treepool.tree import TaskTree
from treepool.tree.clustering import grow_similarity, refine_similarity
from treepool.tree.similarity import cosine_from_gram, gram_matrix


def _grown_ari(signal, center, momentum, batches, seed=0):
    fam = HierarchicalRegression(FamilyConfig())
    torch.manual_seed(seed)
    learner = LearnedTreeMAML(make_net(16), 3, branching=4, inner_lr=0.02, signal=signal,
                              center=center, affinity_momentum=momentum)
    g = torch.Generator().manual_seed(seed)
    for _ in range(batches):
        b = fam.sample(g)
        with torch.no_grad():
            learner.adapt(b["support_x"], b["support_y"])
    learner.eval()
    b = fam.sample(torch.Generator().manual_seed(1000 + seed))
    with torch.no_grad():
        learner.adapt(b["support_x"], b["support_y"])
    tree = learner.last_tree
    return (adjusted_rand_index(tree.labels(1), fam.level1),
            adjusted_rand_index(tree.labels(2), fam.level2))


@pytest.mark.parametrize("signal", ["root_gradient", "step_gradient"])
def test_accumulated_similarity_recovers_planted_tree(signal):
    l1, l2 = _grown_ari(signal, True, 1.0, 60)
    assert l1 >= 0.95, (l1, l2)
    assert l2 >= 0.7, (l1, l2)


def test_eval_mode_keeps_running_affinity():
    fam = HierarchicalRegression(FamilyConfig(branching=(2, 2, 2)))
    learner = LearnedTreeMAML(make_net(8), 3, branching=2, signal="root_gradient", center=True,
                              affinity_momentum=0.9)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        b = fam.sample(g)
        learner.adapt(b["support_x"], b["support_y"])
    saved = {k: v.clone() for k, v in learner.running_affinity.items()}
    assert set(saved) == {1, 2} and learner._affinity_batches == {1: 3, 2: 3}
    learner.eval()
    b = fam.sample(g)
    learner.adapt(b["support_x"], b["support_y"])
    assert all(torch.equal(saved[k], learner.running_affinity[k]) for k in saved)
    learner.train()
    learner.reset_affinity()
    assert learner.running_affinity == {}
    # another number of tasks starts afresh
    b = HierarchicalRegression(FamilyConfig(branching=(2, 2, 3))).sample(g)
    learner.adapt(b["support_x"], b["support_y"])
    assert learner.running_affinity[1].shape == (12, 12)


def test_default_is_the_per_batch_paper_clustering():
    net = make_net(8)
    fam = HierarchicalRegression(FamilyConfig(branching=(2, 2, 2)))
    b = fam.sample(torch.Generator().manual_seed(0))
    old = LearnedTreeMAML(net, 3, branching=2)
    assert old.signal == "step_gradient" and not old.center and old.affinity_momentum is None
    with torch.no_grad():
        old.adapt(b["support_x"], b["support_y"])
    # same tree as growing from the step gradients with TaskTree.grow (no running state)
    assert old.running_affinity == {} and old.last_tree.depth == 3


@pytest.mark.parametrize("kwargs, name", [
    (dict(signal="lookahead"), "signal"),
    (dict(signal=None), "signal"),
    (dict(center=1), "center"),
    (dict(affinity_momentum=1.5), "affinity_momentum"),
    (dict(affinity_momentum=-0.1), "affinity_momentum"),
    (dict(affinity_momentum=float("nan")), "affinity_momentum"),
    (dict(affinity_momentum=True), "affinity_momentum"),
    (dict(affinity_momentum="0.9"), "affinity_momentum"),
])
def test_bad_options_raise_value_error_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        LearnedTreeMAML(make_net(4), 2, branching=2, **kwargs)


def test_centered_cosine_matches_explicit_centering():
    G = torch.randn(7, 33, dtype=torch.float64)
    groups = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    S = cosine_from_gram(gram_matrix(G, chunk_size=5), groups)
    C = G.clone()
    for c in range(3):
        C[groups == c] -= G[groups == c].mean(0)
    C = C / C.norm(dim=1, keepdim=True)
    torch.testing.assert_close(S, C @ C.T)
    torch.testing.assert_close(cosine_from_gram(G @ G.T, center=False),
                               (G / G.norm(dim=1, keepdim=True)) @ (G / G.norm(dim=1, keepdim=True)).T)
    # a group of one has no direction of its own: 0 with the others, 1 with itself
    S1 = cosine_from_gram(gram_matrix(G), torch.tensor([0, 0, 1, 1, 1, 2, 3]))
    assert torch.equal(S1[6], torch.eye(7, dtype=torch.float64)[6])


def test_refine_similarity_and_grow_similarity():
    sim = torch.full((6, 6), -0.5, dtype=torch.float64)
    for block in ([0, 1, 2], [3, 4, 5]):
        for i in block:
            for j in block:
                sim[i, j] = 0.9
    sim.fill_diagonal_(1.0)
    labels = refine_similarity(None, sim, branching=2)
    assert labels.tolist() == [0, 0, 0, 1, 1, 1]
    tree = grow_similarity(TaskTree, None, sim, branching=2)
    tree = grow_similarity(TaskTree, tree, sim, threshold=0.95)
    assert tree.depth == 2 and tree.num_clusters(2) == 6
    with pytest.raises(ValueError, match="similarity"):
        refine_similarity(None, sim[:, :5], branching=2)
    with pytest.raises(ValueError, match="branching, threshold"):
        refine_similarity(None, sim)
