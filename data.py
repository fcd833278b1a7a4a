"""The data path of both stages: packing and task interleaving for SFT, DPH pairs and evaluation
candidates in the shared-prefix layout, and the forward pass that reads rewards and log π.

    best_fit, collate_packed   best-fit packing of documents into rows of seq_len, with document
                               ids (the block-diagonal mask) and positions restarting per document
    TaskSampler                seeded interleaving of tasks: a task per draw, its own shuffled order
    SFTStream                  endless packed SFT batches of k-shot conversations
    make_pairs, draw_pairs     DPH pairs: chosen = the gold answer, rejected = every wrong
                               candidate (beyond the paper) or one drawn uniformly (the paper)
    balance_labels             a fixed-answer task's gold answers made equally frequent (ours)
    ChoiceBatch, collate_choices  the answers of many items in one batch: each prompt once with its
                               answers as branches (the shared-prefix layout), trees packed several
                               to a row; `pool` is where each answer's reward is read
    score_choices              one forward pass -> each answer's reward and log π(y|x)

Conversations become ids and masks in tokenizer/chatml.py (the ChatML template); evaluation
candidates are built in evaluate.py::eval_items.
"""
from __future__ import annotations

import bisect
import random
from dataclasses import dataclass, field
from typing import Optional

import torch

from losses import answer_logps
from tasks import ChoiceExample, InstructionExample, PreferenceExample, TaskError, TextExample
from tokenizer.chatml import IGNORE, Doc, answer_branch, render_prompt, sft_document, \
    text_documents

# ----------------------------------------------------------------------------------------------
# Packing SFT documents (tokenizer/chatml.py renders them)


def best_fit(lengths: list, capacity: int) -> list:
    """Best-fit decreasing bin packing: each item goes to the fullest row it still fits in.
    Returns a list of bins, each a list of item indices. Items longer than capacity are skipped."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    spaces, bins = [], []  # spaces: sorted (remaining, bin index)
    for i in order:
        n = lengths[i]
        if n > capacity:
            continue
        j = bisect.bisect_left(spaces, (n, -1))
        if j == len(spaces):
            bins.append([i])
            bisect.insort(spaces, (capacity - n, len(bins) - 1))
        else:
            rem, b = spaces.pop(j)
            bins[b].append(i)
            bisect.insort(spaces, (rem - n, b))
    return bins


@dataclass
class PackedBatch:
    idx: torch.Tensor  # (B, T) token ids, <|pad|> after the last document
    targets: torch.Tensor  # (B, T) next-token targets, IGNORE outside train masks and doc ends
    pos: torch.Tensor  # (B, T) positions, restarting at 0 for each document
    doc: torch.Tensor  # (B, T) document id within the row, -1 on padding
    tokens: int  # real (non-pad) tokens


def collate_packed(rows: list, seq_len: int, pad_id: int) -> PackedBatch:
    B = len(rows)
    idx = torch.full((B, seq_len), pad_id, dtype=torch.long)
    tgt = torch.full((B, seq_len), IGNORE, dtype=torch.long)
    pos = torch.zeros((B, seq_len), dtype=torch.long)
    doc = torch.full((B, seq_len), -1, dtype=torch.long)
    real = 0
    for r, docs in enumerate(rows):
        c = 0
        for d, dd in enumerate(docs):
            n = len(dd.ids)
            idx[r, c:c + n] = torch.tensor(dd.ids)
            tgt[r, c:c + n] = torch.tensor(dd.targets)
            pos[r, c:c + n] = torch.arange(n)
            doc[r, c:c + n] = d
            c += n
        real += c
    return PackedBatch(idx, tgt, pos, doc, real)


class TaskSampler:
    """Seeded interleaving of tasks: each draw picks a task uniformly (or in proportion to its
    size) and takes that task's next examples from its own shuffled order, reshuffled per epoch."""

    def __init__(self, examples_by_task: dict, seed: int, proportional: bool = False):
        self.names = sorted(n for n, exs in examples_by_task.items() if exs)
        self.examples = examples_by_task
        self.rng = random.Random(seed)
        self.weights = [len(examples_by_task[n]) if proportional else 1 for n in self.names]
        self.order = {n: [] for n in self.names}
        self.epoch = {n: 0 for n in self.names}

    def draw(self, k: int = 1) -> list:
        name = self.rng.choices(self.names, self.weights)[0]
        out = []
        for _ in range(min(k, len(self.examples[name]))):
            if not self.order[name]:
                self.order[name] = list(range(len(self.examples[name])))
                self.rng.shuffle(self.order[name])
                self.epoch[name] += 1
            out.append(self.examples[name][self.order[name].pop()])
        return out

    def state_dict(self):  # plain lists: torch.load(weights_only=True) reads them back
        version, internal, gauss = self.rng.getstate()
        return {"rng": [version, list(internal), gauss], "order": self.order, "epoch": self.epoch}

    def load_state_dict(self, s):
        st = s["rng"]
        self.rng.setstate((st[0], tuple(st[1]), st[2]))
        self.order, self.epoch = s["order"], s["epoch"]


class SFTStream:
    """Endless packed SFT batches: conversations (k-shot bundles of one task) are drawn by the
    TaskSampler, tokenised, and best-fit packed into rows of seq_len. Each batch takes the fullest
    rows of a buffer about twice its capacity; documents of the rows left over go back to the
    buffer. `stats` counts real tokens, row capacity and dropped (too long) documents."""

    def __init__(self, tok, examples_by_task: dict, seq_len: int, batch_size: int, seed: int = 0,
                 kshot: int = 1, proportional: bool = False):
        self.tok, self.seq_len, self.batch_size, self.kshot = tok, seq_len, batch_size, kshot
        self.sampler = TaskSampler(examples_by_task, seed, proportional)
        self.text_tasks = {n for n, exs in examples_by_task.items()
                           if exs and isinstance(exs[0], TextExample)}
        self.buffer: list = []
        self.stats = {"tokens": 0, "capacity": 0, "dropped": 0, "documents": 0}

    def _fill(self):
        want = 2 * self.batch_size * self.seq_len
        have = sum(len(d.ids) for d in self.buffer)
        while have < want:
            exs = self.sampler.draw(self.kshot)
            if isinstance(exs[0], TextExample):
                docs = [d for ex in exs for d in text_documents(self.tok, ex.text, self.seq_len)]
            elif isinstance(exs[0], PreferenceExample) or len(exs[0].messages) > 2:
                docs = [sft_document(self.tok, [ex], self.seq_len) for ex in exs]
            else:
                docs = [sft_document(self.tok, exs, self.seq_len)]
            for d in docs:
                if d is None:
                    self.stats["dropped"] += 1
                else:
                    self.buffer.append(d)
                    have += len(d.ids)

    def next_batch(self) -> PackedBatch:
        self._fill()
        bins = best_fit([len(d.ids) for d in self.buffer], self.seq_len)
        bins.sort(key=lambda b: -sum(len(self.buffer[i].ids) for i in b))
        take, rest = bins[:self.batch_size], bins[self.batch_size:]
        rows = [[self.buffer[i] for i in b] for b in take]
        self.buffer = [self.buffer[i] for b in rest for i in b]
        batch = collate_packed(rows, self.seq_len, self.tok.pad)
        self.stats["tokens"] += batch.tokens
        self.stats["capacity"] += self.batch_size * self.seq_len
        self.stats["documents"] += sum(len(r) for r in rows)
        return batch

    @property
    def efficiency(self) -> float:
        return self.stats["tokens"] / max(1, self.stats["capacity"])

    def state_dict(self):
        return {"sampler": self.sampler.state_dict(), "stats": dict(self.stats),
                "buffer": [(d.ids, d.targets) for d in self.buffer]}

    def load_state_dict(self, s):
        self.sampler.load_state_dict(s["sampler"])
        self.stats = dict(s["stats"])
        self.buffer = [Doc(list(i), list(t)) for i, t in s["buffer"]]


# ----------------------------------------------------------------------------------------------
# DPH pairs and evaluation candidates


@dataclass
class ChoiceItem:
    """A prompt and its answer branches. For a DPH pair the branches are [chosen, rejected]; for
    evaluation they are every candidate in order, `label` the gold index."""
    prompt: list  # ids ending in the assistant header
    branches: list  # list of id lists, each ending in <|im_end|>
    label: int = 0
    ref: int = -1  # index of the example this came from
    content_chars: list = field(default_factory=list)  # characters per answer (acc_norm)


def truncate_prompt(prompt: list, longest_branch: int, max_len: int,
                     header: int) -> Optional[list]:
    """Cut the prompt just after <bos> so that prompt + longest branch fits in max_len; None when
    that would cut into the final assistant header (`header` tokens: <|im_start|> assistant\n)."""
    over = len(prompt) + longest_branch - max_len
    if over <= 0:
        return prompt
    if len(prompt) - 1 - over < header:  # keep <bos> + at least the assistant header
        return None
    return prompt[:1] + prompt[1 + over:]


REJECTED = ("one", "all")


def draw_pairs(sampler: TaskSampler, tok, n: int, rng: random.Random, max_len: int,
               rejected: str, on_draw=None) -> list:
    """The next n DPH pairs from the sampler's interleaved tasks (make_pairs, rejected answers
    drawn with `rng`). on_draw(examples) sees every example drawn (the frozen-state cache)."""
    items, misses = [], 0
    while len(items) < n:
        exs = sampler.draw(1)
        if on_draw is not None:
            on_draw(exs)
        new = make_pairs(tok, exs, rng, max_len, rejected)
        misses = 0 if new else misses + 1
        if misses == 1000:
            raise TaskError(f"1000 examples in a row do not fit in {max_len} tokens; "
                            f"raise --max-len")
        items += new
    return items


def balance_labels(examples: list, seed: int) -> list:
    """A task whose every example offers the same candidate answers (yes/no, a label set) with
    each gold answer equally frequent: rarer answers' examples are repeated, in a seeded shuffled
    cycle, up to the count of the most frequent one. Other tasks are returned as they are.
    Beyond the paper (train_dph.py --balance-labels, off by default): with yes/no answers shared
    by several tasks, a 2:1 task rewards a head that prefers "yes" whatever the prompt says.
    Measured, it did not make the head better than the LM readout (docs/levers.md)."""
    if not examples or not all(isinstance(ex, ChoiceExample) for ex in examples):
        return examples
    answers = sorted(examples[0].candidates)
    if len(answers) < 2 or any(sorted(ex.candidates) != answers for ex in examples):
        return examples
    groups: dict = {}
    for ex in examples:
        groups.setdefault(ex.candidates[ex.label], []).append(ex)
    most = max(len(g) for g in groups.values())
    rng, out = random.Random(seed), list(examples)
    for gold in sorted(groups):
        cycle = list(groups[gold])
        rng.shuffle(cycle)
        out += [cycle[i % len(cycle)] for i in range(most - len(cycle))]
    return out


def make_pairs(tok, examples: list, rng: random.Random, max_len: int,
               rejected: str = "one") -> list:
    """DPH training items, branches [chosen, rejected...]: chosen = the gold answer; rejected =
    one wrong candidate drawn uniformly with `rng` (the paper; call again each epoch for fresh
    draws), or with rejected="all" every wrong candidate, each making a pair with the chosen
    answer (beyond the paper: in the shared-prefix layout the extra branches cost a few tokens
    each). Preference data is used as given. An instruction example with `distractors`
    (plausible wrong answers) is a choice between its answer and those."""
    if rejected not in REJECTED:
        raise ValueError(f"rejected must be one of {REJECTED}, got {rejected!r}")
    items = []
    for i, ex in enumerate(examples):
        if isinstance(ex, ChoiceExample):
            chosen, wrong = ex.candidates[ex.label], [
                c for j, c in enumerate(ex.candidates) if j != ex.label]
        elif isinstance(ex, InstructionExample) and ex.distractors:
            chosen, wrong = ex.answer, list(ex.distractors)
        elif isinstance(ex, PreferenceExample):
            chosen, wrong = ex.chosen, [ex.rejected]
        else:
            continue
        if not wrong:
            continue
        answers = [chosen] + (wrong if rejected == "all" else [rng.choice(wrong)])
        branches = [answer_branch(tok, a) for a in answers]
        prompt = truncate_prompt(render_prompt(tok, ex.messages), max(map(len, branches)),
                                 max_len, 1 + len(tok.piece("assistant\n")))
        if prompt is not None:
            items.append(ChoiceItem(prompt, branches, 0, i, [len(a) for a in answers]))
    return items


@dataclass
class ChoiceBatch:
    """Answers to score, in one of two layouts with identical results:

    padded:        one row per answer, prompt + answer, right-padded; plain causal attention.
    shared prefix: each prompt once, then each answer as a branch that sees the prompt but not
                   the other branches, positions continuing after the prompt; these trees are
                   packed best-fit into rows as long as the longest one, each its own document
                   (it sees nothing of the others in its row, its positions start at 0).

    Sequence s (answers numbered item by item, branch by branch) has its reward read at
    pool[s] = (row, col) of its <|im_end|>. Its log-probability is a sum over "sites": site m
    predicts token site_tgt[m] from the hidden state at site_src[m] (for a branch's first token
    that is the prompt's last position, shared by every branch)."""
    idx: torch.Tensor  # (B, T)
    pos: torch.Tensor  # (B, T)
    doc: torch.Tensor  # (B, T) document (item) within the row, -1 on padding
    branch: Optional[torch.Tensor]  # (B, T) shared-prefix only: 0 prompt, k branch k
    pool: torch.Tensor  # (S, 2)
    logits_at: torch.Tensor  # (B, T) bool: positions whose LM log-probs are needed
    site_logit: torch.Tensor  # (M,) index into the flattened rows at logits_at
    site_tgt: torch.Tensor  # (M,)
    site_seq: torch.Tensor  # (M,) sequence of each site
    site_end: torch.Tensor  # (M,) bool: the site predicts <|im_end|> (not a content token)
    n_branches: list  # answers per item
    labels: list
    refs: list
    chars: list  # characters per answer, flat (S,)
    layout: str

    @property
    def n_seqs(self) -> int:
        return int(self.pool.shape[0])

    def mask(self):
        """The attention mask this layout needs (None: plain causal is exact)."""
        if self.layout == "padded":
            return None
        from model import attention_mask
        return attention_mask(self.doc, self.branch)

    def to(self, device):
        for k in ("idx", "pos", "doc", "branch", "pool", "logits_at", "site_logit", "site_tgt",
                  "site_seq", "site_end"):
            v = getattr(self, k)
            if v is not None:
                setattr(self, k, v.to(device))
        return self


def collate_choices(items: list, layout: str, pad_id: int, *, end_id: int) -> ChoiceBatch:
    """Batch the items; every answer branch must end in `end_id` (<|im_end|>): the reward is
    read there, so a branch that does not is an error, never a silent read of another token."""
    if layout not in ("shared", "padded"):
        raise ValueError(f"unknown layout {layout!r}")
    for it in items:
        for b in it.branches:
            if not b or b[-1] != end_id:
                raise ValueError(f"an answer branch ends in token {b[-1] if b else None}, not "
                                 f"<|im_end|> ({end_id}): the reward would be read elsewhere")
    # segments: a prompt with all its branches (shared), or one prompt + answer (padded); each
    # with its answers' pool columns and LM sites (source column, target, sequence, is_end)
    segs, s = [], 0
    for it in items:
        P = len(it.prompt)
        seg = None
        for k, b in enumerate(it.branches):
            if seg is None or layout == "padded":
                seg = (list(it.prompt), list(range(P)), [0] * P, [], [])
                segs.append(seg)
            ids, pos, br, pools, sites = seg
            start = len(ids)
            ids += b
            pos += range(P, P + len(b))
            br += [k + 1] * len(b)
            pools.append((s, start + len(b) - 1))
            for j, t in enumerate(b):
                sites.append((P - 1 if j == 0 else start + j - 1, t, s, j == len(b) - 1))
            s += 1
    # rows: padded, a segment each; shared, segments packed best-fit into rows as long as the
    # longest one, each its own document (it sees nothing of the others; positions restart)
    lengths = [len(g[0]) for g in segs]
    T = max(lengths)
    bins = [[i] for i in range(len(segs))] if layout == "padded" else best_fit(lengths, T)
    B = len(bins)
    idx = torch.full((B, T), pad_id, dtype=torch.long)
    posT = torch.zeros((B, T), dtype=torch.long)
    doc = torch.full((B, T), -1, dtype=torch.long)
    branch = torch.zeros((B, T), dtype=torch.long)
    pool_at, sites = [None] * s, []
    for r, row in enumerate(bins):
        c = 0
        for d, i in enumerate(row):
            ids, pos, br, pools, seg_sites = segs[i]
            n = len(ids)
            idx[r, c:c + n], posT[r, c:c + n] = torch.tensor(ids), torch.tensor(pos)
            doc[r, c:c + n], branch[r, c:c + n] = d, torch.tensor(br)
            for q, col in pools:
                pool_at[q] = (r, c + col)
            sites += [(r, c + src, t, q, e) for src, t, q, e in seg_sites]
            c += n
    sites.sort(key=lambda x: x[3])  # sequence order, as the answers are numbered
    pools = pool_at
    logits_at = torch.zeros((B, T), dtype=torch.bool)
    src = torch.tensor([(r, c) for r, c, *_ in sites])
    logits_at[src[:, 0], src[:, 1]] = True
    flat = torch.cumsum(logits_at.flatten(), 0) - 1  # position among the rows at logits_at
    site_logit = flat[src[:, 0] * T + src[:, 1]]
    return ChoiceBatch(
        idx, posT, doc, branch if layout == "shared" else None, torch.tensor(pools), logits_at,
        site_logit, torch.tensor([t for *_, t, _, _ in sites]),
        torch.tensor([q for *_, q, _ in sites]), torch.tensor([e for *_, e in sites]),
        [len(it.branches) for it in items], [it.label for it in items], [it.ref for it in items],
        [c for it in items for c in it.content_chars], layout)


def score_choices(model, batch: ChoiceBatch, rewards: bool = True, logps: bool = True) -> dict:
    """One forward pass over a ChoiceBatch. Returns per-answer tensors (S,):
    'rewards' (the head at <|im_end|>), 'logp' (summed log-prob of content + <|im_end|>, what DPO
    uses), 'logp_content' (content tokens only) and 'n_content' (content token count)."""
    out = model(batch.idx, batch.pos, batch.mask())
    res = {}
    if rewards:
        res["rewards"] = model.reward(out.hidden, batch.pool)
    if logps:  # log π(y|x) per answer (losses.answer_logps), with and without <|im_end|>
        args = (out.hidden[batch.logits_at], model.lm_weight, batch.site_logit, batch.site_tgt,
                batch.site_seq, batch.n_seqs)
        content = ~batch.site_end
        res["logp"] = answer_logps(*args)
        res["logp_content"] = answer_logps(*args, keep=content)
        res["n_content"] = torch.zeros(batch.n_seqs, device=content.device).index_add(
            0, batch.site_seq[content], content[content].float())
    return res
