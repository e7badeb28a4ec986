"""The main job: MAML, TreeMAML, Learned TreeMAML and Reptile on hierarchical regression.

``python -m treepool demo`` trains every method with the same budget (meta-steps,
inner steps, tasks per meta-batch, network, outer optimizer, seeds) on a synthetic
family of 1-D regression tasks that sit at the leaves of a depth-3 tree, then prints
the final query MSE (mean and spread over seeds) and the time per meta-step.

The task family (:class:`HierarchicalRegression`). Every meta-batch draws a fresh
tree of related functions,

    f_t(x) = v_t[0] sin(x) + v_t[1] cos(x) + v_t[2] + v_t[3] x / 5,
    v_t    = v_root + v_{level 1} + v_{level 2} + v_leaf,

each term Gaussian with its own scale (large near the root, small at the leaves), with
B_1 x B_2 x B_3 leaves (default 4 x 4 x 4 = 64 tasks).  Every task has K noisy support
points (default 5) and held-out query points.  Tasks related through the tree share
most of their function, which a few noisy points per task cannot pin down alone:
TreeMAML pools the gradients of the tasks of a cluster at the first inner steps.

Evaluation uses fresh meta-batches from the same family (a separate generator, the
same for every method), adapts on their support sets with the method's own inner
loop, and measures the MSE on held-out query points against the noise-free function.
TreeMAML gets the true tree of each batch (it is part of its input); Learned TreeMAML
clusters the tasks from their gradients; MAML and Reptile adapt each task alone.
Task t of every batch sits at the same place of the tree (its functions are fresh), so
Learned TreeMAML accumulates the similarity of the tasks' gradients over the training
batches (``affinity_momentum``) and evaluates with the tree cut from it.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import time
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from .info import allocator, keep_freed_memory
from .meta import MAML, LearnedTreeMAML, Reptile, TreeMAML
from .tree import TaskTree

__all__ = ["FamilyConfig", "HierarchicalRegression", "DemoConfig", "run_demo", "main"]


# ----------------------------------------------------------------------------- task family


@dataclasses.dataclass
class FamilyConfig:
    branching: Tuple[int, int, int] = (4, 4, 4)
    shots: int = 5                     # support points per task
    queries: int = 25                  # query points per task
    noise: float = 0.5                 # std of the observation noise on support and query
    scales: Tuple[float, float, float, float] = (1.0, 1.0, 0.6, 0.15)  # root, level 1, level 2, leaf
    mean: Tuple[float, float, float, float] = (1.0, 0.0, 0.0, 0.0)
    x_range: float = 5.0


class HierarchicalRegression:
    """Meta-batches of 1-D regression tasks at the leaves of a depth-3 tree of functions."""

    def __init__(self, cfg: FamilyConfig, device="cpu", dtype=torch.float32):
        self.cfg = cfg
        self.device = torch.device(device)
        self.dtype = dtype
        b1, b2, b3 = cfg.branching
        self.num_tasks = b1 * b2 * b3
        t = torch.arange(self.num_tasks)
        self.level1 = t // (b2 * b3)
        self.level2 = t // b3
        self.tree = TaskTree.from_labels([self.level1.tolist(), self.level2.tolist()])

    def coefficients(self, g: torch.Generator) -> Tensor:
        """[T, 4] function coefficients of one fresh tree."""
        c = self.cfg
        b1, b2, _ = c.branching
        s0, s1, s2, s3 = c.scales
        root = torch.tensor(c.mean, dtype=torch.float64) + s0 * torch.randn(4, generator=g, dtype=torch.float64)
        l1 = s1 * torch.randn(b1, 4, generator=g, dtype=torch.float64)
        l2 = s2 * torch.randn(b1 * b2, 4, generator=g, dtype=torch.float64)
        leaf = s3 * torch.randn(self.num_tasks, 4, generator=g, dtype=torch.float64)
        return root + l1[self.level1] + l2[self.level2] + leaf

    @staticmethod
    def function(v: Tensor, x: Tensor) -> Tensor:
        """f_v(x) for v [T, 4] and x [T, n, 1] -> [T, n, 1]."""
        v = v[:, None, :]
        return (v[..., 0:1] * torch.sin(x) + v[..., 1:2] * torch.cos(x) + v[..., 2:3]
                + v[..., 3:4] * x / 5)

    def sample(self, g: torch.Generator) -> Dict[str, Tensor]:
        """One meta-batch: support/query inputs and noisy targets, and clean query targets."""
        c = self.cfg
        T = self.num_tasks
        v = self.coefficients(g)
        x = (torch.rand(T, c.shots + c.queries, 1, generator=g, dtype=torch.float64) * 2 - 1) * c.x_range
        clean = self.function(v, x)
        noisy = clean + c.noise * torch.randn(clean.shape, generator=g, dtype=torch.float64)
        out = {"support_x": x[:, :c.shots], "support_y": noisy[:, :c.shots],
               "query_x": x[:, c.shots:], "query_y": noisy[:, c.shots:],
               "query_clean": clean[:, c.shots:]}
        return {k: t.to(device=self.device, dtype=self.dtype) for k, t in out.items()}


# ----------------------------------------------------------------------------- methods


@dataclasses.dataclass
class DemoConfig:
    steps: int = 600
    seeds: int = 3
    inner_steps: int = 3
    inner_lr: float = 0.02
    lr_mode: str = "per_step"
    outer_lr: float = 2e-3
    hidden: int = 40
    first_order: bool = False
    eval_batches: int = 4
    curve_points: int = 12
    branching_learned: int = 4
    # Learned TreeMAML's clustering (see LearnedTreeMAML): the centered similarity of the
    # gradients at theta, averaged over all meta-batches seen (task t of every batch sits
    # at the same place in the family's tree)
    learned_signal: str = "root_gradient"
    learned_center: bool = True
    learned_momentum: Optional[float] = 1.0
    device: str = "cpu"
    threads: Optional[int] = 1         # torch intra-op threads on CPU (None: leave as is)
    methods: Tuple[str, ...] = ("MAML", "TreeMAML", "Learned TreeMAML", "Reptile")
    family: FamilyConfig = dataclasses.field(default_factory=FamilyConfig)


def make_net(hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 1))


class _Method:
    """One learner + its outer optimizer, with a common train/eval interface."""

    def __init__(self, name: str, cfg: DemoConfig, family: HierarchicalRegression, seed: int):
        torch.manual_seed(seed)
        net = make_net(cfg.hidden).to(family.device)
        self.name = name
        if name == "MAML":
            self.learner = MAML(net, inner_lr=cfg.inner_lr, inner_steps=cfg.inner_steps,
                                lr_mode=cfg.lr_mode, first_order=cfg.first_order)
        elif name == "TreeMAML":
            self.learner = TreeMAML(net, family.tree, inner_lr=cfg.inner_lr, lr_mode=cfg.lr_mode,
                                    first_order=cfg.first_order, inner_steps=cfg.inner_steps)
        elif name == "Learned TreeMAML":
            self.learner = LearnedTreeMAML(net, family.tree.depth, branching=cfg.branching_learned,
                                           signal=cfg.learned_signal, center=cfg.learned_center,
                                           affinity_momentum=cfg.learned_momentum,
                                           inner_lr=cfg.inner_lr, lr_mode=cfg.lr_mode,
                                           first_order=cfg.first_order, inner_steps=cfg.inner_steps)
        elif name == "Reptile":
            self.learner = Reptile(net, inner_lr=cfg.inner_lr, inner_steps=cfg.inner_steps)
        else:
            raise ValueError(f"unknown method {name!r}")
        self.learner.to(family.device)
        self.opt = torch.optim.Adam(self.learner.parameters(), lr=cfg.outer_lr)

    def train_step(self, batch: Dict[str, Tensor]) -> float:
        self.opt.zero_grad(set_to_none=True)
        if isinstance(self.learner, Reptile):
            phi = self.learner.outer_grad(batch["support_x"], batch["support_y"])
            with torch.no_grad():
                loss = self.learner.task_losses(phi, batch["query_x"], batch["query_y"]).mean()
        else:
            loss = self.learner.meta_loss(batch["support_x"], batch["support_y"],
                                          batch["query_x"], batch["query_y"])
            loss.backward()
            loss = loss.detach()
        self.opt.step()
        return loss.item()

    def evaluate(self, batches: List[Dict[str, Tensor]], family=None) -> float:
        """Mean query MSE against the noise-free function after adaptation. With
        ``family``, also records how well a learned tree matches the true one."""
        total = 0.0
        self.tree_ari = []
        for b in batches:
            # eval mode: Learned TreeMAML clusters with the similarity accumulated in
            # training and does not fold the evaluation tasks into it
            self.learner.eval()
            try:
                with torch.no_grad():
                    phi = self.learner.adapt(b["support_x"], b["support_y"])
                    pred = self.learner.predict(phi, b["query_x"])
            finally:
                self.learner.train()
            total += float(F.mse_loss(pred, b["query_clean"]))
            if family is not None and isinstance(self.learner, LearnedTreeMAML):
                grown = self.learner.last_tree
                self.tree_ari.append([adjusted_rand_index(grown.labels(lv), true)
                                      for lv, true in ((1, family.level1), (2, family.level2))])
        return total / len(batches)


def adjusted_rand_index(a: Tensor, b: Tensor) -> float:
    """Adjusted Rand index of two partitions given as label vectors (1: identical, ~0: chance)."""
    a = torch.unique(a.cpu(), return_inverse=True)[1]
    b = torch.unique(b.cpu(), return_inverse=True)[1]
    n = a.numel()
    table = torch.zeros(int(a.max()) + 1, int(b.max()) + 1, dtype=torch.float64)
    table.index_put_((a, b), torch.ones(n, dtype=torch.float64), accumulate=True)

    def pairs(x):
        return float((x * (x - 1) / 2).sum())

    both, rows, cols, total = pairs(table), pairs(table.sum(1)), pairs(table.sum(0)), n * (n - 1) / 2
    expected = rows * cols / total if total else 0.0
    top = (rows + cols) / 2
    return 1.0 if top == expected else (both - expected) / (top - expected)


# ----------------------------------------------------------------------------- runner


def run_demo(cfg: DemoConfig, progress=sys.stderr) -> Dict[str, dict]:
    """Train and evaluate every method for every seed. Returns per-method results.

    ``progress``: the stream of the tqdm progress bar, drawn only when it is a terminal."""
    family = HierarchicalRegression(cfg.family, device=cfg.device)
    threads = torch.get_num_threads()
    if cfg.threads is not None and not cfg.device.startswith("cuda"):
        # Every op here is tiny (64 tasks x ~1.8k parameters): intra-op threads gain
        # nothing and, on a busy 2-core machine, their spin-waits cost 10x.
        torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg, family, progress)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: DemoConfig, family: HierarchicalRegression, progress) -> Dict[str, dict]:
    results: Dict[str, dict] = {m: {"final": [], "ms": [], "curves": [], "tree_ari": []}
                                for m in cfg.methods}
    curve_every = max(1, cfg.steps // max(cfg.curve_points, 1))
    # One bar over every method x seed x meta-step. disable=None: tqdm writes nothing
    # at all when the stream is not a terminal, so logs and pipes get no escape codes.
    with tqdm(total=cfg.steps * cfg.seeds * len(cfg.methods), file=progress, disable=None,
              unit="step", dynamic_ncols=True) as bar:
        for seed in range(cfg.seeds):
            # the same training batches and evaluation tasks for every method of this seed
            eval_gen = torch.Generator().manual_seed(10_000 + seed)
            eval_batches = [family.sample(eval_gen) for _ in range(cfg.eval_batches)]
            curve_batches = eval_batches[:max(1, cfg.eval_batches // 2)]
            for name in cfg.methods:
                method = _Method(name, cfg, family, seed)
                bar.set_description(f"{name} seed {seed + 1}/{cfg.seeds}", refresh=False)
                gen = torch.Generator().manual_seed(seed)
                curve: List[Tuple[int, float]] = [(0, method.evaluate(curve_batches))]
                elapsed = 0.0
                for step in range(1, cfg.steps + 1):
                    batch = family.sample(gen)
                    if cfg.device.startswith("cuda"):
                        torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    loss = method.train_step(batch)
                    if cfg.device.startswith("cuda"):
                        torch.cuda.synchronize()
                    elapsed += time.perf_counter() - t0
                    if step % curve_every == 0 or step == cfg.steps:
                        curve.append((step, method.evaluate(curve_batches)))
                    bar.set_postfix_str(f"train query loss {loss:.4f}", refresh=False)
                    bar.update(1)
                results[name]["final"].append(method.evaluate(eval_batches, family))
                results[name]["tree_ari"].extend(method.tree_ari)
                results[name]["ms"].append(1000 * elapsed / cfg.steps)
                results[name]["curves"].append(curve)
    return results


def _mean_std(values: List[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    mean = math.fsum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1))


def format_table(results: Dict[str, dict], cfg: DemoConfig) -> str:
    fam = cfg.family
    T = math.prod(fam.branching)
    lines = [
        f"hierarchical regression: {T} tasks per meta-batch (tree {' x '.join(map(str, fam.branching))}, "
        f"scales {' '.join(f'{v:g}' for v in fam.scales)}), "
        f"{fam.shots}-shot support, {fam.queries} query points, noise {fam.noise}",
        f"budget per method: {cfg.steps} meta-steps x {cfg.seeds} seeds, {cfg.inner_steps} inner steps, "
        f"inner lr {cfg.inner_lr} ({cfg.lr_mode}), Adam {cfg.outer_lr}, MLP 1-{cfg.hidden}-{cfg.hidden}-1, "
        f"{'first' if cfg.first_order else 'second'}-order",
        f"final query MSE: fresh tasks ({cfg.eval_batches} x {T}), held-out points, noise-free targets",
        "",
        f"{'method':<20} {'final query MSE':>22} {'ms / meta-step':>16}",
        f"{'-' * 20} {'-' * 22} {'-' * 16}",
    ]
    for name, r in results.items():
        fin = r["final"]
        ms = statistics.fmean(r["ms"])
        if all(math.isfinite(v) and v < 1e6 for v in fin):
            mean, std = _mean_std(fin)
            cell = f"{mean:.4f} +- {std:.4f}"
        else:
            cell = f"diverged ({sum(not (math.isfinite(v) and v < 1e6) for v in fin)}/{len(fin)})"
        lines.append(f"{name:<20} {cell:>22} {ms:>16.1f}")
    for name, r in results.items():
        if r["tree_ari"]:
            ari = torch.tensor(r["tree_ari"], dtype=torch.float64).mean(0).tolist()
            lines.append(f"{name}: agreement of the grown tree with the true tree on the "
                         f"evaluation tasks (adjusted Rand index, 1 = identical, 0 = chance): "
                         f"level 1 {ari[0]:.2f}, level 2 {ari[1]:.2f}")
    return "\n".join(lines)


def plot_curves(results: Dict[str, dict], path: str) -> bool:
    """Learning curves (eval query MSE vs meta-step, mean over seeds) to a PNG; False
    when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, r in results.items():
        curves = r["curves"]
        steps = [s for s, _ in curves[0]]
        vals = [statistics.fmean(c[i][1] for c in curves) for i in range(len(steps))]
        ax.plot(steps, vals, marker="o", markersize=3, label=name)
    ax.set_xlabel("meta-step")
    ax.set_ylabel("query MSE after adaptation (fresh tasks)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=None, help="meta-steps per method and seed")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--plot", default="demo_curves.png",
                        help="PNG of the learning curves (needs matplotlib); '' to skip")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the ops are too small to gain from more)")
    parser.add_argument("--first-order", action="store_true", help="first-order MAML / TreeMAML")
    parser.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction, default=True,
                        help="tell glibc's malloc to keep freed memory (default; see README, "
                             "'Memory allocator'): the large tensors of every meta-step "
                             "then stop faulting their pages back in")
    parser.add_argument("--quick", action="store_true",
                        help="tiny configuration for tests (a few seconds)")
    parser.add_argument("--scales", type=float, nargs=4, default=None,
                        metavar=("ROOT", "LEVEL1", "LEVEL2", "LEAF"),
                        help="std of the family's terms (default 1 1 0.6 0.15; a weaker "
                             "hierarchy: 1 0.5 0.3 0.3)")


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    cfg = DemoConfig(device=args.device, first_order=args.first_order, threads=args.threads)
    if args.quick:
        cfg = dataclasses.replace(cfg, steps=6, seeds=2, hidden=16, eval_batches=2, curve_points=2,
                                  family=FamilyConfig(branching=(2, 2, 2)))
    if getattr(args, "scales", None) is not None:
        if any(not math.isfinite(v) or v < 0 for v in args.scales):
            raise SystemExit("--scales must be 4 finite numbers >= 0")
        cfg.family = dataclasses.replace(cfg.family, scales=tuple(args.scales))
    if args.steps is not None:
        cfg.steps = args.steps
    if args.seeds is not None:
        cfg.seeds = args.seeds
    if cfg.steps < 1 or cfg.seeds < 1:
        raise SystemExit("--steps and --seeds must be >= 1")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available in this torch build")
    return cfg


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if getattr(args, "keep_freed_memory", False):
        keep_freed_memory()   # this process is the demo's own: see the README
    start = time.perf_counter()
    results = run_demo(cfg)
    print(format_table(results, cfg))
    print(f"CPU allocator: {allocator()}")
    print()
    names = list(results)
    if "TreeMAML" in results and "MAML" in results:
        tree = _mean_std(results["TreeMAML"]["final"])[0]
        maml = _mean_std(results["MAML"]["final"])[0]
        verdict = "below" if tree < maml else "NOT below"
        print(f"TreeMAML's final query MSE is {verdict} MAML's ({tree:.4f} vs {maml:.4f}, "
              f"{100 * (maml - tree) / maml:+.1f}% relative to MAML).")
    if args.plot:
        if plot_curves(results, args.plot):
            print(f"learning curves written to {args.plot}")
        else:
            print("matplotlib is not installed: learning-curve plot skipped")
    print(f"total wall time {time.perf_counter() - start:.1f}s ({len(names)} methods x {cfg.seeds} seeds)")
    return 0
