"""The baseline of bench_distributed.py: a sharded tree update that all-reduces every
cluster of the level, and the bytes each rank sends with it or with treepool's.

treepool.distributed.ShardedTree all-reduces only the clusters whose tasks lie on
several ranks (its ``level(k).spanning``). The naive way sums every cluster's rows on
every rank and all-reduces the whole [C, P + 1] block (sums and weight totals). Both
give the same node parameters; python_tests/distributed checks that this baseline
does, so that the bench compares two correct updates.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor

import treepool
from treepool.distributed import ShardedTree


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the sums travel in: float32 for half types, as in ShardedTree."""
    return torch.promote_types(dtype, torch.float32)


def naive_tree_update(sharded: ShardedTree, node_params: Tensor, grads: Tensor, level: int,
                      lr: Union[float, Tensor], weights: Optional[Tensor] = None) -> Tensor:
    """``sharded.tree_update(node_params, grads, level, lr, weights)`` computed by
    all-reducing the sums and weight totals of every cluster of ``level`` (C x (P + 1)
    numbers per rank instead of S x (P + 1), S the spanning clusters). No autograd
    across ranks: the bench times forward steps."""
    lv = sharded.level(level, grads.device)
    # the level's offsets, clipped to this rank's rows: its share of every cluster
    full = sharded.tree.offsets(level, grads.device)
    local = (full - sharded.row_begin).clamp(0, sharded.num_local_tasks)
    acc = _accumulate_dtype(grads.dtype)
    S = treepool.segment_sum(grads, local, weights).to(acc)
    w = (torch.ones(grads.shape[0], 1, dtype=acc, device=grads.device) if weights is None
         else weights.to(acc)[:, None])
    W = treepool.segment_sum(w, local)[:, 0]
    total = torch.cat([S, W[:, None]], dim=1)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=sharded.group)
    mine = total[lv.first:lv.first + lv.count]
    S, W = mine[:, :-1], mine[:, -1]
    scale = torch.where(W > 0, 1.0 / torch.where(W > 0, W, torch.ones_like(W)),
                        torch.zeros_like(W))  # an empty cluster's mean is 0
    rate = lr.to(acc) if isinstance(lr, Tensor) else lr
    base = node_params.to(acc).index_select(0, lv.parents)
    return (base - rate * (S * scale[:, None])).to(grads.dtype)


def bytes_communicated(sharded: ShardedTree, level: int, num_params: int, dtype: torch.dtype,
                       naive: bool = False) -> int:
    """Bytes each rank sends into the all-reduce of one update at ``level``: a row of
    P sums and one weight total per all-reduced cluster, in the accumulation dtype."""
    rows = (sharded.tree.num_clusters(level) if naive
            else int(sharded.level(level).spanning.numel()))
    size = torch.empty((), dtype=_accumulate_dtype(dtype)).element_size()
    return rows * (num_params + 1) * size
