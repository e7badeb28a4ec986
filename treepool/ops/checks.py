"""Argument checks shared by the reference backend and the fake (meta) kernels.

The native kernels run the same checks in C++ (csrc/checks.cpp) with the same
messages, so that a bad argument raises the same exception on every backend:
``TypeError`` for a wrong dtype, ``ValueError`` for everything else.

Two kinds of check:
- metadata checks (rank, shape, dtype, device) need no data and run everywhere,
  also on fake tensors under torch.compile;
- value checks (offsets, parents, weights) read the small index tensors and
  run on concrete tensors only.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

FLOATING = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _fail(op: str, message: str, kind=ValueError):
    raise kind(f"treepool.{op}: {message}")


def _rows(n: int) -> str:
    """"1 row", "2 rows"."""
    return f"{n} row" if n == 1 else f"{n} rows"


def _shape(t: Tensor) -> str:
    return "[" + ", ".join(str(int(s)) for s in t.shape) + "]"


def check_types(op: str, tensors=(), optional=()) -> None:
    """Arguments that must be tensors, and optional ones that must be tensors or None:
    checked before dispatch, so that a list or a number never reaches the dispatcher."""
    for name, t in tensors:
        if not isinstance(t, Tensor):
            _fail(op, f"{name} must be a tensor, got {type(t).__name__}", TypeError)
    for name, t in optional:
        if t is not None and not isinstance(t, Tensor):
            _fail(op, f"{name} must be a tensor or None, got {type(t).__name__}", TypeError)


def check_rows(op: str, name: str, t: Tensor) -> None:
    """A [rows, P] floating buffer."""
    if not isinstance(t, Tensor):
        _fail(op, f"{name} must be a tensor, got {type(t).__name__}", TypeError)
    if t.dim() != 2:
        _fail(op, f"{name} must be a 2-D tensor [rows, P], got {t.dim()}-D")
    if t.dtype not in FLOATING:
        _fail(op, f"{name} must have a floating dtype (float32, float64, float16 or "
                  f"bfloat16), got {t.dtype}", TypeError)


def max_pool_args(op: str, x: Tensor, kernel_size) -> tuple:
    """x [..., H, W] floating and kernel_size (an int or (kh, kw), positive, no larger than
    a plane); returns (kh, kw). The twin of check_max_pool_args (csrc/checks.cpp)."""
    if not isinstance(x, Tensor):
        _fail(op, f"x must be a tensor, got {type(x).__name__}", TypeError)
    if isinstance(kernel_size, int):
        k = (kernel_size, kernel_size)
    else:
        k = tuple(kernel_size) if isinstance(kernel_size, (tuple, list, torch.Size)) else ()
    if len(k) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in k):
        _fail(op, f"kernel_size must be an int or 2 ints (kh, kw), got {kernel_size!r}", TypeError)
    if k[0] < 1 or k[1] < 1:
        _fail(op, f"kernel_size must be positive, got ({k[0]}, {k[1]})")
    if x.dim() < 2:
        _fail(op, f"x must have at least 2 dimensions [..., H, W], got {x.dim()}-D")
    if x.dtype not in FLOATING:
        _fail(op, f"x must have a floating dtype (float32, float64, float16 or bfloat16), got "
                  f"{x.dtype}", TypeError)
    if x.shape[-2] < k[0] or x.shape[-1] < k[1]:
        _fail(op, f"x's planes [{x.shape[-2]}, {x.shape[-1]}] are smaller than the kernel "
                  f"({k[0]}, {k[1]})")
    return k


def max_pool_shape(x: Tensor, kernel: tuple) -> tuple:
    """The shape of max_pool2d_indices(x, kernel): [..., H // kh, W // kw]."""
    return (*x.shape[:-2], x.shape[-2] // kernel[0], x.shape[-1] // kernel[1])


def check_index(op: str, name: str, t: Tensor, what: str) -> None:
    """A 1-D int64 index tensor such as offsets or parents."""
    if not isinstance(t, Tensor):
        _fail(op, f"{name} must be a tensor, got {type(t).__name__}", TypeError)
    if t.dim() != 1:
        _fail(op, f"{name} must be a 1-D tensor {what}, got {t.dim()}-D")
    if t.dtype != torch.int64:
        _fail(op, f"{name} must have dtype torch.int64, got {t.dtype}", TypeError)


def check_same(op: str, name: str, t: Tensor, ref_name: str, ref: Tensor) -> None:
    if t.device != ref.device:
        _fail(op, f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def check_same_dtype(op: str, name: str, t: Tensor, ref_name: str, ref: Tensor) -> None:
    if t.dtype != ref.dtype:
        _fail(op, f"{name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}",
              TypeError)


def check_segments(op: str, x_name: str, x: Tensor, offsets: Tensor,
                   weights: Optional[Tensor]) -> int:
    """Checks a [T, P] buffer, its offsets [C + 1] and optional weights [T]; returns C."""
    check_rows(op, x_name, x)
    check_index(op, "offsets", offsets, "[C + 1]")
    check_same(op, "offsets", offsets, x_name, x)
    if offsets.numel() == 0:
        _fail(op, "offsets must have at least one element (offsets[0] = 0)")
    if weights is not None:
        if not isinstance(weights, Tensor):
            _fail(op, f"weights must be a tensor or None, got {type(weights).__name__}",
                  TypeError)
        check_same(op, "weights", weights, x_name, x)
        check_same_dtype(op, "weights", weights, x_name, x)
        if weights.dim() != 1 or weights.shape[0] != x.shape[0]:
            _fail(op, f"weights must have shape [T] = [{x.shape[0]}] (one per row of "
                      f"{x_name}), got {_shape(weights)}")
    return offsets.numel() - 1


def check_rate(op: str, name: str, rate: Optional[Tensor], ref_name: str, ref: Tensor) -> None:
    """A learning rate or step size given as a tensor: 0-d or [P]."""
    if rate is None:
        return
    check_same(op, name, rate, ref_name, ref)
    check_same_dtype(op, name, rate, ref_name, ref)
    P = ref.shape[1]
    if not (rate.dim() == 0 or (rate.dim() == 1 and rate.shape[0] == P)):
        _fail(op, f"{name} must be a float, a 0-d tensor or a tensor of shape [P] = "
                  f"[{P}], got shape {_shape(rate)}")


def check_node_rows(op: str, name: str, t: Tensor, ref_name: str, ref: Tensor) -> None:
    """A [rows, P] buffer that must match ref's device, dtype and P."""
    check_rows(op, name, t)
    check_same(op, name, t, ref_name, ref)
    check_same_dtype(op, name, t, ref_name, ref)
    if t.shape[1] != ref.shape[1]:
        _fail(op, f"{name} has {t.shape[1]} columns but {ref_name} has {ref.shape[1]}")


# ----------------------------------------------------------------------------- values


def check_offsets_values(op: str, offsets: Tensor, num_rows: int, x_name: str) -> None:
    o = offsets.tolist()
    if o[0] != 0:
        _fail(op, f"offsets[0] must be 0, got {o[0]}")
    for i in range(len(o) - 1):
        if o[i] > o[i + 1]:
            _fail(op, f"offsets must be non-decreasing, but offsets[{i}] = {o[i]} > "
                      f"offsets[{i + 1}] = {o[i + 1]}")
    if o[-1] != num_rows:
        _fail(op, f"offsets[-1] must equal the number of rows of {x_name} ({num_rows}), "
                  f"got {o[-1]}")


def check_parents_values(op: str, parents: Tensor, num_nodes: int) -> None:
    p = parents.tolist()
    for i, v in enumerate(p):
        if v < 0 or v >= num_nodes:
            _fail(op, f"parents[{i}] = {v} is out of range for node_params with "
                      f"{_rows(num_nodes)}")
        if i + 1 < len(p) and v > p[i + 1]:
            _fail(op, f"parents must be non-decreasing (clusters in DFS order), but "
                      f"parents[{i}] = {v} > parents[{i + 1}] = {p[i + 1]}")


def check_weights_values(op: str, weights: Optional[Tensor]) -> None:
    if weights is None:
        return
    bad = ~(weights.detach() >= 0)  # catches NaN too
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        _fail(op, f"weights must be non-negative, got weights[{i}] = "
                  f"{float(weights[i]):g}")
    inf = torch.isinf(weights.detach())
    if bool(inf.any()):
        i = int(inf.nonzero()[0, 0])
        _fail(op, f"weights must be finite, got weights[{i}] = {float(weights[i]):g}")


# ----------------------------------------------------------------------------- per op


def segment_args(op: str, x_name: str, x: Tensor, offsets: Tensor,
                 weights: Optional[Tensor], values: bool) -> int:
    C = check_segments(op, x_name, x, offsets, weights)
    if values:
        check_offsets_values(op, offsets, x.shape[0], x_name)
        check_weights_values(op, weights)
    return C


def check_trailing_shapes(op: str, base_name: str, base, data_name: str, data) -> None:
    """Paired list elements agree in every dimension but the rows."""
    for i, (b, d) in enumerate(zip(base, data)):
        if tuple(b.shape[1:]) != tuple(d.shape[1:]):
            _fail(op, f"{base_name}[{i}] has shape {_shape(b)} but {data_name}[{i}] has "
                      f"{_shape(d)}: they must agree but for the rows")


def tree_update_args(op: str, node_params: Tensor, grads: Tensor, offsets: Tensor,
                     parents: Tensor, lr_tensor: Optional[Tensor],
                     weights: Optional[Tensor], values: bool) -> int:
    C = check_segments(op, "grads", grads, offsets, weights)
    check_node_rows(op, "node_params", node_params, "grads", grads)
    check_index(op, "parents", parents, "[C]")
    check_same(op, "parents", parents, "grads", grads)
    if parents.shape[0] != C:
        _fail(op, f"parents must have shape [C] = [{C}] (one per cluster of offsets), "
                  f"got {_shape(parents)}")
    check_rate(op, "lr", lr_tensor, "grads", grads)
    if values:
        check_offsets_values(op, offsets, grads.shape[0], "grads")
        check_parents_values(op, parents, node_params.shape[0])
        check_weights_values(op, weights)
    return C


def reptile_update_args(op: str, theta: Tensor, phi: Tensor, offsets: Tensor,
                        eps_tensor: Optional[Tensor], weights: Optional[Tensor],
                        values: bool) -> int:
    C = check_segments(op, "phi", phi, offsets, weights)
    check_node_rows(op, "theta", theta, "phi", phi)
    if theta.shape[0] != C:
        _fail(op, f"theta must have one row per cluster: {_rows(C)} (offsets has {C + 1} "
                  f"entries), got {theta.shape[0]}")
    check_rate(op, "eps", eps_tensor, "phi", phi)
    if values:
        check_offsets_values(op, offsets, phi.shape[0], "phi")
        check_weights_values(op, weights)
    return C


def broadcast_args(op: str, g: Tensor, offsets: Tensor, weights: Optional[Tensor],
                   num_rows: int, values: bool) -> int:
    check_rows(op, "g", g)
    check_index(op, "offsets", offsets, "[C + 1]")
    check_same(op, "offsets", offsets, "g", g)
    C = offsets.numel() - 1
    if C < 0:
        _fail(op, "offsets must have at least one element (offsets[0] = 0)")
    if g.shape[0] != C:
        _fail(op, f"g must have one row per cluster: {_rows(C)} (offsets has {C + 1} "
                  f"entries), got {g.shape[0]}")
    if weights is not None:
        if not isinstance(weights, Tensor):
            _fail(op, f"weights must be a tensor or None, got {type(weights).__name__}",
                  TypeError)
        check_same(op, "weights", weights, "g", g)
        check_same_dtype(op, "weights", weights, "g", g)
        if weights.dim() != 1 or weights.shape[0] != num_rows:
            _fail(op, f"weights must have shape [T] = [{num_rows}] (one per output row), "
                      f"got {_shape(weights)}")
    if values:
        check_offsets_values(op, offsets, num_rows, "the output")
        check_weights_values(op, weights)
    return C


def _span(t: Tensor):
    """Byte range [lo, hi) that a strided tensor touches in its storage."""
    if t.numel() == 0:
        return None
    lo = t.data_ptr()
    extent = sum((s - 1) * st for s, st in zip(t.shape, t.stride()))
    return lo, lo + (extent + 1) * t.element_size()


def _interleaved_disjoint(a: Tensor, b: Tensor) -> bool:
    """Whether two [rows, P] tensors with the same row stride s and unit column stride
    interleave without a common element: a holds columns [0, Pa) of every row of s
    elements, b columns [d, d + Pb) (mod s), d being b's start relative to a's
    (theta = buf[:, :P] and phi = buf[:, P:] are disjoint though their spans overlap)."""
    if a.dim() != 2 or b.dim() != 2 or a.element_size() != b.element_size():
        return False
    s, pa, pb = a.stride(0), a.shape[1], b.shape[1]
    if s != b.stride(0) or s <= 0 or a.shape[0] < 2 or b.shape[0] < 2:
        return False
    if (pa > 1 and a.stride(1) != 1) or (pb > 1 and b.stride(1) != 1) or pa > s or pb > s:
        return False
    diff = b.data_ptr() - a.data_ptr()
    if diff % a.element_size():
        return False
    d = (diff // a.element_size()) % s
    return d >= pa and d + pb <= s


def overlaps(a: Tensor, b: Tensor) -> bool:
    sa, sb = _span(a), _span(b)
    return (sa is not None and sb is not None and sa[0] < sb[1] and sb[0] < sa[1]
            and not _interleaved_disjoint(a, b))


def same_memory(a: Tensor, b: Tensor) -> bool:
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape
            and a.stride() == b.stride())


def check_out(op: str, out: Tensor, out_name: str, ref: Tensor, ref_name: str,
              C: int) -> None:
    """An in-place destination: [C, P], same dtype/device as ref, unit column stride."""
    if not isinstance(out, Tensor):
        _fail(op, f"{out_name} must be a tensor, got {type(out).__name__}", TypeError)
    check_same(op, out_name, out, ref_name, ref)
    check_same_dtype(op, out_name, out, ref_name, ref)
    want = [C, ref.shape[1]]
    if list(out.shape) != want:
        _fail(op, f"{out_name} must have shape [C, P] = [{want[0]}, {want[1]}], got "
                  f"{_shape(out)}")
    if out.numel() > 0 and out.shape[1] > 1 and out.stride(1) != 1:
        _fail(op, f"{out_name} must have unit stride along its last dimension")
    if out.shape[0] > 1 and out.shape[1] > 0 and out.stride(0) < out.shape[1]:
        _fail(op, f"{out_name} has rows that overlap each other")


def check_no_overlap(op: str, out_name: str, out: Tensor, name: str, t: Optional[Tensor]) -> None:
    if t is not None and overlaps(out, t):
        _fail(op, f"{out_name} must not overlap {name}")


def check_tree_update_out(op: str, out: Tensor, node_params: Tensor, grads: Tensor,
                          parents: Tensor, lr_tensor, weights, C: int, values: bool) -> None:
    check_out(op, out, "out", grads, "grads", C)
    for name, t in (("grads", grads), ("lr", lr_tensor), ("weights", weights)):
        check_no_overlap(op, "out", out, name, t)
    if overlaps(out, node_params):
        identity = values and same_memory(out, node_params) and bool(
            (parents == torch.arange(C, device=parents.device)).all())
        if not identity:
            _fail(op, "out may alias node_params only when it is the same tensor and "
                      "parents[c] == c for every c; otherwise pass a separate buffer")


def check_reptile_update_out(op: str, theta: Tensor, phi: Tensor, eps_tensor, weights) -> None:
    if theta.numel() > 0 and theta.shape[1] > 1 and theta.stride(1) != 1:
        _fail(op, "theta must have unit stride along its last dimension")
    if theta.shape[0] > 1 and theta.shape[1] > 0 and theta.stride(0) < theta.shape[1]:
        _fail(op, "theta has rows that overlap each other")
    for name, t in (("phi", phi), ("eps", eps_tensor), ("weights", weights)):
        check_no_overlap(op, "theta", theta, name, t)


def as_rate(rate: Union[float, int, Tensor], name: str, op: str):
    """Splits a user's lr/eps into (float, optional tensor) as the ops take it."""
    if isinstance(rate, Tensor):
        return 1.0, rate
    if isinstance(rate, bool) or not isinstance(rate, (float, int)):
        _fail(op, f"{name} must be a float or a tensor, got {type(rate).__name__}", TypeError)
    return float(rate), None


# ----------------------------------------------------------------------------- list forms


def is_list(x) -> bool:
    """Whether an op's data argument is the list form (one tensor per model parameter)."""
    return isinstance(x, (list, tuple))


def check_list(op: str, name: str, ts) -> None:
    """A list form: a non-empty list of floating tensors [N, *shape_i] that share N,
    dtype and device (the twin of check_list in csrc/checks.cpp)."""
    if not is_list(ts) or len(ts) == 0:
        _fail(op, f"{name} must be a tensor or a non-empty list of tensors")
    for i, t in enumerate(ts):
        if not isinstance(t, Tensor):
            _fail(op, f"{name}[{i}] must be a tensor, got {type(t).__name__}", TypeError)
        if t.dim() == 0:
            _fail(op, f"{name}[{i}] must have at least one dimension [N, ...], got 0-D")
        if t.dtype not in FLOATING:
            _fail(op, f"{name}[{i}] must have a floating dtype (float32, float64, float16 or "
                      f"bfloat16), got {t.dtype}", TypeError)
    first = f"{name}[0]"
    for i, t in enumerate(ts[1:], 1):
        check_same(op, f"{name}[{i}]", t, first, ts[0])
        check_same_dtype(op, f"{name}[{i}]", t, first, ts[0])
        if t.shape[0] != ts[0].shape[0]:
            _fail(op, f"{name}[{i}] has {t.shape[0]} rows but {first} has {ts[0].shape[0]}")


def check_same_length(op: str, name: str, ts, ref_name: str, ref) -> None:
    if not is_list(ts):
        _fail(op, f"{name} must be a list of tensors like {ref_name}, got "
                  f"{type(ts).__name__}", TypeError)
    if len(ts) != len(ref):
        _fail(op, f"{name} has {len(ts)} tensors but {ref_name} has {len(ref)}")


def trailing_numel(t: Tensor) -> int:
    n = 1
    for s in t.shape[1:]:
        n *= int(s)
    return n


def rows_of(t: Tensor) -> Tensor:
    """[N, *shape] as the [N, numel(shape)] buffer the kernels take (a view when it can be)."""
    return t.reshape(t.shape[0], trailing_numel(t))


def rows_view_of(op: str, name: str, i: int, t: Tensor) -> Tensor:
    """rows_of for a tensor written in place: it must be a view, never a copy."""
    if t.dim() == 2:
        return t
    try:
        return t.view(t.shape[0], trailing_numel(t))
    except RuntimeError:
        _fail(op, f"{name}[{i}] must be viewable as [{t.shape[0]}, {trailing_numel(t)}] "
                  f"(it is written in place); make it contiguous")


def as_rate_list(rate, name: str, op: str, ref, ref_name: str):
    """Splits the rate of a list form into (float, optional list of tensors), one 0-d or
    [numel_i] tensor per tensor of ref: a float, one 0-d tensor for all, or a list of
    tensors each 0-d or of the shape of ref[i]'s trailing dimensions."""
    if isinstance(rate, Tensor):
        if rate.dim() != 0:
            _fail(op, f"{name} for a list of tensors must be a float, a 0-d tensor or a "
                      f"list of tensors (one per tensor of {ref_name}), got shape "
                      f"{_shape(rate)}")
        return 1.0, [rate] * len(ref)
    if not is_list(rate):
        return as_rate(rate, name, op)[0], None
    check_same_length(op, name, rate, ref_name, ref)
    out = []
    for i, (r, t) in enumerate(zip(rate, ref)):
        if not isinstance(r, Tensor):
            _fail(op, f"{name}[{i}] must be a tensor, got {type(r).__name__}", TypeError)
        if r.dim() != 0 and tuple(r.shape) != tuple(t.shape[1:]):
            _fail(op, f"{name}[{i}] must be a 0-d tensor or a tensor of shape "
                      f"[{', '.join(str(int(s)) for s in t.shape[1:])}] (the shape of "
                      f"{ref_name}[{i}] without its rows), got shape {_shape(r)}")
        out.append(r if r.dim() == 0 else r.reshape(-1))
    return 1.0, out


def tree_update_list_args(op: str, node_params, grads, offsets, parents, lr_tensor,
                          weights, values: bool) -> int:
    """Checks of the multi-tensor tree update on its [N, P_i] buffers; returns C."""
    check_same_length(op, "node_params", node_params, "grads", grads)
    if lr_tensor is not None:
        check_same_length(op, "lr", lr_tensor, "grads", grads)
    C = 0
    for i in range(len(grads)):
        C = tree_update_args(op, node_params[i], grads[i], offsets, parents,
                             None if lr_tensor is None else lr_tensor[i], weights,
                             values and i == 0)
    check_list(op, "grads", grads)
    check_list(op, "node_params", node_params)
    return C


def reptile_update_list_args(op: str, theta, phi, offsets, eps_tensor, weights,
                             values: bool) -> int:
    """Checks of the multi-tensor Reptile update on its [N, P_i] buffers; returns C."""
    check_same_length(op, "theta", theta, "phi", phi)
    if eps_tensor is not None:
        check_same_length(op, "eps", eps_tensor, "phi", phi)
    C = 0
    for i in range(len(phi)):
        C = reptile_update_args(op, theta[i], phi[i], offsets,
                                None if eps_tensor is None else eps_tensor[i], weights,
                                values and i == 0)
    check_list(op, "phi", phi)
    return C


def segment_list_args(op: str, xs, offsets, weights, values: bool) -> int:
    C = 0
    for i, x in enumerate(xs):
        C = segment_args(op, "x", x, offsets, weights, values and i == 0)
    check_list(op, "x", xs)
    return C


def broadcast_list_args(op: str, gs, offsets, weights, num_rows: int, values: bool) -> int:
    C = 0
    for i, g in enumerate(gs):
        C = broadcast_args(op, g, offsets, weights, num_rows, values and i == 0)
    check_list(op, "g", gs)
    return C


# ------------------------------------------------------------- batched products
# (treepool.ops.products; the twins of csrc/batched_products.cpp's checks)

_PRODUCT_SHAPES = {  # op: (x, y, the optional third argument), as dimension letters
    "bmm_nn": ("BMK", "BKN", ("acc", "BMN")),
    "bmm_nt": ("BMK", "BNK", ("bias", "BN")),
    "bmm_tn": ("BKM", "BKN", None),
    "outer": ("BN", "BK", ("bias", "BK")),
    "row_dot": ("BNK", "BK", None),
    "weighted_row_sum": ("BN", "BNK", None),
    "bmm_nt_relu": ("BMK", "BNK", ("bias", "BN")),
    "outer_relu": ("BN", "BK", ("bias", "BK")),
}
_ARG_NAMES = {"outer": ("g", "w"), "outer_relu": ("g", "w"), "row_dot": ("h", "w"),
              "weighted_row_sum": ("g", "h")}


def _product_operands(op: str, a: Tensor, b: Tensor, extra: Optional[Tensor]) -> None:
    a_letters, b_letters, third = _PRODUCT_SHAPES[op]
    a_name, b_name = _ARG_NAMES.get(op, ("x", "y"))
    named = [(a_name, a, a_letters), (b_name, b, b_letters)]
    if third is not None and extra is not None:
        named.append((third[0], extra, third[1]))
    check_types(op, [(name, t) for name, t, _ in named])
    sizes = {}
    for name, t, letters in named:
        shape = "[" + ", ".join(letters) + "]"
        if t.dim() != len(letters):
            _fail(op, f"{name} must be {shape}, got {_shape(t)}")
        if t.dtype not in FLOATING:
            _fail(op, f"{name} must be a floating tensor, got {t.dtype}", TypeError)
        check_same_dtype(op, name, t, a_name, a)
        check_same(op, name, t, a_name, a)
        for letter, size in zip(letters, t.shape):
            if sizes.setdefault(letter, int(size)) != int(size):
                _fail(op, f"{name} must be {shape} with {letter} = {sizes[letter]} (from "
                          f"{named[0][0]}{'' if name == b_name else ' and ' + b_name}), "
                          f"got {_shape(t)}")


def product_args(op: str, x: Tensor, y: Tensor, extra: Optional[Tensor] = None) -> None:
    """bmm_nn / bmm_nt / bmm_tn / bmm_nt_relu: 3-D floating x and y of one dtype and
    device whose batch and contraction sizes agree, and acc or bias of the output's
    shape."""
    _product_operands(op, x, y, extra)


def row_args(op: str, a: Tensor, b: Tensor, bias: Optional[Tensor] = None) -> None:
    """outer / outer_relu / row_dot / weighted_row_sum: the shapes of treepool.ops.products."""
    _product_operands(op, a, b, bias)
