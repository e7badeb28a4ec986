"""Batched per-task losses and gradients over FlatParams rows (torch.func).

Shared by the meta-learning algorithms: one ``vmap`` over tasks evaluates every
task's loss (or its gradient) at that task's own parameter row, so no algorithm
loops over tasks in Python.  Gradients returned by :meth:`TaskFunctions.grads` stay
differentiable by the outer autograd (second-order MAML); detach them for
first-order methods.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from .flat_params import FlatParams

LossFn = Callable[[Tensor, Tensor], Tensor]


class TaskFunctions:
    """``loss(row, x, y)`` of one task as a pure function of its [P] parameter row.

    ``module(x)`` runs with its trainable parameters replaced by the views of
    ``row`` (:class:`FlatParams` layout); ``loss_fn(prediction, y)`` must return a
    scalar (e.g. ``torch.nn.functional.mse_loss``).  ``randomness`` is passed to
    ``torch.func.vmap`` ('error', 'different' or 'same'; modules with dropout need
    one of the last two).
    """

    def __init__(self, module: nn.Module, flat: FlatParams, randomness: str = "error"):
        self.module = module
        self.flat = flat
        self.randomness = randomness

    def forward(self, row: Tensor, x: Tensor) -> Tensor:
        return torch.func.functional_call(self.module, self.flat._views(row), (x,))

    def loss(self, loss_fn: LossFn) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
        def task_loss(row: Tensor, x: Tensor, y: Tensor) -> Tensor:
            return loss_fn(self.forward(row, x), y)
        return task_loss

    def grads(self, params: Tensor, x: Tensor, y: Tensor, loss_fn: LossFn,
              shared: bool = False) -> Tensor:
        """[T, P] gradients: row t is d loss_fn(module_{params[t]}(x[t]), y[t]) / d params[t].

        ``shared``: params is one [P] row for every task (the first inner step), so the
        forward multiplies all tasks' inputs by the same weights (one GEMM, not T).
        """
        fn = torch.func.vmap(torch.func.grad(self.loss(loss_fn)),
                             in_dims=(None if shared else 0, 0, 0), randomness=self.randomness)
        return fn(params, x, y)

    def losses(self, params: Tensor, x: Tensor, y: Tensor, loss_fn: LossFn,
               in_dims=(0, 0, 0)) -> Tensor:
        """[T] losses, row t at params[t] on (x[t], y[t]) (``in_dims`` as for vmap)."""
        fn = torch.func.vmap(self.loss(loss_fn), in_dims=in_dims, randomness=self.randomness)
        return fn(params, x, y)

    def predict(self, params: Tensor, x: Tensor) -> Tensor:
        """[T, ...] outputs ``module_{params[t]}(x[t])``."""
        return torch.func.vmap(self.forward, randomness=self.randomness)(params, x)


def check_task_batch(name: str, t: Tensor, num_tasks: Optional[int]) -> int:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a tensor [T, n, ...], got {type(t).__name__}")
    if t.dim() < 1:
        raise ValueError(f"{name} must have a leading task dimension [T, n, ...], got a 0-d tensor")
    if num_tasks is not None and t.shape[0] != num_tasks:
        raise ValueError(f"{name} has {t.shape[0]} tasks (dim 0) but {num_tasks} were expected")
    return int(t.shape[0])


class MetaLearnerBase(nn.Module):
    """Holds a model and its meta-parameters theta as one [P] ``nn.Parameter``.

    The model is kept (not registered as a submodule, so that ``parameters()``
    yields only the meta-parameters: theta and, in subclasses, learnable rates);
    its own trainable parameters are replaced by views of theta (or of task rows)
    in every call.  ``.to(...)``, ``.double()`` etc. move the model too.
    :meth:`sync_model` copies theta back into the model.
    """

    def __init__(self, model: nn.Module, randomness: str = "error"):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        flat = FlatParams(model)
        object.__setattr__(self, "_model", model)
        self.flat = flat
        self.theta = nn.Parameter(flat.buffer.clone())
        self.fn = TaskFunctions(model, flat, randomness)

    @property
    def model(self) -> nn.Module:
        return self._model

    @property
    def num_params(self) -> int:
        """P, the length of theta."""
        return self.flat.numel

    def _apply(self, fn, *args, **kwargs):
        self._model._apply(fn)
        return super()._apply(fn, *args, **kwargs)

    def sync_model(self) -> nn.Module:
        """Copy theta into the model's parameters; returns the model."""
        self.flat.load_into(self._model, self.theta.detach())
        return self._model

    def predict(self, params: Tensor, x: Tensor) -> Tensor:
        """Batched forward: ``out[t] = model_{params[t]}(x[t])`` for params [T, P], x [T, m, ...]."""
        return self.fn.predict(params, x)
