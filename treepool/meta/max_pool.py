"""CPU max pooling of the learners' models: the indices from treepool's kernel, the
values a gather at them.

ATen's channels-first CPU max pooling decides every comparison with a branch
(pytorch/pytorch#51393): on random data about 20 ns per output, 20 ms for the 80 x 64
x 28 x 28 first pooling of bench_meta's conv MAML at 16 tasks, an eighth of the meta
step in all (four poolings per forward, and the inner steps run several forwards).
For 2 x 2 windows with stride 2, :func:`treepool.ops.max_pool2d_indices` finds the
same indices branch-free (5.5 ms there), and

    out = x.flatten(-2).gather(-1, idx.flatten(-2))

is exactly ``F.max_pool2d(x, 2)``: the same elements, and under autograd the same
gradient (the gather's backward adds each output's gradient at its index, as max
pooling's backward does; its double backward is a gather, as max pooling's is).
Meta-gradients of bench_meta's conv net are bitwise equal with and without it.

:class:`FastMaxPool` routes ``F.max_pool2d`` (``nn.MaxPool2d``),
``F.max_pool2d_with_indices`` and ``torch.max_pool2d`` there while inside, for
float32/float64 CPU tensors whose planes are contiguous (channels first: ATen's
channels-last pooling is already vectorised), with kernel 2, stride 2 (or None), no
padding or dilation; every other call runs ATen as it is.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import ops

__all__ = ["FastMaxPool", "max_pool2d"]

_POOLS = (F.max_pool2d, F.max_pool2d_with_indices, torch.max_pool2d)


def _pair(v) -> Optional[Tuple[int, int]]:
    if isinstance(v, int) and not isinstance(v, bool):
        return (v, v)
    if isinstance(v, (tuple, list)) and len(v) in (1, 2) and \
            all(isinstance(e, int) and not isinstance(e, bool) for e in v):
        return (v[0], v[-1])
    return None


def _bound(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
           return_indices=False) -> dict:
    """The arguments of a call of F.max_pool2d(_with_indices) or torch.max_pool2d (the
    same order) by name."""
    return dict(input=input, kernel_size=kernel_size, stride=stride, padding=padding,
                dilation=dilation, ceil_mode=ceil_mode, return_indices=return_indices)


def _fits(input, kernel_size, stride, padding, dilation, ceil_mode, return_indices) -> bool:
    """Whether a max pooling call is one that max_pool2d computes (else ATen runs it)."""
    if not isinstance(input, Tensor) or input.device.type != "cpu" or \
            input.dtype not in (torch.float32, torch.float64) or input.dim() not in (3, 4):
        return False
    if _pair(kernel_size) != (2, 2) or stride not in (None, [], ()) and _pair(stride) != (2, 2):
        return False
    if _pair(padding) != (0, 0) or _pair(dilation) != (1, 1):
        return False
    H, W = input.shape[-2:]
    if H < 2 or W < 2 or ceil_mode and (H % 2 or W % 2):  # ceil = floor for even planes
        return False
    # planes contiguous: channels first (a channels-last tensor keeps ATen's pooling)
    return input.stride(-1) == 1 and input.stride(-2) == W and ops.get_backend() == "native"


def max_pool2d(input: Tensor, return_indices: bool = False):
    """``F.max_pool2d(input, 2, return_indices=return_indices)`` for [N, C, H, W] or
    [C, H, W]: the values gathered at :func:`treepool.ops.max_pool2d_indices`."""
    idx = ops.max_pool2d_indices(input, 2)
    out = input.flatten(-2).gather(-1, idx.flatten(-2)).view(idx.shape)
    return (out, idx) if return_indices else out


class FastMaxPool(torch.overrides.TorchFunctionMode):
    """While inside, the max poolings that :func:`max_pool2d` computes run there (see
    the module docstring); the others, and everything else, run as they are."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _POOLS:
            call = _bound(*args, **kwargs)
            if _fits(**call):
                with_indices = func is F.max_pool2d_with_indices or \
                    (func is F.max_pool2d and bool(call["return_indices"]))
                return max_pool2d(call["input"], with_indices)
        return func(*args, **kwargs)
