"""Tasks sharded across processes with torch.distributed (docs/design.md, section 7).

Every rank holds the same :class:`~treepool.tree.TaskTree` and a contiguous block of
its tasks in DFS order. At each level, a rank reduces its own rows per cluster with
the native kernels. Because a rank's rows are contiguous, only its first and last
clusters can have tasks on other ranks: the sums and weight totals of those
*spanning* clusters, and of no others, are all-reduced (NCCL on GPU, Gloo on CPU).
Then every rank applies the same tree update (Garcia et al. 2021),

    out[c] = node[parent(c)] - lr * S_c / W_c,   S_c = sum_{t in c} w_t g_t,  W_c = sum_{t in c} w_t

for the clusters it holds, and keeps only those node parameters: the clusters that
contain at least one of its tasks. The all-reduce is differentiable
(``torch.distributed.nn.functional.all_reduce``), so outer gradients, second order
included, cross ranks; summing every rank's meta-gradient gives the single-process one.

Ranks must agree on the tree, the rows each holds, and the parameters' sizes and dtype:
:func:`check_ranks_agree` compares a digest of them with one small collective when a
sharded learner first meets a tree, and raises a ValueError that names what differs
and on which rank (instead of a wrong result or a bare Gloo abort later).  A rank that
stalls makes the others wait for the process group's ``timeout``
(``torch.distributed.init_process_group(..., timeout=datetime.timedelta(...))``;
torch's default is 30 minutes for Gloo): set a short one for interactive work.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from . import ops
from .ops.numerics import accumulate_dtype, masked_reciprocal
from .tree import TaskTree

Rate = Union[float, Tensor]


@dataclass(frozen=True)
class LocalLevel:
    """What one rank needs of one tree level (cluster ids are the level's global ids)."""

    first: int               # global id of this rank's first cluster
    count: int               # number of clusters holding at least one of its rows
    offsets: Tensor          # [count + 1] offsets into the rank's rows
    parents: Tensor          # [count] rows of the rank's node params at the level above
    spanning: Tensor         # [S] global ids of the clusters with rows on several ranks
    local_spanning: Tensor   # [s] the rank's local indices of those it holds
    slots: Tensor            # [s] their rows in the all-reduce buffer [S, P + 1]


def _update(node_params: Tensor, parents: Tensor, S: Tensor, W: Tensor, lr: Rate,
            dtype: torch.dtype) -> Tensor:
    """node[parents] - lr * S / W (0 where W = 0), computed in S's dtype, rounded to dtype."""
    rate = lr.to(S.dtype) if isinstance(lr, Tensor) else lr
    base = node_params.to(S.dtype).index_select(0, parents)
    return (base - rate * (S * masked_reciprocal(W)[:, None])).to(dtype)


def tree_digest(tree: TaskTree) -> str:
    """A short hash of a tree's task order and of every level's offsets and parents."""
    h = hashlib.sha256()
    h.update(tree.perm.numpy().astype("<i8").tobytes())
    for level in range(1, tree.depth + 1):
        h.update(b"|")
        h.update(tree.offsets(level).numpy().astype("<i8").tobytes())
        h.update(tree.parents(level).numpy().astype("<i8").tobytes())
    return h.hexdigest()[:16]


def check_ranks_agree(group: Optional[dist.ProcessGroup] = None, **facts: Any) -> None:
    """Raise a ValueError on every rank unless all ranks of ``group`` pass equal ``facts``
    (e.g. ``tree=tree_digest(tree), num_params=P, dtype=...``); one all_gather_object.
    The message names the first fact that differs and the ranks whose value differs
    from rank 0's."""
    world = dist.get_world_size(group)
    gathered: List[Dict[str, Any]] = [None] * world  # type: ignore[list-item]
    dist.all_gather_object(gathered, {k: str(v) for k, v in facts.items()}, group=group)
    for key in facts:
        values = [g.get(key) for g in gathered]
        odd = [r for r in range(world) if values[r] != values[0]]
        if odd:
            shown = ", ".join(f"rank {r}: {values[r]}" for r in [0] + odd[:3])
            raise ValueError(f"the ranks disagree on {key} ({shown}); every rank must pass "
                             f"the same {key} (rank {dist.get_rank(group)} raised this)")


def even_split(num_tasks: int, world_size: int) -> List[int]:
    """Rows per rank, as even as possible, earlier ranks taking the remainder."""
    base, extra = divmod(num_tasks, world_size)
    return [base + (1 if r < extra else 0) for r in range(world_size)]


class ShardedTree:
    """A TaskTree whose DFS rows are divided among the ranks of a process group.

    tree: the same tree on every rank; rows_per_rank: how many DFS rows each rank
    holds (default :func:`even_split`); group: the process group (default: world);
    ``facts`` (e.g. ``num_params=P, dtype=...``) are checked to agree across ranks
    together with the tree (:func:`check_ranks_agree`).
    """

    def __init__(self, tree: TaskTree, rows_per_rank: Optional[Sequence[int]] = None,
                 group: Optional[dist.ProcessGroup] = None, **facts: Any):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("treepool.ShardedTree needs torch.distributed to be initialised "
                               "(torch.distributed.init_process_group)")
        self.tree, self.group = tree, group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        counts = list(rows_per_rank) if rows_per_rank is not None else even_split(
            tree.num_tasks, self.world_size)
        # before anything a single rank could refuse: every rank reaches the collective
        check_ranks_agree(group, tree=tree_digest(tree), num_tasks=tree.num_tasks,
                          rows_per_rank=[int(c) for c in counts], **facts)
        if len(counts) != self.world_size or any(int(c) < 0 for c in counts) \
                or sum(counts) != tree.num_tasks:
            raise ValueError(f"rows_per_rank must give {self.world_size} non-negative counts "
                             f"summing to the tree's {tree.num_tasks} tasks, got {counts}")
        self.bounds = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.row_begin = int(self.bounds[self.rank])
        self.row_end = int(self.bounds[self.rank + 1])
        self._levels: List[Optional[LocalLevel]] = [None] + [
            self._local_level(k) for k in range(1, tree.depth + 1)]
        self._device_levels = {}

    # ------------------------------------------------------------------ partition
    def _clusters_of(self, offsets: np.ndarray, begin: int, end: int):
        """Range [first, stop) of the non-empty clusters that meet rows [begin, end)."""
        nonempty = offsets[1:] > offsets[:-1]
        meets = nonempty & (offsets[:-1] < end) & (offsets[1:] > begin)
        ids = np.flatnonzero(meets)
        return (int(ids[0]), int(ids[-1]) + 1) if ids.size else (0, 0)

    def _local_level(self, level: int) -> LocalLevel:
        off = self.tree.offsets(level).numpy()
        first, stop = self._clusters_of(off, self.row_begin, self.row_end)
        n = self.row_end - self.row_begin
        local_off = np.clip(off[first:stop + 1] - self.row_begin, 0, n) if stop > first \
            else np.zeros(1, dtype=np.int64)
        if level == 1:
            parents = np.zeros(stop - first, dtype=np.int64)
        else:
            prev = self.tree.offsets(level - 1).numpy()
            prev_first, _ = self._clusters_of(prev, self.row_begin, self.row_end)
            parents = self.tree.parents(level).numpy()[first:stop] - prev_first
        # The rank holding a cluster's first row and the one holding its last row.
        nonempty = off[1:] > off[:-1]
        first_rank = np.searchsorted(self.bounds, off[:-1], side="right") - 1
        last_rank = np.searchsorted(self.bounds, off[1:] - 1, side="right") - 1
        spanning = np.flatnonzero(nonempty & (first_rank != last_rank))
        held = spanning[(spanning >= first) & (spanning < stop)]
        slots = np.searchsorted(spanning, held)
        as_tensor = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=torch.int64)
        return LocalLevel(first, stop - first, as_tensor(local_off), as_tensor(parents),
                          as_tensor(spanning), as_tensor(held - first), as_tensor(slots))

    def level(self, level: int, device=None) -> LocalLevel:
        """This rank's view of a level (1..depth), its tensors on ``device``."""
        if not 1 <= level <= self.tree.depth:
            raise ValueError(f"level must be in 1..{self.tree.depth}, got {level}")
        device = torch.device(device) if device is not None else torch.device("cpu")
        key = (level, str(device))
        if key not in self._device_levels:
            lv = self._levels[level]
            move = lambda t: t.to(device)
            self._device_levels[key] = LocalLevel(lv.first, lv.count, move(lv.offsets),
                                                  move(lv.parents), move(lv.spanning),
                                                  move(lv.local_spanning), move(lv.slots))
        return self._device_levels[key]

    def segment_ids(self, level: int, device=None) -> Tensor:
        """[num_local_tasks] index of each of the rank's rows among its clusters of ``level``."""
        lv = self.level(level, device)
        sizes = lv.offsets[1:] - lv.offsets[:-1]
        return torch.repeat_interleave(torch.arange(lv.count, device=sizes.device), sizes,
                                       output_size=self.num_local_tasks)

    @property
    def local_tasks(self) -> Tensor:
        """Original ids of the rank's tasks, in its row order: rank r passes the data of
        these tasks, in this order."""
        return self.tree.perm[self.row_begin:self.row_end]

    def local_rows(self, x: Tensor) -> Tensor:
        """This rank's rows of a [T, ...] tensor already in DFS order."""
        return x[self.row_begin:self.row_end]

    @property
    def num_local_tasks(self) -> int:
        return self.row_end - self.row_begin

    # ------------------------------------------------------------------ reductions
    def _all_reduce(self, buffer: Tensor) -> Tensor:
        if torch.is_grad_enabled() and buffer.requires_grad:
            from torch.distributed.nn.functional import all_reduce
            return all_reduce(buffer, op=dist.ReduceOp.SUM, group=self.group)
        buffer = buffer.clone()
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=self.group)
        return buffer

    def cluster_sums(self, grads: Tensor, level: int, weights: Optional[Tensor] = None):
        """(S, W) for the rank's clusters of ``level``, summed over every rank's rows:
        S [count, P] = sum_t w_t g_t, W [count] = sum_t w_t, in float32 for half types.

        grads: this rank's rows [num_local_tasks, P]; weights: their [num_local_tasks].
        Only the spanning clusters' rows are all-reduced.
        """
        lv = self.level(level, grads.device)
        acc = accumulate_dtype(grads.dtype)
        S = ops.segment_sum(grads, lv.offsets, weights).to(acc)
        if weights is None:
            W = (lv.offsets[1:] - lv.offsets[:-1]).to(acc)
        else:
            W = ops.segment_sum(weights[:, None], lv.offsets).to(acc)[:, 0]
        if lv.spanning.numel() == 0:
            return S, W
        buffer = torch.zeros(lv.spanning.numel(), grads.shape[1] + 1, dtype=acc,
                             device=grads.device)
        mine = torch.cat([S[lv.local_spanning], W[lv.local_spanning, None]], dim=1)
        buffer = self._all_reduce(buffer.index_copy(0, lv.slots, mine))
        total = buffer[lv.slots]
        S = S.index_copy(0, lv.local_spanning, total[:, :-1])
        W = W.index_copy(0, lv.local_spanning, total[:, -1])
        return S, W

    def tree_update(self, node_params: Tensor, grads: Tensor, level: int, lr: Rate,
                    weights: Optional[Tensor] = None, same_level: bool = False) -> Tensor:
        """The rank's rows of :func:`treepool.tree_update` at ``level``.

        node_params: the rank's node parameters of level - 1 ([1, P], the root, for
        level 1), as returned by the previous call, or of ``level`` itself when
        ``same_level`` (a further inner step on the same level: parents[c] = c);
        grads: its rows [n, P]. Returns [count, P], the rank's clusters of ``level``
        (``level(level).first`` is the global id of the first).
        """
        S, W = self.cluster_sums(grads, level, weights)
        lv = self.level(level, grads.device)
        parents = torch.arange(lv.count, device=grads.device) if same_level else lv.parents
        return _update(node_params, parents, S, W, lr, grads.dtype)


def all_reduce_mean(rows: Tensor, weights: Optional[Tensor] = None,
                    group: Optional[dist.ProcessGroup] = None) -> Tensor:
    """[P] weighted mean of the rows of every rank: sum_t w_t x_t / sum_t w_t, one
    all-reduce of P + 1 numbers (Reptile's pooled phi over sharded tasks)."""
    acc = accumulate_dtype(rows.dtype)
    offsets = torch.tensor([0, rows.shape[0]], dtype=torch.int64, device=rows.device)
    S = ops.segment_sum(rows, offsets, weights).to(acc)[0]
    W = (torch.tensor(float(rows.shape[0]), dtype=acc, device=rows.device) if weights is None
         else weights.to(acc).sum())
    total = torch.cat([S, W[None]])
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    W = total[-1]
    return (total[:-1] / W if W > 0 else torch.zeros_like(total[:-1])).to(rows.dtype)


def sync_grads(module: torch.nn.Module, group: Optional[dist.ProcessGroup] = None) -> None:
    """Sum every parameter's .grad over the ranks (a missing .grad counts as 0)."""
    for p in module.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM, group=group)
