"""Chat rendering, packing and pair batching; the tokenizer is chat_tokenizer.py.

    render, render_prompt    ChatML ids built piece by piece, with train mask, score mask, pool index
    sft_document             one conversation (or k-shot bundle, or plain text) as ids + targets
    best_fit, SFTStream      seeded task interleaving and best-fit packing into rows of seq_len with
                             document ids and restarted positions
    make_pairs, ChoiceBatch  DPH pairs (chosen = gold, rejected = every wrong candidate, or one
                             drawn uniformly) and evaluation candidates, in the padded or the
                             shared-prefix layout (prompt trees packed several to a row)
    pair_index               the (chosen, rejected) answers of every pair in a batch
    score_choices            one forward pass -> rewards and LM log-probabilities per candidate

The prompt format (ChatML): <|endoftext|> then, per message,
    <|im_start|> role \\n content <|im_end|> \\n
Special tokens are inserted by id and each content string is encoded on its own, so user text that
spells "<|im_end|>" stays plain text and no BPE merge crosses a piece boundary.

Run `python data.py download --tasks glue,race --data-dir DIR` to fetch official datasets.
"""
from __future__ import annotations

import bisect
import json
import random
import sys
from dataclasses import dataclass, field
from typing import Optional

import torch

from losses import answer_logps
from tokenizer.chat import ChatTokenizer
from tasks import ChoiceExample, InstructionExample, PreferenceExample, TextExample

IGNORE = -100

# ----------------------------------------------------------------------------------------------
# Chat rendering (ChatML)


@dataclass
class Rendered:
    ids: list
    train: list  # bool per token: assistant content + its <|im_end|>
    score: list  # bool per token: the last assistant message's content
    pool: int  # index of the last assistant message's <|im_end|>, -1 if none


def render_message(tok: ChatTokenizer, msg: dict):
    """<|im_start|> role \\n content <|im_end|> \\n -> (ids, train, content, end) where train and
    content are per-token masks and end is the index of <|im_end|> within ids."""
    role, content = msg["role"], msg["content"]
    if role not in ("system", "user", "assistant"):
        raise ValueError(f"unknown role {role!r}")
    head = [tok.im_start] + tok.piece(role + "\n")
    body = tok.encode(content)
    nl = tok.piece("\n")
    ids = head + body + [tok.im_end] + nl
    asst = role == "assistant"
    train = [False] * len(head) + [asst] * (len(body) + 1) + [False] * len(nl)
    is_content = [False] * len(head) + [True] * len(body) + [False] * (1 + len(nl))
    return ids, train, is_content, len(head) + len(body)


def render(tok: ChatTokenizer, messages: list) -> Rendered:
    n = len(tok.prefix)  # <bos>, unless the vocabulary adds none
    ids, train, score, pool = list(tok.prefix), [False] * n, [False] * n, -1
    for m in messages:
        i, t, c, end = render_message(tok, m)
        if m["role"] == "assistant":  # only the last assistant message is scored
            score = [False] * len(score) + c
            pool = len(ids) + end
        else:
            score += [False] * len(i)
        ids += i
        train += t
    return Rendered(ids, train, score, pool)


def render_prompt(tok: ChatTokenizer, messages: list) -> list:
    """Prompt ids ending in the assistant header, ready for an answer branch."""
    return render(tok, messages).ids + [tok.im_start] + tok.piece("assistant\n")


def answer_branch(tok: ChatTokenizer, answer: str) -> list:
    """An answer's content ids followed by <|im_end|> (whose hidden state the head reads)."""
    return tok.encode(answer) + [tok.im_end]


# ----------------------------------------------------------------------------------------------
# SFT documents, truncation and packing


@dataclass
class Doc:
    ids: list
    targets: list  # targets[t] = ids[t+1] where that token is trained, else IGNORE


def _targets(ids, train):
    return [ids[t + 1] if train[t + 1] else IGNORE for t in range(len(ids) - 1)] + [IGNORE]


def sft_messages(examples: list) -> list:
    """A k-shot bundle of examples of one task as one conversation: the system prompt once, then
    each example's user turn and gold answer (the paper used k = 5; k distinct examples)."""
    msgs = []
    for ex in examples:
        if isinstance(ex, ChoiceExample):
            answer = ex.candidates[ex.label]
        elif isinstance(ex, PreferenceExample):
            answer = ex.chosen
        else:
            answer = ex.answer
        turns = ex.messages if not msgs else [m for m in ex.messages if m["role"] != "system"]
        msgs += turns + [{"role": "assistant", "content": answer}]
    return msgs


def sft_document(tok: ChatTokenizer, examples: list, seq_len: int) -> Optional[Doc]:
    """Ids and targets of one training conversation, truncated to seq_len from the left of the
    prompt (never inside the last answer or its <|im_end|>). None when it cannot fit."""
    r = render(tok, sft_messages(examples))
    ids, train = r.ids[:-len(tok.piece("\n"))], r.train[:-len(tok.piece("\n"))]  # the final
    # newline is never a target: dropping it saves a token per document and changes no loss
    over = len(ids) - seq_len
    if over > 0:
        # keep <bos>, cut just after it, but keep the last answer's header and content
        header = 1 + len(tok.piece("assistant\n"))
        first_answer_tok = r.score.index(True) if True in r.score else r.pool
        removable = first_answer_tok - header - 1
        if removable < over:
            return None
        ids, train = ids[:1] + ids[1 + over:], train[:1] + train[1 + over:]
    return Doc(ids, _targets(ids, train))


def text_documents(tok: ChatTokenizer, text: str, seq_len: int) -> list:
    """Plain text for pretraining: <bos> + tokens, every token trained, cut into row-sized
    pieces."""
    ids = tok.encode(text)
    out, step = [], seq_len - 1
    for i in range(0, len(ids), step):
        piece = tok.prefix + ids[i:i + step]  # <bos>, unless the vocabulary adds none
        if len(piece) > 2:
            out.append(Doc(piece, piece[1:] + [IGNORE]))
    return out


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

    def state_dict(self):
        return {"rng": self.rng.getstate(), "order": self.order, "epoch": self.epoch}

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

    def __iter__(self):
        while True:
            yield self.next_batch()

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


def padded_sft_batch(tok, examples: list, seq_len: int) -> PackedBatch:
    """One conversation per row, right-padded: the naive layout the benchmark compares with."""
    docs = [d for d in (sft_document(tok, [ex], seq_len) for ex in examples) if d is not None]
    T = max(len(d.ids) for d in docs)
    return collate_packed([[d] for d in docs], T, tok.pad)


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


def apply_label_noise(examples: list, fraction: float, seed: int) -> list:
    """Flip exactly round(fraction * n) training labels: a choice example gets a uniformly drawn
    wrong label, a preference example has chosen and rejected swapped. Other kinds pass."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"--label-noise must be in [0, 1], got {fraction}")
    flippable = [i for i, ex in enumerate(examples)
                 if isinstance(ex, PreferenceExample)
                 or (isinstance(ex, ChoiceExample) and len(ex.candidates) > 1)]
    rng = random.Random(seed)
    flip = set(rng.sample(flippable, round(fraction * len(flippable))))
    out = []
    for i, ex in enumerate(examples):
        if i in flip and isinstance(ex, ChoiceExample):
            wrong = [j for j in range(len(ex.candidates)) if j != ex.label]
            ex = ChoiceExample(ex.task, ex.messages, ex.candidates, rng.choice(wrong), ex.value)
        elif i in flip:
            ex = PreferenceExample(ex.task, ex.messages, ex.rejected, ex.chosen)
        out.append(ex)
    return out


def _truncate_prompt(prompt: list, longest_branch: int, max_len: int,
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
        prompt = _truncate_prompt(render_prompt(tok, ex.messages), max(map(len, branches)), max_len,
                                  1 + len(tok.piece("assistant\n")))
        if prompt is not None:
            items.append(ChoiceItem(prompt, branches, 0, i, [len(a) for a in answers]))
    return items


def eval_items(tok, examples: list, max_len: int) -> list:
    """Every candidate of every choice example (a preference example is the two-candidate choice
    [chosen, rejected] with label 0)."""
    items = []
    for i, ex in enumerate(examples):
        if isinstance(ex, PreferenceExample):
            cands, label = [ex.chosen, ex.rejected], 0
        elif isinstance(ex, ChoiceExample):
            cands, label = ex.candidates, ex.label
        else:
            continue
        branches = [answer_branch(tok, c) for c in cands]
        prompt = _truncate_prompt(render_prompt(tok, ex.messages), max(map(len, branches)), max_len,
                                  1 + len(tok.piece("assistant\n")))
        if prompt is None:
            raise ValueError(f"{ex.task} example {i}: answers do not fit in {max_len} tokens")
        items.append(ChoiceItem(prompt, branches, label, i, [max(1, len(c)) for c in cands]))
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
    logits_at: torch.Tensor  # (B, T) bool: positions whose LM logits are needed
    site_logit: torch.Tensor  # (M,) index into the flattened logits at logits_at
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
    flat = torch.cumsum(logits_at.flatten(), 0) - 1  # position in the flattened logits
    site_logit = flat[src[:, 0] * T + src[:, 1]]
    return ChoiceBatch(
        idx, posT, doc, branch if layout == "shared" else None, torch.tensor(pools), logits_at,
        site_logit, torch.tensor([t for *_, t, _, _ in sites]),
        torch.tensor([q for *_, q, _ in sites]), torch.tensor([e for *_, e in sites]),
        [len(it.branches) for it in items], [it.label for it in items], [it.ref for it in items],
        [c for it in items for c in it.content_chars], layout)


def pair_index(n_branches: list, device=None):
    """(chosen, rejected) answer indices of every pair in a batch whose items have branches
    [chosen, rejected_1, ..., rejected_k]: item i gives the k pairs (chosen_i, rejected_i,j)."""
    chosen, rejected, s = [], [], 0
    for k in n_branches:
        chosen += [s] * (k - 1)
        rejected += range(s + 1, s + k)
        s += k
    return (torch.tensor(chosen, device=device), torch.tensor(rejected, device=device))


def score_choices(model, batch: ChoiceBatch, rewards: bool = True, logps: bool = True) -> dict:
    """One forward pass over a ChoiceBatch. Returns per-answer tensors (S,):
    'rewards' (the head at <|im_end|>), 'logp' (summed log-prob of content + <|im_end|>, what DPO
    uses), 'logp_content' (content tokens only) and 'n_content' (content token count)."""
    out = model(batch.idx, batch.pos, batch.mask(), logits_at=batch.logits_at if logps else None)
    res = {}
    if rewards:
        res["rewards"] = model.reward(out.hidden, batch.pool)
    if logps:  # log π(y|x) per answer (losses.answer_logps), with and without <|im_end|>
        args = (out.logits, batch.site_logit, batch.site_tgt, batch.site_seq, batch.n_seqs)
        content = ~batch.site_end
        res["logp"] = answer_logps(*args)
        res["logp_content"] = answer_logps(*args, keep=content)
        res["n_content"] = torch.zeros(batch.n_seqs, device=content.device).index_add(
            0, batch.site_seq[content], content[content].float())
    return res


# ----------------------------------------------------------------------------------------------
# Command line: `python data.py download ...`, `python data.py show --tasks ...`


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["download"]:
        from tasks import download
        return download.main(argv[1:])
    if argv[:1] == ["show"]:
        import argparse
        from tasks import resolve_tasks
        p = argparse.ArgumentParser(prog="data.py show", description="print rendered examples")
        p.add_argument("--tasks", default="builtin")
        p.add_argument("--split", default="train")
        p.add_argument("-n", type=int, default=1)
        a = p.parse_args(argv[1:])
        for spec in resolve_tasks(a.tasks):
            for ex in spec.load(a.split)[:a.n]:
                print(f"== {spec.name} ==\n" + json.dumps(ex.__dict__, indent=1, ensure_ascii=False))
        return 0
    print("usage: python data.py {download,show} [--help]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
