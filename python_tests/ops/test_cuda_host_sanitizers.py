"""The CUDA kernels under AddressSanitizer and UBSan, with valid and invalid indices.

kernels.h claims that no access is ever out of bounds, whatever offsets and parents
hold (the binding skips its value checks during CUDA graph capture). This runs the
fuzzer of python_tests/ops/cuda_host/fuzz_main.cpp, the kernels compiled with g++ and
``-fsanitize=address,undefined``: decreasing, negative, past-T and int64-extreme
offsets and parents, exact-size buffers, aligned and misaligned, blocks in shuffled
order. Any sanitizer report fails the test.

The warps run as ucontext fibers; the shim tells ASan about every switch
(__sanitizer_start/finish_switch_fiber), and ASan's one-time warning that it does not
fully support swapcontext is expected and ignored.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from .cuda_host import host_build

pytestmark = pytest.mark.cuda_host

CASES = 100  # each case makes 4 launcher calls: one tensor and a list, both launchers
SEEDS = [1, 2]
REPORTS = ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:",
           "SUMMARY: UndefinedBehaviorSanitizer")


@pytest.fixture(scope="module")
def fuzzer():
    try:
        return host_build.sanitizer_fuzzer()
    except host_build.Unavailable as exc:
        pytest.skip(f"host build of the CUDA kernels unavailable: {exc}")


@pytest.mark.parametrize("seed", SEEDS)
def test_no_sanitizer_report_with_valid_and_invalid_indices(fuzzer, seed):
    env = dict(os.environ,
               ASAN_OPTIONS="halt_on_error=1:detect_leaks=1:detect_stack_use_after_return=0",
               UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1")
    res = subprocess.run([str(fuzzer), str(CASES), str(seed)], capture_output=True, text=True,
                         env=env, timeout=600)
    output = res.stdout + res.stderr
    reports = [line for line in output.splitlines() if any(r in line for r in REPORTS)]
    assert res.returncode == 0 and not reports, (
        f"fuzz_kernels {CASES} {seed} exited {res.returncode}:\n{output[-6000:]}")
    assert f"fuzz: {CASES} cases" in res.stdout
