"""Batched products (treepool.ops.products) against the torch expression a user writes.

The plain-MLP path of the learners multiplies, per task or tree node, a layer's rows by
its weight and, on a factored leaf, by the task's low-rank terms (docs/design.md,
sections 3 and 5). This times ``bmm_nn``, ``bmm_nt`` and ``bmm_tn`` on those shapes
against ``torch.bmm`` on the same operands (transposed views where the form needs
them), and the ReLU forms ``bmm_nt_relu`` and ``outer_relu`` of a node's layers
against ``torch.relu`` of ``torch.baddbmm`` / ``torch.addcmul`` (their forward only:
what they save in autograd, ``bench/ab_meta.py --off relu-forms`` measures),
interleaved in one process: per repetition each contender runs ``--number``
calls, and the table gives the median time and the treepool / torch ratio's median, min
and max over the repetitions, with treepool's GFLOP/s. On the CPU, float32 matrices of
at most 64 * 64 * 16 multiply-adds run treepool's register-tiled loops
(csrc/cpu/small_products_cpu.cpp); larger ones run ATen's bmm, so their ratio is the
op's fixed cost.

    python bench/bench_products.py [--device cpu] [--repeats 15] [--json out.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
from torch.utils.benchmark import Timer

import common
from treepool.ops import products

# (name, form, B, M, K, N): a factored leaf's products at width 64 and 256 with 10 and 5
# shots per task, and a node layer of 16 nodes x 160 rows (ATen's path).
CASES = [
    ("leaf h B^T, w64 10-shot", "nt", 256, 10, 64, 10),
    ("leaf (h B^T) A, w64 10-shot", "nn", 256, 10, 10, 64),
    ("leaf grad of A, w64 10-shot", "tn", 256, 10, 10, 64),
    ("leaf h B^T, w64 5-shot", "nt", 256, 5, 64, 5),
    ("leaf (h B^T) A, w64 5-shot", "nn", 256, 5, 5, 64),
    ("leaf h B^T, w256 10-shot", "nt", 64, 10, 256, 10),
    ("leaf (h B^T) A, w256 10-shot", "nn", 64, 10, 10, 256),
    ("per-task weight grad, w64 10-shot", "tn", 256, 64, 10, 64),
    ("node layer, 16 x 160 rows, w64", "nt", 16, 160, 64, 64),
    ("node layer and ReLU, 16 x 160 rows, w64", "nt_relu", 16, 160, 64, 64),
    ("1-input node layer and ReLU, 16 x 160 rows, w64", "outer_relu", 16, 160, 1, 64),
]
QUICK = [CASES[0], CASES[1], CASES[2], CASES[8], CASES[9], CASES[10]]


def contenders(form: str, B: int, M: int, K: int, N: int, device, dtype):
    """(treepool call, torch call) on the same operands of a form."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype).to(device)
    if form == "nn":
        x, y = rand(B, M, K), rand(B, K, N)
        return (lambda: products.bmm_nn(x, y)), (lambda: torch.bmm(x, y))
    if form == "nt":
        x, y = rand(B, M, K), rand(B, N, K)
        return (lambda: products.bmm_nt(x, y)), (lambda: torch.bmm(x, y.transpose(1, 2)))
    if form == "nt_relu":
        x, y, b = rand(B, M, K), rand(B, N, K), rand(B, N)
        return ((lambda: products.bmm_nt_relu(x, y, b)),
                (lambda: torch.relu(torch.baddbmm(b.unsqueeze(1), x, y.transpose(1, 2)))))
    if form == "outer_relu":  # K = 1: g [B, M] times w [B, N]
        g_, w, b = rand(B, M), rand(B, N), rand(B, N)
        return ((lambda: products.outer_relu(g_, w, b)),
                (lambda: torch.relu(torch.addcmul(b.unsqueeze(1), g_.unsqueeze(-1),
                                                  w.unsqueeze(1)))))
    x, y = rand(B, K, M), rand(B, K, N)
    return (lambda: products.bmm_tn(x, y)), (lambda: torch.bmm(x.transpose(1, 2), y))


def bench_case(case, args, device, dtype) -> dict:
    name, form, B, M, K, N = case
    ours, theirs = contenders(form, B, M, K, N, device, dtype)
    timers = [Timer("f()", globals={"f": f}) for f in (ours, theirs)]
    for t in timers:
        t.timeit(args.number)  # warm-up
    times = [[], []]
    for _ in range(args.repeats):
        for i, t in enumerate(timers):
            common.sync(device)
            times[i].append(t.timeit(args.number).mean)
    ratios = [a / b for a, b in zip(*times)]
    ours_s = statistics.median(times[0])
    return dict(case=name, form=form, shape=f"B={B} M={M} K={K} N={N}",
                treepool_us=ours_s * 1e6, torch_us=statistics.median(times[1]) * 1e6,
                ratio=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios),
                gflops=2 * B * M * N * K / ours_s / 1e9)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (CPU)")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--number", type=int, default=50, help="calls per timing")
    p.add_argument("--quick", action="store_true", help="four cases, 3 repetitions")
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    cases = QUICK if args.quick else CASES
    if args.quick:
        args.repeats, args.number = min(args.repeats, 3), min(args.number, 5)
    run = common.Run("bench_products", str(device), common.machine_description(device),
                     torch.__version__, common.command_line(), copy={})
    for i, case in enumerate(cases):
        common.progress(f"[{i + 1}/{len(cases)}] {case[0]}")
        run.rows.append(bench_case(case, args, device, dtype))
    common.progress_done()
    print(f"# {run.machine}, torch {run.torch}, {args.dtype}, {args.repeats} repetitions "
          f"of {args.number} calls, interleaved\n")
    print(common.markdown_table(run.rows, [
        ("case", "case", None), ("form", "form", None), ("shape", "shape", None),
        ("treepool_us", "treepool us", "{:.1f}"), ("torch_us", "torch us", "{:.1f}"),
        ("ratio", "treepool / torch", "{:.2f}"), ("ratio_min", "min", "{:.2f}"),
        ("ratio_max", "max", "{:.2f}"), ("gflops", "treepool GFLOP/s", "{:.1f}")]))
    if args.json:
        run.write_json(args.json)
    return run


if __name__ == "__main__":
    sys.exit(main() and 0)
