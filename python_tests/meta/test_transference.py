"""Lookahead affinity, TAG, the affinity tree and IT-MTL against per-task loops (float64)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import treepool
from treepool import (TaskTree, affinity_tree, choose_gradient, itmtl_candidates, lookahead_affinity,
                      lookahead_params, pcgrad, task_gradients)

from .meta_oracles import data, make_model, split, task_loss

BACKENDS = ["native", "reference"] if treepool.native_available() else ["reference"]


def theta_of(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def loop_grads(model, theta, x, y):
    out = []
    for t in range(x.shape[0]):
        p = theta.clone().requires_grad_(True)
        out.append(torch.autograd.grad(task_loss(model, p, x[t], y[t]), p)[0])
    return torch.stack(out)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tag", [False, True])
def test_affinity_equals_loop(backend, tag):
    model = make_model()
    x, y, qx, qy = data(5, n=6, m=6)
    lr = 0.3
    with treepool.use_backend(backend):
        z = lookahead_affinity(model, x, y, lr=lr, tag=tag, eval_x=qx, eval_y=qy)
    theta = theta_of(model)
    g = loop_grads(model, theta, x, y)
    want = torch.empty(5, 5, dtype=torch.float64)
    for i in range(5):
        for j in range(5):
            after = task_loss(model, theta - lr * g[i], qx[j], qy[j])
            before = task_loss(model, theta, qx[j], qy[j])
            want[i, j] = 1 - after / before
    if tag:
        want /= lr
    torch.testing.assert_close(z, want, rtol=1e-10, atol=1e-12)


def test_task_gradients_and_lookahead_params():
    model = make_model()
    x, y, _, _ = data(4)
    theta = theta_of(model)
    g = task_gradients(model, x, y)
    torch.testing.assert_close(g, loop_grads(model, theta, x, y), rtol=1e-12, atol=1e-14)
    lr = torch.rand(theta.shape[0], dtype=torch.float64)
    torch.testing.assert_close(lookahead_params(theta, g, lr), theta[None] - lr * g, rtol=1e-13, atol=1e-15)
    other = theta + 0.1
    torch.testing.assert_close(task_gradients(model, x, y, params=other),
                               loop_grads(model, other, x, y), rtol=1e-12, atol=1e-14)


def test_affinity_tree_groups_helpful_tasks():
    # two groups of linear tasks with opposite weights: a step on one group helps its
    # own group and hurts the other
    g = torch.Generator().manual_seed(0)
    model = nn.Linear(3, 1, bias=False).double()
    with torch.no_grad():
        model.weight.zero_()
    w = torch.tensor([[1.0, 2.0, -1.0]], dtype=torch.float64).T
    ws = torch.stack([w + 0.05 * torch.randn(3, 1, generator=g, dtype=torch.float64) for _ in range(3)]
                     + [-w + 0.05 * torch.randn(3, 1, generator=g, dtype=torch.float64) for _ in range(3)])
    perm = torch.tensor([3, 0, 4, 1, 5, 2])
    ws = ws[perm]
    x = torch.randn(6, 10, 3, generator=g, dtype=torch.float64)
    y = x @ ws
    z = lookahead_affinity(model, x, y, lr=0.05)
    groups = (perm >= 3).long()
    same = groups[:, None] == groups[None, :]
    assert (z[same] > 0).all() and (z[~same] < 0).all()
    tree = affinity_tree(z, 2, branching=2)
    assert tree.same_hierarchy(TaskTree.from_labels([groups.tolist()]))


def test_pcgrad_removes_conflicts():
    g = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    # g0 projected off g1: g0 - (<g0,g1>/|g1|^2) g1 = [1,0] + 0.5 [-1,1] = [0.5, 0.5]
    # g1 projected off g0: [-1,1] + [1,0] = [0, 1]
    torch.testing.assert_close(pcgrad(g), torch.tensor([0.5, 1.5], dtype=torch.float64))
    agree = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(pcgrad(agree), agree.sum(0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_choose_gradient_equals_loop(backend):
    model = make_model()
    x, y, _, _ = data(4, n=5)
    theta = theta_of(model)
    grads = task_gradients(model, x, y)
    cands = torch.cat([itmtl_candidates(grads), torch.randn(3, theta.shape[0], dtype=torch.float64)])
    with treepool.use_backend(backend):
        idx, totals = choose_gradient(model, cands, x, y, lr=0.2)
    want = torch.stack([sum(task_loss(model, theta - 0.2 * c, x[j], y[j]) for j in range(4))
                        for c in cands])
    torch.testing.assert_close(totals, want, rtol=1e-11, atol=1e-13)
    assert idx == int(torch.argmin(want))
    w = torch.tensor([1.0, 0.0, 2.0, 0.5], dtype=torch.float64)
    _, weighted = choose_gradient(model, cands, x, y, lr=0.2, task_weights=w)
    want_w = torch.stack([sum(w[j] * task_loss(model, theta - 0.2 * c, x[j], y[j]) for j in range(4))
                          for c in cands])
    torch.testing.assert_close(weighted, want_w, rtol=1e-11, atol=1e-13)


def test_split_matches_flat_params_layout():
    # the oracles' hand-written split must agree with FlatParams
    model = make_model()
    theta = torch.randn(treepool.FlatParams(model).numel, dtype=torch.float64)
    views = treepool.FlatParams(model).unflatten(theta)
    for name, t in split(model, theta).items():
        assert torch.equal(views[name], t)
