"""Shared pieces of the meta-learning tests (test_maml, test_reptile, ...): a tiny
float64 model, random task batches, and the model's loss at a flat parameter vector
split by hand (independent of FlatParams)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def make_model(seed=0, hidden=6):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, hidden), nn.Tanh(), nn.Linear(hidden, 1)).double()


def split(model, theta):
    out, a = {}, 0
    for name, p in model.named_parameters():
        out[name] = theta[a:a + p.numel()].view(p.shape)
        a += p.numel()
    return out


def task_loss(model, theta, x, y):
    return F.mse_loss(torch.func.functional_call(model, split(model, theta), (x,)), y)


def data(T, n=4, m=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return r(T, n, 2), r(T, n, 1), r(T, m, 2), r(T, m, 1)


def rel_err(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


