"""Small numeric rules shared by the reference, the autograd rules and the sharded update."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["accumulate_dtype", "masked_reciprocal"]


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types, the dtype itself otherwise."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype



def masked_reciprocal(W: Tensor) -> Tensor:
    """1 / W where W > 0, else 0: the scale of a cluster mean (a cluster of zero total
    weight has mean 0). The reciprocal is masked, not the quotient, so that its
    gradient is 0 there rather than NaN."""
    positive = W > 0
    return torch.where(positive, 1.0 / torch.where(positive, W, torch.ones_like(W)),
                       torch.zeros_like(W))
