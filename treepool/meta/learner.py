"""What every learner shares: the model, its meta-parameters, and adapted parameters.

A learner is an ``nn.Module`` holding the user's model as its submodule ``model``:
the model's own named parameters are the meta-parameters (``learner.named_parameters()``
gives ``"model.0.weight"``, ...), so an optimizer on ``learner.parameters()`` moves the
model's weights, ``model.state_dict()`` is always current, parameter groups and weight
decay work as for any module, and ``learner.train()`` / ``learner.eval()`` reach the
model (Dropout, BatchNorm).

``inner_params`` selects the parameters the inner loop adapts (default: every trainable
one); the others are shared by all tasks and still meta-learned (ANIL, Raghu et al.
2020: only the head adapts).  Adapted parameters are dicts ``{name: [T, *shape]}``
(:data:`~treepool.meta.functional.Params`), one row per task in the tasks' order.
"""

from __future__ import annotations

import copy
from typing import Callable, Dict, Iterable, Optional, Union

import torch
from torch import Tensor, nn

from .functional import (Inputs, LossFn, ModelFunctions, Params, batch_statistics,
                         check_inputs)

__all__ = ["MetaLearner", "select_inner_params"]

InnerParams = Union[None, Iterable[str], Callable[[str], bool]]
RANDOMNESS = ("different", "same", "error")


def select_inner_params(model: nn.Module, inner_params: InnerParams) -> tuple:
    """Names of the trainable parameters that ``inner_params`` selects (all by default)."""
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(f"model {type(model).__name__} has no trainable parameters")
    if inner_params is None:
        return tuple(trainable)
    if callable(inner_params):
        names = tuple(n for n in trainable if inner_params(n))
    else:
        if isinstance(inner_params, str):
            inner_params = [inner_params]
        names = tuple(inner_params)
        unknown = [n for n in names if n not in trainable]
        if unknown:
            raise ValueError(f"inner_params names {unknown} that are not trainable parameters "
                             f"of the model; its trainable parameters are {trainable}")
        names = tuple(n for n in trainable if n in set(names))
    if not names:
        raise ValueError("inner_params selects no parameter: the inner loop would adapt nothing")
    return names


class MetaLearner(nn.Module):
    """Base of the learners: ``model`` (a submodule), the adapted parameter names,
    batched model functions, and the evaluation helpers.

    Args:
        model: any ``nn.Module``; parameters of one dtype and device.
        inner_params: names, or a predicate on the name, of the parameters the inner
            loop adapts (default: all trainable ones).
        randomness: ``torch.func.vmap`` randomness in the inner loop: 'different'
            (default: every task draws its own Dropout mask), 'same' or 'error'.
    """

    def __init__(self, model: nn.Module, inner_params: InnerParams = None,
                 randomness: str = "different"):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if randomness not in RANDOMNESS:
            raise ValueError(f"randomness must be one of {list(RANDOMNESS)}, got {randomness!r}")
        self.model = model
        self.inner_names = select_inner_params(model, inner_params)
        params = dict(model.named_parameters())
        kinds = {(p.dtype, p.device) for n, p in params.items() if p.requires_grad}
        if len(kinds) > 1:
            raise ValueError(f"model has parameters of mixed dtype or device {sorted(map(str, kinds))}; "
                             "cast or move the model first (e.g. model.to(torch.float32))")
        self.fns = ModelFunctions(model, self.inner_names, randomness)

    # ------------------------------------------------------------------ parameters

    def theta(self) -> Params:
        """The adapted meta-parameters, ``{name: parameter}`` (the model's own tensors)."""
        params = dict(self.model.named_parameters())
        return {n: params[n] for n in self.inner_names}

    @property
    def param_dtype(self) -> torch.dtype:
        return next(iter(self.theta().values())).dtype

    @property
    def num_params(self) -> int:
        """P: the number of adapted parameter elements."""
        return sum(p.numel() for p in self.theta().values())

    def _shapes(self) -> Dict[str, torch.Size]:
        return {n: p.shape for n, p in self.theta().items()}

    # ------------------------------------------------------------------ data

    def _check_support(self, support_x: Inputs, support_y: Tensor, query_x=None, query_y=None,
                       num_tasks: Optional[int] = None) -> int:
        dtype = self.param_dtype
        T = check_inputs("support_x", support_x, num_tasks, dtype)
        check_inputs("support_y", support_y, T, None, min_dim=2)
        if query_x is not None:
            check_inputs("query_x", query_x, T, dtype)
            check_inputs("query_y", query_y, T, None, min_dim=2)
        return T

    # ------------------------------------------------------------------ evaluation

    def predict(self, adapted: Params, x: Inputs) -> Tensor:
        """Batched forward ``out[t] = model_{adapted[t]}(x[t])`` (adapted from :meth:`adapt`)."""
        check_inputs("x", x, next(iter(adapted.values())).shape[0], self.param_dtype)
        with batch_statistics(self.model):
            return self.fns.predict(adapted, x)

    def task_losses(self, adapted: Params, x: Inputs, y: Tensor,
                    loss_fn: Optional[LossFn] = None) -> Tensor:
        """[T] losses of every task at its adapted parameters."""
        check_inputs("x", x, next(iter(adapted.values())).shape[0], self.param_dtype)
        with batch_statistics(self.model):
            return self.fns.losses(adapted, x, y, loss_fn or self.loss_fn)

    def task_params(self, adapted: Params, task: int) -> Dict[str, Tensor]:
        """Every parameter of task ``task``'s adapted model, ``{name: tensor}``, ready for
        ``torch.func.functional_call(learner.model, params, x)``."""
        full = dict(self.model.named_parameters())
        full.update({n: p[task] for n, p in adapted.items()})
        return full

    def task_model(self, adapted: Params, task: int) -> nn.Module:
        """A copy of the model holding task ``task``'s adapted parameters (an ``nn.Module``
        of its own, detached from the meta-parameters)."""
        clone = copy.deepcopy(self.model)
        with torch.no_grad():
            for name, value in self.task_params(adapted, task).items():
                clone.get_parameter(name).copy_(value)
        return clone
