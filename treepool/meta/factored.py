"""Factored linear leaves: per-task ``nn.Linear`` weights kept as low-rank updates.

With few shots, a task's adapted weight after j inner steps from a node's weight W is

    W_t = W - sum_j lr_j * A_j^T B_j,     A_j = dL/dz [N, out],  B_j = the layer input [N, in]

(N the rows of the support batch).  Kept in that form, a forward is

    x W_t^T = x W^T - sum_j lr_j * (x B_j^T) A_j

so the tasks of a node share one GEMM with W and add rank-N corrections; no
``[T, out, in]`` weight or gradient is ever built.  The bias's steps are the same rows
summed, ``b_t = b - sum_j lr_j 1^T A_j``, so with the step coefficients per row of the
factors (c_w = -lr_j for W, c_b = -lr_j for b, each step's own rates)

    z_t = x W^T + b + (c_w * (x B^T) + c_b) A            (A, B: every step's rows)

one small product more per layer gives the task's weight and bias: the node's bias is
added by the node's GEMM and no per-task bias, its update or its gradient is ever
built either.  A_j is the gradient of the loss
w.r.t. a zero *probe* added to the layer's output z, B_j the layer's input recorded in
the forward; both are ordinary functions of the meta-parameters, so autograd gives the
exact first- or second-order meta-gradient (float64 tests against the dense form).

A layer is factored when it is a plain ``nn.Linear`` whose weight is adapted and not
tied, the inner rate is a scalar per step or per layer (an elementwise Meta-SGD rate
breaks the low rank), and by default (``'auto'``) when it pays:

    T * (in * out - N * steps * (in + out)) > 96k (first order) or 56k (second order)

the elements of T dense per-task weights against those of the factors, less a fixed
allowance for the factored form's extra operations.  Measured on CPU
(``python bench/bench_meta.py``; bench/RESULTS_meta.md): at width 64 the factored form
costs 1.1-1.3x the dense one with 16 tasks and 0.43-0.92x with 256, whatever the rule.

In first order the steps are constants, ``W_t = W - D_t``: where factoring does not pay
(the rows times steps come near in and out), a plain MLP's layer keeps every task's
weight and updates it in place, ``W_t <- W_t - lr_j A_j^T B_j`` (one ``baddbmm_``, no
``[T, out, in]`` gradient), and the query's gradient reaches W as ``sum_t g_t^T h_t``
(:class:`_InPlaceLinear`; :meth:`FactoredLinears.in_place_layers` says when).
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import products
from . import mlp_backprop
from .batched_mlp import LayerRule, per_task_losses
from .functional import (Inputs, LossFn, ModelFunctions, Params, as_tuple, batched_grads,
                         exact_norms)
from .schedule import descend

__all__ = ["FactoredLinears", "FACTORED_MODES"]

FACTORED_MODES = ("auto", "always", "never")

# 'auto' factors a layer when it saves more than this many weight elements over the batch
# (see the module docstring): below it, the dispatch of the factored form's extra ops
# outweighs the smaller tensors.  Second order pays sooner: the dense form's double
# backward runs through the [T, out, in] tensors once more.  Measured break-evens on
# CPU (always / never): first order 1.05-1.09x at 65-77k elements, 0.73x at 102k;
# second order 1.21x at 45k, 0.86-0.92x at 65-77k.
FACTOR_THRESHOLD = {"first": 96_000, "second": 56_000}

# 'auto' keeps a layer's first-order per-task weights and updates them in place (see
# FactoredLinears.in_place_layers) when the T dense weights hold more elements than this.
# Measured on CPU (bench/ab_meta.py, first-order MAML against the dense leaf steps):
# 1.23x at 26k elements and 1.10x at 102k (forced), 0.91x at 262k, 0.48x at 1M.
IN_PLACE_THRESHOLD = 250_000


class LeafPlan(NamedTuple):
    """How the leaf phase runs: the ``factored`` layers (low-rank terms), how many
    leading steps of the run stay dense (``skip``), and the ``in_place`` layers."""
    factored: Tuple[str, ...]
    skip: int
    in_place: Tuple[str, ...] = ()


class _Layer:
    """Per-task state of one factored layer inside the batched computation: the node's
    weight and bias, and the task's steps so far as one low-rank term (``a`` [R, out]
    the A_j of every step j, ``b`` [R, in] the B_j, stacked along R = N * steps, and
    ``coef`` = (c_w, c_b), their rows' coefficients [R], see the module docstring), so
    that a forward is two extra products however many steps came before."""

    def __init__(self, weight: Tensor, bias: Optional[Tensor], a: Optional[Tensor] = None,
                 b: Optional[Tensor] = None, coef=None, probe: Optional[Tensor] = None):
        self.weight, self.bias, self.a, self.b, self.probe = weight, bias, a, b, probe
        self.coef = coef
        self.seen: Optional[Tensor] = None

    def forward(self, x: Tensor) -> Tensor:
        z = F.linear(x, self.weight, self.bias)
        if self.a is not None:
            flat = x.reshape(-1, x.shape[-1])
            rows = _coefficients(flat @ self.b.transpose(0, 1), *self.coef)
            z = z + (rows @ self.a).view(z.shape)
        if self.probe is not None:
            self.seen = x
            z = z + self.probe
        return z


class FactoredLinears:
    """The factored layers of a model and the batched leaf phase that uses them.

    Args:
        model: the module; fns: its :class:`ModelFunctions` (adapted names).
        mode: 'auto' (factor where it pays), 'always' (every eligible layer) or 'never'.
    """

    def __init__(self, model: nn.Module, fns: ModelFunctions, mode: str = "auto"):
        if mode not in FACTORED_MODES:
            raise ValueError(f"factored must be one of {list(FACTORED_MODES)}, got {mode!r}")
        self.model, self.fns, self.mode = model, fns, mode
        adapted = set(fns.names)
        owners: Dict[int, int] = {}
        for m in model.modules():
            for p in m.parameters(recurse=False):
                owners[id(p)] = owners.get(id(p), 0) + 1
        self.eligible: Dict[str, nn.Linear] = {}
        for name, m in model.named_modules():
            if type(m) is nn.Linear and f"{name}.weight" in adapted and owners[id(m.weight)] == 1:
                if m.bias is None or f"{name}.bias" in adapted:
                    self.eligible[name] = m
        self._shapes: Dict = {}

    # ------------------------------------------------------------------ planning

    def layers_for(self, x: Inputs, rates: Sequence, second_order: bool = True) -> Tuple[str, ...]:
        """The layers to factor for support data ``x`` ([T, n, ...]), the rates of the
        leaf steps and the order of the meta-gradient."""
        steps = len(rates)
        if self.mode == "never" or not self.eligible:
            return ()
        rows = self._input_rows(x)
        tasks = as_tuple(x)[0].shape[0]
        chosen = []
        for name, m in self.eligible.items():
            if name not in rows or not all(self.scalar_rate(r, name) for r in rates):
                continue
            saved = m.in_features * m.out_features - rows[name] * steps * (m.in_features + m.out_features)
            pays = tasks * saved > FACTOR_THRESHOLD["second" if second_order else "first"]
            if self.mode == "always" or pays:
                chosen.append(name)
        return tuple(chosen)

    def in_place_layers(self, x: Inputs, rates: Sequence, second_order: bool,
                        factored: Sequence[str]) -> Tuple[str, ...]:
        """First order only, on a plain MLP (BatchedMLP): the eligible layers besides
        ``factored``, with scalar rates and both dimensions above 1, whose per-task
        weights the leaf steps update in place,

            W_t <- W_t - lr * A^T B        (one baddbmm_, no new [T, out, in] tensor),

        the gradient of the query loss reaching the node's weight W as
        sum_t g_t^T h_t (W_t = W minus constants, :class:`_InPlaceLinear`).  Learned
        rates are not constants: with them the layers stay dense or factored."""
        if second_order or self.mode != "auto" or self.fns.batched_mlp(x) is None or \
                any(_learned(r) for r in rates):
            return ()
        tasks = as_tuple(x)[0].shape[0]
        return tuple(n for n, m in self.eligible.items()
                     if n not in factored and min(m.in_features, m.out_features) > 1
                     and tasks * m.in_features * m.out_features > IN_PLACE_THRESHOLD
                     and all(self.scalar_rate(r, n) for r in rates))

    def plan(self, x: Inputs, rates: Sequence, pools: Sequence[int],
             second_order: bool = True) -> LeafPlan:
        """(layers, skip) for a run of trailing steps with ``pools[j]`` tasks per node at
        step j (1 for the leaf steps, which come last): the layers to factor (by
        :meth:`layers_for` on the leaf steps) and how many of the leading node steps to
        leave dense.  A node step of m tasks joins when, over the chosen layers,

            sum 2 * in * out > sum m^2 * N * (in + out)

        i.e. the T / m dense node weights (and their gradients) hold more elements than
        the m * N rows the step adds to each of the T tasks' factors (at width 256:
        0.36x instead of 0.99x of the vmap TreeMAML with 64 tasks, 5 shots, when the
        16-task nodes stay dense).  The steps above one that does not join stay dense."""
        node_steps = sum(1 for m in pools if m > 1)
        names = self.layers_for(x, rates[node_steps:], second_order)
        in_place = self.in_place_layers(x, rates[node_steps:], second_order, names)
        if not names:
            return LeafPlan((), node_steps if in_place else len(pools), in_place)
        rows = self._input_rows(x)
        layers = [(self.eligible[n], rows[n]) for n in names]
        skip = node_steps
        for j in reversed(range(node_steps)):
            saved = sum(2 * m.in_features * m.out_features
                        - pools[j] ** 2 * r * (m.in_features + m.out_features) for m, r in layers)
            if not all(self.scalar_rate(rates[j], n) for n in names) or \
                    (self.mode != "always" and saved <= 0):
                break
            skip = j
        return LeafPlan(names, skip, in_place)

    @staticmethod
    def scalar_rate(rate, name: str) -> bool:
        """True when ``rate`` scales layer ``name``'s weight and bias by scalars."""
        if not isinstance(rate, dict):
            return True
        return all(rate[k].dim() == 0 for k in (f"{name}.weight", f"{name}.bias") if k in rate)

    def _input_rows(self, x: Inputs) -> Dict[str, int]:
        return {n: rows for n, (rows, _) in self._probe_shapes(x).items()}

    def _probe_shapes(self, x: Inputs) -> Dict[str, Tuple[int, torch.Size]]:
        """For one task's data: each eligible layer's input rows N and output shape (one
        no-grad forward of task 0, cached by the data's shape)."""
        sample = tuple(t[0] for t in as_tuple(x))
        key = tuple((tuple(t.shape), t.dtype) for t in sample)
        if key not in self._shapes:
            seen: Dict[str, Tuple[int, torch.Size]] = {}

            def record(mod, inp, out, name):
                seen[name] = (inp[0].numel() // mod.in_features, out.shape)
            hooks = [m.register_forward_hook(lambda mod, inp, out, name=name: record(mod, inp, out, name))
                     for name, m in self.eligible.items()]
            try:
                with torch.no_grad():
                    self.model(*sample)
            finally:
                for h in hooks:
                    h.remove()
            self._shapes[key] = seen
        return self._shapes[key]

    @contextlib.contextmanager
    def _active(self, layers: Dict[str, _Layer]):
        """The chosen modules run their factored forward while inside."""
        saved = {}
        try:
            for name, state in layers.items():
                m = self.eligible[name]
                saved[name] = m.__dict__.get("forward")
                m.forward = state.forward
            yield
        finally:
            for name, old in saved.items():
                m = self.eligible[name]
                if old is None:
                    del m.forward
                else:
                    m.forward = old

    # ------------------------------------------------------------------ leaf phase

    def query_losses(self, names: Sequence[str], base: Params, shared: bool, groups: int,
                     sx: Inputs, sy: Tensor, qx: Inputs, qy: Tensor, rates: Sequence,
                     pools: Sequence[int], loss_fn: LossFn, create_graph: bool,
                     in_place: Sequence[str] = ()) -> Tensor:
        """[T] query losses after ``len(rates)`` steps from the node parameters ``base``
        (``shared``: one unbatched set; else ``[groups, *shape]``, node c owning the c-th
        of ``groups`` equal blocks of the T tasks).  Step j pools the gradients of blocks
        of ``pools[j]`` tasks (TreeMAML's node step; 1: every task alone): the dense
        gradients are averaged over the block, and a factored layer's new rows are the
        block's rows, A scaled by 1 / pools[j], shared by its tasks.

        Each step is one vmapped forward of every task (the factored layers' weights at
        their node, shared by its tasks) and one plain autograd pass over the batch for
        the dense parameters' gradients and the probes' (A); the per-task tensors keep
        the layout ``[T, ...]`` (shared) or ``[groups, T / groups, ...]``."""
        out_shapes = {n: shape for n, (_, shape) in self._probe_shapes(sx).items()}
        T = as_tuple(sx)[0].shape[0]
        lead = (T,) if shared else (groups, T // groups)
        low_rank, names = tuple(names), tuple(names) + tuple(in_place)
        weights = {n: base[f"{n}.weight"] for n in names}
        # the node parameters the tasks share: every weight, the low-rank layers' biases
        node = {**weights, **{f"{n}.bias": base[f"{n}.bias"] for n in low_rank
                              if f"{n}.bias" in base}}
        factored = {f"{n}.{p}" for n in names for p in ("weight", "bias")}

        def per_task(t: Tensor) -> Tensor:  # node rows -> stride-0 per-task views
            node = t.shape if shared else t.shape[1:]
            return (t if shared else t.unsqueeze(1)).expand(*lead, *node)

        def pooled(t: Tensor, m: int) -> Tensor:  # per-task rows -> their block's mean
            rest = t.shape[len(lead):]
            mean = t.reshape(T // m, m, *rest).mean(1, keepdim=True)
            return mean.expand(T // m, m, *rest).reshape(*lead, *rest)

        def block_rows(t: Tensor, m: int) -> Tensor:  # [*lead, N, d] -> each task its block's [m N, d]
            d = t.shape[-1]
            rows = t.reshape(T // m, 1, -1, d)
            return rows.expand(T // m, m, rows.shape[2], d).reshape(*lead, rows.shape[2], d)

        dense = {k: per_task(v) for k, v in base.items() if k not in factored}
        biases = {n: per_task(base[f"{n}.bias"]) for n in in_place if f"{n}.bias" in base}
        a_terms: Dict[str, Tensor] = {}  # A_j of every step so far, [*lead, R, out]
        b_terms: Dict[str, Tensor] = {}  # B of every step so far, [*lead, R, in]
        coefs: Dict[str, Coefficients] = {}  # their rows' (c_w, c_b), [R] each
        # plain MLPs (direct): a node step's rows stay the node's, (m, A_j / m, B_j, c_w,
        # c_b) with [T / m, m N, out], [T / m, m N, in] and scalars: one product per node
        node_terms: Dict[str, List[Tuple[int, Tensor, Tensor, Tensor, Optional[Tensor]]]] = {}
        adapted: Dict[str, Tensor] = {}  # the in-place layers' task weights (constants), [T, out, in]
        data = [t if shared else _blocks(t, groups) for t in (sx, sy, qx, qy)]

        def layers_of(task, node, coef, probes=None):
            return {n: _Layer(node[n], node.get(f"{n}.bias"), task["A"].get(n), task["B"].get(n),
                              coef.get(n), None if probes is None else probes[n])
                    for n in names}

        def support_loss(task, node, coef):
            layers = layers_of(task, node, coef, task["probe"])
            with self._active(layers):
                loss = loss_fn(self.fns(task["dense"], task["x"]), task["y"])
            return loss, {n: layers[n].seen for n in names}

        def query_loss(task, node, coef):
            with self._active(layers_of(task, node, coef)):
                return loss_fn(self.fns(task["dense"], task["x"]), task["y"])

        direct = self._direct(names, lead, sx, loss_fn, in_place)
        if in_place and (direct is None or create_graph):
            raise ValueError("in-place layers need first order and a plain MLP (in_place_layers)")
        support = direct.losses if direct else self._batched(support_loss, shared)
        # first order: the factors, their coefficients and the node weights are constants
        # of the inner steps
        def keep(t: Optional[Tensor]) -> Optional[Tensor]:
            return t if create_graph or t is None else t.detach()
        for lr, m in zip(rates, pools):
            def support_task(variables, probes=None):
                return {"dense": {k: variables[k] for k in dense},
                        "bias": {n: keep(b) for n, b in biases.items()},
                        "A": {n: keep(a) for n, a in a_terms.items()},
                        "B": {n: keep(b) for n, b in b_terms.items()},
                        "nodes": {n: [(k, *map(keep, term)) for k, *term in terms]
                                  for n, terms in node_terms.items()},
                        "W": adapted, "probe": probes or {}, "x": data[0], "y": data[1]}

            def total(variables):  # the dense parameters and the probes: their gradients
                task = support_task(variables, {n: variables[f"probe:{n}"] for n in names})
                losses, seen = support(task, {k: keep(v) for k, v in node.items()},
                                       {n: Coefficients(*map(keep, c)) for n, c in coefs.items()})
                return losses.sum(), seen
            manual = None
            if direct is not None and not create_graph and self.fns.written_out:
                # backpropagation without autograd (mlp_backprop)
                manual = direct.first_order_grads(
                    support_task(dense), {k: v.detach() for k, v in node.items()},
                    {n: Coefficients(*map(keep, c)) for n, c in coefs.items()})
            if manual is not None:
                grads, seen = manual
            else:
                probes = {f"probe:{n}": torch.zeros((), dtype=weights[n].dtype,
                                                    device=weights[n].device)
                          .expand(*lead, *out_shapes[n]) for n in names}  # zeros, stride 0
                with exact_norms(self.fns.model) if create_graph else contextlib.nullcontext():
                    grads, seen = batched_grads({**dense, **probes}, create_graph, total,
                                                has_aux=True)
            dense = descend(dense, {k: grads[k] if m == 1 else pooled(grads[k], m)
                                    for k in dense}, lr)
            for n in names:
                w = weights[n]
                a = grads[f"probe:{n}"].reshape(*lead, -1, w.shape[-2])
                b = seen[n].reshape(*lead, -1, w.shape[-1])
                if not create_graph:
                    a, b = a.detach(), b.detach()
                per_node = m > 1 and direct is not None and n in low_rank
                if per_node:  # the node's rows, [T / m, m N, d]
                    a, b = a.reshape(T // m, -1, a.shape[-1]) / m, b.reshape(T // m, -1, b.shape[-1])
                elif m > 1:
                    a, b = block_rows(a / m, m), block_rows(b, m)
                w_rate = lr[f"{n}.weight"] if isinstance(lr, dict) else lr
                b_rate = (lr[f"{n}.bias"] if isinstance(lr, dict) else lr) \
                    if f"{n}.bias" in base else None
                if n not in low_rank:  # in place: W_t - lr A^T B, b_t - lr 1^T A
                    adapted[n] = _descend_in_place(adapted.get(n), w.detach(), a * -w_rate, b, T)
                    if n in biases:
                        biases[n] = biases[n] - b_rate * a.sum(-2)
                    continue
                step = Coefficients.of(w_rate, b_rate, a)
                if per_node:
                    node_terms.setdefault(n, []).append((m, a, b, *step))
                elif n not in a_terms:
                    a_terms[n], b_terms[n] = a, b
                    coefs[n] = step.per_row(a.shape[-2])
                else:
                    a_terms[n] = torch.cat([a_terms[n], a], -2)
                    b_terms[n] = torch.cat([b_terms[n], b], -2)
                    coefs[n] = coefs[n].join(step.per_row(a.shape[-2]))
        task = {"dense": dense, "bias": biases, "A": a_terms, "B": b_terms, "nodes": node_terms,
                "W": adapted, "x": data[2], "y": data[3]}
        if direct is not None:
            return direct.losses(task, node, coefs)[0].reshape(-1)
        return self._batched(query_loss, shared)(task, node, coefs).reshape(-1)

    def _direct(self, names: Sequence[str], lead: Tuple[int, ...], x: Inputs, loss_fn: LossFn,
                in_place: Sequence[str] = ()) -> Optional["_Direct"]:
        """For a plain sequential MLP run as batched products without vmap (BatchedMLP):
        ``losses(task, node, coef) -> (losses, inputs)`` like the vmapped support loss,
        and ``first_order_grads(task, node, coef)``, the same step's gradients without
        autograd (:func:`treepool.meta.mlp_backprop.first_order_grads`): ``({dense name:
        grad, probe:name: dL/dz}, {name: layer input})`` as the autograd pass over the
        probes gives them (None where it does not apply).  The
        per-task tensors of ``task`` (leading dims ``lead``) are taken as ``[T, ...]``;
        a factored layer computes ``x W^T + b + (c_w (x B^T) + c_b) A (+ probe)`` by
        batched products, each node's W and b shared by its block of tasks; an
        ``in_place`` layer runs :class:`_InPlaceLinear`.  None for other models."""
        mlp = self.fns.batched_mlp(x)
        if mlp is None:
            return None
        T = math.prod(lead)

        def flat(t: Optional[Tensor]) -> Optional[Tensor]:
            return None if t is None else t.reshape(T, *t.shape[len(lead):])

        def run(task, node, coef):
            seen: Dict[str, Tensor] = {}
            probes = task.get("probe", {})

            def factored(name):
                def forward(h: Tensor) -> Tensor:
                    seen[name] = h.reshape(*lead, *h.shape[1:])
                    probe = flat(probes.get(name))
                    if name in in_place:
                        rows = h.reshape(T, -1, h.shape[-1])
                        z = _InPlaceLinear.apply(rows, task["W"].get(name), node[name],
                                                 flat(task["bias"].get(name)),
                                                 None if probe is None else probe.reshape(
                                                     T, rows.shape[1], -1))
                        return z.reshape(*h.shape[:-1], z.shape[-1])
                    return _factored_linear(h, node[name], node.get(f"{name}.bias"),
                                            flat(task["A"].get(name)), flat(task["B"].get(name)),
                                            coef.get(name), probe,
                                            task["nodes"].get(name, ()))
                return forward
            dense = {k: flat(v) for k, v in task["dense"].items()}
            out = mlp(dense, flat(task["x"]), 1, {n: factored(n) for n in names})
            losses = per_task_losses(loss_fn, out, flat(task["y"]), 1)
            return losses.reshape(lead), seen

        def rule(name, task, node, coef) -> LayerRule:
            if name in in_place:
                w_t, w, bias = task["W"].get(name), node[name], flat(task["bias"].get(name))
                return LayerRule(lambda h: _in_place_forward(h, w_t, w, bias, None),
                                 lambda g: _in_place_input_grad(g, w_t, w))
            terms = (node[name], flat(task["A"].get(name)), flat(task["B"].get(name)),
                     coef.get(name), task["nodes"].get(name, ()))
            return LayerRule(lambda h: _factored_linear(h, terms[0], node.get(f"{name}.bias"),
                                                        *terms[1:4], None, terms[4]),
                             lambda g: _factored_input_grad(g, *terms))

        def first_order_grads(task, node, coef):
            dense = {k: flat(v) for k, v in task["dense"].items()}
            rules = {n: rule(n, task, node, coef) for n in names}
            out = mlp_backprop.first_order_grads(mlp, dense, flat(task["x"]), flat(task["y"]),
                                                 loss_fn, False, 1, rules=rules)
            if out is None:
                return None
            grads, seen = out
            per_task = {k: g.reshape(*lead, *g.shape[1:]) for k, g in grads.items()}
            for n, (dz, h) in seen.items():
                per_task[f"probe:{n}"] = dz.reshape(*lead, *dz.shape[1:])
            return per_task, {n: h.reshape(*lead, *h.shape[1:]) for n, (_, h) in seen.items()}
        return _Direct(run, first_order_grads)

    def _batched(self, fn, shared: bool):
        """``fn(task, node, coef)`` over every task: ``task`` holds per-task tensors,
        ``node`` the node parameters (unbatched when ``shared``, else one per group of
        tasks), ``coef`` the low-rank rows' coefficients (shared by every task)."""
        inner = torch.func.vmap(fn, in_dims=(0, None, None), randomness=self.fns.randomness)
        if shared:
            return inner
        return torch.func.vmap(inner, in_dims=(0, 0, None), randomness=self.fns.randomness)


def _learned(rate) -> bool:
    """Whether an inner rate (float, tensor or {name: tensor}) is differentiated."""
    values = rate.values() if isinstance(rate, dict) else [rate]
    return any(isinstance(v, Tensor) and v.requires_grad for v in values)


def _descend_in_place(adapted: Optional[Tensor], node: Tensor, a: Tensor, b: Tensor,
                      tasks: int) -> Tensor:
    """Every task's weight after a step, ``W_t + a_t^T b_t`` (a [*, R, out] the step's
    -lr A, b [*, R, in], per task): in place into ``adapted`` [T, out, in], or from the
    node weight (unbatched, or [groups, out, in] each shared by its block of tasks) at the
    first step."""
    a = a.reshape(tasks, -1, a.shape[-1]).transpose(1, 2)
    b = b.reshape(tasks, -1, b.shape[-1])
    if adapted is not None:
        return adapted.baddbmm_(a, b)
    if node.dim() == 2:
        return torch.baddbmm(node, a, b)
    return _per_task(node, tasks).baddbmm_(a, b)  # a copy: never the node's memory


def _per_task(node: Tensor, tasks: int) -> Tensor:
    """The node weight of every task, [T, out, in]: a stride-0 view of an unbatched W, a
    new tensor (index_select) from [groups, out, in]."""
    if node.dim() == 2:
        return node.expand(tasks, *node.shape)
    return node.repeat_interleave(tasks // node.shape[0], 0)


class _InPlaceLinear(torch.autograd.Function):
    """A first-order in-place layer on every task's rows, ``z_t = h_t W_t^T + b_t +
    probe_t``, with W_t = W_node(t) - D_t and D_t a constant (the steps so far, kept in
    ``adapted`` [T, out, in]; None before the first step: W_t = W_node(t)).  Backward:

        dh_t = g_t W_t,   dW_node = sum_{t in node} g_t^T h_t,   db_t = sum_rows g_t,
        dprobe_t = g_t

    where ``probe`` (added to z) is a zero the step differentiates by to get A = dL/dz.
    h [T, N, in]; the node weight W unbatched or [groups, out, in] (node g owning the
    g-th block of tasks); bias [T, out] or None.  ``adapted`` gets no gradient: first
    order only."""

    @staticmethod
    def forward(ctx, h, adapted, node, bias, probe):
        # (ctx-style forward: a setup_context makes every apply bind the arguments with
        # inspect.signature, ~40 us)
        ctx.save_for_backward(h, adapted, node)
        return _in_place_forward(h, adapted, node, bias, probe)

    @staticmethod
    def backward(ctx, g):
        h, adapted, node = ctx.saved_tensors
        need_h, _, need_node, need_bias, need_probe = ctx.needs_input_grad
        groups = 0 if node.dim() == 2 else node.shape[0]
        grad_h = grad_node = None
        if need_h:
            if adapted is not None and torch.is_grad_enabled():
                # double backward: dh depends on W through W_t
                per_task = _per_task(node, g.shape[0])
                adapted = adapted + (per_task - per_task.detach())
            grad_h = _in_place_input_grad(g, adapted, node)
        if need_node:
            if groups == 0:
                grad_node = g.reshape(-1, g.shape[-1]).t() @ h.reshape(-1, h.shape[-1])
            else:
                grad_node = torch.bmm(g.reshape(groups, -1, g.shape[-1]).transpose(1, 2),
                                      h.reshape(groups, -1, h.shape[-1]))
        grad_bias = g.sum(1) if need_bias else None
        return grad_h, None, grad_node, grad_bias, (g if need_probe else None)


def _in_place_forward(h: Tensor, adapted: Optional[Tensor], node: Tensor, bias: Optional[Tensor],
                      probe: Optional[Tensor]) -> Tensor:
    """:class:`_InPlaceLinear`'s value, ``h_t W_t^T + b_t + probe_t``."""
    if adapted is not None:  # per-task [10, 64] x [64, 64]^T: the small products' loops
        z = products.bmm_nt(h, adapted, bias)
        return z if probe is None else z.add_(probe)
    if node.dim() == 2:
        z = h @ node.t()
    else:
        z = torch.bmm(h.reshape(node.shape[0], -1, h.shape[-1]), node.transpose(1, 2))
        z = z.view(h.shape[0], h.shape[1], -1)
    if bias is not None:
        z.add_(bias.unsqueeze(1))
    return z if probe is None else z.add_(probe)


def _in_place_input_grad(g: Tensor, adapted: Optional[Tensor], node: Tensor) -> Tensor:
    """``dh_t = g_t W_t`` of :class:`_InPlaceLinear` (W_t: ``adapted``, or the node's)."""
    if adapted is not None:
        return products.bmm_nn(g, adapted)
    if node.dim() == 2:
        return g @ node
    return torch.bmm(g.reshape(node.shape[0], -1, g.shape[-1]), node).view(
        g.shape[0], g.shape[1], -1)


def _factored_input_grad(g: Tensor, weight: Tensor, a: Optional[Tensor], b: Optional[Tensor],
                         coef: Optional["Coefficients"],
                         node_terms: Sequence[Tuple[int, Tensor, Tensor, Tensor, Optional[Tensor]]]
                         ) -> Tensor:
    """The input gradient of :func:`_factored_linear` for g = dL/dz [T, N, out] (first
    order: A, B and the coefficients constants):

        dh = g W + (c_w * (g A^T)) B         (and the same per node for node_terms)"""
    T, out_features = g.shape[0], g.shape[-1]
    rows = g.reshape(T, -1, out_features)
    if weight.dim() == 2:
        dh = rows @ weight
    else:
        dh = products.bmm_nn(rows.reshape(weight.shape[0], -1, out_features), weight)
        dh = dh.reshape(T, rows.shape[1], -1)
    if a is not None:
        dh = products.bmm_nn(products.bmm_nt(rows, a) * coef.w, b, dh)
    for m, node_a, node_b, c_w, _ in node_terms:
        stacked = rows.reshape(T // m, -1, out_features)
        dh = products.bmm_nn(products.bmm_nt(stacked, node_a) * c_w, node_b,
                             dh.reshape(T // m, -1, dh.shape[-1])).view(dh.shape)
    return dh.reshape(*g.shape[:-1], dh.shape[-1])


def _factored_linear(h: Tensor, weight: Tensor, bias: Optional[Tensor], a: Optional[Tensor],
                     b: Optional[Tensor], coef: Optional["Coefficients"], probe: Optional[Tensor],
                     node_terms: Sequence[Tuple[int, Tensor, Tensor, Tensor, Optional[Tensor]]] = ()
                     ) -> Tensor:
    """A factored layer on every task's input ``h`` [T, ..., in]: ``h W^T + b + (c_w
    (h B^T) + c_b) A + probe`` with the node weight W and bias b unbatched or
    ``[groups, ...]`` (node g owning the g-th block of T / groups tasks; the bias is
    added by the node's product), the per-task A [T, R, out], B [T, R, in], their rows'
    coefficients ``coef`` = (c_w, c_b) [R] (module docstring) and probe [T, ..., out].
    The correction accumulates into z in one baddbmm: no separate addition, forward or
    backward.  ``node_terms``: the node steps' rows, (m, A [T / m, m N, out], B [T / m,
    m N, in], c_w, c_b), each node's m consecutive tasks sharing them; their product
    runs per node on the node's stacked rows, ``(c_w h_c B_c^T + c_b) A_c``: the same
    multiply-adds as per task, in T / m larger products and without copying the rows
    to every task."""
    T, in_features = h.shape[0], h.shape[-1]
    rows = h.reshape(T, -1, in_features)
    if weight.dim() == 2:
        z = F.linear(rows, weight, bias)
    else:
        groups = weight.shape[0]
        z = products.bmm_nt(rows.reshape(groups, -1, in_features), weight, bias)
        z = z.reshape(T, rows.shape[1], -1)
    if a is not None:
        z = products.bmm_nn(_coefficients(products.bmm_nt(rows, b), *coef), a, z)
    for m, node_a, node_b, c_w, c_b in node_terms:
        stacked = rows.reshape(T // m, -1, in_features)
        z = products.bmm_nn(_coefficients(products.bmm_nt(stacked, node_b), c_w, c_b), node_a,
                            z.reshape(T // m, -1, z.shape[-1])).view(z.shape)
    z = z.reshape(*h.shape[:-1], z.shape[-1])
    return z if probe is None else z + probe


class _Direct(NamedTuple):
    """The leaf steps of a plain MLP without vmap (:meth:`FactoredLinears._direct`)."""
    losses: Callable
    first_order_grads: Callable


class Coefficients(NamedTuple):
    """The coefficients of low-rank rows (module docstring): ``w`` scales a row's
    product with the input (the weight's step, -lr_j), ``b`` is added to it (the bias's
    step, -lr_j of the bias; None without a bias).  0-dim for one step's rows, [R] for
    stacked steps."""
    w: Tensor
    b: Optional[Tensor]

    @classmethod
    def of(cls, w_rate, b_rate, like: Tensor) -> "Coefficients":
        """One step's, from its rates (floats or 0-dim tensors, learned ones included)."""
        def minus(rate):
            return None if rate is None else -torch.as_tensor(rate, dtype=like.dtype,
                                                               device=like.device)
        return cls(minus(w_rate), minus(b_rate))

    def per_row(self, rows: int) -> "Coefficients":
        return Coefficients(*(None if c is None else c.expand(rows) for c in self))

    def join(self, other: "Coefficients") -> "Coefficients":
        return Coefficients(*(None if c is None else torch.cat([c, d]) for c, d in zip(self, other)))


def _coefficients(products_: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
    """``w * p + b`` over the last dim of the rows' products p (b None: ``w * p``)."""
    return products_ * w if b is None else torch.addcmul(b, products_, w)


def _blocks(x: Inputs, groups: int) -> Inputs:
    if isinstance(x, (tuple, list)):
        return tuple(t.reshape(groups, -1, *t.shape[1:]) for t in x)
    return x.reshape(groups, -1, *x.shape[1:])
