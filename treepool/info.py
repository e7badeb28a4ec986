"""What this installation of treepool has: versions, backends, compiled kernels."""

from __future__ import annotations

import platform

import torch

from . import __version__
from .ops import backend as _backend


def info() -> dict:
    """A dict of the facts `python -m treepool info` prints."""
    build = _backend._C.build_info() if _backend.native_available() else {}
    return {
        "treepool": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "torch CUDA": torch.version.cuda or "none (CPU build)",
        "CUDA device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "active backend": _backend.get_backend(),
        "native extension": ("loaded" if _backend.native_available()
                             else f"missing ({_backend.NATIVE_ERROR})"),
        "CPU kernels": "compiled" if build.get("cpu") else "no",
        "OpenMP": "yes" if build.get("openmp") else "no",
        "CUDA kernels": "compiled" if build.get("cuda") else "no",
        "CUDA architectures": build.get("cuda_archs") or "none",
        "CPU threads": torch.get_num_threads(),
    }


def format_info() -> str:
    facts = info()
    width = max(len(k) for k in facts)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in facts.items())
