"""The one place that knows how treepool's learners are built and where their
meta-gradients live, so that the benchmark and its tests follow API changes here only.

Two learner APIs are handled: the older one holds the meta-parameters as one flat
``theta`` tensor (an ``nn.Parameter`` of the learner); the newer one makes the model's own
parameters the meta-parameters (``theta()`` a method returning them). Both take
``inner_lr``, ``inner_steps``, ``first_order`` and ``loss_fn`` as keywords, and
``learner.parameters()`` is what the outer optimizer steps.
"""

from __future__ import annotations

import os
from typing import Dict, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

import treepool


def _factored(factored: str) -> dict:
    # older learners have no factored leaves: pass the option only when it is not the default
    return {} if factored == "auto" else {"factored": factored}


def maml(model: nn.Module, inner_lr: float, inner_steps: int, first_order: bool,
         loss_fn=F.mse_loss, factored: str = "auto") -> nn.Module:
    return treepool.MAML(model, inner_lr=inner_lr, inner_steps=inner_steps,
                         first_order=first_order, loss_fn=loss_fn, **_factored(factored))


def tree_maml(model: nn.Module, labels: Sequence[Sequence[int]], inner_lr: float,
              first_order: bool, loss_fn=F.mse_loss, factored: str = "auto") -> nn.Module:
    """TreeMAML on the tree of per-task ``labels`` (levels 1..K, the last the leaves);
    inner steps = K."""
    tree = treepool.TaskTree.from_labels(labels, add_leaf_level=False)
    return treepool.TreeMAML(model, tree, inner_lr=inner_lr, first_order=first_order,
                             inner_steps=tree.depth, loss_fn=loss_fn, **_factored(factored))


def meta_parameters(learner: nn.Module):
    """What the outer optimizer steps."""
    return learner.parameters()


def meta_loss(learner: nn.Module, batch) -> Tensor:
    return learner.meta_loss(*batch.tensors())


def meta_grads(learner: nn.Module, model: nn.Module) -> Dict[str, Tensor]:
    """The meta-gradient by the model's parameter names, after ``backward()``."""
    theta = getattr(learner, "theta", None)
    if not isinstance(theta, Tensor):  # the model's own parameters are the meta-parameters
        return {n: p.grad for n, p in learner.model.named_parameters()}
    flat = learner.flat
    layout = zip(flat.names, flat.offsets, flat.numels, flat.shapes)
    return {name: theta.grad[start:start + numel].view(shape)
            for name, start, numel, shape in layout}


def describe() -> str:
    """Which treepool is measured: where it was imported from, whether its native ops
    are built (without them every op runs the pure-PyTorch reference), and the process's
    CPU allocator where this treepool can tell (README, 'Memory allocator')."""
    native = "built" if treepool.native_available() else "NOT built (reference ops)"
    where = os.path.dirname(treepool.__file__)
    text = f"treepool {treepool.__version__} from {where}, native ops {native}"
    from treepool import info
    if hasattr(info, "allocator"):  # glibc's defaults cost the baselines up to 30%: say which
        text += f"; CPU allocator: {info.allocator()}"
    return text
