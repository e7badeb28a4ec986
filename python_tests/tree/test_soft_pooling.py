"""Soft (HSML-style) pooling as matrix products, against loops and the hard tree ops."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import treepool
from treepool import SoftTree, TaskTree, soft_broadcast, soft_segment_mean, soft_tree_update

from ..meta.meta_oracles import data, make_model, rel_err, task_loss


@given(T=st.integers(1, 8), C=st.integers(1, 4), P=st.integers(1, 5), seed=st.integers(0, 10_000))
def test_soft_ops_equal_loops(T, C, P, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(C, T, generator=g, dtype=torch.float64)
    a[a < 0.3] = 0  # some zero weights, maybe whole zero rows/columns
    x = torch.randn(T, P, generator=g, dtype=torch.float64)
    pooled = soft_segment_mean(x, a)
    for c in range(C):
        w = a[c].sum()
        want = (a[c][:, None] * x).sum(0) / w if w > 0 else torch.zeros(P, dtype=torch.float64)
        torch.testing.assert_close(pooled[c], want, rtol=1e-12, atol=1e-14)
    out = soft_broadcast(pooled, a)
    for t in range(T):
        w = a[:, t].sum()
        want = (a[:, t][:, None] * pooled).sum(0) / w if w > 0 else torch.zeros(P, dtype=torch.float64)
        torch.testing.assert_close(out[t], want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(soft_tree_update(x, x, a, 0.5), x - 0.5 * out)


@pytest.mark.parametrize("backend", ["native", "reference"] if treepool.native_available() else ["reference"])
def test_one_hot_soft_update_equals_tree_update(backend):
    tree = TaskTree.from_nested([[[3, 0], [5]], [[1, 2, 4]]])
    g = torch.Generator().manual_seed(0)
    grads = torch.randn(6, 7, generator=g, dtype=torch.float64)
    node = torch.randn(1, 7, generator=g, dtype=torch.float64)
    soft = SoftTree.from_task_tree(tree, dtype=torch.float64)
    phi = node.expand(6, -1)
    with treepool.use_backend(backend):
        for level in (1, 2, 3):
            rows = tree.permute_rows(grads)
            parents = tree.parents(level)
            node = treepool.tree_update(node, rows, tree.offsets(level), parents, 0.3)
            phi = soft_tree_update(phi, grads, soft.assignment(level), 0.3)
            torch.testing.assert_close(phi, node[tree.labels(level)], rtol=1e-13, atol=1e-14)


def test_soft_treemaml_equals_equation():
    """TreeMAML with a random soft tree against the per-task equation, second order."""
    model = make_model()
    sx, sy, qx, qy = data(4)
    g = torch.Generator().manual_seed(1)
    assigns = [torch.rand(2, 4, generator=g, dtype=torch.float64),
               torch.rand(3, 4, generator=g, dtype=torch.float64)]
    learner = treepool.TreeMAML(model, SoftTree(assigns), inner_lr=0.2)
    loss = learner.meta_loss(sx, sy, qx, qy)
    got = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))])

    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).requires_grad_(True)
    phi = [theta] * 4
    for a in assigns:
        gs = [torch.autograd.grad(task_loss(model, phi[t], sx[t], sy[t]), phi[t], create_graph=True)[0]
              for t in range(4)]
        pooled = [sum(a[c, t] * gs[t] for t in range(4)) / a[c].sum() for c in range(a.shape[0])]
        phi = [phi[t] - 0.2 * sum(a[c, t] * pooled[c] for c in range(a.shape[0])) / a[:, t].sum()
               for t in range(4)]
    want_loss = sum(task_loss(model, phi[t], qx[t], qy[t]) for t in range(4)) / 4
    want, = torch.autograd.grad(want_loss, theta)
    assert float(loss.detach()) == pytest.approx(float(want_loss.detach()), rel=1e-12)
    assert rel_err(got, want) <= 1e-10


def test_soft_tree_validation():
    with pytest.raises(ValueError, match="columns"):
        SoftTree([torch.rand(2, 3), torch.rand(2, 4)])
    with pytest.raises(ValueError):
        SoftTree([])
    with pytest.raises(ValueError, match="T = 3"):
        soft_segment_mean(torch.rand(4, 2), torch.rand(2, 3))
    st_ = SoftTree.from_logits([torch.randn(3, 5)], temperature=0.5)
    torch.testing.assert_close(st_.assignment(1).sum(0), torch.ones(5))
