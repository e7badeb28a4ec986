"""Sine-wave regression with MAML, as in learn2learn's example (Finn et al. 2017, section 5.1).

A task is y = A sin(x + phi) with amplitude A ~ U[0.1, 5] and phase phi ~ U[0, pi],
x ~ U[-5, 5]; K support points adapt a 1-40-40-1 ReLU MLP, K query points score it.
The learner holds the model: Adam on ``learner.parameters()`` moves the model's own
weights (no copy to sync), and ``learner.adapt(..., steps=10)`` adapts longer at test
time than in training.

    python examples/sine_maml.py            # full run (a few minutes on 2 CPU cores)
    python examples/sine_maml.py --quick    # a few meta-steps, seconds
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

import treepool


def sine_tasks(num_tasks: int, shots: int, generator: torch.Generator, device="cpu"):
    """support_x, support_y, query_x, query_y, each [T, shots, 1]."""
    amp = torch.empty(num_tasks, 1, 1).uniform_(0.1, 5.0, generator=generator)
    phase = torch.empty(num_tasks, 1, 1).uniform_(0.0, math.pi, generator=generator)
    x = torch.empty(num_tasks, 2 * shots, 1).uniform_(-5.0, 5.0, generator=generator)
    y = amp * torch.sin(x + phase)
    x, y = x.to(device), y.to(device)
    return x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:]


def query_mse(learner, batch, steps=None) -> float:
    """Mean query MSE after adapting on the support set (no meta-gradient)."""
    sx, sy, qx, qy = batch
    with torch.no_grad():
        adapted = learner.adapt(sx, sy, steps=steps)
        return learner.task_losses(adapted, qx, qy).mean().item()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=2000, help="meta-steps")
    parser.add_argument("--meta-batch", type=int, default=16, help="tasks per meta-step")
    parser.add_argument("--shots", type=int, default=10, help="support (and query) points per task")
    parser.add_argument("--inner-lr", type=float, default=0.01)
    parser.add_argument("--inner-steps", type=int, default=1)
    parser.add_argument("--meta-lr", type=float, default=1e-3)
    parser.add_argument("--first-order", action="store_true")
    parser.add_argument("--eval-tasks", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="a few meta-steps (for the tests)")
    args = parser.parse_args(argv)
    if args.quick:
        args.iterations, args.eval_tasks = 30, 32
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    model = nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(),
                          nn.Linear(40, 1)).to(args.device)
    learner = treepool.MAML(model, inner_lr=args.inner_lr, inner_steps=args.inner_steps,
                            first_order=args.first_order, loss_fn=F.mse_loss)
    opt = torch.optim.Adam(learner.parameters(), lr=args.meta_lr)

    eval_batch = sine_tasks(args.eval_tasks, args.shots, torch.Generator().manual_seed(10_000 + args.seed),
                            args.device)
    before = query_mse(learner, eval_batch)
    print(f"MAML sine: {args.iterations} meta-steps, {args.meta_batch} tasks x {args.shots} shots, "
          f"{args.inner_steps} inner step(s) at lr {args.inner_lr}")
    print(f"query MSE before meta-training:       {before:8.4f}")
    start = time.perf_counter()
    for it in range(1, args.iterations + 1):
        opt.zero_grad()
        loss = learner.meta_loss(*sine_tasks(args.meta_batch, args.shots, gen, args.device))
        loss.backward()
        opt.step()
        if not args.quick and it % max(1, args.iterations // 10) == 0:
            print(f"  step {it:5d}  meta-batch query MSE {loss.item():8.4f}")
    elapsed = time.perf_counter() - start
    after = query_mse(learner, eval_batch)
    longer = query_mse(learner, eval_batch, steps=10)
    print(f"query MSE after meta-training:        {after:8.4f}")
    print(f"query MSE after adapt(steps=10):      {longer:8.4f}")
    print(f"{1e3 * elapsed / args.iterations:.1f} ms / meta-step")
    # the model itself holds the meta-learned weights
    assert learner.model is model and model.state_dict()["0.weight"] is not None
    return {"before": before, "after": after, "adapt10": longer}


if __name__ == "__main__":
    main()
