"""Use a trained head on your own files (evaluate.py --score, --generate-file).

    score_file      every line of a JSONL file gets the head's reward of its answer(s), and the
                    LM's log π with --logp: response lines {"prompt"|"messages", "response"}, the
                    preference formats train_dph.py reads (then the pair accuracy is printed),
                    choice lines (then the accuracy). Streamed in batches of --batch-size lines,
                    each batch one forward pass in the shared-prefix layout.
    generate_file   best-of-N over a file of prompts: N samples per prompt decoded together with
                    the KV cache, their rewards, the chosen one; --pairs also writes each prompt's
                    (best, worst) samples as a preference line that `train_dph.py --tasks jsonl:`
                    reads back (rejection-sampling data for another round).

Output lines are the input lines with fields added. Files are written to a temporary file and
renamed at the end: an error leaves no partial output.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys

import torch
from tqdm import tqdm

import plumbing
from data import ChoiceItem, collate_choices, score_choices, truncate_prompt
from inference.generate import generate
from plumbing import UsageError, opt
from tasks import TaskError
from tasks.loaders import prompt_records, user_records
from tokenizer.chatml import answer_branch, render_prompt


@dataclasses.dataclass
class FileConfig:
    """evaluate.py's flags for files of your own."""
    score: str = opt("", "a JSONL file: write each line with the head's reward of its answer(s) "
                         "to --out (a .jsonl file, or OUT/scored.jsonl)")
    logp: bool = opt(False, "with --score: also the LM's summed log-prob of each answer")
    generate_file: str = opt("", "a JSONL file of prompts: best-of-N for each (sampling flags as "
                                 "--generate) to --out (a .jsonl file, or OUT/best_of_n.jsonl)")
    pairs: str = opt("", "with --generate-file: also write (best, worst) preference lines here")


MODES = ("generate", "generate_from", "score", "generate_file")


def out_file(cfg, default: str) -> str:
    return cfg.out if cfg.out.endswith(".jsonl") else os.path.join(cfg.out, default)


def check_flags(cfg):
    """One mode at a time; the output paths can be written."""
    modes = [m for m in MODES if getattr(cfg, m)]
    if len(modes) > 1:
        raise UsageError(" and ".join(f"--{m.replace('_', '-')}" for m in modes) + ": pick one")
    if cfg.pairs and not cfg.generate_file:
        raise UsageError("--pairs: only with --generate-file")
    for flag, path in (("--out", cfg.out), ("--pairs", cfg.pairs)):
        if path.endswith(".jsonl"):
            if os.path.isdir(path):
                raise UsageError(f"{flag} {path}: is a directory")
            plumbing.check_writable_dir(os.path.dirname(os.path.abspath(path)), flag)
        elif path:
            plumbing.check_writable_dir(path, flag)
    for flag in ("score", "generate_file"):
        path = getattr(cfg, flag)
        if path and not os.path.isfile(path):
            raise UsageError(f"--{flag.replace('_', '-')} {path}: file not found")


def _ranker(cfg, device):
    path = cfg.dph or cfg.sft
    model, _, tok = plumbing.load_init(path, device)
    if model.head is None:
        raise UsageError(f"{path} has no preference head to score with; pass --dph")
    return model.eval(), tok


def _count_lines(path: str) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def _answers(kind: str, ex) -> list:
    if kind == "instruction":
        return [ex.answer]
    if kind == "preference":
        return [ex.chosen, ex.rejected]
    return list(ex.candidates)


@torch.no_grad()
def _score(model, tok, items, cfg, device, dtype):
    """-> (rewards, log π or None), one list per item."""
    b = collate_choices(items, "shared", tok.pad, end_id=tok.im_end).to(device)
    with plumbing.autocast(device, dtype):
        res = score_choices(model, b, rewards=True, logps=cfg.logp)
    flat = {k: res[k].float().cpu().tolist() for k in ("rewards", "logp") if k in res}
    out, s = [], 0
    for k in b.n_branches:
        out.append((flat["rewards"][s:s + k], flat["logp"][s:s + k] if cfg.logp else None))
        s += k
    return out


def score_file(cfg, device, dtype):
    """--score: each line with its rewards (and log π); pair accuracy of preference lines."""
    model, tok = _ranker(cfg, device)
    ctx, header = model.cfg.max_seq_len, 1 + len(tok.piece("assistant\n"))
    dest = out_file(cfg, "scored.jsonl")
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    hits = {"preference": [0, 0], "choice": [0, 0]}
    n = 0

    def flush(batch, f):
        scored = _score(model, tok, [it for it, *_ in batch], cfg, device, dtype)
        for (_, obj, kind, ex), (r, lp) in zip(batch, scored):
            if kind == "instruction":
                obj.update(reward=r[0], **({"logp": lp[0]} if lp else {}))
            elif kind == "preference":
                obj.update(reward_chosen=r[0], reward_rejected=r[1], **(
                    {"logp_chosen": lp[0], "logp_rejected": lp[1]} if lp else {}))
                hits[kind][0] += r[0] > r[1]
                hits[kind][1] += 1
            else:
                obj.update(rewards=r, **({"logps": lp} if lp else {}))
                hits[kind][0] += max(range(len(r)), key=r.__getitem__) == ex.label \
                    and r.count(max(r)) == 1  # a tie at the top counts as wrong
                hits[kind][1] += 1
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")

    def write(tmp):
        nonlocal n
        with open(tmp, "w") as f:
            batch = []
            bar = tqdm(user_records(cfg.score), total=_count_lines(cfg.score), desc="score",
                       dynamic_ncols=True)
            for i, obj, kind, ex in bar:
                answers = [answer_branch(tok, a) for a in _answers(kind, ex)]
                prompt = truncate_prompt(render_prompt(tok, ex.messages), max(map(len, answers)),
                                         ctx, header)
                if prompt is None:
                    raise TaskError(f"{cfg.score}:{i}: the answers do not fit in the model's "
                                    f"context of {ctx} tokens")
                batch.append((ChoiceItem(prompt, answers), obj, kind, ex))
                n += 1
                if len(batch) == cfg.batch_size:
                    flush(batch, f)
                    batch = []
            if batch:
                flush(batch, f)
    plumbing.atomic_write(dest, write)
    print(f"scored {n} lines of {cfg.score} -> {dest}")
    for kind, (right, total) in hits.items():
        if total:
            what = "pair accuracy (reward of chosen > rejected)" if kind == "preference" else \
                "accuracy (the gold candidate has the top reward)"
            print(f"{kind} lines: {total}; {what} {right / total:.4f}")
    return 0


def generate_file(cfg, device, dtype):
    """--generate-file: best-of-N for every prompt of a file; --pairs: (best, worst) lines."""
    model, tok = _ranker(cfg, device)
    ctx = model.cfg.max_seq_len
    dest = out_file(cfg, "best_of_n.jsonl")
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    n, n_pairs = 0, 0
    pairs_tmp = cfg.pairs + ".tmp" if cfg.pairs else os.devnull

    def write(tmp):
        nonlocal n, n_pairs
        with open(tmp, "w") as f, open(pairs_tmp, "w") as pf:
            bar = tqdm(prompt_records(cfg.generate_file), total=_count_lines(cfg.generate_file),
                       desc="best-of-n", dynamic_ncols=True)
            for i, obj, messages in bar:
                prompt = render_prompt(tok, messages)
                max_new = min(cfg.max_new_tokens, ctx - len(prompt) - 1)
                if max_new < 1:
                    raise TaskError(f"{cfg.generate_file}:{i}: the prompt ({len(prompt)} tokens) "
                                    f"leaves no room to answer in the model's context of {ctx}")
                samples = generate(model, prompt, cfg.n, max_new, cfg.temperature, cfg.top_k,
                                   cfg.top_p, stop_id=tok.im_end, generator=g)
                item = ChoiceItem(prompt, [s + [tok.im_end] for s in samples])
                ((r, lp),) = _score(model, tok, [item], cfg, device, dtype)
                texts = [tok.decode(s).strip() for s in samples]
                best = max(range(len(r)), key=r.__getitem__)
                worst = min(range(len(r)), key=r.__getitem__)
                obj.update(samples=texts, rewards=r, best=texts[best], best_index=best)
                f.write(json.dumps(obj, ensure_ascii=False) + "\n")
                if texts[best] != texts[worst] and texts[best] and texts[worst]:
                    pf.write(json.dumps({"messages": messages, "chosen": texts[best],
                                         "rejected": texts[worst]}, ensure_ascii=False) + "\n")
                    n_pairs += 1
                n += 1
    try:
        plumbing.atomic_write(dest, write)
        if cfg.pairs:
            os.replace(pairs_tmp, cfg.pairs)
    finally:
        if cfg.pairs and os.path.exists(pairs_tmp):
            os.remove(pairs_tmp)
    print(f"best of {cfg.n} for {n} prompts of {cfg.generate_file} -> {dest}")
    if cfg.pairs:
        print(f"{n_pairs} (best, worst) preference lines -> {cfg.pairs} (prompts whose samples "
              f"were all the same are left out)", file=sys.stderr)
    return 0
