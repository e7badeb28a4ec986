"""Which implementation runs the ops: the compiled extension or the PyTorch reference.

- ``native``: ``treepool._C`` (C++ on CPU, CUDA when it was compiled in).
- ``reference``: :mod:`treepool.reference`, pure PyTorch.

The default is ``native`` when ``_C`` imports, else ``reference`` with one warning.
``TREEPOOL_BACKEND=reference`` (read at import) or :func:`use_backend` force a choice.
A device that ``_C`` has no kernels for (CUDA in a CPU-only build) runs the reference.
"""

from __future__ import annotations

import contextlib
import os
import warnings

import torch

BACKENDS = ("native", "reference")

try:
    from .. import _C  # noqa: F401  (importing it registers the kernels)

    NATIVE_ERROR = None
except ImportError as exc:  # the extension was not built, or does not match this torch
    _C = None
    NATIVE_ERROR = exc


def native_available() -> bool:
    """True when the compiled extension ``treepool._C`` is loaded."""
    return _C is not None


def _initial_backend() -> str:
    name = os.environ.get("TREEPOOL_BACKEND", "").strip().lower()
    if name and name not in BACKENDS:
        raise ValueError(f"TREEPOOL_BACKEND must be one of {BACKENDS}, got {name!r}")
    if name == "native" and _C is None:
        raise ImportError(f"TREEPOOL_BACKEND=native but treepool._C failed to import: {NATIVE_ERROR}")
    if not name:
        if _C is None:
            warnings.warn(
                f"treepool._C is not available ({NATIVE_ERROR}); treepool falls back to its "
                "pure-PyTorch reference backend, which is correct but slower. Reinstall with "
                "`pip install --no-build-isolation -e .` to build the kernels.",
                RuntimeWarning, stacklevel=3)
        name = "native" if _C is not None else "reference"
    return name


# A plain module global (not a ContextVar) so that torch.compile can trace the choice.
_active = _initial_backend()

# Devices the native kernels cover, asked of the dispatcher once per device type.
_native_devices = {}


def get_backend() -> str:
    """The backend the ops use now: 'native' or 'reference'."""
    return _active


def set_backend(name: str) -> None:
    """Choose the backend for every later call ('native' needs the compiled extension)."""
    global _active
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name == "native" and _C is None:
        raise RuntimeError(f"the native backend is unavailable: {NATIVE_ERROR}")
    _active = name


@contextlib.contextmanager
def use_backend(name: str):
    """Run a block with the given backend, e.g. ``with treepool.use_backend('reference'):``."""
    previous = _active
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def native_has_device(device_type: str) -> bool:
    """Whether ``_C`` registered kernels for this device type (meta: the fake kernels)."""
    if _C is None:
        return False
    if device_type not in _native_devices:
        key = {"cpu": "CPU", "cuda": "CUDA", "meta": "Meta"}.get(device_type)
        _native_devices[device_type] = key is not None and (
            key == "Meta" or torch._C._dispatch_has_kernel_for_dispatch_key(
                "treepool::tree_update", key))
    return _native_devices[device_type]


# Ask the dispatcher now, not at the first call: torch.compile cannot trace the probe.
for _device_type in ("cpu", "cuda", "meta"):
    native_has_device(_device_type)


def runs_native(t: torch.Tensor) -> bool:
    """Whether an op on tensor t goes to the compiled kernels."""
    return _active == "native" and native_has_device(t.device.type)
