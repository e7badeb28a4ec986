"""Pairwise cosine similarity of task gradients, computed in chunks of P.

For a gradient buffer ``G`` of shape [T, P] (one row per task),

    S[i, j] = <g_i, g_j> / (||g_i|| * ||g_j||)

The Gram matrix ``G @ G.T`` is accumulated over column chunks
``G[:, a:b] @ G[:, a:b].T`` so that the extra memory is O(T * chunk_size)
rather than O(T * P) whatever the size of P.  Each row is first divided by
its largest |entry| (cosine similarity does not change), so squares neither
underflow nor overflow; partial products are summed in float64, which keeps
the result accurate for very large P.

Zero rows: a task whose gradient is exactly zero has no direction.  It gets
similarity 0 with every other task and 1 with itself, so ``S`` is always a
valid similarity matrix (symmetric, unit diagonal, entries in [-1, 1]) and
never contains NaN.
"""

from __future__ import annotations

import numbers
from typing import Optional

import torch

__all__ = [
    "DEFAULT_CHUNK_ELEMENTS",
    "gram_matrix",
    "cosine_similarity_matrix",
    "cosine_from_gram",
]

# Default memory budget of one chunk, in elements of the [rows, chunk] slice.
DEFAULT_CHUNK_ELEMENTS = 1 << 24


def _check_matrix(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be a 2-D [T, P] tensor, got shape {tuple(x.shape)}")
    if not (x.is_floating_point()):
        raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half and bfloat16 products are done in float32; float64 stays float64.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _resolve_chunk(chunk_size: Optional[int], rows: int, cols: int) -> int:
    if chunk_size is None:
        return max(1, min(cols, DEFAULT_CHUNK_ELEMENTS // max(rows, 1)))
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    return int(chunk_size)


def _row_scales(x: torch.Tensor, step: int, name: str) -> torch.Tensor:
    """Largest |entry| of each row (1 for zero rows), computed chunk by chunk."""
    scale = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for start in range(0, x.shape[1], step):
        scale = torch.maximum(scale, x[:, start:start + step].abs().amax(dim=1))
    if not bool(torch.isfinite(scale).all()):
        raise ValueError(f"{name} contains non-finite values (inf or NaN)")
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def _chunked_products(a: torch.Tensor, chunk_size: Optional[int]):
    """Products of the rows of ``a`` [T, P] with each other, each row first divided by
    its largest |entry| so that squares neither underflow nor overflow.  Returns
    (dot [T, T], |a_i|^2 [T], scale [T], dtype), dot and squares in float64 and for the
    scaled rows."""
    step = _resolve_chunk(chunk_size, a.shape[0], a.shape[1])
    cdt = _compute_dtype(a.dtype)
    scale = _row_scales(a, step, "grads").to(cdt)
    dot = torch.zeros(a.shape[0], a.shape[0], dtype=torch.float64, device=a.device)
    sq = torch.zeros(a.shape[0], dtype=torch.float64, device=a.device)
    for start in range(0, a.shape[1], step):
        ca = a[:, start:start + step].to(cdt) / scale[:, None]
        sq += (ca * ca).sum(dim=1, dtype=torch.float64)
        dot += (ca @ ca.T).to(torch.float64)
    return dot, sq, scale.double(), cdt


def gram_matrix(grads: torch.Tensor, chunk_size: Optional[int] = None) -> torch.Tensor:
    """Gram matrix ``grads @ grads.T`` of a [T, P] buffer, accumulated in float64 over chunks of P."""
    _check_matrix(grads, "grads")
    dot, _, scale, _ = _chunked_products(grads.detach(), chunk_size)
    gram = (dot + dot.T) / 2
    return gram * (scale[:, None] * scale[None, :])


def _normalise(dot, sq):
    inv = torch.where(sq > 0, sq.rsqrt(), torch.zeros_like(sq))
    # outer product first, so that a symmetric dot gives an exactly symmetric result
    return (dot * (inv[:, None] * inv[None, :])).clamp_(-1.0, 1.0)


def cosine_similarity_matrix(grads: torch.Tensor, chunk_size: Optional[int] = None) -> torch.Tensor:
    """Pairwise cosine similarity ``S[i, j] = <g_i, g_j> / (|g_i| |g_j|)`` of a [T, P] buffer.

    Args:
        grads: [T, P] floating tensor, one gradient per row (any device).
        chunk_size: number of columns per chunk; ``None`` picks one so that a
            chunk holds about ``DEFAULT_CHUNK_ELEMENTS`` elements.

    Returns:
        [T, T] symmetric tensor on ``grads.device``, float64 for float64 input
        and float32 otherwise, with entries in [-1, 1] and a unit diagonal.
        Zero rows have similarity 0 with every other row (1 with themselves).

    Raises:
        ValueError if ``grads`` is not 2-D or contains inf/NaN.
    """
    _check_matrix(grads, "grads")
    dot, sq, _, cdt = _chunked_products(grads.detach(), chunk_size)
    dot = (dot + dot.T) / 2
    sim = _normalise(dot, sq)
    sim.fill_diagonal_(1.0)
    return sim.to(cdt)


def cosine_from_gram(gram: torch.Tensor, groups: Optional[torch.Tensor] = None,
                     center: bool = True) -> torch.Tensor:
    """[T, T] cosine similarity of rows whose Gram matrix is ``gram`` [T, T], after
    subtracting their group's mean row when ``center``.

    With ``center``: ``S[i, j] = cos(g_i - m_{c(i)}, g_j - m_{c(j)})`` with ``m_c`` the
    mean of the rows of group c (``groups`` [T] labels; ``None``: one group).  What all
    tasks of a group share (at the root: the part of the gradient that every task of
    the batch has in common) says nothing about how the group splits; removing it
    leaves the differences between the tasks.  Computed from the Gram matrix (for a
    [T, P] buffer G: ``cosine_from_gram(gram_matrix(G), groups)``, chunked over P), so
    no centered [T, P] copy is made.  A row equal to its group's mean (e.g. a group of
    one) has similarity 0 with the others.  Similarities across groups are those of
    the centered rows too.  Returns float64 with a unit diagonal."""
    gram = gram.double()
    T = gram.shape[0]
    if not center:
        sq = gram.diagonal().clamp_min(0.0)
        sim = _normalise((gram + gram.T) / 2, sq)
        sim.fill_diagonal_(1.0)
        return sim
    if groups is None:
        member = torch.full((1, T), 1.0 / T, dtype=gram.dtype, device=gram.device)
        index = torch.zeros(T, dtype=torch.long, device=gram.device)
    else:
        if not isinstance(groups, torch.Tensor) or groups.shape != (T,):
            raise ValueError(f"groups must be a [{T}] tensor of labels, got "
                             f"{tuple(groups.shape) if isinstance(groups, torch.Tensor) else groups!r}")
        index = torch.unique(groups.to(gram.device), return_inverse=True)[1]
        onehot = torch.zeros(int(index.max()) + 1, T, dtype=gram.dtype, device=gram.device)
        onehot[index, torch.arange(T, device=gram.device)] = 1.0
        member = onehot / onehot.sum(1, keepdim=True)
    # rows of C = I - M, M[i] = mean weights of i's group: centered Gram = C K C^T
    proj = member[index]                                  # [T, T]
    kc = gram - proj @ gram - gram @ proj.T + proj @ gram @ proj.T
    kc = (kc + kc.T) / 2
    sq = kc.diagonal().clamp_min(0.0)
    # a row that is (numerically) its group's mean has no direction of its own
    tiny = sq <= 1e-12 * gram.diagonal().clamp_min(1e-300)
    sq = torch.where(tiny, torch.zeros_like(sq), sq)
    sim = _normalise(kc, sq)
    sim.fill_diagonal_(1.0)
    return sim
