"""TreeMAML / MAML / Meta-SGD / Learned TreeMAML against plain per-task loops (float64).

The oracles loop over tasks and clusters with torch.autograd.grad(create_graph=True),
straight from the update equation, with the model's parameters split out of theta by
hand (no FlatParams, no treepool op).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import treepool
from treepool import MAML, LearnedTreeMAML, SoftTree, TaskTree, TreeMAML

from .meta_oracles import data, make_model, rel_err, split, task_loss

BACKENDS = ["native", "reference"] if treepool.native_available() else ["reference"]
TOL = 1e-10


# ----------------------------------------------------------------------------- oracles

def tree_oracle(model, theta, rate, labels, steps, batch, first_order):
    """TreeMAML from the equation. labels[l] = cluster of every task at level l+1
    (original order); rate(k) = lr of step k. Returns the outer loss."""
    sx, sy, qx, qy = batch
    T = sx.shape[0]
    nodes, node_of = {0: theta}, [0] * T
    for k in range(steps):
        lab = [int(v) for v in labels[min(k, len(labels) - 1)]]
        new = {}
        for c in sorted(set(lab)):
            members = [t for t in range(T) if lab[t] == c]
            parent = nodes[node_of[members[0]]]
            gs = [torch.autograd.grad(task_loss(model, parent, sx[t], sy[t]), parent,
                                      create_graph=True)[0] for t in members]
            mean = sum(gs) / len(gs)
            if first_order:
                mean = mean.detach()
            new[c] = parent - rate(k) * mean
        nodes, node_of = new, lab
    return sum(task_loss(model, nodes[node_of[t]], qx[t], qy[t]) for t in range(T)) / T


def flat_rates(learner):
    """The learnable inner rates as one tensor in the oracle's layout: [K] (per_step),
    [P] (per_parameter) or [K, P] (per_step_parameter); None when fixed."""
    rate = learner.inner_rate
    if rate.mode == "fixed":
        return None
    if rate.mode == "per_step":
        return rate.rate
    if rate.mode == "per_parameter":
        return torch.cat([r.reshape(-1) for r in rate.rates])
    return torch.cat([r.reshape(r.shape[0], -1) for r in rate.rates], dim=1)


def meta_params(learner):
    """(theta params, rate params) of a learner, in the order flat_grads expects."""
    return list(learner.theta().values()), list(learner.inner_rate.parameters())


def flat_grads(learner, loss):
    """d loss / d (theta as one [P] vector, rates in the oracle's layout)."""
    theta, rates = meta_params(learner)
    got = torch.autograd.grad(loss, theta + rates)
    g_theta = torch.cat([g.reshape(-1) for g in got[:len(theta)]])
    if not rates:
        return [g_theta]
    mode = learner.inner_rate.mode
    if mode == "per_step":
        return [g_theta, got[-1]]
    if mode == "per_parameter":
        return [g_theta, torch.cat([g.reshape(-1) for g in got[len(theta):]])]
    return [g_theta, torch.cat([g.reshape(g.shape[0], -1) for g in got[len(theta):]], dim=1)]


def scramble_rates(learner):
    """Distinct rates per step / parameter."""
    with torch.no_grad():
        for r in learner.inner_rate.parameters():
            r.mul_(torch.rand_like(r) + 0.5)


def check_against_oracle(learner, model, labels, batch, first_order, tree=None):
    loss = learner.meta_loss(*batch, tree=tree)
    got = flat_grads(learner, loss)
    theta = torch.cat([p.detach().reshape(-1) for p in learner.theta().values()]).requires_grad_(True)
    rate_param = flat_rates(learner)
    if rate_param is not None:
        rate_param = rate_param.detach().clone().requires_grad_(True)

    def rate(k):
        if rate_param is None:
            return learner.inner_rate.value
        if learner.inner_rate.mode == "per_parameter":
            return rate_param
        return rate_param[min(k, rate_param.shape[0] - 1)]

    want_loss = tree_oracle(model, theta, rate, labels, learner.inner_steps, batch, first_order)
    want = torch.autograd.grad(want_loss, [theta] + ([rate_param] if rate_param is not None else []))
    assert abs(float(loss.detach()) - float(want_loss.detach())) <= TOL * abs(float(want_loss.detach()))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert rel_err(g, w) <= TOL, (rel_err(g, w), g, w)


# ----------------------------------------------------------------------------- MAML


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("steps", [1, 3])
def test_maml_meta_gradient_equals_loop(backend, first_order, steps):
    model = make_model()
    batch = data(5)
    with treepool.use_backend(backend):
        learner = MAML(model, inner_lr=0.3, inner_steps=steps, first_order=first_order)
        check_against_oracle(learner, model, [list(range(5))], batch, first_order)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["per_step", "per_parameter", "per_step_parameter"])
@pytest.mark.parametrize("first_order", [False, True])
def test_learned_rates_get_loop_gradients(backend, mode, first_order):
    model = make_model(1)
    batch = data(4, seed=3)
    with treepool.use_backend(backend):
        learner = MAML(model, inner_lr=0.2, inner_steps=2, lr_mode=mode, first_order=first_order)
        scramble_rates(learner)
        check_against_oracle(learner, model, [list(range(4))], batch, first_order)


def test_maml_builds_flat_tree_per_batch_size():
    model = make_model()
    learner = MAML(model, inner_lr=0.1, inner_steps=2)
    for T in (3, 5):
        batch = data(T)
        check_against_oracle(learner, model, [list(range(T))], batch, False)


def test_maml_matches_treemaml_on_flat_tree():
    model = make_model()
    batch = data(4)
    a = MAML(model, inner_lr=0.1, inner_steps=2).meta_loss(*batch)
    b = TreeMAML(model, TaskTree.flat(4, 2), inner_lr=0.1).meta_loss(*batch)
    assert float(a.detach()) == pytest.approx(float(b.detach()), rel=1e-14)


# ----------------------------------------------------------------------------- TreeMAML


@st.composite
def random_trees(draw):
    T = draw(st.integers(2, 7))
    depth = draw(st.integers(1, 3))
    levels, prev = [], [0] * T
    for _ in range(depth):
        cur = [p * 4 + draw(st.integers(0, 2)) for p in prev]
        levels.append(cur)
        prev = cur
    leaf = draw(st.booleans())
    tree = TaskTree.from_labels(levels, add_leaf_level=leaf)
    labels = levels + ([list(range(T))] if leaf else [])
    extra = draw(st.integers(0, 1))
    return tree, labels, extra


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("first_order", [False, True])
@given(case=random_trees(), seed=st.integers(0, 1000))
def test_treemaml_equals_equation_on_random_trees(backend, first_order, case, seed):
    tree, labels, extra = case
    model = make_model(seed % 7)
    batch = data(tree.num_tasks, seed=seed)
    with treepool.use_backend(backend):
        learner = TreeMAML(model, tree, inner_lr=0.25, first_order=first_order,
                           inner_steps=tree.depth + extra)
        check_against_oracle(learner, model, labels, batch, first_order)


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=random_trees(), seed=st.integers(0, 1000))
def test_treemaml_meta_sgd_on_random_trees(backend, case, seed):
    tree, labels, _ = case
    model = make_model(seed % 5)
    batch = data(tree.num_tasks, seed=seed)
    with treepool.use_backend(backend):
        learner = TreeMAML(model, tree, inner_lr=0.2, lr_mode="per_step_parameter")
        scramble_rates(learner)
        check_against_oracle(learner, model, labels, batch, False)


def test_fewer_steps_than_levels_reads_the_level_k_node():
    tree = TaskTree.from_nested([[[0, 1], [2]], [[3, 4]]])
    model = make_model()
    batch = data(5)
    learner = TreeMAML(model, tree, inner_lr=0.3, inner_steps=1)
    check_against_oracle(learner, model, [tree.labels(1).tolist()], batch, False)


def test_adapt_and_per_task_losses_are_in_original_order():
    tree = TaskTree.from_nested([[[4, 1], [2]], [[0, 3]]])
    model = make_model()
    sx, sy, qx, qy = data(5)
    learner = TreeMAML(model, tree, inner_lr=0.3)
    with torch.no_grad():
        phi = learner.adapt(sx, sy)
        per_task = learner.meta_loss(sx, sy, qx, qy, reduction="none")
        pred = learner.predict(phi, qx)
    want = torch.stack([F.mse_loss(pred[t], qy[t]) for t in range(5)])
    torch.testing.assert_close(per_task, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(per_task.mean(), learner.meta_loss(sx, sy, qx, qy).detach())
    # tasks 0 and 3 share their level-2 node, hence everything but the last (leaf) step
    assert {n: tuple(p.shape) for n, p in phi.items()} == {
        n: (5, *p.shape) for n, p in model.named_parameters()}


def test_outer_step_with_any_optimizer():
    tree = TaskTree.from_nested([[0, 1], [2, 3]])
    model = make_model()
    batch = data(4)
    learner = TreeMAML(model, tree, inner_lr=0.1, lr_mode="per_step")
    opt = torch.optim.Adam(learner.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in learner.parameters()]
    first = float(learner.meta_loss(*batch).detach())
    for _ in range(30):
        opt.zero_grad()
        learner.meta_loss(*batch).backward()
        opt.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, learner.parameters()))
    assert float(learner.meta_loss(*batch).detach()) < first
    # the meta-parameters are the model's own: nothing to copy back
    assert all(a is b for a, b in zip(model.parameters(), learner.theta().values()))


def test_module_methods_move_the_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1))
    learner = MAML(model, inner_lr=0.1).double()
    assert all(p.dtype == torch.float64 for p in learner.parameters())
    assert all(p.dtype == torch.float64 for p in model.parameters())
    learner.meta_loss(*data(3)).backward()


def test_bad_arguments():
    model = make_model()
    tree = TaskTree.flat(3)
    with pytest.raises(ValueError, match="lr_mode"):
        TreeMAML(model, tree, lr_mode="adaptive")
    with pytest.raises(ValueError, match="inner_steps"):
        TreeMAML(model, None)
    with pytest.raises(ValueError, match="tasks"):
        TreeMAML(model, tree).meta_loss(*data(4))
    with pytest.raises(TypeError, match="inner_lr"):
        TreeMAML(model, tree, inner_lr="0.1")
    with pytest.raises(ValueError, match="branching, threshold"):
        LearnedTreeMAML(model, 3)


# ----------------------------------------------------------------------------- soft pooling


@pytest.mark.parametrize("first_order", [False, True])
def test_one_hot_soft_tree_equals_hard_tree(first_order):
    tree = TaskTree.from_nested([[[4, 1], [2]], [[0, 3, 5]]])
    model = make_model()
    batch = data(6)
    learner = TreeMAML(model, tree, inner_lr=0.3, first_order=first_order)
    hard = learner.meta_loss(*batch)
    g_hard, = flat_grads(learner, hard)
    soft = learner.meta_loss(*batch, tree=SoftTree.from_task_tree(tree, dtype=torch.float64))
    g_soft, = flat_grads(learner, soft)
    assert float(soft.detach()) == pytest.approx(float(hard.detach()), rel=1e-12)
    assert rel_err(g_soft, g_hard) <= TOL


def test_soft_tree_gradients_reach_the_assignments():
    model = make_model()
    batch = data(4)
    logits = [torch.randn(2, 4, dtype=torch.float64, requires_grad=True), torch.randn(4, 4, dtype=torch.float64)]
    learner = TreeMAML(model, None, inner_lr=0.3, inner_steps=2)
    loss = learner.meta_loss(*batch, tree=SoftTree.from_logits(logits))
    g, = torch.autograd.grad(loss, logits[0])
    assert torch.isfinite(g).all() and g.abs().sum() > 0


# ----------------------------------------------------------------------------- Learned TreeMAML


def clustered_regression(groups=3, per=4, n=6, seed=0):
    """Linear tasks whose weights form ``groups`` well separated groups."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(groups, 5, 1, generator=g, dtype=torch.float64) * 3
    w = centers.repeat_interleave(per, 0) + 0.05 * torch.randn(groups * per, 5, 1, generator=g,
                                                                 dtype=torch.float64)
    x = torch.randn(groups * per, 2 * n, 5, generator=g, dtype=torch.float64)
    y = x @ w
    return x[:, :n], y[:, :n], x[:, n:], y[:, n:]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("first_order", [False, True])
def test_learned_treemaml_equals_treemaml_on_its_grown_tree(backend, first_order):
    torch.manual_seed(0)
    model = nn.Linear(5, 1, bias=False).double()
    with torch.no_grad():
        model.weight.zero_()
    perm = torch.randperm(12)
    batch = [t[perm] for t in clustered_regression()]
    with treepool.use_backend(backend):
        learned = LearnedTreeMAML(model, 3, branching=3, inner_lr=0.05, first_order=first_order,
                                  inner_steps=4)
        loss = learned.meta_loss(*batch)
        g_learned, = flat_grads(learned, loss)
        tree = learned.last_tree
        assert tree.depth == 3 and tree.is_complete
        # the three weight groups are found at level 1
        assert tree.same_hierarchy(TaskTree.from_labels(
            [(torch.arange(12) // 4)[perm].tolist(), tree.labels(2).tolist()]))
        fixed = TreeMAML(model, tree, inner_lr=0.05, first_order=first_order, inner_steps=4)
        g_fixed, = flat_grads(fixed, fixed.meta_loss(*batch))
    assert rel_err(g_learned, g_fixed) <= TOL
    check_against_oracle(learned, model, [tree.labels(lv).tolist() for lv in (1, 2, 3)], batch,
                         first_order)


@given(seed=st.integers(0, 10_000), branching=st.integers(2, 3))
def test_learned_tree_on_random_gradients_matches_fixed_tree(seed, branching):
    model = make_model(seed % 3)
    batch = data(7, seed=seed)
    learned = LearnedTreeMAML(model, 3, branching=branching, inner_lr=0.3, leaf_last=False)
    loss = learned.meta_loss(*batch)
    fixed = TreeMAML(model, learned.last_tree, inner_lr=0.3)
    assert float(loss.detach()) == pytest.approx(float(fixed.meta_loss(*batch).detach()), rel=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(learned.adapt(batch[0], batch[1]),
                                   fixed.adapt(batch[0], batch[1]), rtol=1e-12, atol=1e-14)
        assert learned.last_tree is not None


def test_conv_classifier_with_cross_entropy():
    """A small CNN with integer class targets."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3)).double()
    g = torch.Generator().manual_seed(0)
    sx = torch.randn(4, 6, 1, 6, 6, generator=g, dtype=torch.float64)
    qx = torch.randn(4, 5, 1, 6, 6, generator=g, dtype=torch.float64)
    sy = torch.randint(0, 3, (4, 6), generator=g)
    qy = torch.randint(0, 3, (4, 5), generator=g)
    tree = TaskTree.from_nested([[0, 2], [1, 3]])
    learner = TreeMAML(model, tree, inner_lr=0.5, loss_fn=F.cross_entropy)
    got, = flat_grads(learner, learner.meta_loss(sx, sy, qx, qy))

    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).requires_grad_(True)

    def loss(p, x, y):
        return F.cross_entropy(torch.func.functional_call(model, split(model, p), (x,)), y)

    nodes = {}
    for c, members in enumerate([[0, 2], [1, 3]]):
        gs = [torch.autograd.grad(loss(theta, sx[t], sy[t]), theta, create_graph=True)[0] for t in members]
        nodes[c] = theta - 0.5 * sum(gs) / 2
    leaf = {}
    for c, members in enumerate([[0, 2], [1, 3]]):
        for t in members:
            g_t, = torch.autograd.grad(loss(nodes[c], sx[t], sy[t]), nodes[c], create_graph=True)
            leaf[t] = nodes[c] - 0.5 * g_t
    want_loss = sum(loss(leaf[t], qx[t], qy[t]) for t in range(4)) / 4
    want, = torch.autograd.grad(want_loss, theta)
    assert rel_err(got, want) <= TOL


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("flat", [True, False])
def test_shared_step_of_a_conv_model_equals_the_autograd_pass(first_order, flat):
    """Adapted convolutions take their shared-parameter step by vmap(grad) over unbatched
    parameters (ModelFunctions._shared_grads); it gives the autograd pass's meta-gradient,
    on MAML's per-task step and TreeMAML's per-node one.  A frozen convolution does not
    switch the path."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(3 * 2 * 2, 3)).double()
    g = torch.Generator().manual_seed(1)
    sx = torch.randn(4, 5, 2, 6, 6, generator=g, dtype=torch.float64)
    qx = torch.randn(4, 3, 2, 6, 6, generator=g, dtype=torch.float64)
    sy = torch.randint(0, 3, (4, 5), generator=g)
    qy = torch.randint(0, 3, (4, 3), generator=g)
    tree = TaskTree.flat(4) if flat else TaskTree.from_nested([[0, 2], [1, 3]])
    learner = TreeMAML(model, tree, inner_lr=0.4, inner_steps=2, first_order=first_order,
                       loss_fn=F.cross_entropy, factored="never")
    assert learner.fns.adapts_conv
    got, = flat_grads(learner, learner.meta_loss(sx, sy, qx, qy))
    learner.fns.adapts_conv = False
    want, = flat_grads(learner, learner.meta_loss(sx, sy, qx, qy))
    assert rel_err(got, want) <= TOL
    frozen = TreeMAML(model, tree, inner_lr=0.4, loss_fn=F.cross_entropy,
                      inner_params=lambda name: not name.startswith("0."))
    assert not frozen.fns.adapts_conv


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("per_step", [False, True])
def test_one_input_and_one_output_linears_equal_the_loop(first_order, per_step):
    """Linear layers with one input or one output feature run as elementwise ops under
    the learners (functional._ThinLinears): the meta-gradient of a 1-h-h-1 net, one
    thin layer without a bias, equals the per-task loop on MAML's per-task steps and
    TreeMAML's per-node ones, and the path with the bmm of F.linear."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(1, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(),
                          nn.Linear(4, 1, bias=False)).double()
    g = torch.Generator().manual_seed(4)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    batch = (r(4, 3, 1), r(4, 3, 1), r(4, 5, 1), r(4, 5, 1))
    lr_mode = "per_step" if per_step else "fixed"
    maml = MAML(model, inner_lr=0.3, inner_steps=2, first_order=first_order, lr_mode=lr_mode)
    assert maml.fns.thin_linears
    check_against_oracle(maml, model, [list(range(4))], batch, first_order)
    labels = [[0, 1, 0, 1], [0, 1, 2, 3]]
    tree = TreeMAML(model, TaskTree.from_labels(labels), inner_lr=0.3, inner_steps=2,
                    first_order=first_order, lr_mode=lr_mode, factored="never")
    check_against_oracle(tree, model, labels, batch, first_order)
    for learner in (maml, tree):
        got = flat_grads(learner, learner.meta_loss(*batch))
        learner.fns.thin_linears = False
        want = flat_grads(learner, learner.meta_loss(*batch))
        assert all(rel_err(a, b) <= TOL for a, b in zip(got, want))
    assert not MAML(nn.Linear(2, 3).double(), inner_lr=0.1).fns.thin_linears


def test_diverged_inner_loop_is_an_error_not_a_nan_model():
    model = make_model()
    batch = data(3)
    learner = MAML(model, inner_lr=1e200, inner_steps=3)
    with pytest.raises(FloatingPointError, match="non-finite query loss"):
        learner.meta_loss(*batch)
    quiet = MAML(model, inner_lr=1e200, inner_steps=3, check_finite=False)
    assert not torch.isfinite(quiet.meta_loss(*batch))
    for bad, err in (("0.1", TypeError), (-0.5, ValueError), (float("nan"), ValueError)):
        with pytest.raises(err, match="inner_lr"):
            MAML(model, inner_lr=bad)
    for eps in (0.0, 1.5, float("inf")):
        with pytest.raises(ValueError, match="outer_lr"):
            treepool.Reptile(model, outer_lr=eps)
