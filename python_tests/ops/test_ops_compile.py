"""torch.compile(fullgraph=True) of a function calling treepool.tree_update and
treepool.segment_mean (native backend): forward and backward equal eager."""

from __future__ import annotations

import pytest
import torch

import treepool
from .helpers import DEVICES, needs_native

pytestmark = needs_native


def inner_step(root, grads, offsets, parents, lr, weights, num_rows):
    """A two-level TreeMAML-like step: pool per cluster, update the nodes, broadcast the
    nodes back to their tasks and pool again."""
    nodes = treepool.tree_update(root, grads, offsets, parents, lr, weights)
    per_task = treepool.segment_broadcast(nodes, offsets, None, False, num_rows)
    pooled = treepool.segment_mean(per_task * grads, offsets, weights)
    return (nodes.square().sum() + pooled.sum(), nodes)


def make_inputs(device, T=9, P=16):
    g = torch.Generator().manual_seed(0)
    offsets = torch.tensor([0, 3, 3, 8, 9], device=device)
    parents = torch.tensor([0, 0, 1, 1], device=device)
    root = torch.randn(2, P, generator=g).to(device)
    grads = torch.randn(T, P, generator=g).to(device)
    lr = (torch.rand(P, generator=g) * 0.1).to(device)
    weights = (torch.rand(T, generator=g) + 0.1).to(device)
    return root, grads, offsets, parents, lr, weights, T


def run(fn, inputs, diff):
    leaves = [t.clone().requires_grad_(i in diff) if isinstance(t, torch.Tensor)
              and t.is_floating_point() else t for i, t in enumerate(inputs)]
    loss, nodes = fn(*leaves)
    grads = torch.autograd.grad(loss, [leaves[i] for i in diff])
    return loss.detach(), nodes.detach(), grads


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_forward_and_backward_equal_eager(device):
    torch._dynamo.reset()
    inputs = make_inputs(device)
    diff = (0, 1, 4, 5)  # root, grads, lr, weights
    with treepool.use_backend("native"):
        e_loss, e_nodes, e_grads = run(inner_step, inputs, diff)
        compiled = torch.compile(inner_step, fullgraph=True)
        c_loss, c_nodes, c_grads = run(compiled, inputs, diff)
        # A second call with other values reuses the graph and still matches eager.
        inputs2 = list(inputs)
        inputs2[1] = inputs[1] * 2 - 1
        c2 = run(compiled, inputs2, diff)
        e2 = run(inner_step, inputs2, diff)
    torch.testing.assert_close(c_loss, e_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c_nodes, e_nodes, rtol=1e-5, atol=1e-6)
    for a, b in zip(c_grads, e_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(c2[0], e2[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(c2[2], e2[2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # eager itself is right: nodes = root[parents] - lr * weighted cluster means
    root, grads, offsets, parents, lr, weights, _ = inputs
    o = offsets.tolist()
    for c, p in enumerate(parents.tolist()):
        w = weights[o[c]:o[c + 1]].double()
        mean = (w[:, None] * grads[o[c]:o[c + 1]].double()).sum(0) / w.sum() if o[c + 1] > o[c] \
            else torch.zeros(grads.shape[1], dtype=torch.float64, device=device)
        torch.testing.assert_close(e_nodes[c].double(), root[p].double() - lr.double() * mean,
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_float_lr_and_no_weights(device):
    """The other overloads: lr a Python float, weights None, segment_mean alone."""
    torch._dynamo.reset()
    root, grads, offsets, parents, _, _, _ = make_inputs(device)

    def fn(root, grads):
        nodes = treepool.tree_update(root, grads, offsets, parents, 0.25)
        return treepool.segment_mean(grads, offsets).sum() + nodes.sum(), nodes

    with treepool.use_backend("native"):
        e = run(fn, [root, grads], (0, 1))
        compiled = torch.compile(fn, fullgraph=True)
        c = run(compiled, [root, grads], (0, 1))
    torch.testing.assert_close(c[0], e[0])
    torch.testing.assert_close(c[1], e[1])
    for a, b in zip(c[2], e[2]):
        torch.testing.assert_close(a, b)


FRESH_PROCESS_SCRIPT = """
import torch, treepool
def step(root, grads, offsets, parents):
    return treepool.tree_update(root, grads, offsets, parents, 0.1).square().sum()
root = torch.randn(1, 8, requires_grad=True)
grads = torch.randn(5, 8)
offsets, parents = torch.tensor([0, 2, 5]), torch.tensor([0, 0])
loss = torch.compile(step, fullgraph=True)(root, grads, offsets, parents)
loss.backward()
expect = step(root.detach(), grads, offsets, parents)
assert torch.allclose(loss.detach(), expect), (loss, expect)
print("ok")
"""


def test_compile_before_any_eager_call():
    """In a fresh process the first treepool call may well be inside torch.compile: the
    backend's per-device probe must not break the graph (fullgraph=True)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", FRESH_PROCESS_SCRIPT], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
