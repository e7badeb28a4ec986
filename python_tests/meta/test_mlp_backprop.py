"""mlp_backprop.first_order_grads, the first-order inner step of a plain MLP by
backpropagation written out, against autograd on a per-row loop, and the learners
that fall back to autograd where it does not apply."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from treepool import MAML, TaskTree, TreeMAML
from treepool.meta import mlp_backprop
from treepool.meta.batched_mlp import BatchedMLP

from .test_batched_mlp import assert_same_without_the_batched_mlp, float64_batch, mlps
from .test_maml import TOL, flat_grads, rel_err


FIRST_ORDER_ACTIVATIONS = [nn.ReLU, nn.Tanh, nn.Sigmoid, nn.Identity, lambda: nn.LeakyReLU(0.2)]


@given(case=mlps(FIRST_ORDER_ACTIVATIONS, stacked=True), B=st.integers(1, 3),
       depth=st.sampled_from([1, 2]),
       shared=st.booleans(), weighted=st.booleans(),
       loss=st.sampled_from([F.mse_loss, F.l1_loss, F.smooth_l1_loss]),
       adapt=st.sampled_from(["all", "weights", "biases", "last"]), seed=st.integers(0, 1000))
def test_first_order_grads_equal_a_per_row_autograd_loop(case, B, depth, shared, weighted, loss,
                                                          adapt, seed):
    """mlp_backprop.first_order_grads (backpropagation written out, activations in place)
    equals autograd on a loop over the rows: per task (depth 1), per node of m tasks
    (the mean of their losses, or a weighted sum), at shared or per-row parameters, for
    any adapted subset, stacked activations and a final activation; the inputs and
    parameters are left as they were (float64)."""
    model, widths = case
    model = model.double()
    torch.manual_seed(seed)
    last_layer = list(dict(model.named_parameters()))[-1].rsplit(".", 1)[0]
    names = [n for n, _ in model.named_parameters()
             if adapt == "all" or (adapt == "weights" and n.endswith("weight"))
             or (adapt == "biases" and n.endswith("bias"))
             or (adapt == "last" and n.rsplit(".", 1)[0] == last_layer)]
    if not names:  # biases only, and no layer has one
        return
    m = 3
    lead = (B, m) if depth == 2 else (B,)
    x = torch.randn(*lead, 4, widths[0], dtype=torch.float64)
    y = torch.randn(*lead, 4, widths[-1], dtype=torch.float64)
    weights = torch.rand(B, m, dtype=torch.float64) if weighted and depth == 2 else None
    params = {n: (p.detach().clone() if shared else p.detach() + 0.1 * torch.randn(B, *p.shape,
                                                                                   dtype=p.dtype))
              for n, p in model.named_parameters() if n in names}
    before = {n: p.clone() for n, p in params.items()}, x.clone()
    got = mlp_backprop.first_order_grads(BatchedMLP.of(model), params, x, y, loss, shared,
                                         depth, weights)
    assert got is not None and list(got) == names
    for b in range(B):
        p_b = {n: (p if shared else p[b]).clone().requires_grad_() for n, p in params.items()}
        losses = [loss(torch.func.functional_call(model, p_b, (xt,)), yt)
                  for xt, yt in zip(x[b].reshape(-1, 4, widths[0]), y[b].reshape(-1, 4, widths[-1]))]
        scale = weights[b] if weights is not None else torch.full(
            (len(losses),), 1.0 / len(losses) if depth == 2 else 1.0, dtype=torch.float64)
        total = sum(s * l for s, l in zip(scale, losses))
        want = torch.autograd.grad(total, list(p_b.values()), allow_unused=True)
        for n, w in zip(p_b, want):
            torch.testing.assert_close(got[n][b], torch.zeros_like(got[n][b]) if w is None else w,
                                       rtol=1e-10, atol=1e-12)
    assert all(torch.equal(params[n], before[0][n]) for n in params) and torch.equal(x, before[1])


def test_first_order_grads_leave_other_activations_to_autograd():
    """An activation whose derivative is not written from its output (GELU), or a
    LeakyReLU of negative slope (y > 0 is then not z > 0), gives None: the caller takes
    the autograd pass; the learners' first-order gradients still equal vmap's."""
    for act in (nn.GELU(), nn.LeakyReLU(-0.5)):
        model = nn.Sequential(nn.Linear(2, 3), act, nn.Linear(3, 1)).double()
        params = {n: p.detach() for n, p in model.named_parameters()}
        x, y = torch.randn(4, 5, 2, dtype=torch.float64), torch.randn(4, 5, 1, dtype=torch.float64)
        assert mlp_backprop.first_order_grads(BatchedMLP.of(model), params, x, y, F.mse_loss,
                                             True, 1) is None
        learner = MAML(model, inner_lr=0.2, inner_steps=2, first_order=True)
        assert_same_without_the_batched_mlp(learner, float64_batch(6, 2, seed=3))


def test_learners_meta_gradient_is_autograds_with_the_pass_switched_off():
    """With ``fns.written_out = False`` the first-order steps take autograd's pass (as
    bench/ab_meta.py's ``--off written-out``) and give the same meta-gradient: per-task
    steps, equal and ragged (weighted) node steps, factored leaves with node steps
    (float64)."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(2, 7), nn.Tanh(), nn.Linear(7, 6), nn.ReLU(),
                          nn.Linear(6, 1)).double()
    batch = float64_batch(8, 2, seed=4)
    learners = [MAML(model, inner_lr=0.2, inner_steps=2, first_order=True),
                TreeMAML(model, TaskTree.from_labels([[0, 0, 0, 0, 1, 1, 1, 1]]), inner_lr=0.2,
                         inner_steps=2, first_order=True, factored="never"),
                TreeMAML(model, TaskTree.from_labels([[0, 0, 0, 0, 0, 0, 1, 2]]), inner_lr=0.2,
                         inner_steps=2, first_order=True, factored="never"),
                TreeMAML(model, TaskTree.from_labels([[0, 0, 0, 0, 1, 1, 1, 1],
                                                      [0, 0, 1, 1, 2, 2, 3, 3]]),
                         inner_lr=0.2, inner_steps=3, first_order=True, factored="always")]
    for learner in learners:
        got = flat_grads(learner, learner.meta_loss(*batch))
        learner.fns.written_out = False
        want = flat_grads(learner, learner.meta_loss(*batch))
        assert all(rel_err(a, b) <= TOL for a, b in zip(got, want))
