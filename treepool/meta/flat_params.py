"""FlatParams: all trainable parameters of a module as one contiguous [P] vector.

Transference (:mod:`treepool.meta.transference`) works on [P] parameter vectors and
[M, P] rows of them: the T lookahead vectors ``theta - lr g_i`` are one fused
:func:`treepool.tree_update`.  FlatParams fixes the layout of such a row for a module:

    row = concat(p.flatten() for name, p in module.named_parameters() if p.requires_grad)

and turns a [P] or [N, P] buffer back into named, shaped tensors that are zero-copy,
differentiable *views* of the buffer, ready for ``torch.func.functional_call`` (one
set of parameters) or ``torch.func.vmap`` over rows.

Ownership: FlatParams does not rewire the module.  The module keeps its own
parameters; :attr:`FlatParams.buffer` is a copy taken at construction.

Restrictions (checked at construction, with a clear error): all trainable parameters
share one dtype and one device (nothing is silently cast); a module with buffers (e.g.
BatchNorm running statistics) is refused, because they are not part of the vector.
Parameters with ``requires_grad=False`` are left out of the vector; calls use the
module's own values for them.  Shared (tied) parameters appear once, under their
first name, as in ``module.named_parameters()``.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import nn

__all__ = ["FlatParams"]


class FlatParams:
    """Layout of a module's trainable parameters in one contiguous [P] vector.

    Attributes:
        names: parameter names, in ``module.named_parameters()`` order.
        shapes: their shapes (``torch.Size``).
        numels: their number of elements.
        offsets: start of each parameter in the vector (``offsets[-1] == P``).
        numel: P, the total number of elements.
        dtype, device: the common dtype and device of the parameters.
        buffer: [P] copy of the parameters at construction.
    """

    def __init__(self, module: nn.Module):
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError(f"module {type(module).__name__} has no trainable parameters")
        first_name, first = named[0]
        for name, p in named[1:]:
            if p.dtype != first.dtype:
                raise TypeError(
                    f"module has parameters of mixed dtype: {first_name!r} is {first.dtype} but "
                    f"{name!r} is {p.dtype}; FlatParams needs a single dtype (cast the module "
                    "first, e.g. module.to(torch.float32))")
            if p.device != first.device:
                raise ValueError(
                    f"module has parameters on mixed devices: {first_name!r} is on {first.device} "
                    f"but {name!r} is on {p.device}; FlatParams needs a single device "
                    "(move the module first, e.g. module.to(device))")
        buffer_names = [n for n, _ in module.named_buffers()]
        if buffer_names:
            raise ValueError(
                f"module has buffers {buffer_names} that FlatParams does not flatten "
                "(e.g. BatchNorm running statistics). Remove them (BatchNorm with "
                "track_running_stats=False, or torch.func.replace_all_batch_norm_modules_)")
        self.names: Tuple[str, ...] = tuple(n for n, _ in named)
        self.shapes: Tuple[torch.Size, ...] = tuple(p.shape for _, p in named)
        self.numels: Tuple[int, ...] = tuple(p.numel() for _, p in named)
        offsets = [0]
        for n in self.numels:
            offsets.append(offsets[-1] + n)
        self.offsets: Tuple[int, ...] = tuple(offsets)
        self.numel: int = offsets[-1]
        self.dtype: torch.dtype = first.dtype
        self.device: torch.device = first.device
        with torch.no_grad():
            self.buffer: torch.Tensor = torch.cat([p.detach().reshape(-1) for _, p in named])

    def __repr__(self) -> str:
        return (f"FlatParams(numel={self.numel}, num_params={len(self.names)}, "
                f"dtype={self.dtype}, device={self.device})")

    def __len__(self) -> int:
        return self.numel

    def _check_buffer(self, buffer: torch.Tensor, name: str = "buffer") -> None:
        if not isinstance(buffer, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(buffer).__name__}")
        if buffer.dim() not in (1, 2) or buffer.shape[-1] != self.numel:
            raise ValueError(f"{name} must have shape [P] or [N, P] with P = {self.numel}, "
                             f"got {tuple(buffer.shape)}")
        if buffer.shape[-1] > 1 and buffer.stride(-1) != 1:
            raise ValueError(f"{name} must have unit stride along P so that views can be taken; "
                             "call .contiguous() first")

    def unflatten(self, buffer: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Named views of a [P] or [N, P] buffer: ``{name: buffer[..., a:b].view(*batch, *shape)}``.

        The views share memory with ``buffer`` (writing one changes the other)
        and are differentiable, so gradients flow back to ``buffer``.
        """
        self._check_buffer(buffer)
        batch = tuple(buffer.shape[:-1])
        return {name: buffer[..., a:a + n].view(batch + tuple(shape))
                for name, shape, a, n in zip(self.names, self.shapes, self.offsets, self.numels)}
