"""Sharded tree updates: bytes communicated and time per step, treepool's spanning-cluster
all-reduce against a naive all-reduce of every cluster's [C, P] sums.

Spawns the ranks itself on this machine (Gloo on CPU; NCCL, one GPU per rank, with
--device cuda). Each step is one tree level: a tree of 4 x 4 clusters over T tasks,
the rank boundaries shifted by --shift rows so that some clusters span two ranks.

    python bench/bench_distributed.py                   # 2 ranks, Gloo
    python bench/bench_distributed.py --ranks 4 --device cuda
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import sharded_baseline  # noqa: E402

from treepool.distributed import ShardedTree, even_split  # noqa: E402
from treepool.tree import TaskTree  # noqa: E402


def tree_of(num_tasks: int) -> TaskTree:
    """4 clusters, each of 4 sub-clusters, then the leaves."""
    level1 = [t * 4 // num_tasks for t in range(num_tasks)]
    level2 = [t * 16 // num_tasks for t in range(num_tasks)]
    return TaskTree.from_labels([level1, level2])


def worker(rank, world, port, args, queue):
    backend = "nccl" if args.device == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=300))
    device = torch.device(f"cuda:{rank}" if args.device == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    try:
        for P in args.params:
            tree = tree_of(args.tasks)
            counts = even_split(args.tasks, world)
            counts[0] += args.shift  # move rank boundaries off the cluster boundaries
            counts[-1] -= args.shift
            sharded = ShardedTree(tree, counts)
            grads = torch.randn(sharded.num_local_tasks, P, device=device)
            for level in range(1, tree.depth + 1):
                prev = torch.randn(sharded.level(level - 1).count if level > 1 else 1, P,
                                   device=device)
                for naive in (False, True):
                    if naive:
                        fn = lambda: sharded_baseline.naive_tree_update(  # noqa: E731
                            sharded, prev, grads, level, 0.1)
                    else:
                        fn = lambda: sharded.tree_update(prev, grads, level, 0.1)  # noqa: E731
                    dist.barrier()
                    t = common.median_time(fn, device, repeats=args.repeats, warmup=2)
                    gathered = [torch.zeros(1) for _ in range(world)]
                    dist.all_gather(gathered, torch.tensor([t]))
                    if rank == 0:
                        queue.put(dict(P=P, level=level, clusters=tree.num_clusters(level),
                                       method="naive all-reduce" if naive else "treepool",
                                       bytes=sharded_baseline.bytes_communicated(
                                           sharded, level, P, grads.dtype, naive=naive),
                                       ms=max(float(g) for g in gathered) * 1e3))
    finally:
        dist.destroy_process_group()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--tasks", type=int, default=64)
    parser.add_argument("--params", type=lambda s: [int(float(v)) for v in s.split(",")],
                        default=[10**5, 10**6])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--shift", type=int, default=3,
                        help="rows moved from the last rank to the first, so that clusters "
                             "span ranks (0: an even split, which here spans none)")
    parser.add_argument("--quick", action="store_true", help="P = 1e4 only, a few seconds")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.quick:
        args.params, args.repeats = [10**4], 3
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    t0 = time.monotonic()
    mp.start_processes(worker, args=(args.ranks, port, args, queue), nprocs=args.ranks,
                       start_method="spawn")
    rows = []
    while not queue.empty():
        rows.append(queue.get())
    device = torch.device(args.device)
    run = common.Run("bench_distributed.py", args.device, common.machine_description(device),
                     torch.__version__, common.command_line(), {}, rows)
    print(f"# bench_distributed: {args.ranks} ranks ({'NCCL' if args.device == 'cuda' else 'Gloo'}),"
          f" {args.tasks} tasks, boundaries shifted by {args.shift} rows, float32, "
          f"{time.monotonic() - t0:.0f} s\n")
    print(common.markdown_table(rows, [
        ("P", "P", "{:.0e}"), ("level", "level", None), ("clusters", "clusters", None),
        ("method", "method", None), ("bytes", "bytes per rank", "{:,}"),
        ("ms", "ms per step (slowest rank)", "{:.2f}")]))
    if args.json:
        run.write_json(args.json)
    return run


if __name__ == "__main__":
    main()
