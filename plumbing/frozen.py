"""The frozen-backbone fast path of DPH training (train_dph.py --freeze-backbone).

With the backbone frozen, the head is a probe of fixed features: the final normed hidden state at
each answer's <|im_end|> (the paper's frozen-LLM experiment trained only the pooler and head on
frozen Qwen1.5 models). So the backbone runs once per example, over the prompt and EVERY
candidate answer as branches of one shared-prefix row, and the head then trains on the cached
states for as many steps as asked. Rejected answers are still drawn afresh at every visit, from
the cached candidates, by the same draws as without the cache.

    StateCache           (prompt ids, answer ids) -> hidden state (C,) at the answer's <|im_end|>
    cached_pair_loss     the DPH loss of a batch of pairs, from cached states

Why a cache keyed by (prompt, answer) is exact: in the shared-prefix layout an answer branch
attends to the prompt and to itself only, with positions continuing after the prompt, so its
state does not depend on the other branches or on the batch it was computed in.
"""
from __future__ import annotations

import random

import torch

import plumbing
from data import collate_choices, make_pairs
from losses import items_dph_loss, pair_index, reward_penalty


class StateCache:
    """Hidden states of a frozen backbone at each answer's <|im_end|>, computed on first use.
    `model` is the DPHModel (its backbone runs; its head does not)."""

    def __init__(self, model, tok, max_len: int, device, dtype, batch_size: int = 16):
        self.model, self.tok, self.max_len = model, tok, max_len
        self.device, self.dtype, self.batch_size = device, dtype, batch_size
        self.states = {}  # (prompt tuple, answer tuple) -> (C,) float32, on the CPU
        self._seen = set()  # ids of examples whose candidates are all cached
        self.forwards = 0  # prompts run through the backbone (for the log)

    def __len__(self):
        return len(self.states)

    @staticmethod
    def _keys(item):
        p = tuple(item.prompt)
        return [(p, tuple(b)) for b in item.branches]

    @torch.no_grad()
    def fill(self, items):
        """Run the backbone on the items that have an answer not cached yet."""
        todo = [it for it in items if any(k not in self.states for k in self._keys(it))]
        if not todo:
            return
        was = self.model.training
        self.model.eval()
        try:
            for i in range(0, len(todo), self.batch_size):
                chunk = todo[i:i + self.batch_size]
                b = collate_choices(chunk, "shared", self.tok.pad,
                                    end_id=self.tok.im_end).to(self.device)
                with plumbing.autocast(self.device, self.dtype):
                    hidden = self.model(b.idx, b.pos, b.mask()).hidden  # (B, T, C), no logits
                h = hidden[b.pool[:, 0], b.pool[:, 1]].float().cpu()  # (S, C)
                keys = [k for it in chunk for k in self._keys(it)]
                self.states.update(zip(keys, h))
                self.forwards += len(chunk)
        finally:
            self.model.train(was)

    def add_examples(self, examples):
        """Every candidate answer of each example not seen before, in one branch set per
        example (the draws of the training loop then only read the cache)."""
        new = [ex for ex in examples if id(ex) not in self._seen]
        if new:
            # rejected="all": the gold answer and every wrong one; its own generator, so the
            # training draws are untouched
            self.fill(make_pairs(self.tok, new, random.Random(0), self.max_len, "all"))
            self._seen.update(id(ex) for ex in new)

    def gather(self, items) -> torch.Tensor:
        """(S, C) states of the items' answers, item by item, branch by branch (the order of
        score_choices' rewards), on the device. Anything missing is computed first."""
        self.fill(items)
        return torch.stack([self.states[k] for it in items for k in self._keys(it)]).to(self.device)


def cached_pair_loss(head, cache: StateCache, items, cfg):
    """w_dph·L_DPH (+ the optional reward penalty) of a batch of pairs, the head reading cached
    states: what train_dph.pair_loss computes with a frozen backbone, without the backbone."""
    h = cache.gather(items)
    n = [len(it.branches) for it in items]
    w, l = pair_index(n, h.device)
    r = head(h).float()
    loss, metrics = items_dph_loss(r, n, cfg.loss, getattr(cfg, "contrast", "pairs"),
                                   cfg.label_smoothing)
    loss = getattr(cfg, "dph_weight", 1.0) * loss
    if cfg.reward_penalty > 0:
        pen, pm = reward_penalty(r[w], r[l], cfg.reward_penalty, cfg.reward_penalty_kind)
        loss = loss + pen
        metrics.update(pm)
    return loss, metrics


@torch.no_grad()
def cached_validation(head, cache: StateCache, items):
    """Reward accuracy and margin on fixed pairs (train_dph.validation_rewards, from the cache)."""
    was = head.training
    head.eval()
    r = head(cache.gather(items)).float()
    head.train(was)
    w, l = pair_index([len(it.branches) for it in items], r.device)
    c, r = r[w], r[l]
    return {"rewards/chosen": c.mean().item(), "rewards/rejected": r.mean().item(),
            "rewards/accuracies": (c > r).float().mean().item(),
            "rewards/margins": (c - r).mean().item(), "pairs": len(c)}
