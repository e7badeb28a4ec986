"""Registers, spills and theoretical occupancy of every CUDA kernel instantiation.

Compiles each csrc/cuda/*.cu with ``nvcc -Xptxas -v`` for sm_80 and sm_90 (the flags
of the CUDAExtension build, no GPU needed), reads what ptxas reports per kernel and
prints a Markdown table (recorded in bench/RESULTS.md):

    python3 bench/cuda_resources.py [--arch 80 90]

Occupancy is the theoretical one for blocks of kThreads = 256 threads (every
treepool kernel is launched so), limited by registers alone (no shared memory is
used): 64K 32-bit registers and 64 warps per SM, registers allocated per warp in
units of 256, at most 32 blocks per SM (sm_80 and sm_90 alike).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CUDA_DIR = ROOT / "csrc" / "cuda"
DEFINES = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
           "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]
BLOCK_THREADS = 256
REGS_PER_SM = 65536
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32
REG_ALLOC_UNIT = 256  # registers, per warp

ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(sm_\d+)'")
SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
REGS = re.compile(r"Used (\d+) registers")


def occupancy(regs: int) -> tuple[int, float]:
    """(blocks of 256 threads per SM, resident warps / 64) when registers are the limit."""
    warps_per_block = BLOCK_THREADS // 32
    per_warp = -(-regs * 32 // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    blocks = min(REGS_PER_SM // per_warp // warps_per_block,
                 MAX_WARPS_PER_SM // warps_per_block, MAX_BLOCKS_PER_SM)
    return blocks, blocks * warps_per_block / MAX_WARPS_PER_SM


def demangle(names: list[str]) -> dict[str, str]:
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None:
        return {n: n for n in names}
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True,
                         check=True).stdout.splitlines()
    return dict(zip(names, out))


EPILOGUES = {"0": "sum", "1": "mean", "2": "tree", "3": "reptile"}


def short(name: str) -> str:
    """`segment_reduce_kernel<mean, 8, true, fp16>` from the demangled signature."""
    name = re.sub(r"treepool::cuda::detail::\(anonymous namespace\)::", "", name)
    name = re.sub(r"\(treepool::Epilogue\)(\d)", lambda m: EPILOGUES[m.group(1)], name)
    name = name.split("(")[0].removeprefix("void ")
    return name.replace("__nv_bfloat16", "bf16").replace("__half", "fp16")


def ptxas_report(source: Path, archs: list[str], nvcc: str, out_dir: Path) -> str:
    cmd = [nvcc, "-c", "-std=c++17", "-O3", "-Xptxas", "-v", *DEFINES]
    for arch in archs:
        cmd += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    cmd += [str(source), "-o", str(out_dir / (source.stem + ".o"))]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"nvcc failed on {source.name}:\n{res.stderr}")
    return res.stdout + res.stderr


def parse(report: str) -> list[dict]:
    rows, current = [], None
    for line in report.splitlines():
        if m := ENTRY.search(line):
            current = {"mangled": m.group(1), "arch": m.group(2)}
            rows.append(current)
        elif current is not None and (m := SPILLS.search(line)):
            current["stack"], current["spill_st"], current["spill_ld"] = map(int, m.groups())
        elif current is not None and (m := REGS.search(line)):
            current["regs"] = int(m.group(1))
    return [r for r in rows if "regs" in r]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=["80", "90"])
    args = parser.parse_args()
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        print("nvcc is not on PATH", file=sys.stderr)
        return 1
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for source in sorted(CUDA_DIR.glob("*.cu")):
            rows += parse(ptxas_report(source, args.arch, nvcc, Path(tmp)))
    names = demangle([r["mangled"] for r in rows])
    print("| kernel | arch | registers | spill stores / loads (bytes) | stack (bytes) "
          "| blocks of 256 / SM | occupancy |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in sorted(rows, key=lambda r: (short(names[r["mangled"]]), r["arch"])):
        blocks, occ = occupancy(r["regs"])
        print(f"| `{short(names[r['mangled']])}` | {r['arch']} | {r['regs']} | "
              f"{r.get('spill_st', 0)} / {r.get('spill_ld', 0)} | {r.get('stack', 0)} | "
              f"{blocks} | {occ:.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
