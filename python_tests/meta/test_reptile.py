"""Reptile, hierarchical Reptile and Sequential Reptile against per-task loops (float64)."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import treepool
from treepool import Reptile, SequentialReptile, TaskTree, tree_mean_weights

from .meta_oracles import data, make_model, task_loss

BACKENDS = ["native", "reference"] if treepool.native_available() else ["reference"]


def flat(learner):
    """theta as one [P] vector (a copy)."""
    return torch.cat([p.detach().reshape(-1) for p in learner.theta().values()])


def rows(phi):
    """{name: [T, *shape]} as one [T, P] tensor."""
    return torch.cat([p.reshape(p.shape[0], -1) for p in phi.values()], dim=1)


def sgd_loop(model, theta, x, y, lr, steps):
    phi = theta.detach().clone()
    for _ in range(steps):
        p = phi.clone().requires_grad_(True)
        g, = torch.autograd.grad(task_loss(model, p, x, y), p)
        phi = phi - lr * g
    return phi


def nested_mean(node, phis):
    """Tree mean from to_nested(): mean over children, recursively."""
    if isinstance(node, int):
        return phis[node]
    return sum(nested_mean(c, phis) for c in node) / len(node)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reptile_step_equals_loop(backend):
    model = make_model()
    x, y, _, _ = data(5, n=6)
    with treepool.use_backend(backend):
        r = Reptile(model, inner_lr=0.2, inner_steps=3, outer_lr=0.4)
        theta0 = flat(r)
        phi = r.step(x, y)
    want_phi = torch.stack([sgd_loop(model, theta0, x[t], y[t], 0.2, 3) for t in range(5)])
    torch.testing.assert_close(rows(phi), want_phi, rtol=1e-12, atol=1e-14)
    want = theta0 + 0.4 * (want_phi.mean(0) - theta0)
    torch.testing.assert_close(flat(r), want, rtol=1e-12, atol=1e-14)
    assert all(p.is_leaf and p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("backend", BACKENDS)
def test_outer_grad_with_sgd_equals_step(backend):
    model = make_model()
    x, y, _, _ = data(4, n=6)
    with treepool.use_backend(backend):
        a = Reptile(copy.deepcopy(model), inner_lr=0.1, inner_steps=2, outer_lr=0.5)
        b = Reptile(copy.deepcopy(model), inner_lr=0.1, inner_steps=2)
        opt = torch.optim.SGD(b.parameters(), lr=0.5)
        for _ in range(3):
            a.step(x, y)
            opt.zero_grad()
            b.outer_grad(x, y)
            opt.step()
    torch.testing.assert_close(flat(a), flat(b), rtol=1e-12, atol=1e-14)


@st.composite
def complete_trees(draw):
    T = draw(st.integers(2, 8))
    depth = draw(st.integers(1, 3))
    levels, prev = [], [0] * T
    for _ in range(depth - 1):
        prev = [p * 4 + draw(st.integers(0, 2)) for p in prev]
        levels.append(prev)
    if not levels:
        return TaskTree.flat(T)
    return TaskTree.from_labels(levels, add_leaf_level=draw(st.booleans()))


@pytest.mark.parametrize("backend", BACKENDS)
@given(tree=complete_trees(), seed=st.integers(0, 1000))
def test_hierarchical_reptile_equals_nested_mean(backend, tree, seed):
    model = make_model(seed % 3)
    T = tree.num_tasks
    x, y, _, _ = data(T, n=4, seed=seed)
    with treepool.use_backend(backend):
        r = Reptile(model, inner_lr=0.2, inner_steps=2, outer_lr=0.3, tree=tree)
        theta0 = flat(r)
        r.step(x, y)
    phis = [sgd_loop(model, theta0, x[t], y[t], 0.2, 2) for t in range(T)]
    if tree.is_complete:
        pooled = nested_mean(tree.to_nested(), phis)
    else:  # last level clusters of several tasks: the tree mean of the leaf-completed tree
        pooled = nested_mean(tree.with_leaf_level().to_nested(), phis)
    torch.testing.assert_close(flat(r), theta0 + 0.3 * (pooled - theta0),
                               rtol=1e-11, atol=1e-13)
    w = tree_mean_weights(tree, torch.float64)
    assert float(w.sum()) == pytest.approx(1.0, abs=1e-12)


def test_flat_tree_is_plain_reptile():
    model = make_model()
    x, y, _, _ = data(5)
    a = Reptile(copy.deepcopy(model), 0.1, 2, 0.5)
    b = Reptile(copy.deepcopy(model), 0.1, 2, 0.5, tree=TaskTree.flat(5, 2))
    a.step(x, y)
    b.step(x, y)
    torch.testing.assert_close(flat(a), flat(b), rtol=1e-13, atol=1e-15)


def test_minibatches_are_per_task_and_reproducible():
    model = make_model()
    x, y, _, _ = data(3, n=8)
    runs = []
    for _ in range(2):
        r = Reptile(model, 0.1, 3, 1.0, batch_size=2, generator=torch.Generator().manual_seed(5))
        runs.append(rows(r.adapt(x, y)))
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
    full = rows(Reptile(model, 0.1, 3, 1.0).adapt(x, y))
    assert not torch.allclose(runs[0], full)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sequential_reptile_equals_loop(backend):
    model = make_model()
    x, y, _, _ = data(4, n=5)
    tasks = [2, 0, 2, 3, 1]
    with treepool.use_backend(backend):
        s = SequentialReptile(model, inner_lr=0.15, inner_steps=5, outer_lr=0.6)
        theta0 = flat(s)
        s.step(x, y, tasks=torch.tensor(tasks))
    phi = theta0
    for t in tasks:
        phi = sgd_loop(model, phi, x[t], y[t], 0.15, 1)
    torch.testing.assert_close(flat(s), theta0 + 0.6 * (phi - theta0), rtol=1e-12, atol=1e-14)


def test_sequential_reptile_samples_from_p():
    model = make_model()
    x, y, _, _ = data(3)
    s = SequentialReptile(model, 0.1, 200, probs=torch.tensor([0.0, 1.0, 3.0]),
                          generator=torch.Generator().manual_seed(0))
    tasks = s.sample_tasks(3)
    counts = torch.bincount(tasks, minlength=3)
    assert counts[0] == 0 and 30 < counts[1] < 80
    s.inner_steps = 4
    s.outer_grad(x, y)
    assert all(p.grad is not None for p in model.parameters()) and s.last_tasks.shape == (4,)
    with pytest.raises(ValueError, match="probs"):
        s.sample_tasks(2)
