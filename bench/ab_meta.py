"""A/B of one treepool learner path: the learner as shipped against the same learner with
a path switched off, on bench_meta's cells, timed interleaved in one process.

Switches (``--off``, one or more):

- ``in-place``: the first-order in-place layers (``FactoredLinears.in_place_layers``
  returns nothing, so the leaf steps stay dense or factored);
- ``factored``: the whole factored leaf phase, in-place layers included
  (``factored='never'``);
- ``fast-pool``: the CPU max pooling at treepool's indices (treepool.meta.max_pool):
  the model's max poolings run ATen's kernel;
- ``written-out``: the first-order steps of a plain MLP by the backpropagation of
  treepool.meta.mlp_backprop: they take autograd's pass;
- ``relu-forms``: a plain MLP's linear layers followed by ReLU as the products' ReLU
  forms (``bmm_nt_relu``, ``outer_relu``): the product, then torch.relu.

``--force-in-place`` lowers the in-place layers' size threshold to 0 for every learner
(to measure them below the size where 'auto' picks them).  ``--baseline vmap|loop``
adds that hand-written contender.  Cells are ``net:size:tasks:shots:order``, e.g.
``mlp:64:256:10:first`` or ``conv:64:4:1:second``.

    python bench/ab_meta.py --cells mlp:64:256:10:first --off in-place
    python bench/ab_meta.py --cells mlp:40:16:5:first --off in-place --force-in-place
    python bench/ab_meta.py --cells conv:64:4:1:second --off factored --baseline loop
    python bench/ab_meta.py --cells conv:64:16:1:second --off fast-pool --baseline vmap
    python bench/ab_meta.py --cells mlp:64:256:10:first,mlp:40:16:5:first --off written-out
    python bench/ab_meta.py --cells mlp:64:256:10:second --off relu-forms

Reported per cell and family: ms per meta-step (median) of each contender, its minor
page faults per meta-step (median; see bench_meta) and its per-repetition ratio to the
learner as shipped (median, min-max).  ``--keep-freed-memory`` as in bench_meta.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
from types import SimpleNamespace

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import baselines  # noqa: E402
import bench_meta as bm  # noqa: E402
import treepool_adapter as tp  # noqa: E402


def _no_in_place(learner):
    learner.factored.in_place_layers = lambda *args, **kwargs: ()


def _no_fast_pool(learner):
    learner.fns.max_pools = False


def _no_written_out(learner):
    learner.fns.written_out = False


def _no_relu_forms(learner):
    if learner.fns.mlp is not None:
        learner.fns.mlp.relu_forms = False


SWITCHES = {"in-place": _no_in_place, "factored": None, "fast-pool": _no_fast_pool,
            "written-out": _no_written_out, "relu-forms": _no_relu_forms}


def parse_cell(text: str) -> bm.Cell:
    net, size, tasks, shots, order = text.split(":")
    if net not in ("mlp", "conv") or order not in ("first", "second"):
        raise argparse.ArgumentTypeError(f"a cell is net:size:tasks:shots:order, got {text!r}")
    return bm.Cell(net, int(size), int(tasks), int(shots), order)


def contenders(cell: bm.Cell, family: str, off, baseline):
    init, batch, loss_fn = bm.problem(cell, torch.device("cpu"))
    labels = baselines.balanced_labels(cell.tasks, bm.TREE_DEPTH, bm.TREE_BRANCHING)
    fo = cell.first_order

    def learner(factored):
        model = copy.deepcopy(init)
        if family == "MAML":
            return tp.maml(model, bm.INNER_LR, bm.TREE_DEPTH, fo, loss_fn, factored=factored)
        return tp.tree_maml(model, labels, bm.INNER_LR, fo, loss_fn, factored=factored)

    def step(learner):
        opt = torch.optim.Adam(tp.meta_parameters(learner), lr=bm.OUTER_LR)
        return lambda: baselines.meta_step(lambda: tp.meta_loss(learner, batch), opt)

    out = [bm.Contender(family, "as shipped", step(learner("auto")))]
    for name in off:
        variant = learner("never" if name == "factored" else "auto")
        if SWITCHES[name] is not None:
            SWITCHES[name](variant)
        out.append(bm.Contender(family, f"{name} off", step(variant)))
    if baseline:  # bench_meta's own hand-written contender of this family
        hand = bm.contenders(cell, SimpleNamespace(maml_steps=bm.TREE_DEPTH), torch.device("cpu"))
        chosen = next(c for c in hand if c.family == family and c.name == baseline)
        out.append(bm.Contender(family, f"{baseline} baseline", chosen.step))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cells", type=lambda s: [parse_cell(c) for c in s.split(",")],
                   default=[parse_cell("mlp:64:256:10:first")])
    p.add_argument("--families", default="MAML,TreeMAML")
    p.add_argument("--off", default="in-place", help=f"comma-separated, of {list(SWITCHES)}")
    p.add_argument("--force-in-place", action="store_true")
    p.add_argument("--baseline", choices=["vmap", "loop"])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--min-time", type=float, default=0.4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="glibc's malloc keeps freed memory (as bench_meta's flag)")
    args = p.parse_args(argv)
    off = [o for o in args.off.split(",") if o]
    unknown = [o for o in off if o not in SWITCHES]
    if unknown:
        p.error(f"--off: unknown {unknown}; choose from {list(SWITCHES)}")
    if args.keep_freed_memory:
        bm.keep_freed_memory()
    torch.set_num_threads(args.threads)
    if args.force_in_place:
        from treepool.meta import factored
        factored.IN_PLACE_THRESHOLD = 0
    print(f"- {tp.describe()}")
    for cell in args.cells:
        for family in args.families.split(","):
            entries = contenders(cell, family, off, args.baseline)
            with tqdm(total=args.repeats, desc=f"{cell.label()} {family}", leave=False) as bar:
                timed = bm.measure(entries, args.repeats, args.min_time, args.threads, 2, bar)
            ref = timed[entries[0].key]["times"]
            parts = []
            for c in entries:
                times, faults = timed[c.key]["times"], timed[c.key]["faults"]
                ratios = [a / b for a, b in zip(times, ref)]
                parts.append(f"{c.name} {statistics.median(times) * 1e3:.2f} ms"
                             + (f" ({statistics.median(faults):.0f} faults/step)" if faults
                                else "")
                             + ("" if c is entries[0] else
                                f" ({statistics.median(ratios):.3f}x, "
                                f"{min(ratios):.2f}-{max(ratios):.2f})"))
            print(f"{cell.label()}, {family}: " + "; ".join(parts), flush=True)


if __name__ == "__main__":
    main()
