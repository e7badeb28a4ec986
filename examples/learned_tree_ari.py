"""Which gradient signal reveals the task tree?  Adjusted Rand index of Learned TreeMAML's trees.

For the demo's family (:class:`treepool.demo.HierarchicalRegression`, 4 x 4 x 4 tasks,
scales 1, 1, 0.6, 0.15) and one with a weaker hierarchy (scales 1, 0.5, 0.3, 0.3: the
level-1 and level-2 terms are smaller and the leaves' own term twice as large), the
learner adapts on ``--batches`` fresh meta-batches in training mode (which updates a
running similarity where ``affinity_momentum`` is set), then grows the trees of
``--eval`` fresh batches in eval mode; the table gives the adjusted Rand index (1 =
identical, 0 = chance) of the grown level 1 and level 2 against the true ones, mean
over seeds.  The network is the demo's MLP at its initialization, or after
``--pretrain`` meta-steps of MAML.

Signals: the gradients of each inner step ('step', the paper's online top-down
clustering) or those at theta ('root'), raw cosine or centered within the cluster
being split; per batch or accumulated over batches (m = 1: the mean); and the
lookahead affinity of issue 5 (Fifty et al. 2020, :func:`lookahead_affinity`, at theta,
cut top-down by :meth:`TaskTree.from_affinity`).

    python examples/learned_tree_ari.py --quick
    python examples/learned_tree_ari.py            # 3 seeds, 200 batches (a few minutes)
"""

from __future__ import annotations

import argparse
import statistics
from typing import Dict, List

import torch

from treepool.demo import (DemoConfig, FamilyConfig, HierarchicalRegression, _Method,
                           adjusted_rand_index, make_net)
from treepool.meta import LearnedTreeMAML
from treepool.meta.transference import lookahead_affinity
from treepool.tree import TaskTree

FAMILIES = {"demo": FamilyConfig(), "weak": FamilyConfig(scales=(1.0, 0.5, 0.3, 0.3))}
VARIANTS = {  # name: (signal, center, momentum)
    "step, raw, per batch (paper; old default)": ("step_gradient", False, None),
    "step, centered, per batch": ("step_gradient", True, None),
    "root, centered, per batch": ("root_gradient", True, None),
    "step, centered, accumulated m=1": ("step_gradient", True, 1.0),
    "root, raw, accumulated m=1": ("root_gradient", False, 1.0),
    "root, centered, accumulated m=0.99": ("root_gradient", True, 0.99),
    "root, centered, accumulated m=1 (demo)": ("root_gradient", True, 1.0),
}


def _ari(tree: TaskTree, fam: HierarchicalRegression) -> List[float]:
    return [adjusted_rand_index(tree.labels(1), fam.level1),
            adjusted_rand_index(tree.labels(2), fam.level2)]


def measure(family: str, variant: str, seed: int, batches: int, evals: int,
            pretrain: int) -> List[float]:
    fam = HierarchicalRegression(FAMILIES[family])
    torch.manual_seed(seed)
    if pretrain:
        method = _Method("MAML", DemoConfig(family=fam.cfg), fam, seed)
        g = torch.Generator().manual_seed(seed)
        for _ in range(pretrain):
            method.train_step(fam.sample(g))
        net = method.learner.model
    else:
        net = make_net(40)
    g = torch.Generator().manual_seed(100 + seed)
    eval_g = torch.Generator().manual_seed(10_000 + seed)
    if variant == "lookahead, accumulated m=1":
        acc = None
        for n in range(1, batches + 1):
            b = fam.sample(g)
            z = lookahead_affinity(net, b["support_x"], b["support_y"], lr=0.02).double()
            acc = z if acc is None else acc + (z - acc) / n
        tree = TaskTree.from_affinity(acc, 3, branching=fam.cfg.branching[0])
        return _ari(tree, fam)
    if variant == "lookahead, per batch":
        out = []
        for _ in range(evals):
            b = fam.sample(eval_g)
            z = lookahead_affinity(net, b["support_x"], b["support_y"], lr=0.02)
            out.append(_ari(TaskTree.from_affinity(z, 3, branching=fam.cfg.branching[0]), fam))
        return [statistics.fmean(v) for v in zip(*out)]
    signal, center, momentum = VARIANTS[variant]
    learner = LearnedTreeMAML(net, 3, branching=fam.cfg.branching[0], inner_lr=0.02,
                              signal=signal, center=center, affinity_momentum=momentum)
    if momentum is not None:
        learner.train()
        for _ in range(batches):
            b = fam.sample(g)
            with torch.no_grad():
                learner.adapt(b["support_x"], b["support_y"])
    learner.eval()
    out = []
    for _ in range(evals):
        b = fam.sample(eval_g)
        with torch.no_grad():
            learner.adapt(b["support_x"], b["support_y"])
        out.append(_ari(learner.last_tree, fam))
    return [statistics.fmean(v) for v in zip(*out)]


def main(argv=None) -> Dict[str, Dict[str, List[float]]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--batches", type=int, default=200, help="training batches accumulated")
    p.add_argument("--eval", type=int, default=4, help="evaluation batches")
    p.add_argument("--pretrain", type=int, default=0, help="MAML meta-steps before measuring")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.batches, args.eval = 1, 20, 2
    torch.set_num_threads(1)
    variants = list(VARIANTS) + ["lookahead, per batch", "lookahead, accumulated m=1"]
    table: Dict[str, Dict[str, List[float]]] = {}
    print(f"adjusted Rand index of grown level 1 / level 2 vs the true tree; {args.seeds} seeds, "
          f"{args.batches} training batches, {args.eval} evaluation batches, "
          f"network {'after %d MAML steps' % args.pretrain if args.pretrain else 'at init'}")
    print(f"{'signal':<42} " + " ".join(f"{f:>14}" for f in FAMILIES))
    for v in variants:
        row = {}
        for f in FAMILIES:
            vals = [measure(f, v, s, args.batches, args.eval, args.pretrain) for s in range(args.seeds)]
            row[f] = [statistics.fmean(x) for x in zip(*vals)]
        table[v] = row
        print(f"{v:<42} " + " ".join(f"{row[f][0]:>6.2f} / {row[f][1]:<5.2f}" for f in FAMILIES),
              flush=True)
    return table


if __name__ == "__main__":
    main()
