"""Factored linear leaves against the dense inner loop (float64, first and second order)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from treepool import MAML, TaskTree, TreeMAML
from treepool.meta import factored as factored_module

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


# ------------------------------------------------------------- first-order in-place layers

@pytest.fixture
def in_place_everywhere(monkeypatch):
    """'auto' keeps every eligible layer's first-order task weights in place, however small."""
    monkeypatch.setattr(factored_module, "IN_PLACE_THRESHOLD", 0)


def in_place_and_dense(make_model, make_learner, data):
    """(loss, grads, learner) with 'auto' (in-place layers) and with 'never' (dense)."""
    out = []
    for mode in ("auto", "never"):
        model = make_model()
        before = [p.detach().clone() for p in model.parameters()]
        learner = make_learner(model, mode)
        loss = learner.meta_loss(*data)
        out.append((loss, torch.autograd.grad(loss, list(learner.parameters())), learner))
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    return out


def assert_same(a, ga, b, gb):
    assert abs(float((a - b).detach())) <= TOL * abs(float(b.detach()))
    for x, y in zip(ga, gb):
        assert rel_err(x, y) <= TOL


def leaf_plan(learner, tree, sx, steps):
    first, pools = learner.schedule(tree, sx.shape[0]).factored_phase(steps)
    rates = [learner.inner_rate(k) for k in range(first, steps)]
    return learner.factored.plan(sx, rates, pools, second_order=not learner.first_order)


@pytest.mark.parametrize("labels", [
    None,                                                      # MAML: from the shared root
    [[0, 0, 0, 0, 1, 1, 1, 1]],                                # one node level, then leaves
    [[0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 2, 2, 3, 3]],      # two node levels
    [[0, 0, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 2, 2, 3, 3]],      # ragged, then pairs
    [[0] * 8, [0, 1, 2, 3, 4, 5, 6, 7]],                       # one node of all tasks
])
@pytest.mark.parametrize("extra_steps", [0, 1])
def test_in_place_layers_equal_dense(in_place_everywhere, labels, extra_steps):
    T = 8
    tree = TaskTree.flat(T, 2) if labels is None else TaskTree.from_labels(labels)
    steps = tree.depth + extra_steps
    data = batch(T, 4)
    (a, ga, la), (b, gb, _) = in_place_and_dense(
        lambda: mlp(2),
        lambda m, f: TreeMAML(m, tree, inner_lr=0.2, inner_steps=steps, first_order=True,
                              factored=f),
        data)
    assert leaf_plan(la, tree, data[0], steps).in_place == ("0", "2", "4")
    assert_same(a, ga, b, gb)


@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # the same patch for all
@given(T=st.integers(1, 6), steps=st.integers(1, 3), n=st.integers(1, 4), bias=st.booleans(),
       width=st.integers(2, 9), seed=st.integers(0, 100))
def test_in_place_maml_any_batch(in_place_everywhere, T, steps, n, bias, width, seed):
    data = batch(T, seed, n=n)
    (a, ga, la), (b, gb, _) = in_place_and_dense(
        lambda: mlp(seed, width=width, bias=bias),
        lambda m, f: MAML(m, inner_lr=0.3, inner_steps=steps, first_order=True, factored=f),
        data)
    assert la.factored.plan(data[0], [0.3] * steps, [1] * steps, False).in_place == ("0", "2", "4")
    assert_same(a, ga, b, gb)


def test_in_place_layers_only_where_exact_and_paying(in_place_everywhere):
    torch.manual_seed(0)
    x = torch.randn(4, 5, 1)
    thin = nn.Sequential(nn.Linear(1, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
    fo = MAML(thin, inner_lr=0.1, inner_steps=2, first_order=True).factored
    assert fo.plan(x, [0.1] * 2, [1, 1], False).in_place == ("2",)  # 1-feature layers stay dense
    assert fo.plan(x, [0.1] * 2, [1, 1], True).in_place == ()  # second order
    learned = MAML(thin, inner_lr=0.1, inner_steps=2, first_order=True, lr_mode="per_step")
    assert learned.factored.plan(x, [learned.inner_rate(k) for k in range(2)], [1, 1],
                                 False).in_place == ()  # a learned rate is not a constant
    assert MAML(thin, first_order=True, factored="never").factored.plan(
        x, [0.1], [1], False).in_place == ()
    handle = thin[2].register_forward_hook(lambda *a: None)  # not a plain MLP: vmap, dense
    assert fo.plan(x, [0.1] * 2, [1, 1], False).in_place == ()
    handle.remove()


def test_in_place_threshold():
    narrow = nn.Sequential(nn.Linear(1, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
    auto = MAML(narrow, inner_lr=0.01, inner_steps=3, first_order=True).factored
    # 256 tasks of 10 rows: not worth factoring in first order, but in place
    assert auto.plan(torch.randn(256, 10, 1), [0.01] * 3, [1] * 3, False) == ((), 0, ("2",))
    assert auto.plan(torch.randn(32, 10, 1), [0.01] * 3, [1] * 3, False).in_place == ()


@pytest.mark.parametrize("groups", [0, 1, 2, 4])
@pytest.mark.parametrize("adapted", [False, True])
def test_in_place_linear_gradcheck(groups, adapted):
    T, N, d_in, d_out = 4, 3, 5, 2
    g = torch.Generator().manual_seed(groups)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    h, bias, probe = r(T, N, d_in), r(T, d_out), torch.zeros(T, N, d_out, dtype=torch.float64)
    node = r(d_out, d_in) if groups == 0 else r(groups, d_out, d_in)
    steps = r(T, d_out, d_in)  # D_t: the constant steps so far

    def layer(h, node, bias, probe):
        if not adapted:
            return factored_module._InPlaceLinear.apply(h, None, node, bias, probe)
        per_task = node.expand(T, d_out, d_in) if groups == 0 else node.repeat_interleave(T // groups, 0)
        return factored_module._InPlaceLinear.apply(h, (per_task - steps).detach(), node, bias, probe)

    inputs = [t.requires_grad_() for t in (h, node, bias, probe)]
    assert torch.autograd.gradcheck(lambda *i: layer(*i), inputs)
    assert torch.autograd.gradgradcheck(lambda *i: layer(*i), inputs)


def test_descend_in_place_never_writes_the_node_weights():
    node = torch.randn(4, 3, 2, dtype=torch.float64)
    kept = node.clone()
    a, b = torch.randn(4, 5, 3, dtype=torch.float64), torch.randn(4, 5, 2, dtype=torch.float64)
    for groups_node in (node, node[:2], node[:1]):  # 1, 2 or 4 tasks per node
        out = factored_module._descend_in_place(None, groups_node, a, b, 4)
        per_task = groups_node.repeat_interleave(4 // groups_node.shape[0], 0)
        assert torch.allclose(out, per_task + a.transpose(1, 2) @ b)
        assert torch.equal(node, kept)


def test_in_place_layers_in_float32_and_under_no_grad(in_place_everywhere):
    """float32 agrees with the dense loop to float32 rounding; evaluation under no_grad
    takes the same path."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
    data = [t.float() for t in batch(8, 3, n=5, m=4)]
    results = []
    for mode in ("auto", "never"):
        learner = MAML(copy.deepcopy(model), inner_lr=0.1, inner_steps=3, first_order=True,
                       factored=mode)
        with torch.no_grad():
            per_task = learner.meta_loss(*data, reduction="none")
        loss = learner.meta_loss(*data)
        results.append((per_task, torch.autograd.grad(loss, list(learner.parameters()))))
    assert MAML(model, first_order=True, inner_steps=3).factored.plan(
        data[0], [0.1] * 3, [1] * 3, False).in_place == ("0", "2", "4")
    (a, ga), (b, gb) = results
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    for x, y in zip(ga, gb):
        assert rel_err(x, y) <= 1e-5
