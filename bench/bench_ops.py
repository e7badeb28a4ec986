"""Kernel benchmark: every op (tree_update, segment_mean, segment_sum, reptile_update,
segment_broadcast), native against the PyTorch reference and against the same pooling
built from torch_scatter.segment_csr and from torch.segment_reduce when those are
importable.

For each (T tasks, C clusters, P parameters, tree shape, dtype) it reports the median
time over repeats after warm-up, the achieved bandwidth (the bytes the op must move:
every input read once, the output written once) and that bandwidth as a fraction of
the machine's measured copy bandwidth (a large copy into a preallocated buffer, bytes
read plus written; a clone, which pays page faults for its fresh allocation, is
printed beside it).

    python bench/bench_ops.py                 # the full table on the CPU
    python bench/bench_ops.py --ops tree_update,segment_mean
    python bench/bench_ops.py --quick         # about a minute on 2 cores
    python bench/bench_ops.py --device cuda --json out.json --plot ops.png
    python bench/bench_ops.py --profile traces/   # torch.profiler trace of a few calls
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import treepool  # noqa: E402
from treepool.ops import reference  # noqa: E402

try:
    import torch_scatter
except ImportError:  # optional baseline
    torch_scatter = None

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}


def level_offsets(T: int, C: int, shape: str) -> torch.Tensor:
    """Cluster sizes of one tree level: equal ('balanced') or one cluster holding 90% of
    the tasks and the rest shared by the others ('skewed')."""
    if shape == "balanced" or C == 1:
        sizes = [T // C + (1 if c < T % C else 0) for c in range(C)]
    else:
        big = max(1, min(T - (C - 1), round(0.9 * T)))
        rest = T - big
        sizes = [big] + [rest // (C - 1) + (1 if c < rest % (C - 1) else 0) for c in range(C - 1)]
    offsets = [0]
    for s in sizes:
        offsets.append(offsets[-1] + s)
    return torch.tensor(offsets, dtype=torch.int64)


def configurations(args):
    """(T, C, P, tree shape) of every case; C = 8 clusters under the root."""
    if args.quick:
        return [(64, 8, 10**5, "balanced"), (64, 8, 10**6, "balanced"), (64, 8, 10**6, "skewed")]
    sizes = [10**4, 10**5, 10**6, 10**7] + ([10**8] if args.device == "cuda" else [])
    return [(T, 8, P, shape) for T in (16, 64, 256, 1024) for P in sizes
            for shape in ("balanced", "skewed")]


def memory_budget(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.7)
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(pages * 0.4)


def bench_case(T, C, P, shape, dtype, device, args):
    """The rows for one configuration: every op on every backend."""
    offsets = level_offsets(T, C, shape).to(device)
    parents = torch.zeros(C, dtype=torch.int64, device=device)
    grads = torch.randn(T, P, device=device, dtype=dtype)
    root = torch.randn(1, P, device=device, dtype=dtype)
    out = torch.empty(C, P, device=device, dtype=dtype)
    theta = torch.randn(C, P, device=device, dtype=dtype)
    theta_ = theta.clone()  # updated in place, again and again
    sizes = (offsets[1:] - offsets[:-1]).to(dtype)
    rows_of = torch.repeat_interleave(torch.arange(C, device=device), sizes.long(), output_size=T)
    sizes = sizes[rows_of][:, None]  # the broadcast baseline: g[c(t)] / |c(t)|
    size = torch.empty((), dtype=dtype).element_size()
    cases = {
        ("tree_update", "native"): lambda: treepool.tree_update(root, grads, offsets, parents, 0.1),
        ("tree_update", "native in-place"): lambda: treepool.tree_update_(out, root, grads, offsets,
                                                                          parents, 0.1),
        ("tree_update", "reference"): lambda: reference.tree_update(root, grads, offsets, parents, 0.1),
        ("tree_update", "torch.segment_reduce"): lambda: root[parents] - 0.1 * torch.segment_reduce(
            grads, "mean", offsets=offsets, axis=0, unsafe=True),
        ("segment_mean", "native"): lambda: treepool.segment_mean(grads, offsets),
        ("segment_mean", "reference"): lambda: reference.segment_mean(grads, offsets),
        ("segment_mean", "torch.segment_reduce"): lambda: torch.segment_reduce(
            grads, "mean", offsets=offsets, axis=0, unsafe=True),
        ("segment_sum", "native"): lambda: treepool.segment_sum(grads, offsets),
        ("segment_sum", "reference"): lambda: reference.segment_sum(grads, offsets),
        ("segment_sum", "torch.segment_reduce"): lambda: torch.segment_reduce(
            grads, "sum", offsets=offsets, axis=0, unsafe=True),
        ("reptile_update", "native"): lambda: treepool.reptile_update(theta, grads, offsets, 0.5),
        ("reptile_update", "native in-place"): lambda: treepool.reptile_update_(theta_, grads,
                                                                                offsets, 0.5),
        ("reptile_update", "reference"): lambda: reference.reptile_update(theta, grads, offsets, 0.5),
        ("segment_broadcast", "native"): lambda: treepool.segment_broadcast(theta, offsets, None,
                                                                            True, T),
        ("segment_broadcast", "reference"): lambda: reference.segment_broadcast(theta, offsets, None,
                                                                                True, T),
        ("segment_broadcast", "index_select"): lambda: theta.index_select(0, rows_of) / sizes,
    }
    if torch_scatter is not None:
        cases[("tree_update", "torch_scatter")] = lambda: root[parents] - 0.1 * \
            torch_scatter.segment_csr(grads, offsets, reduce="mean")
        cases[("segment_mean", "torch_scatter")] = lambda: torch_scatter.segment_csr(
            grads, offsets, reduce="mean")
        cases[("segment_sum", "torch_scatter")] = lambda: torch_scatter.segment_csr(
            grads, offsets, reduce="sum")
    cases = {k: v for k, v in cases.items() if k[0] in args.ops}
    moved = {"tree_update": (T + 1 + C) * P * size, "segment_mean": (T + C) * P * size,
             "segment_sum": (T + C) * P * size, "reptile_update": (T + 2 * C) * P * size,
             "segment_broadcast": (C + T) * P * size}
    rows = []
    for (op, backend), fn in cases.items():
        if backend.startswith("native") and not treepool.native_available():
            continue
        once = common.median_time(fn, device, repeats=1, warmup=1)
        repeats = max(3, min(args.repeats, int(args.seconds / max(once, 1e-6))))
        t = common.median_time(fn, device, repeats=repeats, warmup=1)
        rows.append(dict(op=op, backend=backend, T=T, C=C, P=P, tree=shape,
                         dtype=str(dtype).replace("torch.", ""), ms=t * 1e3,
                         gbs=moved[op] / t / 1e9))
    for r in rows:
        same_op = {x["backend"]: x["ms"] for x in rows if x["op"] == r["op"]}
        r["speedup"] = same_op["reference"] / r["ms"]
        if "torch_scatter" in same_op:
            r["vs_scatter"] = same_op["torch_scatter"] / r["ms"]
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--quick", action="store_true", help="a few small cases, about a minute")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--seconds", type=float, default=2.0, help="time budget per case")
    parser.add_argument("--ops", default="tree_update,segment_mean,segment_sum,reptile_update,"
                                          "segment_broadcast", type=lambda v: v.split(","),
                        help="comma-separated ops to time")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--plot", help="write a PNG chart of the fraction of copy bandwidth here")
    parser.add_argument("--profile", help="write a torch.profiler trace of a few calls here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)

    common.progress("measuring copy bandwidth")
    bw = common.copy_bandwidth(device, nbytes=(128 if args.quick else 512) * 2**20)
    run = common.Run("bench_ops.py", args.device, common.machine_description(device),
                     torch.__version__, common.command_line(), vars(bw))
    budget = memory_budget(device)
    dtypes = [DTYPES[d] for d in args.dtypes.split(",")]
    if args.quick:
        dtypes = dtypes[:1]
    for T, C, P, shape in configurations(args):
        for dtype in dtypes:
            need = 3 * (T + 2 * C) * P * torch.empty((), dtype=dtype).element_size()
            if need > budget:
                note = f"skipped T={T} P={P:.0e} {dtype}: needs ~{need / 2**30:.1f} GiB"
                if note not in run.notes:
                    run.notes.append(note)
                continue
            common.progress(f"T={T} C={C} P={P:.0e} {shape} {dtype}")
            run.rows += bench_case(T, C, P, shape, dtype, device, args)
    common.progress_done()
    for r in run.rows:
        r["of_copy"] = r["gbs"] / bw.copy_gbs

    print(f"# bench_ops on {run.machine} ({args.device}), torch {run.torch}")
    print(f"copy bandwidth: {bw.copy_gbs:.1f} GB/s into a preallocated buffer, "
          f"{bw.clone_gbs:.1f} GB/s by clone ({bw.nbytes / 2**20:.0f} MiB, read + write)\n")
    print(common.markdown_table(run.rows, [
        ("op", "op", None), ("backend", "backend", None), ("T", "T", None), ("C", "C", None),
        ("P", "P", "{:.0e}"), ("tree", "tree", None), ("dtype", "dtype", None),
        ("ms", "median ms", "{:.3f}"), ("gbs", "GB/s", "{:.1f}"),
        ("of_copy", "of copy bw", "{:.0%}"), ("speedup", "vs reference", "{:.1f}x"),
        ("vs_scatter", "vs torch_scatter", "{:.1f}x")]))
    if torch_scatter is None:
        run.notes.append("torch_scatter is not installed: its rows are absent")
    for note in run.notes:
        print(f"- {note}")
    if args.json:
        run.write_json(args.json)
    if args.plot:
        common.bar_plot([dict(op=r["op"], backend=r["backend"], T=r["T"], P=f"{r['P']:.0e}",
                              tree=r["tree"], dtype=r["dtype"], of_copy=r["of_copy"])
                         for r in run.rows], args.plot, "of_copy", "fraction of copy bandwidth")
    if args.profile:
        profile_calls(args.profile, device)
    return run


def profile_calls(directory: str, device: torch.device) -> None:
    """A torch.profiler trace of a few native tree_update and segment_mean calls."""
    grads = torch.randn(64, 10**6, device=device)
    offsets = level_offsets(64, 8, "balanced").to(device)
    parents = torch.zeros(8, dtype=torch.int64, device=device)
    root = torch.randn(1, 10**6, device=device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    os.makedirs(directory, exist_ok=True)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(3):
            treepool.tree_update(root, grads, offsets, parents, 0.1)
            treepool.segment_mean(grads, offsets)
        common.sync(device)
    path = os.path.join(directory, "bench_ops.json")
    prof.export_chrome_trace(path)
    print(f"profiler trace: {path}")


if __name__ == "__main__":
    main()
