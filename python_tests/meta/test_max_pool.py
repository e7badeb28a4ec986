"""The learners' CPU max pooling (treepool.meta.max_pool): values, indices, gradient and
double gradient equal to F.max_pool2d's; which calls it takes; meta-gradients of conv
learners bitwise equal with and without it."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import treepool
from treepool import ops
from treepool.meta import max_pool

params = pytest.mark.parametrize


@pytest.fixture
def routed(monkeypatch):
    """The shapes of the inputs that reached treepool's indices."""
    seen = []
    original = ops.max_pool2d_indices

    def counting(x, kernel_size):
        seen.append(tuple(x.shape))
        return original(x, kernel_size)
    monkeypatch.setattr(ops, "max_pool2d_indices", counting)
    return seen


@params("shape", [(3, 4, 8, 6), (4, 7, 9), (2, 1, 2, 2)])
@params("dtype", [torch.float32, torch.float64])
def test_values_indices_and_gradients_equal_aten(shape, dtype):
    torch.manual_seed(0)
    x = torch.relu(torch.randn(shape, dtype=dtype)).requires_grad_()   # tied zeros
    x.data[..., :2, :2] = 1.0                                             # tied positives
    g = torch.randn_like(F.max_pool2d(x, 2))
    out, idx = max_pool.max_pool2d(x, return_indices=True)
    ref, ref_idx = F.max_pool2d(x, 2, return_indices=True)
    assert torch.equal(out, ref) and torch.equal(idx, ref_idx)
    (dx,) = torch.autograd.grad(out, x, g, create_graph=True)
    (ref_dx,) = torch.autograd.grad(ref, x, g, create_graph=True)
    assert torch.equal(dx, ref_dx)
    h = torch.randn_like(x)
    gg = g.clone().requires_grad_()
    (ddx,) = torch.autograd.grad(torch.autograd.grad(max_pool.max_pool2d(x), x, gg, create_graph=True)[0], gg, h)
    (ref_ddx,) = torch.autograd.grad(torch.autograd.grad(F.max_pool2d(x, 2), x, gg, create_graph=True)[0], gg, h)
    assert torch.equal(ddx, ref_ddx)


def test_gradcheck():
    torch.manual_seed(1)
    x = torch.randn(2, 3, 6, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(max_pool.max_pool2d, (x,))
    assert torch.autograd.gradgradcheck(max_pool.max_pool2d, (x,))


@params("call", [
    lambda x: nn.MaxPool2d(2)(x),
    lambda x: nn.MaxPool2d(2, return_indices=True)(x),
    lambda x: F.max_pool2d(x, (2, 2), 2, 0, 1, False, True),        # all positional
    lambda x: F.max_pool2d_with_indices(x, 2),
    lambda x: torch.max_pool2d(x, [2, 2]),
    lambda x: nn.MaxPool2d(2, ceil_mode=True)(x),                    # even planes
])
def test_routed_calls(routed, call):
    torch.manual_seed(2)
    x = torch.randn(3, 4, 8, 6)
    want = call(x)
    with max_pool.FastMaxPool():
        got = call(x)
    assert len(routed) == 1
    for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        assert torch.equal(a, b)


@params("call,x", [
    (lambda x: F.max_pool2d(x, 3), torch.randn(2, 3, 9, 9)),
    (lambda x: F.max_pool2d(x, 2, stride=1), torch.randn(2, 3, 8, 8)),
    (lambda x: F.max_pool2d(x, 2, padding=1), torch.randn(2, 3, 8, 8)),
    (lambda x: F.max_pool2d(x, 2, dilation=2), torch.randn(2, 3, 8, 8)),
    (lambda x: F.max_pool2d(x, 2, ceil_mode=True), torch.randn(2, 3, 7, 8)),
    (lambda x: F.max_pool2d(x, 2), torch.randn(2, 3, 8, 8).half()),
    (lambda x: F.max_pool2d(x, 2), torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)),
    (lambda x: F.max_pool2d(x, 2), torch.randn(2, 3, 8, 8)[..., ::2]),
])
def test_other_calls_run_aten(routed, call, x):
    want = call(x)
    with max_pool.FastMaxPool():
        got = call(x)
    assert not routed and torch.equal(got, want)


def test_reference_backend_runs_aten(routed):
    x = torch.randn(2, 3, 8, 8)
    with treepool.use_backend("reference"), max_pool.FastMaxPool():
        assert torch.equal(F.max_pool2d(x, 2), F.max_pool2d(x, 2))
    assert not routed


def _conv_net():
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(4 * 2 * 2, 3)).double()


def _batch(tasks=4):
    g = torch.Generator().manual_seed(4)
    images = lambda n: torch.randn(tasks, n, 1, 8, 8, generator=g, dtype=torch.float64)
    labels = lambda n: torch.arange(3).repeat(n // 3).expand(tasks, -1).contiguous()
    return images(3), labels(3), images(6), labels(6)


@params("learner", ["MAML", "TreeMAML", "MetaSGD"])
@params("first_order", [False, True])
def test_meta_gradients_bitwise_equal(routed, learner, first_order):
    """The step's meta-gradient with treepool's pooling equals the one with ATen's."""
    grads = []
    for fast in (True, False):
        model = _conv_net()
        common = dict(inner_steps=2, first_order=first_order, loss_fn=F.cross_entropy)
        if learner == "TreeMAML":
            tree = treepool.TaskTree.from_labels([[0, 0, 1, 1], [0, 1, 2, 3]], add_leaf_level=False)
            meta = treepool.TreeMAML(model, tree, inner_lr=0.1, **common)
        elif learner == "MetaSGD":
            meta = treepool.MAML(model, inner_lr=0.1, lr_mode="per_parameter", **common)
        else:
            meta = treepool.MAML(model, inner_lr=0.1, **common)
        meta.fns.max_pools = fast
        meta.meta_loss(*_batch()).backward()
        grads.append([p.grad.clone() for p in meta.parameters()])
    assert routed                     # the fast pooling ran in the first step
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_model_without_max_pooling_has_no_mode():
    meta = treepool.MAML(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten()), inner_lr=0.1)
    assert not meta.fns.max_pools
    assert treepool.MAML(copy.deepcopy(_conv_net()), inner_lr=0.1).fns.max_pools
