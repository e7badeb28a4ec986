"""Builds the CUDA kernels (csrc/cuda/*.cu) for execution on the host, with g++.

Every .cu file is compiled unchanged as C++ (``-x c++``) against CUDA's own headers,
with cuda_host_shim.h force-included (the CUDA builtins and the emulated launch).
Two builds:

- ``library()``: a shared library of the kernels, driver.cpp (the kernels.h launchers
  as C functions) and shim_selftest.cpp, for ctypes;
- ``sanitizer_fuzzer()``: an executable of the kernels and fuzz_main.cpp built with
  ``-fsanitize=address,undefined``.

Builds are cached under ``build/cuda_host/`` (gitignored), keyed by a hash of every
source, header and flag, so a test run recompiles only after a change.
``Unavailable`` is raised, with the reason, when g++ or the CUDA headers are missing.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
CUDA_DIR = ROOT / "csrc" / "cuda"
CACHE = ROOT / "build" / "cuda_host"
SHIM = HERE / "cuda_host_shim.h"

# The half-type restrictions torch's CUDAExtension gives nvcc, so that the host
# build sees the same code.
TORCH_NVCC_DEFINES = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
]
# -Wno-maybe-uninitialized: g++ cannot see that a register array is loaded before use
# (segment_broadcast_kernel loads gv on its first row); nvcc does not warn.
COMMON_FLAGS = ["-std=c++17", "-fPIC", "-Wall", "-Wextra", "-Werror", "-Wno-unknown-pragmas",
                "-Wno-maybe-uninitialized"]
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
COMPILE_TIMEOUT_S = 600


class Unavailable(Exception):
    """The host build cannot be made on this machine (the message says why)."""


def cuda_include_dir() -> Path:
    """The directory of CUDA's cuda_runtime.h: $CUDA_HOME, $CUDA_PATH, the toolkit of
    the nvcc on PATH (its real path, wrappers resolved), or /usr/local/cuda."""
    candidates = [Path(os.environ[v]) / "include" for v in ("CUDA_HOME", "CUDA_PATH")
                  if os.environ.get(v)]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(nvcc).resolve().parent.parent / "include")
    candidates.append(Path("/usr/local/cuda/include"))
    for inc in candidates:
        if (inc / "cuda_runtime.h").is_file() and (inc / "cuda_bf16.h").is_file():
            return inc
    raise Unavailable("the CUDA headers (cuda_runtime.h, cuda_bf16.h) were not found; "
                      "set CUDA_HOME to a CUDA toolkit")


def compiler() -> str:
    gxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("g++")
    if gxx is None:
        raise Unavailable("g++ is not on PATH")
    return gxx


def _run(cmd: list[str]) -> None:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"timed out after {exc.timeout} s: {' '.join(cmd)}") from exc
    if res.returncode != 0:
        raise RuntimeError(f"host build failed: {' '.join(cmd)}\n{res.stdout}{res.stderr}")


def _build(name: str, sources: list[Path], compile_flags: list[str], link_flags: list[str],
           output: str) -> Path:
    """Compiles `sources` (in parallel) and links `output`; cached by content hash."""
    gxx, inc = compiler(), cuda_include_dir()
    flags = [*COMMON_FLAGS, *compile_flags, *TORCH_NVCC_DEFINES, f"-I{inc}"]
    inputs = sorted({*sources, SHIM, *CUDA_DIR.glob("*.h"), *CUDA_DIR.glob("*.cuh")})
    digest = hashlib.sha256()
    for part in [gxx, *flags, *link_flags, output]:
        digest.update(part.encode() + b"\0")
    for path in inputs:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    target_dir = CACHE / f"{name}-{digest.hexdigest()[:16]}"
    target = target_dir / output
    if target.is_file():
        return target

    CACHE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"tmp-{name}-", dir=CACHE))
    try:
        def compile_one(src: Path) -> Path:
            obj = work / (src.name + ".o")
            lang = ["-x", "c++"] if src.suffix == ".cu" else []
            _run([gxx, *flags, "-include", str(SHIM), *lang, "-c", str(src), "-o", str(obj)])
            return obj

        workers = max(1, min(len(sources), os.cpu_count() or 1))
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            objects = list(pool.map(compile_one, sources))
        _run([gxx, *compile_flags, *[str(o) for o in objects], *link_flags,
              "-o", str(work / output)])
        try:
            work.rename(target_dir)  # atomic: a concurrent build of the same hash wins
        except OSError:
            if not target.is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for stale in CACHE.glob(f"{name}-*"):  # builds of older sources
        if stale != target_dir:
            shutil.rmtree(stale, ignore_errors=True)
    return target


def library() -> Path:
    """The shared library of the kernels, the driver and the shim self-tests."""
    sources = sorted(CUDA_DIR.glob("*.cu")) + [HERE / "driver.cpp", HERE / "shim_selftest.cpp"]
    return _build("lib", sources, ["-O2"], ["-shared"], "libtreepool_cuda_host.so")


def sanitizer_fuzzer() -> Path:
    """The fuzz executable of the kernels under AddressSanitizer and UBSan."""
    sources = sorted(CUDA_DIR.glob("*.cu")) + [HERE / "fuzz_main.cpp"]
    return _build("asan", sources, ["-O1", "-g", *SANITIZE], [], "fuzz_kernels")
