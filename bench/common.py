"""Timing, bandwidth and table helpers shared by the benchmark scripts."""

from __future__ import annotations

import json
import platform
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn, device: torch.device, repeats: int = 10, warmup: int = 2) -> float:
    """Median wall time of fn() in seconds, after warm-up; CUDA events on the GPU."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


@dataclass
class CopyBandwidth:
    """Bytes read plus written per second by a large copy: into a preallocated buffer
    (the streaming limit an op can hope for) and by clone (allocation included)."""

    copy_gbs: float
    clone_gbs: float
    nbytes: int


def copy_bandwidth(device: torch.device, nbytes: int = 512 * 2**20, repeats: int = 10) -> CopyBandwidth:
    n = nbytes // 4
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    t_copy = median_time(lambda: dst.copy_(src), device, repeats)
    t_clone = median_time(lambda: src.clone(), device, repeats)
    return CopyBandwidth(2 * n * 4 / t_copy / 1e9, 2 * n * 4 / t_clone / 1e9, n * 4)


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


@dataclass
class Run:
    """Everything one benchmark run printed, for --json."""

    script: str
    device: str
    machine: str
    torch: str
    command: str
    copy: dict
    rows: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    def write_json(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(asdict(self), f, indent=1)


def command_line() -> str:
    """The command as typed, quoted so that it can be pasted back (empty arguments too)."""
    return "python " + shlex.join(sys.argv)


def markdown_table(rows: list, columns: list) -> str:
    """rows: dicts; columns: (key, header, format) triples."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    lines = [head, rule]
    for r in rows:
        cells = []
        for key, _, fmt in columns:
            v = r.get(key)
            cells.append("" if v is None else (fmt.format(v) if fmt else str(v)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def progress(message: str) -> None:
    """One overwritten status line on stderr; nothing when stderr is not a terminal
    (logs and pipes get no escape codes)."""
    if sys.stderr.isatty():
        print(f"\r\033[K{message}", end="", file=sys.stderr, flush=True)


def progress_done() -> None:
    if sys.stderr.isatty():
        print("\r\033[K", end="", file=sys.stderr, flush=True)


def bar_plot(rows: list, path: str, value_key: str, ylabel: str) -> None:
    """A PNG bar chart, one bar per row labelled by its non-float fields; needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"--plot: matplotlib is not installed, {path} not written")
        return
    labels = [" ".join(str(r[k]) for k in r if k not in (value_key,) and not isinstance(r[k], float))
              for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(rows)), 4.5))
    ax.bar(range(len(rows)), [r[value_key] for r in rows])
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(labels, rotation=75, ha="right", fontsize=6)
    ax.set_ylabel(ylabel)
    ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")
