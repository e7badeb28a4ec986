"""The meta-learning layer: learners on top of the ops and the task trees.

``functional`` (the model as batched functions of its parameters), ``rates`` (inner
learning rates), ``schedule`` (how parameters move down a tree: the one inner loop's
interface), ``learner`` (what every learner shares), and the learners: ``maml``
(TreeMAML, MAML), ``learned_tree`` (Learned TreeMAML), ``reptile``.
"""

from .learned_tree import LearnedTreeMAML
from .maml import MAML, TreeMAML
from .rates import InnerRate
from .reptile import Reptile, SequentialReptile, tree_mean_weights

__all__ = ["InnerRate", "LearnedTreeMAML", "MAML", "Reptile", "SequentialReptile", "TreeMAML",
           "tree_mean_weights"]
