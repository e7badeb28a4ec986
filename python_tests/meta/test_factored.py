"""Factored linear leaves against the dense inner loop (float64, first and second order)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from treepool import MAML, TaskTree, TreeMAML

from .meta_oracles import rel_err

TOL = 1e-10


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 12)
        self.b = nn.Linear(2, 12, bias=False)
        self.head = nn.Linear(12, 2)

    def forward(self, x, z):
        return self.head(torch.tanh(self.a(x) + self.b(z)))


def mlp(seed, width=12, bias=True):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, width, bias=bias), nn.Tanh(), nn.Linear(width, width),
                         nn.Tanh(), nn.Linear(width, 2)).double()


def batch(T, seed, n=3, m=4, two_inputs=False):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    sx, qx = r(T, n, 3), r(T, m, 3)
    if two_inputs:
        sx, qx = (sx, r(T, n, 2)), (qx, r(T, m, 2))
    return sx, r(T, n, 2), qx, r(T, m, 2)


def both(make_model, make_learner, data):
    """(loss, grads) of the factored and of the dense learner on the same model state."""
    out = []
    for mode in ("always", "never"):
        model = make_model()
        learner = make_learner(model, mode)
        with torch.no_grad():
            g = torch.Generator().manual_seed(7)
            for r in learner.inner_rate.parameters():
                r.mul_(torch.rand(r.shape, generator=g, dtype=r.dtype) + 0.5)
        loss = learner.meta_loss(*data)
        out.append((loss, torch.autograd.grad(loss, list(learner.parameters())), learner))
    return out


def trees(T):
    return [TaskTree.flat(T, 2),
            TaskTree.from_labels([[t * 2 // T for t in range(T)]]),
            TaskTree.from_labels([[t * 2 // T for t in range(T)], [t * 4 // T for t in range(T)]])]


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("mode", ["fixed", "per_step", "per_layer", "per_step_layer"])
@pytest.mark.parametrize("tree_index", [0, 1, 2])
def test_factored_equals_dense(first_order, mode, tree_index):
    T = 8
    tree = trees(T)[tree_index]
    (a, ga, la), (b, gb, _) = both(
        lambda: mlp(tree_index),
        lambda m, f: TreeMAML(m, tree, inner_lr=0.2, inner_steps=tree.depth + 1, lr_mode=mode,
                              first_order=first_order, factored=f),
        batch(T, tree_index))
    assert la.factored.layers_for(batch(T, 0)[0], [0.2]) == ("0", "2", "4")
    # 'always' factors every step of these trees, the node steps above the leaves too
    first, pools = la.schedule(tree, T).factored_phase(tree.depth + 1)
    assert first == 0 and pools[-1] == 1 and (tree_index == 0 or pools[0] > 1)
    rates = [la.inner_rate(k) for k in range(tree.depth + 1)]
    assert la.factored.plan(batch(T, 0)[0], rates, pools, not first_order)[1] == 0
    assert abs(float((a - b).detach())) <= TOL * abs(float(b.detach()))
    for x, y in zip(ga, gb):
        assert rel_err(x, y) <= TOL


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("labels, phase", [
    ([[0, 0, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 2, 2, 3, 3]], (2, [1])),  # ragged, then pairs
    ([[0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 2, 2, 3, 3]], (0, [4, 2, 1])),  # equal from the root
    ([[0, 1, 1, 1, 1, 1, 1, 2], [0, 1, 1, 2, 2, 3, 3, 4]], None),  # the leaves' parents ragged
])
def test_factored_node_steps_after_any_level(first_order, labels, phase):
    T = 8
    tree = TaskTree.from_labels(labels)

    def model():  # a LayerNorm: dense parameters inside the factored steps, pooled per node
        torch.manual_seed(5)
        return nn.Sequential(nn.Linear(3, 12), nn.LayerNorm(12), nn.Tanh(), nn.Linear(12, 2)).double()
    (a, ga, la), (b, gb, _) = both(
        model,
        lambda m, f: TreeMAML(m, tree, inner_lr=0.2, inner_steps=tree.depth, lr_mode="per_step",
                              first_order=first_order, factored=f),
        batch(T, 5))
    assert la.schedule(tree, T).factored_phase(tree.depth) == phase
    assert abs(float((a - b).detach())) <= TOL * abs(float(b.detach()))
    for x, y in zip(ga, gb):
        assert rel_err(x, y) <= TOL


@settings(max_examples=15, deadline=None)
@given(T=st.integers(1, 6), steps=st.integers(1, 3), n=st.integers(1, 4), bias=st.booleans(),
       first_order=st.booleans(), seed=st.integers(0, 100))
def test_factored_maml_any_batch(T, steps, n, bias, first_order, seed):
    (a, ga, _), (b, gb, _) = both(
        lambda: mlp(seed, bias=bias),
        lambda m, f: MAML(m, inner_lr=0.3, inner_steps=steps, first_order=first_order,
                          lr_mode="per_step", factored=f),
        batch(T, seed, n=n))
    assert abs(float((a - b).detach())) <= TOL * abs(float(b.detach()))
    for x, y in zip(ga, gb):
        assert rel_err(x, y) <= TOL


@pytest.mark.parametrize("first_order", [False, True])
def test_factored_with_two_inputs_and_shared_body(first_order):
    T = 4
    data = batch(T, 3, two_inputs=True)
    for inner in (None, ["head.weight", "head.bias", "b.weight"]):
        def make():
            torch.manual_seed(0)
            return TwoInputs().double()
        (a, ga, _), (b, gb, _) = both(
            make, lambda m, f: MAML(m, inner_lr=0.2, inner_steps=2, first_order=first_order,
                                    inner_params=inner, factored=f), data)
        assert abs(float((a - b).detach())) <= TOL * abs(float(b.detach()))
        for x, y in zip(ga, gb):
            assert rel_err(x, y) <= TOL


def test_factored_with_batchnorm_and_cross_entropy():
    T = 4
    g = torch.Generator().manual_seed(0)
    sx, qx = torch.randn(T, 5, 3, generator=g).double(), torch.randn(T, 6, 3, generator=g).double()
    sy, qy = torch.randint(0, 3, (T, 5), generator=g), torch.randint(0, 3, (T, 6), generator=g)

    def make():
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(3, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3)).double()
    (a, ga, la), (b, gb, _) = both(
        make, lambda m, f: MAML(m, inner_lr=0.3, inner_steps=2, loss_fn=F.cross_entropy, factored=f),
        (sx, sy, qx, qy))
    assert abs(float((a - b).detach())) <= TOL * abs(float(b.detach()))
    # the bias before BatchNorm has a zero meta-gradient: compare all gradients at once
    flat = lambda gs: torch.cat([g.reshape(-1) for g in gs])  # noqa: E731
    assert rel_err(flat(ga), flat(gb)) <= TOL
    assert torch.equal(la.model[1].running_mean, torch.zeros(16, dtype=torch.float64))


def test_auto_factors_only_where_it_pays_and_meta_sgd_stays_dense():
    torch.manual_seed(0)
    wide = nn.Sequential(nn.Linear(1, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 1))
    learner = MAML(wide, inner_lr=0.01, inner_steps=1)
    x = torch.randn(4, 10, 1)
    assert learner.factored.layers_for(x, [0.01]) == ("2",)
    assert learner.factored.layers_for(x, [{n: torch.ones(p.shape) for n, p in
                                            wide.named_parameters()}]) == ()
    assert MAML(wide, factored="never").factored.layers_for(x, [0.01]) == ()
    # width 64, 5 rows, 3 steps: 16 tasks save too little to pay for the extra ops, 256 do
    narrow = nn.Sequential(nn.Linear(1, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
    auto = MAML(narrow, inner_lr=0.01, inner_steps=3).factored
    assert auto.layers_for(torch.randn(16, 5, 1), [0.01] * 3) == ()
    assert auto.layers_for(torch.randn(256, 5, 1), [0.01] * 3) == ("2",)
    # 256 tasks of 10 rows save 65536 elements: enough for second order only
    assert auto.layers_for(torch.randn(256, 10, 1), [0.01] * 3, second_order=True) == ("2",)
    assert auto.layers_for(torch.randn(256, 10, 1), [0.01] * 3, second_order=False) == ()
    assert MAML(narrow, factored="always").factored.layers_for(torch.randn(16, 5, 1), [0.01]) == ("0", "2", "4")
    with pytest.raises(ValueError, match="factored"):
        MAML(wide, factored="sometimes")
