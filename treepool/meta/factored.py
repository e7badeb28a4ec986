"""Factored linear leaves: per-task ``nn.Linear`` weights kept as low-rank updates.

With few shots, a task's adapted weight after j inner steps from a node's weight W is

    W_t = W - sum_j lr_j * A_j^T B_j,     A_j = dL/dz [N, out],  B_j = the layer input [N, in]

(N the rows of the support batch).  Kept in that form, a forward is

    x W_t^T = x W^T - sum_j lr_j * (x B_j^T) A_j

so the tasks of a node share one GEMM with W and add rank-N corrections; no
``[T, out, in]`` weight or gradient is ever built.  A_j is the gradient of the loss
w.r.t. a zero *probe* added to the layer's output z, B_j the layer's input recorded in
the forward; both are ordinary functions of the meta-parameters, so autograd gives the
exact first- or second-order meta-gradient (float64 tests against the dense form).

A layer is factored when it is a plain ``nn.Linear`` whose weight is adapted and not
tied, the inner rate is a scalar per step or per layer (an elementwise Meta-SGD rate
breaks the low rank), and by default when it clearly pays:
2 * N * steps * (in + out) < in * out (the factors' traffic against the dense weight's).
"""

from __future__ import annotations

import contextlib
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .functional import Inputs, LossFn, ModelFunctions, Params, as_tuple, exact_norms

__all__ = ["FactoredLinears", "FACTORED_MODES"]

FACTORED_MODES = ("auto", "always", "never")


class _Layer:
    """Per-task state of one factored layer inside the batched computation."""

    def __init__(self, weight: Tensor, bias: Optional[Tensor]):
        self.weight, self.bias = weight, bias
        self.terms: List[Tuple[object, Tensor, Tensor]] = []  # (lr, A [N, out], B [N, in])
        self.probe: Optional[Tensor] = None
        self.seen: Optional[Tensor] = None

    def forward(self, x: Tensor) -> Tensor:
        z = F.linear(x, self.weight, self.bias)
        if self.terms:
            flat = x.reshape(-1, x.shape[-1])
            for lr, a, b in self.terms:
                z = z - lr * (flat @ b.transpose(0, 1) @ a).view(z.shape)
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

    def layers_for(self, x: Inputs, rates: Sequence) -> Tuple[str, ...]:
        """The layers to factor for support data ``x`` ([T, n, ...]) and the rates of
        the leaf steps."""
        steps = len(rates)
        if self.mode == "never" or not self.eligible:
            return ()
        rows = self._input_rows(x)
        chosen = []
        for name, m in self.eligible.items():
            if name not in rows or not all(self.scalar_rate(r, name) for r in rates):
                continue
            pays = 2 * rows[name] * steps * (m.in_features + m.out_features) < m.in_features * m.out_features
            if self.mode == "always" or pays:
                chosen.append(name)
        return tuple(chosen)

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
                     loss_fn: LossFn, create_graph: bool) -> Tensor:
        """[T] query losses after ``len(rates)`` per-task steps from the node parameters
        ``base`` (``shared``: one unbatched set; else ``[groups, *shape]``, node c owning
        the c-th of ``groups`` equal blocks of the T tasks)."""
        out_shapes = {n: shape for n, (_, shape) in self._probe_shapes(sx).items()}

        def task(params: Params, x, y, xq, yq) -> Tensor:
            layers = {n: _Layer(params[f"{n}.weight"], params.get(f"{n}.bias")) for n in names}
            factored = {f"{n}.{p}" for n in names for p in ("weight", "bias")}
            dense = {k: v for k, v in params.items() if k not in factored}
            for lr in rates:
                dense = self._step(layers, dense, x, y, lr, loss_fn, create_graph, out_shapes)
            with self._active(layers):
                return loss_fn(self.fns(dense, xq), yq)

        per_task = torch.func.vmap(task, in_dims=(None, 0, 0, 0, 0), randomness=self.fns.randomness)
        if shared:
            return per_task(base, sx, sy, qx, qy)

        def node(params, x, y, xq, yq):
            return per_task(params, x, y, xq, yq)

        blocks = [_blocks(t, groups) for t in (sx, sy, qx, qy)]
        losses = torch.func.vmap(node, randomness=self.fns.randomness)(base, *blocks)
        return losses.reshape(-1)

    def _step(self, layers: Dict[str, _Layer], dense: Params, x, y, lr, loss_fn: LossFn,
              create_graph: bool, out_shapes: Dict[str, torch.Size]) -> Params:
        """One inner step of one task: dense parameters by their gradient, factored
        layers by a new (A, B) term and their bias by the sum of A's rows."""
        def loss(dense_params, probes):
            for n, probe in probes.items():
                layers[n].probe = probe
            try:
                with self._active(layers):
                    out = loss_fn(self.fns(dense_params, x), y)
            finally:
                for n in probes:
                    layers[n].probe = None
            return out, {n: layers[n].seen for n in probes}

        probes = {n: torch.zeros(out_shapes[n], dtype=l.weight.dtype, device=l.weight.device)
                  for n, l in layers.items()}
        grad = torch.func.grad(loss, argnums=(0, 1), has_aux=True)
        with exact_norms(self.fns.model) if create_graph else torch.no_grad():
            (g_dense, g_probe), seen = grad(dense, probes)
        new_dense = {}
        for k, v in dense.items():
            rate = lr[k] if isinstance(lr, dict) else lr
            g = g_dense[k] if create_graph else g_dense[k].detach()
            new_dense[k] = v - rate * g
        for n, layer in layers.items():
            a = g_probe[n].reshape(-1, layer.weight.shape[0])
            b = seen[n].reshape(-1, layer.weight.shape[1])
            if not create_graph:
                a, b = a.detach(), b.detach()
            w_rate = lr[f"{n}.weight"] if isinstance(lr, dict) else lr
            layer.terms.append((w_rate, a, b))
            if layer.bias is not None:
                b_rate = lr[f"{n}.bias"] if isinstance(lr, dict) else lr
                layer.bias = layer.bias - b_rate * a.sum(0)
        return new_dense


def _blocks(x: Inputs, groups: int) -> Inputs:
    if isinstance(x, (tuple, list)):
        return tuple(t.reshape(groups, -1, *t.shape[1:]) for t in x)
    return x.reshape(groups, -1, *x.shape[1:])
