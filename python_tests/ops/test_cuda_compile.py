"""The CUDA sources build, on a machine without a GPU.

Every csrc/cuda/*.cu is compiled with plain ``nvcc -c`` for sm_80 and sm_90 (one nvcc
per file, both -gencode at once), with the half-type restrictions torch's
CUDAExtension adds. Any warning is a failure (``-Werror all-warnings``, and stderr
must be empty). The torch binding csrc/cuda/bindings_cuda.cpp is syntax-checked with
g++ against torch's headers and the CUDA headers, with the C++ standard torch builds
extensions with (C++20 for torch 2.14), so that binding errors show up
here too. The compiles run in parallel; nothing is linked and nothing runs on a GPU.

Skipped, with the reason, when nvcc (or, for the binding, g++, torch's headers or the
CUDA headers) is missing.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CUDA_DIR = ROOT / "csrc" / "cuda"
CU_FILES = sorted(CUDA_DIR.glob("*.cu"))
BINDINGS = sorted(CUDA_DIR.glob("*.cpp"))

ARCHS = ("80", "90")
# What torch.utils.cpp_extension.CUDAExtension passes to nvcc that makes code stricter
# (no implicit half / bfloat16 conversions or operators).
TORCH_NVCC_DEFINES = (
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
)
TIMEOUT_S = 300

NVCC = shutil.which("nvcc")
GXX = shutil.which("g++")


def nvcc_command(source: Path, obj: Path) -> list[str]:
    cmd = [NVCC, "-c", "-std=c++17", "-O3"]
    for arch in ARCHS:
        cmd += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    cmd += [*TORCH_NVCC_DEFINES, "-Xcompiler", "-Wall,-Wextra", "-Werror", "all-warnings"]
    return cmd + [str(source), "-o", str(obj)]


def cuda_include_dir() -> str | None:
    """The include directory nvcc itself uses (asked with --dryrun), else the usual places."""
    candidates = []
    try:
        dry = subprocess.run([NVCC, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
        for line in (dry.stdout + dry.stderr).splitlines():
            if "INCLUDES=" in line and "SYSTEM_INCLUDES" not in line:
                candidates += re.findall(r'-I"?([^"\s]+)', line)
    except (OSError, subprocess.SubprocessError):
        pass
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "include"))
    candidates += [str(Path(NVCC).resolve().parent.parent / "include"), "/usr/local/cuda/include"]
    for inc in candidates:
        if os.path.isfile(os.path.join(inc, "cuda_runtime.h")):
            return inc
    return None


def torch_cxx_standard(cpp_ext) -> str:
    """The -std= that the installed torch's BuildExtension gives C++ sources (torch 2.14's
    headers need C++20): read from its source, the newest standard it names."""
    import inspect

    try:
        text = inspect.getsource(cpp_ext.BuildExtension)
    except (OSError, TypeError):
        return "c++17"
    years = [int(y) for y in re.findall(r"c\+\+(\d\d)\b", text)]
    return f"c++{max(years)}" if years else "c++17"


def binding_command(source: Path) -> tuple[list[str] | None, str]:
    """g++ -fsyntax-only for a binding .cpp, or (None, why it cannot run)."""
    if GXX is None:
        return None, "g++ is not on PATH"
    try:
        import torch.utils.cpp_extension as cpp_ext
    except ImportError:
        return None, "torch is not installed"
    torch_includes = cpp_ext.include_paths()
    if not any(os.path.isfile(os.path.join(d, "c10", "cuda", "CUDAStream.h"))
               for d in torch_includes):
        return None, "torch's c10/cuda headers are not installed"
    cuda_inc = cuda_include_dir()
    if cuda_inc is None:
        return None, "the CUDA headers (cuda_runtime.h) were not found"
    cmd = [GXX, "-fsyntax-only", f"-std={torch_cxx_standard(cpp_ext)}", "-Wall", "-Wextra",
           "-Werror"]
    for inc in torch_includes + [cuda_inc]:
        cmd += ["-isystem", inc]  # their warnings are not ours
    # CPU-only torch wheels lack the generated c10/cuda/impl/cuda_cmake_macros.h; it
    # only matters for linking (export macros), not for a syntax check.
    cmd += ["-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", "-DTREEPOOL_WITH_CUDA", str(source)]
    return cmd, ""


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, cwd=ROOT)
    except subprocess.TimeoutExpired as exc:
        return subprocess.CompletedProcess(cmd, -1, "", f"timed out after {exc.timeout} s")


_compiled: dict = {}
_compile_lock = threading.Lock()


def compile_all() -> tuple[dict, dict]:
    """Compiles every .cu and checks every binding .cpp, all at once: (name -> result,
    name -> why a binding check cannot run). Once per process: python_tests/conftest.py
    starts it in the background when the session begins, so that the compiles overlap
    the tests that run before this module; the fixture waits for that run or, when
    nothing started it, runs it itself."""
    with _compile_lock:
        if "builds" not in _compiled:
            with tempfile.TemporaryDirectory(prefix="treepool_cuda_objects_") as out_dir:
                jobs = {src.name: nvcc_command(src, Path(out_dir) / (src.stem + ".o"))
                        for src in CU_FILES}
                skipped = {}
                for src in BINDINGS:
                    cmd, why = binding_command(src)
                    if cmd is None:
                        skipped[src.name] = why
                    else:
                        jobs[src.name] = cmd
                workers = max(1, min(len(jobs), os.cpu_count() or 1))
                with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
                    futures = {name: pool.submit(run, cmd) for name, cmd in jobs.items()}
                    results = {name: f.result() for name, f in futures.items()}
            _compiled["builds"] = (results, skipped)
        return _compiled["builds"]


def warm_up() -> None:
    """What python_tests/conftest.py runs in the background before this module's tests."""
    if NVCC is not None:
        compile_all()


@pytest.fixture(scope="module")
def builds():
    """name -> result of every compile (see compile_all)."""
    if NVCC is None:
        pytest.skip("nvcc is not on PATH: the CUDA sources cannot be compile-checked")
    return compile_all()


def check(result: subprocess.CompletedProcess) -> None:
    output = (result.stdout + result.stderr).strip()
    if output:
        print(output)  # shown by pytest on failure (or with -s)
    assert result.returncode == 0 and not result.stderr.strip(), (
        f"{' '.join(result.args)}\nfailed (exit {result.returncode}) or warned:\n{output}")


def test_there_are_cuda_sources():
    assert CU_FILES, "no csrc/cuda/*.cu found"
    assert BINDINGS, "no csrc/cuda/*.cpp binding found"


@pytest.mark.parametrize("name", [p.name for p in CU_FILES])
def test_cu_compiles_for_sm80_and_sm90_without_warnings(builds, name):
    results, _ = builds
    check(results[name])


@pytest.mark.parametrize("name", [p.name for p in BINDINGS])
def test_binding_passes_syntax_check(builds, name):
    results, skipped = builds
    if name in skipped:
        pytest.skip(skipped[name])
    check(results[name])
