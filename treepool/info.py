"""What this installation of treepool has: versions, backends, compiled kernels."""

from __future__ import annotations

import os
import platform

import torch

from . import __version__
from .ops import backend as _backend


def info() -> dict:
    """A dict of the facts `python -m treepool info` prints."""
    native = _backend.native_available()
    build = _backend._C.build_info() if native else {}
    built_with = build.get("torch", "unknown")
    if native and built_with not in ("unknown", torch.__version__):
        built_with += f"  (MISMATCH: running torch {torch.__version__}; rebuild treepool)"
    missing = ("MISSING: treepool runs its pure-PyTorch reference (correct, slower). "
               f"Reason: {_backend.NATIVE_ERROR}. Build it with "
               "`pip install --no-build-isolation -e .` against this torch")
    return {
        "treepool": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "torch CUDA": torch.version.cuda or "none (CPU build)",
        "CUDA device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "active backend": _backend.get_backend(),
        "native extension": (f"loaded from {_backend._C.__file__}" if native else missing),
        "built against torch": built_with if native else "-",
        "compile flags": build.get("compile_flags", "-"),
        "CPU kernels": "compiled" if build.get("cpu") else "no",
        "OpenMP": "yes" if build.get("openmp") else "no",
        "CUDA kernels": "compiled" if build.get("cuda") else "no",
        "CUDA architectures": build.get("cuda_archs") or "none",
        "CPU threads": torch.get_num_threads(),
        "CPU allocator": allocator(),
    }


_KEEP = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")
_PRELOADED = ("jemalloc", "tcmalloc", "mimalloc")
# mallopt parameters (glibc's malloc.h) and the values of keep_freed_memory: no trimming,
# 64 MiB of padding when the heap grows, and blocks up to 32 MiB (the largest threshold
# glibc accepts on 64-bit) from the heap instead of their own mmap
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_KEPT_SETTINGS = ((_M_TRIM_THRESHOLD, 1 << 30), (_M_TOP_PAD, 64 << 20), (_M_MMAP_THRESHOLD, 32 << 20))
_kept_by_mallopt = False


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep the memory this process frees (``mallopt``), so that
    the large tensors a meta-step allocates and frees every step stop faulting their
    pages back in (README, 'Memory allocator').  Process-wide, for programs: the
    demo calls it; the library never does.  Does nothing, and returns False, where the
    environment already chose (an allocator under LD_PRELOAD, or MALLOC_* settings) or
    the C library is not glibc; True when set."""
    global _kept_by_mallopt
    if any(name in os.environ.get("LD_PRELOAD", "") for name in _PRELOADED) or \
            any(k in os.environ for k in _KEEP) or platform.libc_ver()[0] != "glibc":
        return False
    import ctypes
    mallopt = ctypes.CDLL(None).mallopt
    _kept_by_mallopt = all(mallopt(param, value) == 1 for param, value in _KEPT_SETTINGS)
    return _kept_by_mallopt


def allocator() -> str:
    """Which malloc this process has, and whether glibc's is told to keep what it frees
    (README, 'Memory allocator')."""
    preload = os.environ.get("LD_PRELOAD", "")
    for name in _PRELOADED:
        if name in preload:
            return f"{name} (LD_PRELOAD)"
    libc, _ = platform.libc_ver()
    if libc != "glibc":
        return f"the platform's ({libc or platform.system()})"
    kept = [f"{k}={os.environ[k]}" for k in _KEEP if k in os.environ]
    if kept:
        return "glibc malloc, " + " ".join(kept)
    if _kept_by_mallopt:
        return "glibc malloc, keeps freed memory (mallopt by treepool.info.keep_freed_memory)"
    return ("glibc malloc, defaults: freed memory goes back to the OS and faults back in "
            "every meta-step (README, 'Memory allocator')")


def format_info() -> str:
    facts = info()
    width = max(len(k) for k in facts)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in facts.items())
