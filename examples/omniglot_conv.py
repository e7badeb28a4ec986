"""Omniglot-style few-shot classification: MAML's 4-block conv net with BatchNorm.

The network is the one of Finn et al. (2017) for Omniglot: four blocks
conv3x3 - BatchNorm - ReLU - maxpool2 on 28x28 images, then a linear head, trained
with cross-entropy, 5-way 1-shot.  No download: the "characters" are synthesised here.
Every class is a few random pen strokes (quadratic curves) drawn from one of several
"alphabets" (classes of an alphabet share stroke statistics); every example of a class
is the class's strokes jittered, shifted, thickened and noised.

BatchNorm is the model's own: in training mode every task is normalised by its own
batch statistics (as in MAML's conv nets), and treepool's inner and outer loops leave
the running statistics untouched.  Evaluation therefore adapts in training mode too.

``--method treemaml`` groups the tasks of a meta-batch by alphabet (a depth-2
TaskTree: alphabet, then the task) so that the first inner step pools the gradients
of tasks of the same alphabet.

    python examples/omniglot_conv.py                     # MAML, full run (about 3 minutes on 2 CPU cores)
    python examples/omniglot_conv.py --method treemaml
    python examples/omniglot_conv.py --quick             # a few meta-steps, seconds
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

import treepool

SIZE = 28


# ----------------------------------------------------------------------------- data


class Characters:
    """Synthetic handwritten characters: ``num_alphabets`` alphabets of
    ``per_alphabet`` classes; a class is ``strokes`` quadratic Bezier strokes."""

    def __init__(self, num_alphabets: int, per_alphabet: int, strokes: int = 3, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.num_alphabets, self.per_alphabet = num_alphabets, per_alphabet
        # an alphabet's style: a centre and spread for its strokes' control points
        centre = 0.5 + 0.15 * (torch.rand(num_alphabets, 1, 1, 1, 2, generator=g) - 0.5)
        spread = 0.2 + 0.15 * torch.rand(num_alphabets, 1, 1, 1, 1, generator=g)
        pts = centre + spread * torch.randn(num_alphabets, per_alphabet, strokes, 3, 2, generator=g)
        self.controls = pts.clamp(0.1, 0.9)  # [A, C, strokes, 3 control points, xy]

    def render(self, alphabet: torch.Tensor, cls: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """One noisy example of each (alphabet, class) pair: [B, 1, 28, 28]."""
        B = alphabet.shape[0]
        ctrl = self.controls[alphabet, cls]                                  # [B, S, 3, 2]
        ctrl = ctrl + 0.03 * torch.randn(ctrl.shape, generator=g)           # handwriting jitter
        ctrl = ctrl + 0.05 * (torch.rand(B, 1, 1, 2, generator=g) - 0.5)    # position
        t = torch.linspace(0, 1, 16).view(1, 1, -1, 1)
        p0, p1, p2 = ctrl[:, :, 0:1], ctrl[:, :, 1:2], ctrl[:, :, 2:3]
        curve = ((1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2).reshape(B, -1, 2)
        grid = (torch.arange(SIZE) + 0.5) / SIZE
        gy, gx = torch.meshgrid(grid, grid, indexing="ij")
        d2 = (gx.reshape(1, 1, -1) - curve[..., :1]) ** 2 + (gy.reshape(1, 1, -1) - curve[..., 1:]) ** 2
        width = (0.025 + 0.015 * torch.rand(B, 1, 1, generator=g)) ** 2
        img = torch.exp(-d2.min(dim=1, keepdim=True).values / (2 * width)).view(B, 1, SIZE, SIZE)
        img = img + 0.1 * torch.randn(img.shape, generator=g)
        return img.clamp(0, 1)

    def tasks(self, num_tasks: int, ways: int, shots: int, queries: int, classes: range,
              g: torch.Generator, alphabets=None):
        """N-way K-shot tasks, each from one alphabet (``alphabets``: [T] ids, default random)
        and the classes of ``classes`` within it: support [T, ways*shots, 1, 28, 28] and
        labels [T, ways*shots]; query likewise with ``queries`` per class."""
        if alphabets is None:
            alphabets = torch.randint(self.num_alphabets, (num_tasks,), generator=g)
        chosen = torch.stack([torch.tensor(classes)[torch.randperm(len(classes), generator=g)[:ways]]
                              for _ in range(num_tasks)])                      # [T, ways]
        out = []
        for n in (shots, queries):
            labels = torch.arange(ways).repeat(n).expand(num_tasks, -1)      # [T, ways * n]
            cls = chosen.gather(1, labels)
            alpha = alphabets.view(-1, 1).expand_as(cls)
            x = self.render(alpha.reshape(-1), cls.reshape(-1), g)
            out += [x.view(num_tasks, ways * n, 1, SIZE, SIZE), labels.contiguous()]
        return tuple(out)


# ----------------------------------------------------------------------------- model


def conv_net(ways: int, hidden: int) -> nn.Module:
    """MAML's Omniglot network: 4 x (conv3x3, BatchNorm, ReLU, maxpool 2), linear head."""
    layers, channels = [], 1
    for _ in range(4):
        layers += [nn.Conv2d(channels, hidden, 3, padding=1), nn.BatchNorm2d(hidden), nn.ReLU(),
                   nn.MaxPool2d(2, ceil_mode=True)]
        channels = hidden
    # 28 -> 14 -> 7 -> 4 -> 2
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(hidden * 2 * 2, ways))


def accuracy(learner, batch, steps=None) -> float:
    sx, sy, qx, qy = batch
    with torch.no_grad():
        adapted = learner.adapt(sx, sy, steps=steps)
        logits = learner.predict(adapted, qx)          # [T, ways * queries, ways]
    return (logits.argmax(-1) == qy).double().mean().item()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=["maml", "treemaml"], default="maml")
    parser.add_argument("--iterations", type=int, default=150)
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--queries", type=int, default=5, help="query examples per class")
    parser.add_argument("--alphabets", type=int, default=8)
    parser.add_argument("--per-alphabet", type=int, default=30, help="classes per alphabet")
    parser.add_argument("--groups", type=int, default=4, help="alphabets per meta-batch")
    parser.add_argument("--tasks-per-group", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=32, help="conv channels (64 in the paper)")
    parser.add_argument("--inner-lr", type=float, default=0.1)
    parser.add_argument("--inner-steps", type=int, default=3)
    parser.add_argument("--meta-lr", type=float, default=1e-3)
    parser.add_argument("--first-order", action="store_true")
    parser.add_argument("--test-steps", type=int, default=5,
                        help="inner steps at meta-test time (more than in training)")
    parser.add_argument("--eval-tasks", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="a few small meta-steps (for the tests)")
    args = parser.parse_args(argv)
    if args.quick:
        args.iterations, args.hidden, args.eval_tasks, args.queries = 5, 8, 8, 2
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    chars = Characters(args.alphabets, args.per_alphabet, seed=args.seed)
    split = int(0.7 * args.per_alphabet)        # classes [0, split) meta-train, the rest meta-test
    train_classes, test_classes = range(split), range(split, args.per_alphabet)
    T = args.groups * args.tasks_per_group

    model = conv_net(args.ways, args.hidden)
    common = dict(inner_lr=args.inner_lr, inner_steps=args.inner_steps, first_order=args.first_order,
                  loss_fn=F.cross_entropy)
    if args.method == "maml":
        learner = treepool.MAML(model, **common)
        tree = None
    else:
        # level 1: the alphabet group of each task; level 2: the tasks
        groups = [t // args.tasks_per_group for t in range(T)]
        tree = treepool.TaskTree([groups, list(range(T))])
        learner = treepool.TreeMAML(model, tree, **common)
    opt = torch.optim.Adam(learner.parameters(), lr=args.meta_lr)

    def meta_batch():
        alphabets = torch.randperm(args.alphabets, generator=gen)[:args.groups]
        alphabets = alphabets.repeat_interleave(args.tasks_per_group)   # tasks grouped as the tree
        return chars.tasks(T, args.ways, args.shots, args.queries, train_classes, gen, alphabets)

    eval_gen = torch.Generator().manual_seed(10_000 + args.seed)
    eval_batch = chars.tasks(args.eval_tasks, args.ways, args.shots, args.queries, test_classes, eval_gen)
    # evaluation adapts each task alone (MAML's inner loop on the flat tree), in training
    # mode: BatchNorm normalises each task by its own statistics
    evaluator = treepool.MAML(model, **common)
    before = accuracy(evaluator, eval_batch)
    print(f"{args.method} on synthetic Omniglot: {args.ways}-way {args.shots}-shot, {T} tasks per "
          f"meta-batch, {args.iterations} meta-steps, conv {args.hidden} channels, BatchNorm")
    print(f"meta-test accuracy before meta-training: {before:.3f}  (chance {1 / args.ways:.3f})")
    stats = {n: b.clone() for n, b in model.named_buffers()}
    start = time.perf_counter()
    for it in range(1, args.iterations + 1):
        opt.zero_grad()
        loss = learner.meta_loss(*meta_batch())
        loss.backward()
        opt.step()
        if not args.quick and it % max(1, args.iterations // 10) == 0:
            print(f"  step {it:5d}  meta-batch query loss {loss.item():.4f}")
    elapsed = time.perf_counter() - start
    after = accuracy(evaluator, eval_batch)
    longer = accuracy(evaluator, eval_batch, steps=args.test_steps)
    print(f"meta-test accuracy after meta-training:  {after:.3f}")
    print(f"meta-test accuracy after adapt(steps={args.test_steps}): {longer:.3f}")
    print(f"{1e3 * elapsed / args.iterations:.0f} ms / meta-step")
    unchanged = all(torch.equal(stats[n], b) for n, b in model.named_buffers())
    print(f"BatchNorm running statistics untouched: {unchanged}")
    return {"before": before, "after": after, "adapt": longer, "running_stats_unchanged": unchanged}


if __name__ == "__main__":
    main()
