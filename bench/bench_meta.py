"""End-to-end benchmark: one meta-step of MAML and TreeMAML, treepool against what users
write today.

A meta-step is the inner loop (inner steps = tree depth), the outer loss, its backward
(second or first order) and an Adam step. Implementations:

- ``treepool``: :class:`treepool.TreeMAML` / :class:`treepool.MAML` (batched with
  torch.func, pooled updates through the treepool ops);
- ``loop``: the way learn2learn users write it: a Python loop over tasks, each cloning
  the parameters and taking ``torch.autograd.grad`` steps (for TreeMAML, the per-task
  gradients are then averaged per cluster in Python);
- ``higher``: ``higher.innerloop_ctx`` per task (MAML only; when higher is installed);
- ``vmap``: a hand-written torch.func MAML, vmap over tasks, without treepool (MAML only).

Peak memory is ``torch.cuda.max_memory_allocated`` on the GPU; on the CPU it is how far
the process's peak resident set rose during one meta-step (Linux VmHWM, reset before
the step), which undercounts memory the allocator had already cached.

    python bench/bench_meta.py            # the full table
    python bench/bench_meta.py --quick    # about a minute on 2 cores
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import treepool  # noqa: E402
from treepool.tree import TaskTree  # noqa: E402

try:
    import higher
except ImportError:  # optional
    higher = None


def mlp(width: int, in_dim: int = 1) -> nn.Module:
    """A 2-layer MLP: in_dim -> width -> width -> 1."""
    return nn.Sequential(nn.Linear(in_dim, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, 1))


def balanced_tree(num_tasks: int, depth: int = 3, branching: int = 4) -> TaskTree:
    """Levels of branching**k clusters (capped at T), the last level the leaves."""
    levels = []
    for k in range(1, depth):
        clusters = min(num_tasks, branching ** k)
        levels.append([t * clusters // num_tasks for t in range(num_tasks)])
    return TaskTree.from_labels(levels)


def make_batch(num_tasks, shots, in_dim, device):
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(num_tasks, shots, in_dim, generator=g)
    xq = torch.randn(num_tasks, shots, in_dim, generator=g)
    slope = torch.randn(num_tasks, 1, in_dim, generator=g)
    ys = (xs * slope).sum(-1, keepdim=True).sin()
    yq = (xq * slope).sum(-1, keepdim=True).sin()
    return [t.to(device) for t in (xs, ys, xq, yq)]


# --------------------------------------------------------------------------- baselines

def _call(model, names, params, x):
    return torch.func.functional_call(model, dict(zip(names, params)), (x,))


def loop_tree_maml_loss(model, tree, batch, lr, first_order):
    """TreeMAML as a per-task Python loop (clone + autograd.grad), clusters pooled in Python."""
    xs, ys, xq, yq = batch
    names = [n for n, _ in model.named_parameters()]
    nodes = [list(model.parameters())]  # level 0: the root
    prev_labels = [0] * tree.num_tasks
    for level in range(1, tree.depth + 1):
        grads = []
        for t in range(tree.num_tasks):
            p = nodes[prev_labels[t]]
            loss = F.mse_loss(_call(model, names, p, xs[t]), ys[t])
            grads.append(torch.autograd.grad(loss, p, create_graph=not first_order))
        labels, parents = tree.labels(level).tolist(), tree.parents(level).tolist()
        new_nodes = []
        for c, parent in enumerate(parents):
            members = [t for t in range(tree.num_tasks) if labels[t] == c]
            mean = [sum(grads[t][i] for t in members) / len(members) for i in range(len(names))]
            new_nodes.append([w - lr * g for w, g in zip(nodes[parent], mean)])
        nodes, prev_labels = new_nodes, labels
    losses = [F.mse_loss(_call(model, names, nodes[prev_labels[t]], xq[t]), yq[t])
              for t in range(tree.num_tasks)]
    return torch.stack(losses).mean()


def loop_maml_loss(model, steps, batch, lr, first_order):
    """MAML as learn2learn users write it: per task, clone and take autograd.grad steps."""
    xs, ys, xq, yq = batch
    names = [n for n, _ in model.named_parameters()]
    losses = []
    for t in range(xs.shape[0]):
        p = [w.clone() for w in model.parameters()]
        for _ in range(steps):
            loss = F.mse_loss(_call(model, names, p, xs[t]), ys[t])
            g = torch.autograd.grad(loss, p, create_graph=not first_order)
            p = [w - lr * gi for w, gi in zip(p, g)]
        losses.append(F.mse_loss(_call(model, names, p, xq[t]), yq[t]))
    return torch.stack(losses).mean()


def higher_maml_step(model, steps, batch, lr, first_order, opt):
    """MAML with higher.innerloop_ctx, one context per task (its documented pattern)."""
    xs, ys, xq, yq = batch
    inner = torch.optim.SGD(model.parameters(), lr=lr)
    opt.zero_grad()
    T = xs.shape[0]
    for t in range(T):
        with higher.innerloop_ctx(model, inner, copy_initial_weights=False,
                                  track_higher_grads=not first_order) as (fmodel, diffopt):
            for _ in range(steps):
                diffopt.step(F.mse_loss(fmodel(xs[t]), ys[t]))
            (F.mse_loss(fmodel(xq[t]), yq[t]) / T).backward()
    opt.step()


def vmap_maml_loss(model, steps, batch, lr, first_order):
    """A hand-written torch.func MAML: vmap over tasks of K functional SGD steps."""
    params = dict(model.named_parameters())

    def support_loss(p, x, y):
        return F.mse_loss(torch.func.functional_call(model, p, (x,)), y)

    def query_loss(p, xs, ys, xq, yq):
        for _ in range(steps):
            g = torch.func.grad(support_loss)(p, xs, ys)
            if first_order:
                g = {n: v.detach() for n, v in g.items()}
            p = {n: p[n] - lr * g[n] for n in p}
        return F.mse_loss(torch.func.functional_call(model, p, (xq,)), yq)

    return torch.func.vmap(query_loss, in_dims=(None, 0, 0, 0, 0))(params, *batch).mean()


# --------------------------------------------------------------------------- measurement

def _status_kib(field: str):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def cpu_peak_growth(fn):
    """Runs fn; returns how far the process's peak RSS rose above its RSS before (bytes),
    or None where Linux's peak counter cannot be reset."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, the peak resident set size
        before = _status_kib("VmRSS")
        fn()
        return max(0, _status_kib("VmHWM") - before) * 1024
    except OSError:
        fn()
        return None


def methods(args, width, T, order, device):
    """name -> (model, step function) for one configuration."""
    first_order = order == "first"
    lr, steps = 0.01, 3
    tree = balanced_tree(T, depth=steps)
    torch.manual_seed(0)
    out = {}

    def with_adam(model, loss_fn):
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)

        def step():
            opt.zero_grad()
            loss_fn().backward()
            opt.step()
        return step

    def add(name, build):
        model = mlp(width).to(device)
        out[name] = build(model)

    batch = make_batch(T, args.shots, 1, device)
    add("TreeMAML treepool", lambda m: _learner_step(
        treepool.TreeMAML(m, tree, inner_lr=lr, first_order=first_order), batch))
    add("TreeMAML loop", lambda m: with_adam(m, lambda: loop_tree_maml_loss(m, tree, batch, lr,
                                                                            first_order)))
    add("MAML treepool", lambda m: _learner_step(
        treepool.MAML(m, T, inner_lr=lr, inner_steps=steps, first_order=first_order), batch))
    add("MAML loop", lambda m: with_adam(m, lambda: loop_maml_loss(m, steps, batch, lr,
                                                                   first_order)))
    add("MAML vmap", lambda m: with_adam(m, lambda: vmap_maml_loss(m, steps, batch, lr,
                                                                   first_order)))
    if higher is not None:
        def higher_step(m):
            opt = torch.optim.Adam(m.parameters(), lr=1e-3)
            return lambda: higher_maml_step(m, steps, batch, lr, first_order, opt)
        add("MAML higher", higher_step)
    return out


def _learner_step(learner, batch):
    opt = torch.optim.Adam(learner.parameters(), lr=1e-3)

    def step():
        opt.zero_grad()
        learner.meta_loss(*batch).backward()
        opt.step()
    return step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="a few small cases, about a minute")
    parser.add_argument("--shots", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--plot", help="write a PNG bar chart here (needs matplotlib)")
    parser.add_argument("--profile", help="write a torch.profiler trace of treepool steps here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)

    if args.quick:
        grid = [(64, 16, "second"), (64, 16, "first")]
    else:
        grid = [(w, T, o) for w in (64, 256) for T in (16, 64, 256) for o in ("second", "first")]
    run = common.Run("bench_meta.py", args.device, common.machine_description(device),
                     torch.__version__, common.command_line(), {})
    if higher is None:
        run.notes.append("higher is not installed: its column is absent")
    for width, T, order in grid:
        for name, step in methods(args, width, T, order, device).items():
            common.progress(f"width {width}, {T} tasks, {order} order: {name}")
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                step()
                peak = torch.cuda.max_memory_allocated(device)
            else:
                step()  # warm-up: caches and allocator pools
                peak = cpu_peak_growth(step)
            t = common.median_time(step, device, repeats=args.repeats, warmup=0)
            run.rows.append(dict(method=name, width=width, tasks=T, order=order, ms=t * 1e3,
                                 peak_mib=None if peak is None else peak / 2**20))
    common.progress_done()
    for r in run.rows:
        base = next(x for x in run.rows if x["width"] == r["width"] and x["tasks"] == r["tasks"]
                    and x["order"] == r["order"]
                    and x["method"] == r["method"].split()[0] + " loop")
        r["vs_loop"] = base["ms"] / r["ms"]

    memory = "peak MiB (GPU)" if device.type == "cuda" else "peak RSS growth MiB"
    print(f"# bench_meta on {run.machine} ({args.device}), torch {run.torch}\n")
    print(common.markdown_table(run.rows, [
        ("method", "method", None), ("width", "MLP width", None), ("tasks", "tasks", None),
        ("order", "order", None), ("ms", "ms / meta-step", "{:.1f}"),
        ("vs_loop", "speed-up vs loop", "{:.1f}x"), ("peak_mib", memory, "{:.1f}")]))
    for note in run.notes:
        print(f"- {note}")
    if args.json:
        run.write_json(args.json)
    if args.plot:
        common.bar_plot(run.rows, args.plot, "ms", "ms per meta-step")
    if args.profile:
        profile_steps(args, device)
    return run


def profile_steps(args, device):
    """A torch.profiler trace of a few TreeMAML meta-steps (chrome trace JSON)."""
    step = methods(args, 64, 64, "second", device)["TreeMAML treepool"]
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
