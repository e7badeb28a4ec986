"""End-to-end benchmark: one meta-step of MAML and TreeMAML, treepool against the
hand-written baselines of ``bench/baselines.py``.

A meta-step is the inner loop, the outer (query) loss, its backward (second or first
order) and an Adam step. Contenders, per family:

- MAML (3 inner steps, ``--maml-steps``): ``treepool`` (treepool.MAML), ``vmap``
  (torch.func MAML), ``loop`` (a Python loop over tasks, learn2learn style);
- TreeMAML (3 inner steps = the depth of a balanced tree with 4, then 16 clusters,
  then the leaves; capped at T): ``treepool`` (treepool.TreeMAML), ``vmap`` (each
  cluster's gradient computed once, vmap over the clusters of a level), ``loop`` (a
  Python loop over the clusters).

Cells: an MLP 1 -> width -> width -> 1 (MSE) at widths 40, 64, 256, 16/64/256 tasks,
5 and 10 shots (support and query points per task), second and first order; and the
Omniglot conv net (4 x [conv3x3 64 channels, ReLU, maxpool]; no BatchNorm; 28 x 28
inputs; 5-way 1-shot, 1 query image per class; cross-entropy) at 4, 16, 32 tasks.

Timing: every contender of a cell is built in this one process and timed INTERLEAVED:
each repetition times every contender once, in an order rotated by one per
repetition, with ``torch.utils.benchmark.Timer`` (``number`` meta-steps per
measurement, chosen once per contender so that a measurement lasts ``--min-time``;
the Timer runs 2 untimed steps just before each measurement, so a contender is timed
warm even right after another one).
Reported: min / median / max ms per meta-step over the repetitions, and for each
contender its ratio to the best (lowest median) hand-written baseline of its family:
the ratio of the medians, and the min-max of the per-repetition ratios (each taken
against the same repetition of that baseline). treepool meets the bar when its ratio
is at most 1.0x in every cell. Also reported: each contender's minor page faults per
meta-step (median): pages the step touched first since malloc took them from the OS,
mostly memory it had given back. With glibc's defaults they are a large share of some
cells (16% of treepool's conv step with 4 tasks, second order), and they depend on what
the other contenders of the process allocated; ``--keep-freed-memory`` runs the cells with
freed memory kept (README, "Memory allocator"), every contender alike.

``--threads N`` (default 1) sets torch's intra-op threads (torch.set_num_threads) for
the whole run: one thread per process is right for meta-steps this small on a small
machine (README, "Threads"; bench/RESULTS_meta.md, "Threads").

    python bench/bench_meta.py --json meta.json --plot meta.png   # the full grid, 30-45 min
    python bench/bench_meta.py --quick                            # 3 cells, about a minute

It measures the treepool that ``import treepool`` finds (the notes say which); for a
worktree built in place (``python setup.py build_ext --inplace``), run it with
``PYTHONPATH=$PWD``.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

try:
    import resource
except ImportError:  # not on Windows: no page-fault counts
    resource = None

import torch
import torch.nn.functional as F
from torch.utils.benchmark import Timer
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import baselines  # noqa: E402
import common  # noqa: E402
import treepool_adapter as tp  # noqa: E402

FAMILIES = ("MAML", "TreeMAML")
TREEPOOL = "treepool"
INNER_LR = 0.01
OUTER_LR = 1e-3
TREE_DEPTH, TREE_BRANCHING = 3, 4
CONV_WAYS, CONV_SHOTS, CONV_QUERIES = 5, 1, 1


@dataclass(frozen=True)
class Cell:
    """One configuration: an MLP of width ``size`` or the conv net of ``size`` channels."""

    net: str  # "mlp" or "conv"
    size: int
    tasks: int
    shots: int
    order: str  # "second" or "first"

    @property
    def first_order(self) -> bool:
        return self.order == "first"

    def label(self) -> str:
        net = f"MLP {self.size}" if self.net == "mlp" else f"conv {self.size}ch"
        return f"{net}, T={self.tasks}, {self.shots}-shot, {self.order} order"


@dataclass
class Contender:
    family: str
    name: str  # "treepool", "vmap", "loop"
    step: Callable[[], None]

    @property
    def key(self) -> str:
        return f"{self.family} {self.name}"


def _ints(text: str) -> List[int]:
    return [int(v) for v in text.split(",") if v]


def grid(args) -> List[Cell]:
    orders = [o for o in args.orders.split(",") if o]
    cells = [Cell("mlp", w, t, s, o) for w in _ints(args.widths) for t in _ints(args.tasks)
             for s in _ints(args.shots) for o in orders]
    cells += [Cell("conv", args.conv_channels, t, CONV_SHOTS, o) for t in _ints(args.conv_tasks)
              for o in orders]
    if args.quick and not args.keep_grid:
        # A small subset of the full grid's kinds of cells: both orders, both nets.
        cells = [Cell("mlp", 40, 16, 5, "second"), Cell("mlp", 64, 64, 10, "first"),
                 Cell("conv", 64, 4, CONV_SHOTS, "second")]
    return cells


def problem(cell: Cell, device: torch.device):
    """(initial model, meta-batch, loss function) of a cell; the same for every contender."""
    torch.manual_seed(0)
    if cell.net == "mlp":
        model = baselines.mlp(cell.size)
        batch = baselines.regression_batch(cell.tasks, cell.shots)
        loss_fn = F.mse_loss
    else:
        model = baselines.conv_net(CONV_WAYS, channels=cell.size)
        batch = baselines.classification_batch(cell.tasks, CONV_WAYS, CONV_SHOTS, CONV_QUERIES)
        loss_fn = F.cross_entropy
    return model.to(device), batch.to(device=device), loss_fn


def contenders(cell: Cell, args, device: torch.device) -> List[Contender]:
    """Every contender of a cell, each with its own copy of the same initial model."""
    init, batch, loss_fn = problem(cell, device)
    labels = baselines.balanced_labels(cell.tasks, TREE_DEPTH, TREE_BRANCHING)
    levels = baselines.tree_levels(labels, device)
    fo, steps = cell.first_order, args.maml_steps

    def hand_written(loss):
        model = copy.deepcopy(init)
        opt = torch.optim.Adam(model.parameters(), lr=OUTER_LR)
        return lambda: baselines.meta_step(lambda: loss(model), opt)

    def with_treepool(build):
        learner = build(copy.deepcopy(init))
        opt = torch.optim.Adam(tp.meta_parameters(learner), lr=OUTER_LR)
        return lambda: baselines.meta_step(lambda: tp.meta_loss(learner, batch), opt)

    return [
        Contender("MAML", TREEPOOL, with_treepool(
            lambda m: tp.maml(m, INNER_LR, steps, fo, loss_fn))),
        Contender("MAML", "vmap", hand_written(
            lambda m: baselines.vmap_maml_loss(m, batch, INNER_LR, steps, fo, loss_fn))),
        Contender("MAML", "loop", hand_written(
            lambda m: baselines.loop_maml_loss(m, batch, INNER_LR, steps, fo, loss_fn))),
        Contender("TreeMAML", TREEPOOL, with_treepool(
            lambda m: tp.tree_maml(m, labels, INNER_LR, fo, loss_fn))),
        Contender("TreeMAML", "vmap", hand_written(
            lambda m: baselines.vmap_tree_maml_loss(m, levels, batch, INNER_LR, fo, loss_fn))),
        Contender("TreeMAML", "loop", hand_written(
            lambda m: baselines.loop_tree_maml_loss(m, levels, batch, INNER_LR, fo, loss_fn))),
    ]


# --------------------------------------------------------------------------- timing

def _timer(step: Callable[[], None], threads: int) -> Timer:
    # Timer runs under num_threads intra-op threads (its own default is 1).
    return Timer("step()", globals={"step": step}, num_threads=threads)


def _minor_faults() -> Optional[int]:
    """Page faults of this process so far that the kernel served without I/O (first
    touches of pages malloc took from the OS, mostly memory it had given back); None
    where the platform does not count them."""
    if resource is None:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def measure(entries: List[Contender], repeats: int, min_time: float, threads: int,
            warmup: int, progress) -> Dict[str, dict]:
    """Interleaved timing: per repetition, every contender once, order rotated by one.
    Returns key -> {"number": meta-steps per measurement, "times": [s per meta-step],
    "faults": [minor page faults per meta-step, over the Timer's own warm-up steps and
    the measurement]} ("faults" empty where the platform does not count them)."""
    out = {}
    for c in entries:
        for _ in range(warmup - 1):
            c.step()
        one = _timer(c.step, threads).timeit(1).mean  # the last warm-up step calibrates
        number = max(1, math.ceil(min_time / one)) if one > 0 else 1
        out[c.key] = {"number": number, "times": [], "faults": []}
    for r in range(repeats):
        shift = r % len(entries)
        for c in entries[shift:] + entries[:shift]:
            calls = [0]

            def counted(step=c.step):
                calls[0] += 1
                step()
            before = _minor_faults()
            out[c.key]["times"].append(_timer(counted, threads).timeit(out[c.key]["number"]).mean)
            if before is not None:
                out[c.key]["faults"].append((_minor_faults() - before) / calls[0])
        progress.update(1)
    return out


def summarize(cell: Cell, entries: List[Contender], timed: Dict[str, dict]) -> List[dict]:
    """Rows of one cell: ms min/median/max per contender and ratios to the best baseline."""
    rows = []
    for family in FAMILIES:
        members = [c for c in entries if c.family == family]
        hand = [c for c in members if c.name != TREEPOOL]
        best = min(hand, key=lambda c: statistics.median(timed[c.key]["times"]))
        best_times = timed[best.key]["times"]
        for c in members:
            times = timed[c.key]["times"]
            paired = [a / b for a, b in zip(times, best_times)]
            rows.append(dict(
                net=cell.net, size=cell.size, tasks=cell.tasks, shots=cell.shots, order=cell.order,
                family=family, contender=c.name, best_baseline=best.name,
                number=timed[c.key]["number"], repeats=len(times),
                ms_min=min(times) * 1e3, ms_median=statistics.median(times) * 1e3,
                ms_max=max(times) * 1e3,
                faults=(statistics.median(timed[c.key]["faults"])
                        if timed[c.key].get("faults") else None),
                ratio=statistics.median(times) / statistics.median(best_times),
                ratio_min=min(paired), ratio_max=max(paired)))
    return rows


# --------------------------------------------------------------------------- report

def cell_name(r: dict) -> str:
    net = f"MLP {r['size']}" if r["net"] == "mlp" else f"conv {r['size']}ch"
    return f"{net} T={r['tasks']} {r['shots']}-shot {r['order']}"


def detail_table(rows: List[dict]) -> str:
    return common.markdown_table(
        [dict(r, cell=cell_name(r), who=f"{r['family']} {r['contender']}",
              spread=f"{r['ratio_min']:.2f}-{r['ratio_max']:.2f}") for r in rows],
        [("cell", "cell", None), ("who", "contender", None), ("ms_min", "ms min", "{:.2f}"),
         ("ms_median", "ms median", "{:.2f}"), ("ms_max", "ms max", "{:.2f}"),
         ("ratio", "x best baseline (medians)", "{:.2f}x"),
         ("spread", "per-repetition ratio min-max", None),
         ("faults", "page faults / step", "{:.0f}")])


def summary_rows(rows: List[dict]) -> List[dict]:
    """One row per cell: treepool's ratio per family and which baseline was best."""
    out: Dict[str, dict] = {}
    for r in rows:
        if r["contender"] != TREEPOOL:
            continue
        s = out.setdefault(cell_name(r), {"cell": cell_name(r)})
        s[r["family"]] = (f"{r['ratio']:.2f}x ({r['ratio_min']:.2f}-{r['ratio_max']:.2f}) "
                          f"vs {r['best_baseline']}")
    return list(out.values())


def verdict(rows: List[dict]) -> List[str]:
    lines = []
    for family in FAMILIES:
        mine = [r for r in rows if r["family"] == family and r["contender"] == TREEPOOL]
        if not mine:
            continue
        worst = max(mine, key=lambda r: r["ratio"])
        within = sum(r["ratio"] <= 1.0 for r in mine)
        lines.append(f"{family} treepool at most 1.0x the best baseline in {within} of {len(mine)} "
                     f"cells; worst {worst['ratio']:.2f}x ({cell_name(worst)}, vs "
                     f"{worst['best_baseline']})")
    return lines


def ratio_plot(rows: List[dict], path: str, title: str) -> None:
    """treepool / best baseline per cell and family (median, whiskers min-max); needs
    matplotlib, skipped with a note without it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print(f"--plot: matplotlib is not installed, {path} not written")
        return
    cells = list(dict.fromkeys(cell_name(r) for r in rows))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(cells)), 5))
    width = 0.8 / len(FAMILIES)
    for i, family in enumerate(FAMILIES):
        mine = {cell_name(r): r for r in rows
                if r["family"] == family and r["contender"] == TREEPOOL}
        xs = [k + (i - (len(FAMILIES) - 1) / 2) * width for k, c in enumerate(cells) if c in mine]
        med = [mine[c]["ratio"] for c in cells if c in mine]
        err = [[mine[c]["ratio"] - mine[c]["ratio_min"] for c in cells if c in mine],
               [mine[c]["ratio_max"] - mine[c]["ratio"] for c in cells if c in mine]]
        ax.bar(xs, med, width, yerr=err, capsize=2, label=f"{family} treepool")
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(cells)))
    ax.set_xticklabels(cells, rotation=75, ha="right", fontsize=6)
    ax.set_ylabel("time / best hand-written baseline (lower is better)")
    ax.set_yscale("log")
    as_ratio = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x")
    ax.yaxis.set_major_formatter(as_ratio)
    ax.yaxis.set_minor_formatter(as_ratio)
    ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


# --------------------------------------------------------------------------- main

def keep_freed_memory() -> None:
    """--keep-freed-memory: glibc's malloc keeps freed memory, for every contender alike
    (the notes' allocator line says whether it took effect)."""
    from treepool import info
    if not hasattr(info, "keep_freed_memory"):
        raise SystemExit("--keep-freed-memory: this treepool has no info.keep_freed_memory; "
                         "set MALLOC_TRIM_THRESHOLD_ etc. in the environment instead")
    info.keep_freed_memory()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=1,
                   help="intra-op threads (torch.set_num_threads); default 1")
    p.add_argument("--quick", action="store_true",
                   help="3 cells (MLP second and first order, conv), fewer and shorter repetitions")
    p.add_argument("--keep-grid", action="store_true",
                   help="with --quick: run the grid given by --widths etc., not the 3 quick cells")
    p.add_argument("--widths", default="40,64,256", help="MLP widths")
    p.add_argument("--tasks", default="16,64,256", help="tasks per meta-batch (MLP)")
    p.add_argument("--shots", default="5,10", help="support (and query) points per task (MLP)")
    p.add_argument("--orders", default="second,first")
    p.add_argument("--conv-tasks", default="4,16,32",
                   help="tasks per meta-batch (conv net); '' for none")
    p.add_argument("--conv-channels", type=int, default=64)
    p.add_argument("--maml-steps", type=int, default=TREE_DEPTH,
                   help="MAML inner steps (default 3)")
    p.add_argument("--repeats", type=int, help="repetitions per cell (default 7, --quick 3)")
    p.add_argument("--min-time", type=float,
                   help="seconds per measurement (default 0.2, --quick 0.05)")
    p.add_argument("--warmup", type=int, default=2,
                   help="meta-steps per contender before the repetitions (>= 1; the last one "
                        "sets how many steps a measurement runs)")
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="tell glibc's malloc to keep what the process frees "
                        "(treepool.info.keep_freed_memory; README, 'Memory allocator') "
                        "before any contender is built; default: the allocator as it is")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--plot", help="write a PNG of the ratios here (needs matplotlib)")
    p.add_argument("--profile", help="write a torch.profiler trace of TreeMAML treepool steps here")
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = 3 if args.quick else 7
    if args.min_time is None:
        args.min_time = 0.05 if args.quick else 0.2
    if min(args.threads, args.repeats, args.warmup) < 1:
        p.error("--threads, --repeats and --warmup must be >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.keep_freed_memory:
        keep_freed_memory()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cells = grid(args)
    run = common.Run("bench_meta.py", args.device, common.machine_description(device),
                     torch.__version__, common.command_line(), {})
    run.notes.append(tp.describe())
    run.notes.append(f"{args.threads} intra-op thread(s); MAML {args.maml_steps} inner steps; "
                     f"TreeMAML {TREE_DEPTH} (balanced tree, {TREE_BRANCHING} then "
                     f"{TREE_BRANCHING ** 2} clusters capped at T, then the leaves); Adam; "
                     f"{args.repeats} interleaved repetitions, each >= {args.min_time} s "
                     "per contender")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    if load is not None:
        run.notes.append(f"load average at the start: {load:.2f} on {os.cpu_count()} CPUs "
                         "(other processes' work slows every contender; the ratios are paired "
                         "per repetition)")
    # tqdm writes nothing when stderr is not a terminal (disable=None).
    with tqdm(total=len(cells) * args.repeats, disable=None, file=sys.stderr, unit="rep") as bar:
        for cell in cells:
            bar.set_description(cell.label())
            entries = contenders(cell, args, device)
            timed = measure(entries, args.repeats, args.min_time, args.threads, args.warmup, bar)
            run.rows.extend(summarize(cell, entries, timed))
            del entries

    print(f"# bench_meta on {run.machine} ({args.device}), torch {run.torch}\n")
    print(f"`{run.command}`\n")
    for note in run.notes:
        print(f"- {note}")
    print("\n## treepool / best hand-written baseline, per cell "
          "(median ratio, per-repetition min-max)\n")
    print(common.markdown_table(summary_rows(run.rows), [
        ("cell", "cell", None), ("MAML", "MAML treepool", None),
        ("TreeMAML", "TreeMAML treepool", None)]))
    print()
    for line in verdict(run.rows):
        print(f"- {line}")
    print("\n## every contender: ms per meta-step\n")
    print(detail_table(run.rows))
    if args.json:
        run.write_json(args.json)
    if args.plot:
        ratio_plot(run.rows, args.plot, f"treepool / best hand-written baseline\n"
                                        f"{run.machine}, torch {run.torch}")
    if args.profile:
        profile_steps(cells[0], args, device)
    return run


def profile_steps(cell: Cell, args, device: torch.device) -> None:
    """A torch.profiler trace (chrome JSON) of a few TreeMAML treepool meta-steps."""
    step = next(c.step for c in contenders(cell, args, device)
                if c.family == "TreeMAML" and c.name == TREEPOOL)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    os.makedirs(args.profile, exist_ok=True)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(3):
            step()
    path = os.path.join(args.profile, "bench_meta_treemaml.json")
    prof.export_chrome_trace(path)
    print(f"profiler trace: {path}")


if __name__ == "__main__":
    main()
