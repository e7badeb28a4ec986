"""The learner API of issue 12: any nn.Module (BatchNorm, buffers, several inputs), the
model's own named parameters as meta-parameters, modes, test-time adaptation,
``inner_params`` (ANIL), per-layer rates, one constructor shape, and clear errors.

The exactness tests compare ``torch.autograd.grad(learner.meta_loss(...), parameters)``
in float64 with a plain loop over tasks (and clusters) written from the MAML / TreeMAML
equation with ``torch.autograd.grad`` and ``torch.func.functional_call`` on the
model's own parameter tensors, first and second order.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import treepool
from treepool import MAML, Reptile, TaskTree, TreeMAML

TOL = 1e-10


# ----------------------------------------------------------------------------- models


def mlp(seed=0, dtype=torch.float64, hidden=6, inputs=2):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(inputs, hidden), nn.Tanh(), nn.Linear(hidden, hidden),
                         nn.Tanh(), nn.Linear(hidden, 1)).to(dtype)


def conv_bn(seed=0, dtype=torch.float64, ways=3, channels=4):
    """A small Omniglot-style block net: conv3x3-BN-ReLU-maxpool x2, linear head, 8x8 input."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(channels * 2 * 2, ways)).to(dtype)


class TwoInputs(nn.Module):
    def __init__(self, a=3, b=2, hidden=5):
        super().__init__()
        self.fa = nn.Linear(a, hidden)
        self.fb = nn.Linear(b, hidden)
        self.head = nn.Linear(hidden, 1)

    def forward(self, a, b):
        return self.head(torch.tanh(self.fa(a) * torch.sigmoid(self.fb(b))))


class Scaled(nn.Module):
    """A model with a constant buffer."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 1)
        self.register_buffer("scale", torch.tensor([2.0, -0.5]))

    def forward(self, x):
        return self.lin(x * self.scale)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def regression(T, n=4, m=5, features=2, seed=1, dtype=torch.float64):
    g = gen(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return r(T, n, features), r(T, n, 1), r(T, m, features), r(T, m, 1)


def two_input_data(T, n=4, m=5, seed=2):
    g = gen(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return (r(T, n, 3), r(T, n, 2)), r(T, n, 1), (r(T, m, 3), r(T, m, 2)), r(T, m, 1)


def images(T, ways=3, shots=2, queries=2, seed=3, dtype=torch.float64):
    g = gen(seed)
    sx = torch.randn(T, ways * shots, 1, 8, 8, generator=g, dtype=dtype)
    qx = torch.randn(T, ways * queries, 1, 8, 8, generator=g, dtype=dtype)
    sy = torch.arange(ways).repeat(shots).expand(T, -1).contiguous()
    qy = torch.arange(ways).repeat(queries).expand(T, -1).contiguous()
    return sx, sy, qx, qy


def rel_err(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


# ----------------------------------------------------------------------------- oracle


def row(x, t):
    return tuple(v[t] for v in x) if isinstance(x, tuple) else (x[t],)


def oracle_rate(learner, name, k):
    """alpha of step k for parameter ``name``, read from the learner's own rate tensors."""
    rate = learner.inner_rate
    if rate.mode == "fixed":
        return rate.value
    if rate.mode == "per_step":
        return rate.rate[min(k, rate.num_steps - 1)]
    r = rate.rates[list(learner.inner_names).index(name)]
    if rate.mode in ("per_step_layer", "per_step_parameter"):
        return r[min(k, rate.num_steps - 1)]
    return r


def oracle_meta_loss(learner, batch, first_order, labels=None, loss_fn=F.mse_loss, steps=None):
    """Mean query loss from the (Tree)MAML equation: tasks (and clusters) looped one by
    one, gradients by torch.autograd.grad, the model called by functional_call with
    its own parameters (the non-adapted ones untouched) and copies of its buffers.
    labels[l]: cluster of every task at level l+1 (None: MAML, every task alone)."""
    sx, sy, qx, qy = batch
    model = learner.model
    T = sy.shape[0]
    steps = learner.inner_steps if steps is None else steps
    names = list(learner.inner_names)
    own = dict(model.named_parameters())

    def loss(params, x, y):
        buffers = {n: b.clone() for n, b in model.named_buffers()}  # BN running stats: scratch
        return loss_fn(torch.func.functional_call(model, {**buffers, **params}, x), y)

    nodes, node_of = {0: {n: own[n] for n in names}}, [0] * T
    for k in range(steps):
        lab = list(range(T)) if labels is None else [int(v) for v in labels[min(k, len(labels) - 1)]]
        new = {}
        for c in sorted(set(lab)):
            members = [t for t in range(T) if lab[t] == c]
            parent = nodes[node_of[members[0]]]
            grads = [torch.autograd.grad(loss(parent, row(sx, t), sy[t]), [parent[n] for n in names],
                                         create_graph=not first_order) for t in members]
            new[c] = {}
            for i, n in enumerate(names):
                mean = sum(g[i] for g in grads) / len(grads)
                new[c][n] = parent[n] - oracle_rate(learner, n, k) * mean
        nodes, node_of = new, lab
    return sum(loss(nodes[node_of[t]], row(qx, t), qy[t]) for t in range(T)) / T


def check_exact(learner, batch, first_order, labels=None, loss_fn=F.mse_loss, tree=None):
    params = [p for p in learner.parameters() if p.requires_grad]
    loss = learner.meta_loss(*batch, tree=tree)
    got = torch.autograd.grad(loss, params, allow_unused=True)
    want_loss = oracle_meta_loss(learner, batch, first_order, labels, loss_fn)
    want = torch.autograd.grad(want_loss, params, allow_unused=True)
    assert abs(float(loss.detach()) - float(want_loss.detach())) <= TOL * abs(float(want_loss.detach()))
    names = [n for n, p in learner.named_parameters() if p.requires_grad]
    # a parameter whose true gradient is zero (a conv bias before BatchNorm) is compared
    # with a scale of 1e-4 of the whole meta-gradient's norm instead of its own
    scale = 1e-4 * float(torch.sqrt(sum(w.pow(2).sum() for w in want if w is not None)))
    for name, g, w in zip(names, got, want):
        if w is None:
            assert g is None or float(g.abs().max()) == 0.0, name
            continue
        assert g is not None, f"{name} got no meta-gradient"
        err = float((g - w).norm()) / max(float(w.norm()), scale)
        assert err <= TOL, (name, err)


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("lr_mode", ["per_layer", "per_step_layer"])
def test_layer_rates_exact(lr_mode, first_order):
    model = mlp()
    learner = MAML(model, inner_lr=0.3, inner_steps=3, lr_mode=lr_mode, first_order=first_order)
    with torch.no_grad():  # distinct rates per layer (and step), so a mix-up shows
        for i, r in enumerate(learner.inner_rate.rates):
            r.copy_(0.05 + 0.1 * i + 0.03 * torch.arange(r.numel(), dtype=r.dtype).view(r.shape))
    expected = 4 if lr_mode == "per_layer" else 12
    assert sum(r.numel() for r in learner.inner_rate.rates) == 6 * (expected // 4)
    assert [tuple(r.shape) for r in learner.inner_rate.rates] == \
        [() if lr_mode == "per_layer" else (3,)] * 6
    check_exact(learner, regression(4), first_order)


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("lr_mode", ["fixed", "per_layer"])
def test_anil_exact(lr_mode, first_order):
    model = mlp()
    learner = MAML(model, inner_lr=0.4, inner_steps=2, lr_mode=lr_mode, first_order=first_order,
                   inner_params=lambda n: n.startswith("4."))
    assert learner.inner_names == ("4.weight", "4.bias")
    check_exact(learner, regression(3), first_order)


@pytest.mark.parametrize("first_order", [False, True])
def test_tuple_inputs_exact(first_order):
    learner = MAML(TwoInputs().double(), inner_lr=0.3, inner_steps=2, lr_mode="per_step_layer",
                   first_order=first_order)
    check_exact(learner, two_input_data(3), first_order)


@pytest.mark.parametrize("first_order", [False, True])
def test_batchnorm_exact(first_order):
    model = conv_bn()
    learner = MAML(model, inner_lr=0.2, inner_steps=2, lr_mode="per_layer",
                   first_order=first_order, loss_fn=F.cross_entropy)
    check_exact(learner, images(3), first_order, loss_fn=F.cross_entropy)


def norm_model(norm):
    torch.manual_seed(0)
    if norm == "batch":
        return conv_bn()
    if norm == "group":
        return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(),
                             nn.MaxPool2d(4), nn.Flatten(), nn.Linear(16, 3)).double()
    return nn.Sequential(nn.Linear(2, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3)).double()


FACTORED = ["default"] + (["always"] if "factored" in inspect.signature(TreeMAML.__init__).parameters
                          else [])


@pytest.mark.parametrize("factored", FACTORED)
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("norm", ["batch", "layer", "group"])
def test_norm_layers_exact(norm, first_order, factored):
    """BatchNorm / LayerNorm / GroupNorm with affine weights: vmap's fused norm backward
    has a wrong second derivative (pytorch/functorch#534); the learner's meta-gradient
    must still be exact."""
    extra = {} if factored == "default" else {"factored": factored}
    learner = TreeMAML(norm_model(norm), TaskTree.flat(3, 2), inner_lr=0.2, first_order=first_order,
                       loss_fn=F.cross_entropy, **extra)
    if norm == "layer":
        sx, _, qx, _ = regression(3, n=6, m=6)
        sy = torch.arange(3).repeat(2).expand(3, -1).contiguous()
        batch = (sx, sy, qx, sy)
    else:
        batch = images(3)
    check_exact(learner, batch, first_order, loss_fn=F.cross_entropy)


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("levels", [
    [[0, 0, 0, 1, 1, 1]],              # equal clusters: one gradient per node
    [[0, 0, 0, 0, 1, 1]],              # ragged, padded
    [[0, 0, 0, 0, 0, 1]],              # ragged, per-task gradients pooled by tree_update
], ids=["equal", "padded", "kernel"])
def test_tree_per_step_layer_anil_exact(levels, first_order):
    """TreeMAML with MAML++ rates, ANIL, on the three ways a level is pooled."""
    T = len(levels[0])
    tree = TaskTree(levels + [list(range(T))])
    labels = [[int(v) for v in tree.labels(l + 1)] for l in range(tree.depth)]
    learner = TreeMAML(mlp(), tree, inner_lr=0.3, lr_mode="per_step_layer",
                       first_order=first_order, inner_params=["2.weight", "2.bias", "4.weight"])
    with torch.no_grad():
        for i, r in enumerate(learner.inner_rate.rates):
            r.copy_(torch.tensor([0.2 + 0.05 * i, 0.1 + 0.02 * i], dtype=r.dtype))
    check_exact(learner, regression(T), first_order, labels)


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("inputs", [1, 2])
def test_relu_mlp_adapting_weights_only_exact(inputs, first_order):
    """A ReLU MLP whose inner steps adapt the weights and keep the biases (the batched
    products' ReLU forms must add the shared bias before the ReLU), MAML and TreeMAML,
    against the per-task oracle."""
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(inputs, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(),
                          nn.Linear(5, 1)).double()
    weights = ["0.weight", "2.weight", "4.weight"]
    batch = regression(4, features=inputs)
    check_exact(MAML(model, inner_lr=0.3, inner_steps=2, first_order=first_order,
                     inner_params=weights), batch, first_order)
    tree = TaskTree([[0, 0, 1, 1], [0, 1, 2, 3]])
    labels = [[int(v) for v in tree.labels(l + 1)] for l in range(tree.depth)]
    check_exact(TreeMAML(model, tree, inner_lr=0.3, first_order=first_order,
                         inner_params=weights), batch, first_order, labels)


@pytest.mark.parametrize("first_order", [False, True])
def test_treemaml_batchnorm_exact(first_order):
    tree = TaskTree([[0, 0, 1, 1], [0, 1, 2, 3]])
    learner = TreeMAML(conv_bn(), tree, inner_lr=0.2, first_order=first_order,
                       loss_fn=F.cross_entropy)
    labels = [[int(v) for v in tree.labels(l + 1)] for l in range(tree.depth)]
    check_exact(learner, images(4), first_order, labels, loss_fn=F.cross_entropy)


# ----------------------------------------------------------------------------- BatchNorm, buffers


def bn_stats(model):
    return {n: b.clone() for n, b in model.named_buffers()}


def test_batchnorm_conv_net_cross_entropy_trains():
    model = conv_bn(dtype=torch.float32)
    learner = MAML(model, inner_lr=0.1, inner_steps=2, loss_fn=F.cross_entropy)
    batch = images(4, dtype=torch.float32)
    before = bn_stats(model)
    opt = torch.optim.Adam(learner.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = learner.meta_loss(*batch)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in learner.parameters())
    assert losses[-1] < losses[0]
    with torch.no_grad():
        adapted = learner.adapt(batch[0], batch[1], steps=5)
        learner.predict(adapted, batch[2])
    after = bn_stats(model)
    for n in before:  # running statistics (and num_batches_tracked) untouched
        assert torch.equal(before[n], after[n]), n
    assert all(m.track_running_stats for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_batchnorm_per_task_statistics():
    """In training mode every task is normalised by its own batch statistics: a task's
    loss does not depend on the other tasks of the batch."""
    model = conv_bn()
    learner = MAML(model, inner_lr=0.2, inner_steps=2, loss_fn=F.cross_entropy)
    sx, sy, qx, qy = images(3)
    other = images(3, seed=9)
    with torch.no_grad():
        full = learner.meta_loss(sx, sy, qx, qy, reduction="none")
        mixed = learner.meta_loss(torch.stack([sx[0], 5 * other[0][1] + 3, other[0][2]]), sy,
                                  torch.stack([qx[0], other[2][1], other[2][2]]), qy,
                                  reduction="none")
        alone = learner.meta_loss(sx[:1], sy[:1], qx[:1], qy[:1], reduction="none")
    assert torch.allclose(full[0], mixed[0], rtol=1e-12, atol=0)
    assert torch.allclose(full[0], alone[0], rtol=1e-12, atol=0)
    # ... and equals the model run on that task alone (in training mode)
    with torch.no_grad():
        adapted = learner.adapt(sx, sy)
        pred = learner.predict(adapted, qx)
        one = torch.func.functional_call(model, {**bn_stats(model), **learner.task_params(adapted, 1)},
                                         (qx[1],))
    assert torch.allclose(pred[1], one, rtol=1e-10, atol=1e-12)


def test_batchnorm_eval_uses_running_statistics():
    model = conv_bn()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    learner = MAML(model, inner_lr=0.2, inner_steps=2, loss_fn=F.cross_entropy)
    sx, sy, qx, qy = images(3)
    learner.eval()
    assert not model.training and not model[1].training
    before = bn_stats(model)
    with torch.no_grad():
        adapted = learner.adapt(sx, sy, steps=4)
        pred = learner.predict(adapted, qx)
        for t in range(3):
            task = learner.task_model(adapted, t)
            assert not task.training
            assert torch.allclose(task(qx[t]), pred[t], rtol=1e-10, atol=1e-12)
    # eval mode: a task's prediction is per example (running statistics), so one
    # example alone gives the same output
    with torch.no_grad():
        single = learner.predict(adapted, qx[:, :1])
    assert torch.allclose(single[:, 0], pred[:, 0], rtol=1e-10, atol=1e-12)
    for n in before:
        assert torch.equal(before[n], bn_stats(model)[n])


def test_constant_buffer():
    model = Scaled().double()
    learner = MAML(model, inner_lr=0.3, inner_steps=2)
    assert [n for n, _ in learner.named_buffers()] == ["model.scale"]
    check_exact(learner, regression(3), first_order=False)
    with torch.no_grad():
        model.scale.mul_(3)  # the learner reads the model's current buffer
        sx, sy, qx, qy = regression(3)
        adapted = learner.adapt(sx, sy)
        want = torch.stack([torch.func.functional_call(model, learner.task_params(adapted, t), (qx[t],))
                            for t in range(3)])
        assert torch.allclose(learner.predict(adapted, qx), want, rtol=1e-12, atol=0)


def test_tuple_of_two_inputs():
    learner = MAML(TwoInputs(), inner_lr=0.2, inner_steps=2)
    sx, sy, qx, qy = (tuple(v.float() for v in x) if isinstance(x, tuple) else x.float()
                      for x in two_input_data(5))
    loss = learner.meta_loss(sx, sy, qx, qy)
    loss.backward()
    assert all(p.grad is not None for p in learner.parameters())
    with torch.no_grad():
        adapted = learner.adapt(sx, sy, steps=4)
        pred = learner.predict(adapted, qx)
        assert pred.shape == (5, 5, 1)
        assert torch.allclose(learner.task_model(adapted, 2)(*row(qx, 2)), pred[2], atol=1e-6)
        losses = learner.task_losses(adapted, list(qx), qy)  # a list works as a tuple
    assert losses.shape == (5,)


# ----------------------------------------------------------------------------- parameters


def test_named_parameters_are_the_models():
    model = mlp(dtype=torch.float32)
    learner = MAML(model, inner_lr=0.1, inner_steps=2)
    names = [n for n, _ in learner.named_parameters()]
    assert names == ["model." + n for n, _ in model.named_parameters()]
    own = dict(model.named_parameters())
    for n, p in learner.named_parameters():
        assert p is own[n[len("model."):]]
    assert learner.model is model

    opt = torch.optim.SGD(learner.parameters(), lr=0.1)
    before = copy.deepcopy(model.state_dict())
    loss = learner.meta_loss(*regression(4, dtype=torch.float32))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    state = model.state_dict()
    for n in before:  # moved by the optimizer, no sync step; state_dict current
        assert torch.allclose(state[n], before[n] - 0.1 * grads[n])
        assert torch.equal(learner.state_dict()["model." + n], state[n])
    # a fresh model loaded from that state_dict gives the same meta-loss
    fresh = mlp(seed=5, dtype=torch.float32)
    fresh.load_state_dict(state)
    batch = regression(4, dtype=torch.float32, seed=7)
    with torch.no_grad():
        assert torch.equal(MAML(fresh, inner_lr=0.1, inner_steps=2).meta_loss(*batch),
                           learner.meta_loss(*batch))


def test_learned_rates_are_named_and_saved():
    learner = MAML(mlp(), inner_lr=0.1, inner_steps=2, lr_mode="per_step")
    names = [n for n, _ in learner.named_parameters()]
    assert names[:6] == ["model." + n for n, _ in learner.model.named_parameters()]
    assert names[6:] == ["inner_rate.rate"]
    assert "inner_rate.rate" in learner.state_dict()


def test_parameter_groups_and_per_layer_weight_decay():
    model = mlp(dtype=torch.float32)
    learner = MAML(model, inner_lr=0.1, inner_steps=1, lr_mode="per_layer")
    head = [p for n, p in learner.named_parameters() if n.startswith("model.4.")]
    body = [p for n, p in learner.named_parameters() if n.startswith("model.") and not n.startswith("model.4.")]
    rates = list(learner.inner_rate.parameters())
    opt = torch.optim.SGD([{"params": body, "weight_decay": 0.0},
                           {"params": head, "weight_decay": 0.5, "lr": 0.2},
                           {"params": rates, "lr": 0.01}], lr=0.1)
    before = [p.detach().clone() for p in body + head + rates]
    learner.meta_loss(*regression(3, dtype=torch.float32)).backward()
    grads = [p.grad.clone() for p in body + head + rates]
    opt.step()
    after = body + head + rates
    for i, (b, g, a) in enumerate(zip(before, grads, after)):
        if i < len(body):
            want = b - 0.1 * g
        elif i < len(body) + len(head):
            want = b - 0.2 * (g + 0.5 * b)
        else:
            want = b - 0.01 * g
        assert torch.allclose(a.detach(), want, atol=1e-7), i


# ----------------------------------------------------------------------------- modes, randomness


def dropout_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 1))


def test_train_eval_reach_the_model():
    model = dropout_model()
    learner = MAML(model, inner_lr=0.1, inner_steps=2)
    assert learner.fns.randomness == "different"  # the documented default
    learner.eval()
    assert not model.training and not model[2].training
    learner.train()
    assert model.training and model[2].training
    model.eval()
    assert not learner.model.training


def test_dropout_random_in_train_deterministic_in_eval():
    model = dropout_model()
    learner = MAML(model, inner_lr=0.1, inner_steps=2)
    sx, sy, qx, qy = regression(4, dtype=torch.float32)
    # the same task four times: with randomness='different' each draws its own masks
    same = (sx[:1].expand(4, -1, -1), sy[:1].expand(4, -1, -1),
            qx[:1].expand(4, -1, -1), qy[:1].expand(4, -1, -1))
    learner.train()
    losses = learner.meta_loss(*same, reduction="none")
    assert len(set(losses.tolist())) > 1
    loss = learner.meta_loss(sx, sy, qx, qy)
    loss.backward()  # Dropout in the inner loop does not raise, second order included
    assert torch.isfinite(model[0].weight.grad).all()
    with torch.no_grad():
        a, b = (learner.meta_loss(sx, sy, qx, qy) for _ in range(2))
    assert float(a) != float(b)

    learner.eval()
    with torch.no_grad():
        e = learner.meta_loss(*same, reduction="none")
        assert torch.equal(e, e[:1].expand(4))
        assert torch.equal(learner.meta_loss(sx, sy, qx, qy), learner.meta_loss(sx, sy, qx, qy))


def test_randomness_same():
    learner = MAML(dropout_model(), inner_lr=0.1, inner_steps=2, randomness="same")
    sx, sy, qx, qy = regression(1, dtype=torch.float32)
    same = tuple(v.expand(4, -1, -1) for v in (sx, sy, qx, qy))
    with torch.no_grad():
        losses = learner.meta_loss(*same, reduction="none")
    assert torch.equal(losses, losses[:1].expand(4))
    with pytest.raises(ValueError, match="randomness"):
        MAML(dropout_model(), inner_lr=0.1, inner_steps=2, randomness="sometimes")


# ----------------------------------------------------------------------------- adaptation


def sgd_oracle(model, x, y, lr, steps):
    """Every task's parameters after ``steps`` plain SGD steps from the model's."""
    out = []
    for t in range(y.shape[0]):
        p = {n: v.detach().clone().requires_grad_(True) for n, v in model.named_parameters()}
        for _ in range(steps):
            loss = F.mse_loss(torch.func.functional_call(model, p, row(x, t)), y[t])
            g = torch.autograd.grad(loss, list(p.values()))
            p = {n: (v - lr * gi).detach().requires_grad_(True) for (n, v), gi in zip(p.items(), g)}
        out.append({n: v.detach() for n, v in p.items()})
    return out


def test_adapt_more_steps_than_training():
    model = mlp()
    learner = MAML(model, inner_lr=0.1, inner_steps=2)
    sx, sy, qx, qy = regression(3, n=6)
    with torch.no_grad():
        two = learner.adapt(sx, sy)
        ten = learner.adapt(sx, sy, steps=10)
        l2 = learner.task_losses(two, sx, sy)
        l10 = learner.task_losses(ten, sx, sy)
    assert set(ten) == {n for n, _ in model.named_parameters()}
    assert all(v.shape == (3, *model.get_parameter(n).shape) for n, v in ten.items())
    assert (l10 < l2).all()
    want = sgd_oracle(model, sx, sy, 0.1, 10)
    for t in range(3):
        for n in ten:
            assert rel_err(ten[n][t], want[t][n]) <= 1e-10


def test_adapt_past_learned_steps_uses_last_rate():
    model = mlp()
    learner = MAML(model, inner_lr=0.1, inner_steps=2, lr_mode="per_step")
    with torch.no_grad():
        learner.inner_rate.rate.copy_(torch.tensor([0.3, 0.05], dtype=torch.float64))
    sx, sy, _, _ = regression(2)
    with torch.no_grad():
        got = learner.adapt(sx, sy, steps=5)
    for t in range(2):
        p = {n: v.detach() for n, v in model.named_parameters()}
        for k, lr in enumerate([0.3, 0.05, 0.05, 0.05, 0.05]):
            q = {n: v.clone().requires_grad_(True) for n, v in p.items()}
            g = torch.autograd.grad(F.mse_loss(torch.func.functional_call(model, q, (sx[t],)), sy[t]),
                                    list(q.values()))
            p = {n: v - lr * gi for (n, v), gi in zip(p.items(), g)}
        for n in p:
            assert rel_err(got[n][t], p[n]) <= 1e-10


def test_task_model_and_task_params_match_predict():
    model = mlp(dtype=torch.float32)
    learner = MAML(model, inner_lr=0.1, inner_steps=2, inner_params=lambda n: n.startswith("4."))
    sx, sy, qx, qy = regression(4, dtype=torch.float32)
    adapted = learner.adapt(sx, sy, steps=10)  # in grad mode: differentiable
    pred = learner.predict(adapted, qx)
    pred.pow(2).mean().backward()
    assert model[0].weight.grad is not None  # through the shared body
    with torch.no_grad():
        for t in range(4):
            params = learner.task_params(adapted, t)
            assert set(params) == {n for n, _ in model.named_parameters()}
            via_call = torch.func.functional_call(learner.model, params, (qx[t],))
            task = learner.task_model(adapted, t)
            assert isinstance(task, nn.Module) and task is not model
            assert torch.allclose(via_call, pred[t], atol=1e-6)
            assert torch.allclose(task(qx[t]), pred[t], atol=1e-6)
            assert all(not p.grad_fn for p in task.parameters())
        # the copy is its own module: changing it leaves the meta-parameters alone
        w = model[4].weight.clone()
        task.get_parameter("4.weight").add_(1.0)
        assert torch.equal(model[4].weight, w)
        losses = learner.task_losses(adapted, qx, qy)
        want = torch.stack([F.mse_loss(pred[t], qy[t]) for t in range(4)])
        assert torch.allclose(losses, want, atol=1e-6)


# ----------------------------------------------------------------------------- inner_params (ANIL)


@pytest.mark.parametrize("select", [lambda n: n.startswith("4."), ["4.weight", "4.bias"], "4.weight"],
                         ids=["callable", "names", "one name"])
def test_anil_head_adapts_body_meta_learned(select):
    model = mlp(dtype=torch.float32)
    learner = MAML(model, inner_lr=0.2, inner_steps=2, inner_params=select)
    expected = ("4.weight",) if select == "4.weight" else ("4.weight", "4.bias")
    assert learner.inner_names == expected
    sx, sy, qx, qy = regression(4, dtype=torch.float32)
    learner.meta_loss(sx, sy, qx, qy).backward()
    for n, p in model.named_parameters():  # every parameter is meta-learned
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, n
    with torch.no_grad():
        adapted = learner.adapt(sx, sy)
    assert tuple(adapted) == expected  # the body is not adapted
    for n in expected:
        assert not torch.allclose(adapted[n][0], model.get_parameter(n))


def test_anil_body_unchanged_by_inner_loop():
    """With inner_params the other parameters are the model's own in every task."""
    model = mlp()
    learner = MAML(model, inner_lr=0.2, inner_steps=3, inner_params=lambda n: n.startswith("4."))
    sx, sy, qx, qy = regression(3)
    with torch.no_grad():
        adapted = learner.adapt(sx, sy)
        for t in range(3):
            params = learner.task_params(adapted, t)
            assert params["0.weight"] is model[0].weight


def test_inner_params_errors():
    with pytest.raises(ValueError, match="nope"):
        MAML(mlp(), inner_lr=0.1, inner_steps=1, inner_params=["nope"])
    with pytest.raises(ValueError, match="no parameter"):
        MAML(mlp(), inner_lr=0.1, inner_steps=1, inner_params=lambda n: False)


def test_frozen_parameters_are_not_adapted():
    model = mlp()
    model[0].weight.requires_grad_(False)
    learner = MAML(model, inner_lr=0.1, inner_steps=1)
    assert "0.weight" not in learner.inner_names
    check_exact(learner, regression(3), first_order=False)


def test_reptile_anil_moves_only_the_head():
    model = mlp()
    reptile = Reptile(model, inner_lr=0.1, inner_steps=3, outer_lr=0.5,
                      inner_params=lambda n: n.startswith("4."))
    before = copy.deepcopy(model.state_dict())
    sx, sy, _, _ = regression(3)
    phi = reptile.step(sx, sy)
    assert set(phi) == {"4.weight", "4.bias"}
    for n, v in model.state_dict().items():
        assert torch.equal(v, before[n]) == (not n.startswith("4.")), n


# ----------------------------------------------------------------------------- rates


def test_per_layer_rates_shapes_and_learning():
    model = mlp(dtype=torch.float32)
    learner = MAML(model, inner_lr=0.05, inner_steps=3, lr_mode="per_step_layer",
                   inner_params=lambda n: not n.startswith("0."))
    assert [tuple(r.shape) for r in learner.inner_rate.rates] == [(3,)] * 4
    learner.meta_loss(*regression(4, dtype=torch.float32)).backward()
    assert all(r.grad is not None and float(r.grad.abs().sum()) > 0 for r in learner.inner_rate.rates)
    layer = MAML(mlp(dtype=torch.float32), inner_lr=0.05, inner_steps=3, lr_mode="per_layer")
    assert [tuple(r.shape) for r in layer.inner_rate.rates] == [()] * 6
    assert all(r.item() == pytest.approx(0.05) for r in layer.inner_rate.rates)


# ----------------------------------------------------------------------------- constructors


def test_one_constructor_shape_any_number_of_tasks():
    learner = MAML(mlp(), inner_lr=0.1, inner_steps=2)
    for T in (3, 7, 1, 3):
        batch = regression(T, seed=T)
        loss = learner.meta_loss(*batch)
        assert loss.shape == ()
        assert learner.meta_loss(*batch, reduction="none").shape == (T,)
        assert learner.adapt(batch[0], batch[1])["0.weight"].shape == (T, 6, 2)
    check_exact(learner, regression(7), first_order=False)
    fixed = MAML(mlp(), inner_lr=0.1, inner_steps=2, num_tasks=3)
    fixed.meta_loss(*regression(5))  # another T still works
    with pytest.raises(TypeError):
        MAML(mlp(), 0.1, 2)  # inner_lr and inner_steps are keyword-only


def test_treemaml_and_reptile_constructors():
    tree = TaskTree([[0, 0, 1], [0, 1, 2]])
    learner = TreeMAML(mlp(), tree, inner_lr=0.1)
    assert learner.inner_steps == 2
    learner.meta_loss(*regression(3))
    with pytest.raises(ValueError, match="tree"):
        learner.meta_loss(*regression(4))
    reptile = Reptile(mlp(), inner_lr=0.1, inner_steps=2, outer_lr=0.5)
    phi = reptile.adapt(*regression(4)[:2], steps=4)
    assert phi["0.weight"].shape == (4, 6, 2)


@pytest.mark.parametrize("kwargs,error,word", [
    (dict(inner_lr="0.1"), TypeError, "inner_lr"),
    (dict(inner_lr=-0.1), ValueError, "inner_lr"),
    (dict(inner_lr=float("nan")), ValueError, "inner_lr"),
    (dict(inner_lr=float("inf")), ValueError, "inner_lr"),
    (dict(inner_lr=None), TypeError, "inner_lr"),
    (dict(inner_steps=0), ValueError, "inner_steps"),
    (dict(inner_steps=1.5), ValueError, "inner_steps"),
    (dict(num_tasks=0), ValueError, "num_tasks"),
    (dict(num_tasks=-2), ValueError, "num_tasks"),
    (dict(lr_mode="per_tensor"), ValueError, "lr_mode"),
    (dict(loss_fn="mse"), TypeError, "loss_fn"),
    (dict(lr_mode="per_layer", inner_lr=-1.0), ValueError, "inner_lr"),
])
def test_bad_constructor_values(kwargs, error, word):
    args = dict(inner_lr=0.1, inner_steps=1)
    args.update(kwargs)
    with pytest.raises(error, match=word):
        MAML(mlp(), **args)


@pytest.mark.parametrize("kwargs,error,word", [
    (dict(inner_lr="0.1"), TypeError, "inner_lr"),
    (dict(inner_lr=-0.1), ValueError, "inner_lr"),
    (dict(outer_lr=float("nan")), ValueError, "outer_lr"),
    (dict(outer_lr=1.5), ValueError, "outer_lr"),
    (dict(inner_steps=-1), ValueError, "inner_steps"),
])
def test_bad_reptile_values(kwargs, error, word):
    args = dict(inner_lr=0.1, inner_steps=1, outer_lr=0.5)
    args.update(kwargs)
    with pytest.raises(error, match=word):
        Reptile(mlp(), **args)


def test_model_must_be_a_module():
    with pytest.raises(TypeError, match="model"):
        MAML(lambda x: x, inner_lr=0.1, inner_steps=1)


# ----------------------------------------------------------------------------- errors at the model boundary


def fp32_batch(T=3, features=2):
    return regression(T, features=features, dtype=torch.float32)


def test_wrong_feature_size_names_support_x_and_shape():
    learner = MAML(mlp(dtype=torch.float32), inner_lr=0.1, inner_steps=1)
    sx, sy, qx, qy = fp32_batch()
    bad = torch.randn(3, 4, 5)
    with pytest.raises(ValueError, match=r"support_x.*\(4, 5\)"):
        learner.meta_loss(bad, sy, qx, qy)
    with pytest.raises(ValueError, match=r"support_x.*\(4, 5\)"):
        learner.adapt(bad, sy)
    with torch.no_grad(), pytest.raises(ValueError, match=r"support_x.*\(4, 5\)"):
        learner.adapt(bad, sy)
    with pytest.raises(ValueError, match=r"query_x.*\(5, 7\)"):
        learner.meta_loss(sx, sy, torch.randn(3, 5, 7), qy)


def test_wrong_dtype_names_support_x():
    learner = MAML(mlp(dtype=torch.float32), inner_lr=0.1, inner_steps=1)
    sx, sy, qx, qy = fp32_batch()
    with pytest.raises(ValueError, match="support_x.*float64"):
        learner.meta_loss(sx.double(), sy, qx, qy)
    with pytest.raises(ValueError, match="query_x.*float64"):
        learner.meta_loss(sx, sy, qx.double(), qy)


def test_wrong_number_of_inputs_names_support_x():
    sx, sy, qx, qy = fp32_batch()
    learner = MAML(mlp(dtype=torch.float32), inner_lr=0.1, inner_steps=1)
    with pytest.raises(ValueError, match=r"support_x.*2 input"):
        learner.meta_loss((sx, sx), sy, qx, qy)
    two = MAML(TwoInputs(a=2, b=2), inner_lr=0.1, inner_steps=1)
    with pytest.raises(ValueError, match=r"support_x.*1 input"):
        two.meta_loss(sx, sy, (qx, qx), qy)
    with pytest.raises(ValueError, match=r"query_x.*1 input"):
        two.meta_loss((sx, sx), sy, qx, qy)


def test_wrong_feature_size_in_a_tuple():
    learner = MAML(TwoInputs(), inner_lr=0.1, inner_steps=1)
    (a, b), sy, qx, qy = (tuple(v.float() for v in x) if isinstance(x, tuple) else x.float()
                          for x in two_input_data(3))
    with pytest.raises(ValueError, match=r"support_x.*\(4, 3\), \(4, 4\)"):
        learner.meta_loss((a, torch.randn(3, 4, 4)), sy, qx, qy)


@pytest.mark.parametrize("which", ["support", "query"])
def test_zero_shots_and_task_mismatch(which):
    learner = MAML(mlp(dtype=torch.float32), inner_lr=0.1, inner_steps=1)
    sx, sy, qx, qy = fp32_batch()
    if which == "support":
        with pytest.raises(ValueError, match="support_x.*shot"):
            learner.meta_loss(sx[:, :0], sy[:, :0], qx, qy)
        with pytest.raises(ValueError, match="support_y"):
            learner.meta_loss(sx, sy[:2], qx, qy)
    else:
        with pytest.raises(ValueError, match="query_x.*shot"):
            learner.meta_loss(sx, sy, qx[:, :0], qy[:, :0])
        with pytest.raises(ValueError, match="query_x"):
            learner.meta_loss(sx, sy, qx[:2], qy[:2])
    with pytest.raises(ValueError, match="support_x"):
        learner.meta_loss(sx[:0], sy[:0], qx[:0], qy[:0])


# ----------------------------------------------------------------------------- ops under torch.func


@pytest.mark.skipif(not treepool.native_available(), reason="native extension not built")
def test_func_grad_through_native_tree_update():
    g = gen(4)
    node = torch.randn(2, 5, generator=g, dtype=torch.float64)
    grads = torch.randn(5, 5, generator=g, dtype=torch.float64)
    offsets = torch.tensor([0, 2, 3, 5])
    parents = torch.tensor([0, 0, 1])
    w = torch.randn(3, 5, generator=g, dtype=torch.float64)

    def f(n, gr):
        return (treepool.tree_update(n, gr, offsets, parents, 0.3) * w).sum()

    with treepool.use_backend("native"):
        got = torch.func.grad(f, argnums=(0, 1))(node, grads)
    with treepool.use_backend("reference"):
        want = torch.func.grad(f, argnums=(0, 1))(node, grads)
    for a, b in zip(got, want):
        assert rel_err(a, b) <= 1e-12
