"""FlatParams: all trainable parameters of a module as one contiguous [P] vector.

treepool's ops work on row-major [N, P] buffers: one row of parameters (or
gradients) per task or tree node.  FlatParams fixes the layout of such a row
for a given module:

    row = concat(p.flatten() for name, p in module.named_parameters() if p.requires_grad)

and turns a [P] or [N, P] buffer back into named, shaped tensors that are
zero-copy *views* of the buffer, ready for ``torch.func.functional_call`` (one
set of parameters) or ``torch.func.vmap`` over rows (N tasks or tree nodes in
one batched forward).  Gradients taken w.r.t. a buffer that requires grad
come back as a buffer of the same [N, P] layout.

Ownership: FlatParams does not rewire the module.  The module keeps its own
parameters; :attr:`FlatParams.buffer` is a copy taken at construction.  Use
:meth:`flatten` to copy a module's parameters (or a dict) into a new buffer
and :meth:`load_into` to copy a buffer back into the module.

Restrictions (checked at construction, with a clear error):

* all trainable parameters must share one dtype and one device (nothing is
  silently cast);
* module buffers (e.g. BatchNorm running statistics) are refused by default
  because they are not part of the flat vector and would be shared, and
  updated in place, by every row.  ``buffers="share"`` accepts them: calls
  then use the module's own buffers for every row, and refuse a BatchNorm
  that is in training mode and tracks running statistics (call
  ``module.eval()`` or use ``track_running_stats=False``).

Parameters with ``requires_grad=False`` are left out of the vector; calls use
the module's own values for them.  Shared (tied) parameters appear once,
under their first name, as in ``module.named_parameters()``.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple, Union

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
        buffer_names: names of the module's buffers (empty unless ``buffers="share"``).
        buffer: [P] copy of the parameters at construction.
    """

    def __init__(self, module: nn.Module, *, buffers: str = "refuse"):
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        if buffers not in ("refuse", "share"):
            raise ValueError(f"buffers must be 'refuse' or 'share', got {buffers!r}")
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
        buffer_names = tuple(n for n, _ in module.named_buffers())
        if buffer_names and buffers == "refuse":
            raise ValueError(
                f"module has buffers {list(buffer_names)} that FlatParams does not flatten "
                "(e.g. BatchNorm running statistics). Remove them (BatchNorm with "
                "track_running_stats=False, or torch.func.replace_all_batch_norm_modules_), or "
                "pass buffers='share' to use the module's own buffers for every row in "
                "eval mode")
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
        self.buffer_names: Tuple[str, ...] = buffer_names
        self._index = {n: i for i, n in enumerate(self.names)}
        self.buffer: torch.Tensor = self.flatten(module)

    def __repr__(self) -> str:
        return (f"FlatParams(numel={self.numel}, num_params={len(self.names)}, "
                f"dtype={self.dtype}, device={self.device})")

    def __len__(self) -> int:
        return self.numel

    # ------------------------------------------------------------- layout

    def slice(self, name: str) -> slice:
        """Columns of parameter ``name`` in the vector."""
        if name not in self._index:
            raise KeyError(f"{name!r} is not a trainable parameter of this layout; names: {list(self.names)}")
        i = self._index[name]
        return slice(self.offsets[i], self.offsets[i + 1])

    def _check_module(self, module: nn.Module) -> Dict[str, torch.Tensor]:
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        named = {n: p for n, p in module.named_parameters() if p.requires_grad}
        layout = [(n, tuple(p.shape)) for n, p in named.items()]
        expected = [(n, tuple(s)) for n, s in zip(self.names, self.shapes)]
        if layout != expected:
            for i in range(max(len(layout), len(expected))):
                got = layout[i] if i < len(layout) else None
                want = expected[i] if i < len(expected) else None
                if got != want:
                    raise ValueError(f"module does not match this FlatParams layout: trainable "
                                     f"parameter #{i} is {got} (name, shape) but {want} was expected")
        return named

    def _check_shared_buffers(self, module: nn.Module) -> None:
        # Shared buffers must not be updated in place by a forward pass.
        if not self.buffer_names:
            return
        for name, sub in module.named_modules():
            if isinstance(sub, nn.modules.batchnorm._NormBase) and sub.training and sub.track_running_stats:
                raise ValueError(
                    f"module {name!r} ({type(sub).__name__}) is in training mode and would update "
                    "its running statistics, which FlatParams shares between all rows; call "
                    "module.eval() or use track_running_stats=False")

    def _check_buffer(self, buffer: torch.Tensor, name: str = "buffer") -> None:
        if not isinstance(buffer, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(buffer).__name__}")
        if buffer.dim() not in (1, 2) or buffer.shape[-1] != self.numel:
            raise ValueError(f"{name} must have shape [P] or [N, P] with P = {self.numel}, "
                             f"got {tuple(buffer.shape)}")
        if buffer.shape[-1] > 1 and buffer.stride(-1) != 1:
            raise ValueError(f"{name} must have unit stride along P so that views can be taken; "
                             "call .contiguous() first")

    # -------------------------------------------------------- conversions

    def unflatten(self, buffer: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Named views of a [P] or [N, P] buffer: ``{name: buffer[..., a:b].view(*batch, *shape)}``.

        The views share memory with ``buffer`` (writing one changes the other)
        and are differentiable, so gradients flow back to ``buffer``.
        """
        self._check_buffer(buffer)
        return self._views(buffer)

    def _views(self, buffer: torch.Tensor) -> Dict[str, torch.Tensor]:
        batch = tuple(buffer.shape[:-1])
        return {name: buffer[..., a:a + n].view(batch + tuple(shape))
                for name, shape, a, n in zip(self.names, self.shapes, self.offsets, self.numels)}

    def flatten(self, params: Union[nn.Module, Mapping[str, torch.Tensor]]) -> torch.Tensor:
        """Copy parameters into a new contiguous buffer.

        ``params`` is a module (result [P], detached, in the module's dtype and
        device) or a dict name -> tensor of shape ``shape`` or ``[N, *shape]``
        (result [P] or [N, P]; differentiable; extra keys are ignored).
        """
        if isinstance(params, nn.Module):
            named = self._check_module(params)
            with torch.no_grad():
                return torch.cat([named[n].detach().reshape(-1) for n in self.names])
        if not isinstance(params, Mapping):
            raise TypeError(f"params must be an nn.Module or a dict of tensors, got {type(params).__name__}")
        missing = [n for n in self.names if n not in params]
        if missing:
            raise ValueError(f"params is missing parameter(s) {missing}")
        first = params[self.names[0]]
        batch = tuple(first.shape[:first.dim() - len(self.shapes[0])])
        pieces = []
        for name, shape, n in zip(self.names, self.shapes, self.numels):
            t = params[name]
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"params[{name!r}] must be a tensor, got {type(t).__name__}")
            if tuple(t.shape) != batch + tuple(shape):
                raise ValueError(f"params[{name!r}] has shape {tuple(t.shape)}, expected "
                                 f"{batch + tuple(shape)}")
            pieces.append(t.reshape(batch + (n,)))
        return torch.cat(pieces, dim=-1)

    def grads(self, module: nn.Module) -> torch.Tensor:
        """The module's ``.grad`` fields as a new [P] buffer (zeros where a grad is None)."""
        named = self._check_module(module)
        out = []
        for n in self.names:
            g = named[n].grad
            out.append(torch.zeros(named[n].numel(), dtype=self.dtype, device=self.device)
                       if g is None else g.detach().reshape(-1))
        return torch.cat(out)

    def load_into(self, module: nn.Module, buffer: torch.Tensor) -> None:
        """Copy a [P] buffer into the module's parameters (in place, no autograd)."""
        named = self._check_module(module)
        self._check_buffer(buffer)
        if buffer.dim() != 1:
            raise ValueError(f"buffer must have shape [P] to load into a module, got {tuple(buffer.shape)}")
        views = self.unflatten(buffer)
        with torch.no_grad():
            for n in self.names:
                named[n].copy_(views[n])

    # -------------------------------------------------------------- calls

    def functional_call(self, module: nn.Module, buffer: torch.Tensor, *args, **kwargs) -> Any:
        """``module(*args, **kwargs)`` with its trainable parameters taken from a [P] buffer.

        Uses ``torch.func.functional_call``; other parameters and buffers come
        from the module.
        """
        self._check_module(module)
        self._check_shared_buffers(module)
        self._check_buffer(buffer)
        if buffer.dim() != 1:
            raise ValueError(f"buffer must have shape [P]; use batched_call for [N, P], "
                             f"got {tuple(buffer.shape)}")
        return torch.func.functional_call(module, self.unflatten(buffer), args, kwargs)

    def batched_call(self, module: nn.Module, buffer: torch.Tensor, *args,
                     in_dims: Union[int, None, Tuple] = 0, chunk_size: Optional[int] = None, **kwargs) -> Any:
        """One batched forward for N parameter rows: ``out[i] = module_{buffer[i]}(*args_i)``.

        ``buffer`` is [N, P].  ``args`` are mapped over dim 0 by default (each
        row gets its own input ``args[j][i]``); ``in_dims`` is passed to
        ``torch.func.vmap`` for ``args`` (an int / None for all of them, or a
        tuple with one entry per arg; None = the same input for every row).
        ``kwargs`` are not mapped.  ``chunk_size`` is passed to vmap.
        """
        self._check_module(module)
        self._check_shared_buffers(module)
        self._check_buffer(buffer)
        if buffer.dim() != 2:
            raise ValueError(f"buffer must have shape [N, P]; use functional_call for [P], "
                             f"got {tuple(buffer.shape)}")
        if isinstance(in_dims, tuple):
            if len(in_dims) != len(args):
                raise ValueError(f"in_dims has {len(in_dims)} entries but {len(args)} args were given")
            arg_dims = in_dims
        else:
            arg_dims = (in_dims,) * len(args)

        def call_row(row: torch.Tensor, *row_args):
            return torch.func.functional_call(module, self._views(row), row_args, kwargs)

        return torch.func.vmap(call_row, in_dims=(0,) + tuple(arg_dims),
                               chunk_size=chunk_size)(buffer, *args)
