"""Inner learning rates alpha_k, fixed or learned (Meta-SGD, MAML++).

Modes (K inner steps, the adapted parameters named n with shapes s_n):

| mode | learnable | alpha of step k for parameter n |
| --- | --- | --- |
| ``'fixed'`` | nothing | one float |
| ``'per_step'`` | ``[K]`` | ``rate[k]`` |
| ``'per_layer'`` | one scalar per tensor | ``rate_n`` |
| ``'per_step_layer'`` | ``[K]`` per tensor | ``rate_n[k]`` (MAML++, Antoniou et al. 2019) |
| ``'per_parameter'`` | ``s_n`` per tensor | ``rate_n`` elementwise (Meta-SGD, Li et al. 2017) |
| ``'per_step_parameter'`` | ``[K, *s_n]`` per tensor | ``rate_n[k]`` (Arnold et al. 2021) |

Steps past K use the rate of step K (a learner adapting longer at test time).
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Union

import torch
from torch import Tensor, nn

__all__ = ["InnerRate", "LR_MODES", "check_rate_value"]

LR_MODES = ("fixed", "per_step", "per_layer", "per_step_layer", "per_parameter",
            "per_step_parameter")
Rate = Union[float, Tensor, Dict[str, Tensor]]


def check_rate_value(name: str, value, allow_tensor: bool = True, upper: Optional[float] = None,
                     positive: bool = False):
    """A finite non-negative float (or tensor of them), at most ``upper`` and non-zero when
    ``positive``; TypeError / ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float, Tensor)):
        raise TypeError(f"{name} must be a float{' or a tensor' if allow_tensor else ''}, "
                        f"got {type(value).__name__} {value!r}")
    if isinstance(value, Tensor):
        if not allow_tensor:
            raise TypeError(f"{name} must be a float, got a tensor")
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {value.dtype}")
        v = value.detach()
        if not bool(torch.isfinite(v).all()):
            raise ValueError(f"{name} must be finite, got {value}")
        if bool((v < 0).any()) or (positive and bool((v == 0).any())):
            raise ValueError(f"{name} must be {'positive' if positive else 'non-negative'}, got {value}")
        if upper is not None and bool((v > upper).any()):
            raise ValueError(f"{name} must be at most {upper}, got {value}")
        return value
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be {'positive' if positive else 'non-negative'}, got {value!r}")
    if upper is not None and value > upper:
        raise ValueError(f"{name} must be at most {upper}, got {value!r}")
    return float(value)


class InnerRate(nn.Module):
    """Inner learning rate alpha_k of step k (0-based in :meth:`forward`).

    Args:
        init: the initial rate: a float (every entry), or a tensor broadcastable to
            each learnable shape.
        mode: one of :data:`LR_MODES` (see the module docstring).
        num_steps: K.
        shapes: ``{name: shape}`` of the adapted parameters (needed by the per-layer
            and per-parameter modes).
    """

    def __init__(self, init: Union[float, Tensor] = 0.01, mode: str = "fixed", num_steps: int = 1,
                 shapes: Optional[Dict[str, Sequence[int]]] = None, *, dtype=None, device=None):
        super().__init__()
        if not isinstance(mode, str) or mode not in LR_MODES:
            raise ValueError(f"lr_mode must be one of {list(LR_MODES)}, got {mode!r}")
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"inner_steps must be an int >= 1, got {num_steps!r}")
        check_rate_value("inner_lr", init)
        self.mode = mode
        self.num_steps = num_steps
        self.names = tuple(shapes or ())
        self.value = None
        self.rate = None
        self.rates = None
        if mode == "fixed":
            if isinstance(init, Tensor):
                if init.numel() != 1:
                    raise ValueError("lr_mode='fixed' needs a single float inner_lr")
                init = float(init)
            self.value = float(init)
            return
        dtype = dtype or torch.get_default_dtype()
        if mode == "per_step":
            self.rate = nn.Parameter(self._filled((num_steps,), init, dtype, device))
            return
        if not shapes:
            raise ValueError(f"lr_mode={mode!r} needs the shapes of the adapted parameters")
        per = {"per_layer": lambda s: (), "per_step_layer": lambda s: (num_steps,),
               "per_parameter": lambda s: tuple(s),
               "per_step_parameter": lambda s: (num_steps, *s)}[mode]
        self.rates = nn.ParameterList(
            [nn.Parameter(self._filled(per(s), init, dtype, device)) for s in shapes.values()])

    @staticmethod
    def _filled(shape, init, dtype, device) -> Tensor:
        value = torch.empty(shape, dtype=dtype, device=device)
        with torch.no_grad():
            value.copy_(torch.as_tensor(init, dtype=dtype, device=device).expand(shape))
        return value

    @property
    def learned(self) -> bool:
        return self.mode != "fixed"

    def forward(self, step: int) -> Rate:
        """alpha of inner step ``step``: a float, a 0-d tensor, or ``{name: tensor}``
        (each broadcastable to that parameter's shape)."""
        k = min(step, self.num_steps - 1)
        if self.mode == "fixed":
            return self.value
        if self.mode == "per_step":
            return self.rate[k]
        stepped = self.mode in ("per_step_layer", "per_step_parameter")
        return {n: (r[k] if stepped else r) for n, r in zip(self.names, self.rates)}

    def extra_repr(self) -> str:
        if self.mode == "fixed":
            return f"mode='fixed', value={self.value}"
        return f"mode={self.mode!r}, num_steps={self.num_steps}"
