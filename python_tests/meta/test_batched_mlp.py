"""BatchedMLP (a plain sequential MLP on batched parameters without vmap) against
vmap(functional_call) of the same model, and the learners' meta-gradients with and
without it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from treepool import MAML, TaskTree, TreeMAML
from treepool.meta.batched_mlp import BatchedMLP, per_task_losses
from treepool.meta.functional import ModelFunctions

from .test_maml import TOL, flat_grads, rel_err

ACTIVATIONS = [nn.ReLU, nn.Tanh, nn.GELU, nn.Sigmoid, nn.Identity]


@st.composite
def mlps(draw, activations=ACTIVATIONS, stacked=False):
    """(model, widths): Linear layers of 1-5 features with one activation between them
    (``stacked``: one or two between them and up to two after the last), sometimes
    nested in a second Sequential."""
    widths = draw(st.lists(st.sampled_from([1, 2, 3, 5]), min_size=2, max_size=4))
    layers = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1], bias=draw(st.booleans())))
        last = i == len(widths) - 2
        count = draw(st.integers(0 if last else 1, 2)) if stacked else (0 if last else 1)
        layers.extend(draw(st.sampled_from(activations))() for _ in range(count))
    nested = draw(st.booleans()) and len(layers) > 2
    model = nn.Sequential(layers[0], nn.Sequential(*layers[1:])) if nested else nn.Sequential(*layers)
    return model, widths


@given(case=mlps(), B=st.integers(1, 4), rows=st.sampled_from([(), (1,), (3,), (2, 3)]),
       lead=st.sampled_from([0, 1]), dtype=st.sampled_from([torch.float32, torch.float64]),
       adapt=st.sampled_from(["all", "weights", "biases", "first"]), seed=st.integers(0, 1000))
def test_batched_mlp_equals_vmap_of_the_model(case, B, rows, lead, dtype, adapt, seed):
    """Outputs and their gradients (with respect to the batched parameters and the
    input) equal vmap(functional_call), for unbatched (lead 0) and per-row (lead 1)
    parameters, any adapted subset, per-task inputs of rank 1 to 3, nested Sequentials
    and layers with one input or one output feature."""
    model, widths = case
    model = model.to(dtype)
    torch.manual_seed(seed)
    mlp = BatchedMLP.of(model)
    assert mlp is not None and mlp.usable()
    names = [n for n, _ in model.named_parameters()
             if adapt == "all" or (adapt == "weights" and n.endswith("weight"))
             or (adapt == "biases" and n.endswith("bias")) or (adapt == "first" and n.startswith("0."))]
    params = {n: (p.detach().clone() if lead == 0 else torch.randn(B, *p.shape, dtype=dtype))
              .requires_grad_() for n, p in model.named_parameters() if n in names}
    x = torch.randn(B, *rows, widths[0], dtype=dtype, requires_grad=True)
    got = mlp(params, x, lead)
    if lead == 1 and len(rows) == 2:   # a node's tasks share the node's parameters
        per_node = torch.func.vmap(lambda p, xt: torch.func.functional_call(model, p, (xt,)),
                                   in_dims=(None, 0))
        want = torch.func.vmap(per_node)(params, x)
    else:
        call = lambda p, xt: torch.func.functional_call(model, p, (xt,))  # noqa: E731
        want = torch.func.vmap(call, in_dims=(None if lead == 0 else 0, 0))(params, x)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert got.shape == want.shape == (B, *rows, widths[-1])
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    probe = torch.randn_like(want)
    inputs = [x, *params.values()]
    g_got = torch.autograd.grad((got * probe).sum(), inputs, allow_unused=True)
    g_want = torch.autograd.grad((want * probe).sum(), inputs, allow_unused=True)
    for a, b in zip(g_got, g_want):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("adapt", ["all", "weights", "biases"])
@pytest.mark.parametrize("lead", [0, 1])
def test_linear_layers_followed_by_relu_equal_vmap_for_every_adapted_subset(adapt, lead):
    """Every branch of a linear layer followed by ReLU (one input feature, one output
    feature, the product), each with adapted or shared weight and bias: the ReLU comes
    after the bias, fused in the product only where the product adds the bias."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(1, 4), nn.ReLU(), nn.Linear(4, 3), nn.ReLU(inplace=True),
                          nn.Linear(3, 1), nn.ReLU()).double()
    with torch.no_grad():
        model[4].bias.fill_(0.5)  # some outputs above zero
    B = 3
    params = {n: (p.detach().clone() if lead == 0 else torch.randn(B, *p.shape, dtype=p.dtype))
              .requires_grad_() for n, p in model.named_parameters()
              if adapt == "all" or n.endswith(adapt[:-1] if adapt == "weights" else "bias")}
    x = torch.randn(B, 5, 1, dtype=torch.float64)
    got = BatchedMLP.of(model)(params, x, lead)
    call = lambda p, xt: torch.func.functional_call(model, p, (xt,))  # noqa: E731
    want = torch.func.vmap(call, in_dims=(None if lead == 0 else 0, 0))(params, x)
    assert (want > 0).any()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    probe = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad((got * probe).sum(), list(params.values())),
                    torch.autograd.grad((want * probe).sum(), list(params.values()))):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_only_plain_sequential_mlps_are_batched():
    assert BatchedMLP.of(nn.Linear(3, 2)) is not None
    assert BatchedMLP.of(nn.Sequential(nn.Linear(3, 2), nn.Sequential(nn.ReLU(), nn.Linear(2, 1)))) is not None
    for model in [nn.Sequential(nn.Linear(3, 2), nn.PReLU()),          # a parameter
                  nn.Sequential(nn.Linear(3, 2), nn.Dropout(0.5)),     # randomness
                  nn.Sequential(nn.Flatten(), nn.Linear(3, 2)),        # not elementwise
                  nn.Sequential(nn.ReLU()),                            # no linear layer
                  nn.Sequential(nn.Linear(3, 2), nn.LayerNorm(2)),
                  nn.Conv1d(1, 1, 1)]:
        assert BatchedMLP.of(model) is None, model

    class Custom(nn.Linear):
        pass
    assert BatchedMLP.of(nn.Sequential(Custom(3, 2))) is None


def test_hooks_send_the_model_through_vmap():
    """A hook registered after the learner is built runs: the batched path steps aside."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1))
    fns = ModelFunctions(model, [n for n, _ in model.named_parameters()])
    params = {n: p.detach().expand(4, *p.shape) for n, p in model.named_parameters()}
    x, y = torch.randn(4, 5, 2), torch.randn(4, 5, 1)
    before = fns.losses(params, x, y, F.mse_loss)
    calls = []
    handle = model[2].register_forward_hook(lambda m, i, o: calls.append(1) or o * 2)
    try:
        assert not fns.mlp.usable()
        doubled = fns.losses(params, x, y, F.mse_loss)
    finally:
        handle.remove()
    assert calls and fns.mlp.usable()
    want = torch.stack([F.mse_loss(2 * model(x[t]), y[t]) for t in range(4)])
    torch.testing.assert_close(doubled, want)
    assert not torch.allclose(before, doubled)
    for register in (lambda: model[1].register_full_backward_hook(lambda *args: None),
                     lambda: nn.modules.module.register_module_forward_hook(lambda *args: None),
                     lambda: model[0].register_forward_pre_hook(lambda *args: None)):
        handle = register()
        try:
            assert not fns.mlp.usable()
        finally:
            handle.remove()
        assert fns.mlp.usable()


def float64_batch(T, d, seed):
    """(support_x, support_y, query_x, query_y) of T tasks, d input features, 4 support
    and 3 query points."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    return r(T, 4, d), r(T, 4, 1), r(T, 3, d), r(T, 3, 1)


def assert_same_without_the_batched_mlp(learner, batch):
    assert learner.fns.mlp is not None
    got = flat_grads(learner, learner.meta_loss(*batch))
    learner.fns.mlp = None
    want = flat_grads(learner, learner.meta_loss(*batch))
    assert all(rel_err(a, b) <= TOL for a, b in zip(got, want))


@pytest.mark.parametrize("first_order", [False, True])
def test_learners_meta_gradient_is_the_same_without_the_batched_mlp(first_order):
    """MAML's per-task steps, TreeMAML's per-node steps and the ragged tree's weighted
    node steps give the same meta-gradient with BatchedMLP as through vmap (float64)."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(1, 6), nn.ReLU(), nn.Linear(6, 5), nn.Tanh(),
                          nn.Linear(5, 1)).double()
    batch = float64_batch(6, 1, seed=2)
    learners = [MAML(model, inner_lr=0.2, inner_steps=2, first_order=first_order),
                TreeMAML(model, TaskTree.from_labels([[0, 0, 0, 1, 1, 1]]), inner_lr=0.2,
                         inner_steps=2, first_order=first_order, factored="never"),
                TreeMAML(model, TaskTree.from_labels([[0, 0, 0, 0, 1, 2]]), inner_lr=0.2,
                         inner_steps=2, first_order=first_order, factored="never")]
    for learner in learners:
        assert_same_without_the_batched_mlp(learner, batch)


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("labels", [[[0] * 8], [[0, 0, 0, 0, 1, 1, 1, 1]],
                                    [[0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 2, 2, 3, 3]],
                                    [[0, 0, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 2, 2, 3, 3]]])
def test_factored_leaves_are_the_same_without_the_batched_mlp(first_order, labels):
    """The factored leaf phase (factored.FactoredLinears) on BatchedMLP equals its
    vmapped form: at shared parameters (flat tree, or node steps from the root) and at
    nodes' weights shared by blocks of tasks (after a ragged level) (float64)."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(2, 7), nn.Tanh(), nn.Linear(7, 6), nn.ReLU(),
                          nn.Linear(6, 1)).double()
    learner = TreeMAML(model, TaskTree.from_labels(labels), inner_lr=0.2, inner_steps=3,
                       first_order=first_order, lr_mode="per_step", factored="always")
    assert_same_without_the_batched_mlp(learner, float64_batch(8, 2, seed=6))


def _graph_nodes(t):
    seen, stack = set(), [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(n for n, _ in node.next_functions)
    return {node.name() for node in seen}


@pytest.mark.parametrize("first_order", [False, True])
def test_relu_forms_give_the_meta_gradient_of_the_product_then_relu(first_order):
    """Linear layers followed by ReLU run the products' ReLU forms (outer_relu for the
    one-feature input layer, bmm_nt_relu for the hidden one); with ``relu_forms = False``
    (bench/ab_meta.py's ``--off relu-forms``) the product, then torch.relu: the same
    meta-gradient for per-task steps, node steps and factored leaves, whose factored
    layers keep torch.relu (float64)."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(1, 7), nn.ReLU(), nn.Linear(7, 6), nn.ReLU(),
                          nn.Linear(6, 1)).double()
    batch = float64_batch(8, 1, seed=3)
    tree = TaskTree.from_labels([[0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 2, 2, 3, 3]])
    learners = [MAML(model, inner_lr=0.2, inner_steps=2, first_order=first_order),
                TreeMAML(model, tree, inner_lr=0.2, inner_steps=3, first_order=first_order,
                         factored="never"),
                TreeMAML(model, tree, inner_lr=0.2, inner_steps=3, first_order=first_order,
                         factored="always")]
    for learner in learners:
        loss = learner.meta_loss(*batch)
        forms = {"OuterBiasRelu", "NTBiasRelu"} <= {n.split("::")[-1].rstrip(">")
                                                    for n in _graph_nodes(loss)}
        assert forms == (learner.factored.mode != "always")
        got = flat_grads(learner, loss)
        learner.fns.mlp.relu_forms = False
        loss = learner.meta_loss(*batch)
        assert not any("Relu>" in n for n in _graph_nodes(loss))
        want = flat_grads(learner, loss)
        assert all(rel_err(a, b) <= TOL for a, b in zip(got, want))


@pytest.mark.parametrize("depth", [1, 2])
def test_per_task_losses_equal_the_vmapped_loss(depth):
    """The mean squared error as one elementwise loss and a mean per task equals
    vmap(F.mse_loss), values and second derivatives; other losses, and an MSE of
    broadcast shapes, go through vmap."""
    g = torch.Generator().manual_seed(8)
    out = torch.randn(3, 2, 4, 1, generator=g, dtype=torch.float64, requires_grad=True)
    out = out if depth == 2 else out.reshape(6, 4, 1)
    y = torch.randn(out.shape, generator=g, dtype=torch.float64)
    vmapped = F.mse_loss
    for _ in range(depth):
        vmapped = torch.func.vmap(vmapped)
    got, want = per_task_losses(F.mse_loss, out, y, depth), vmapped(out, y)
    assert got.shape == out.shape[:depth]
    torch.testing.assert_close(got, want, rtol=1e-14, atol=0)
    w = torch.randn(got.shape, generator=g, dtype=torch.float64)
    g1, = torch.autograd.grad((got * w).sum(), out, create_graph=True)
    g2, = torch.autograd.grad((want * w).sum(), out, create_graph=True)
    torch.testing.assert_close(g1, g2, rtol=1e-14, atol=0)
    torch.testing.assert_close(torch.autograd.grad(g1.pow(2).sum(), out)[0],
                               torch.autograd.grad(g2.pow(2).sum(), out)[0], rtol=1e-13, atol=0)
    huber = per_task_losses(F.huber_loss, out, y, depth)
    torch.testing.assert_close(huber, torch.stack([F.huber_loss(o, t) for o, t in
                                                   zip(out.reshape(-1, 4, 1), y.reshape(-1, 4, 1))])
                               .reshape(out.shape[:depth]))
    flat_y = y.squeeze(-1)   # [.., 4] against [.., 4, 1]: F.mse_loss broadcasts per task
    with pytest.warns(UserWarning):
        torch.testing.assert_close(per_task_losses(F.mse_loss, out, flat_y, depth),
                                   vmapped(out, flat_y))

