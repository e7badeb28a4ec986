"""Calls the host build of the CUDA kernels (host_build.library()) on CPU tensors.

The launchers of csrc/cuda/kernels.h are called as the CUDA bindings call them, with
the argument structs mirrored by ctypes Structures below (their sizes are checked
against the C++ ones at load). Every buffer the kernels see lives inside a larger
"guarded" storage: the bytes around it (and between its rows) hold a guard value that
a test checks afterwards, and outputs and workspace are filled with NaN first.

The launchers take a list of argument structs (one per tensor of a multi-tensor op,
run as one launch per 16 tensors); `run_reduce` and `run_broadcast` take one struct or
a list. Adding a launcher: mirror its argument struct here, add its wrappers to
driver.cpp, and a `run_*` function below.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from . import host_build

DTYPE_IDS = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
EPILOGUES = {"sum": 0, "mean": 1, "tree": 2, "reptile": 3}
ORDERS = {"forward": 0, "reverse": 1, "shuffled": 2}
GUARD = 768.0  # surrounds every buffer; 3 * 2^8, exact in every dtype (bfloat16 too)
GUARD_ELEMS = 16  # elements of guard before a buffer (keeps 16-byte alignment)
CUDA_SUCCESS = 0


class ReduceArgs(ctypes.Structure):
    """treepool::cuda::SegmentReduceArgs (kernels.h), field by field."""

    _fields_ = [
        ("dtype", ctypes.c_int), ("epilogue", ctypes.c_int),
        ("T", ctypes.c_int64), ("P", ctypes.c_int64), ("C", ctypes.c_int64),
        ("x", ctypes.c_void_p), ("x_stride", ctypes.c_int64),
        ("offsets", ctypes.c_void_p), ("weights", ctypes.c_void_p),
        ("out", ctypes.c_void_p), ("out_stride", ctypes.c_int64),
        ("base", ctypes.c_void_p), ("base_stride", ctypes.c_int64),
        ("base_rows", ctypes.c_int64), ("parents", ctypes.c_void_p),
        ("rate", ctypes.c_double), ("rate_tensor", ctypes.c_void_p),
        ("rate_stride", ctypes.c_int64),
    ]


class BroadcastArgs(ctypes.Structure):
    """treepool::cuda::SegmentBroadcastArgs (kernels.h), field by field."""

    _fields_ = [
        ("dtype", ctypes.c_int), ("mean", ctypes.c_bool),
        ("T", ctypes.c_int64), ("P", ctypes.c_int64), ("C", ctypes.c_int64),
        ("g", ctypes.c_void_p), ("g_stride", ctypes.c_int64),
        ("offsets", ctypes.c_void_p), ("weights", ctypes.c_void_p),
        ("out", ctypes.c_void_p), ("out_stride", ctypes.c_int64),
    ]


_LIB = None


def lib() -> ctypes.CDLL:
    """The host build, loaded once (raises host_build.Unavailable without g++ or CUDA)."""
    global _LIB
    if _LIB is None:
        so = ctypes.CDLL(str(host_build.library()))
        for name in ("tp_host_sizeof_reduce_args", "tp_host_sizeof_broadcast_args",
                     "tp_host_segment_reduce_workspace_bytes",
                     "tp_host_segment_broadcast_workspace_bytes"):
            getattr(so, name).restype = ctypes.c_size_t
        so.tp_host_launch_count.restype = ctypes.c_longlong
        so.tp_host_take_error.restype = ctypes.c_char_p
        so.tp_host_set_order.argtypes = [ctypes.c_int, ctypes.c_uint64]
        for struct, name in ((ReduceArgs, "reduce"), (BroadcastArgs, "broadcast")):
            size = getattr(so, f"tp_host_sizeof_{name}_args")()
            if size != ctypes.sizeof(struct):
                raise RuntimeError(f"{struct.__name__} has {ctypes.sizeof(struct)} bytes, the "
                                   f"C++ struct {size}: mirror kernels.h again")
        _LIB = so
    return _LIB


def set_order(order: str, seed: int = 0) -> None:
    lib().tp_host_set_order(ORDERS[order], seed)


def launch_count() -> int:
    return lib().tp_host_launch_count()


def take_error() -> str:
    return lib().tp_host_take_error().decode()


# ----------------------------------------------------------------------------- buffers


@dataclass
class Layout:
    """Where a [rows, P] buffer lies: `shift` elements after a 16-byte aligned start
    and rows `pad` elements apart beyond P (stride = P + pad)."""

    shift: int = 0
    pad: int = 0


def vector_layout(P: int, dtype: torch.dtype) -> Layout:
    """16-byte aligned rows: the kernels take their vector path."""
    vec = 16 // torch.empty((), dtype=dtype).element_size()
    return Layout(shift=0, pad=(-P) % vec)


class Guarded:
    """A [rows, cols] view with row stride `stride` inside a storage of guard values."""

    def __init__(self, values: torch.Tensor, layout: Layout, fill: Optional[float] = None):
        rows, cols = values.shape
        self.dtype = values.dtype
        self.stride = cols + layout.pad
        self.start = GUARD_ELEMS + layout.shift
        span = (rows - 1) * self.stride + cols if rows > 0 else 0
        self.storage = torch.full((self.start + span + GUARD_ELEMS + 8,), GUARD, dtype=self.dtype)
        self.view = self.storage.as_strided((rows, cols), (self.stride, 1), self.start)
        self.view.copy_(values if fill is None else torch.full_like(values, fill))
        inside = torch.zeros_like(self.storage, dtype=torch.bool)
        inside.as_strided((rows, cols), (self.stride, 1), self.start).fill_(True)
        self.outside = ~inside

    def ptr(self) -> int:
        return self.view.data_ptr()

    def untouched_guards(self) -> bool:
        """True when every element outside the view still holds the guard value."""
        return bool((self.storage[self.outside] == GUARD).all())


class Workspace:
    """Scratch of `nbytes` bytes, 256-byte aligned, NaN-filled, with guard bytes around."""

    GUARD_BYTE = 0x5A

    def __init__(self, nbytes: int):
        self.nbytes = nbytes
        self.storage = torch.full((nbytes + 1024,), self.GUARD_BYTE, dtype=torch.uint8)
        base = self.storage.data_ptr()
        self.start = 256 + (-(base + 256)) % 256
        self.storage[self.start:self.start + nbytes] = 0xFF  # NaN in every float type

    def ptr(self) -> Optional[int]:
        return self.storage.data_ptr() + self.start if self.nbytes > 0 else None

    def untouched_guards(self) -> bool:
        g = self.storage
        return bool((g[:self.start] == self.GUARD_BYTE).all()
                    and (g[self.start + self.nbytes:] == self.GUARD_BYTE).all())


def index_tensor(values) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.int64).contiguous()


# ----------------------------------------------------------------------------- launches


def check_error(err: int, what: str) -> None:
    if err != CUDA_SUCCESS:
        raise RuntimeError(f"{what}: cudaError {err}: {take_error()}")


def _run(name: str, args, guarded: list) -> None:
    """Launcher `name` over one argument struct or a list of them, with a NaN-filled,
    guarded workspace; checks every guard."""
    so = lib()
    items = [args] if isinstance(args, ctypes.Structure) else list(args)
    array = (type(items[0]) * len(items))(*items)
    n = ctypes.c_int64(len(items))
    nbytes = getattr(so, f"tp_host_{name}_workspace_bytes")(array, n)
    ws = Workspace(nbytes)
    check_error(getattr(so, f"tp_host_{name}")(array, n, ctypes.c_void_p(ws.ptr())), name)
    assert ws.untouched_guards(), f"{name} wrote outside its workspace"
    for what, buf in guarded:
        assert buf.untouched_guards(), f"{name} wrote outside {what}"


def run_reduce(args: Union[ReduceArgs, Sequence[ReduceArgs]], guarded: list) -> None:
    _run("segment_reduce", args, guarded)


def run_broadcast(args: Union[BroadcastArgs, Sequence[BroadcastArgs]], guarded: list) -> None:
    _run("segment_broadcast", args, guarded)
