"""The paper's inference-time alignment procedure: sample N answers from the language model, then
keep the one the preference head rewards most (evaluate.py --generate / --generate-from).

    sample_and_score    the greedy answer and N samples of one prompt, each with its reward
                        and its LM score
    best_of_n_summary   exact match of each way to pick one answer per prompt
    run_generate        --generate: rank N samples of a prompt typed on the command line
    run_generate_from   --generate-from: best-of-N on a task's test prompts, checked against gold
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import sys

import numpy as np
import torch
from tqdm import tqdm

import plumbing
from data import ChoiceItem, collate_choices, score_choices
from inference.generate import generate
from plumbing import UsageError, opt
from tasks import SYSTEM_PROMPTS, TaskError, resolve_tasks
from tokenizer.chatml import render_prompt


@dataclasses.dataclass
class SamplingConfig:
    """evaluate.py's flags for the inference-time alignment procedure."""
    generate: str = opt("", "a user message: sample -n answers and rank them by reward")
    generate_from: str = opt("", "a task with exact answers (synth/instruct): best-of-N on its "
                                 "test prompts, exact match of four pickers (--max-examples "
                                 "prompts, default 50)")
    show: int = opt(3, "prompts whose samples --generate-from prints")
    n: int = opt(8, "answers to sample with --generate", alias="-n")
    max_new_tokens: int = opt(64, "longest sampled answer")
    temperature: float = opt(0.8, "sampling temperature")
    top_k: int = opt(0, "sample from the k most likely tokens (0: all)")
    top_p: float = opt(0.95, "nucleus sampling mass")
    system: str = opt(SYSTEM_PROMPTS["chat"], "system prompt for --generate")


RANGES = {
    "show": "[0, max]",
    "n": "[1, 1024]",  # best-of-N: N answers decoded together, each with its KV cache
    "max_new_tokens": "[1, 1048576]", "temperature": "[0, 10000]", "top_k": "[0, 2147483647]",
    "top_p": "(0, 1]",
}
MIN_TEMPERATURE = 1e-4  # below it logits / T overflows float32: use 0, greedy decoding


def validate(cfg, argv=None):
    """The sampling flags, beyond their ranges."""
    if 0 < cfg.temperature < MIN_TEMPERATURE:
        raise UsageError(f"--temperature {cfg.temperature}: use 0 for greedy decoding, or at "
                         f"least {MIN_TEMPERATURE}")
    given = plumbing.explicit_flags(argv)
    for name in ("generate", "generate_from"):
        if name in given and not getattr(cfg, name, "").strip():
            raise UsageError(f"--{name.replace('_', '-')}: empty "
                             f"{'prompt' if name == 'generate' else 'task'}")
    if (cfg.generate or cfg.generate_from) and not (cfg.dph or cfg.sft):
        raise UsageError("--generate needs a checkpoint with a preference head: pass --dph")


def generation_prompt(tok, system: str, user: str, ctx: int, max_new_tokens: int):
    """-> (prompt ids, new tokens allowed). A prompt too long for the context leaves room for
    min(--max-new-tokens, context / 2) answer tokens (and the <|im_end|> the head reads) by
    losing the start of the user's message: <bos>, the system message and the user header are
    kept. Both cuts are announced."""
    head = render_prompt(tok, [{"role": "system", "content": system}])[:-len(
        [tok.im_start] + tok.piece("assistant\n"))] + [tok.im_start] + tok.piece("user\n")
    body = tok.encode(user)
    tail = [tok.im_end] + tok.piece("\n") + [tok.im_start] + tok.piece("assistant\n")
    room = min(max_new_tokens, ctx // 2)
    over = len(head) + len(body) + len(tail) + room + 1 - ctx
    if over > 0:
        if over > len(body):
            raise UsageError(f"--system: the system prompt alone ({len(head) + len(tail)} "
                             f"tokens) leaves no room to answer in the model's context {ctx}")
        print(f"note: --generate: the prompt ({len(head) + len(body) + len(tail)} tokens) is too "
              f"long for the model's context {ctx}; its first {over} tokens after the user "
              f"header are dropped (the system prompt is kept)", file=sys.stderr)
        body = body[over:]
    prompt = head + body + tail
    max_new = min(max_new_tokens, ctx - len(prompt) - 1)
    if max_new < max_new_tokens:
        print(f"note: --max-new-tokens {max_new_tokens}: answers stop at {max_new} tokens, the "
              f"room left in the model's context {ctx}", file=sys.stderr)
    return prompt, max_new


def unseen_words(text: str, conf: dict, cfg, per_task: int = 5000) -> list:
    """Words of `text` that occur nowhere in the checkpoint's training text (its SFT tasks, at
    most `per_task` examples each): a model trained from scratch knows nothing of them."""
    from tokenizer.chat import training_text
    sft = conf.get("sft", {})
    if not sft.get("tasks"):  # a pretrained model: its training text is not ours to check
        return []
    seen = set()
    try:
        for spec in resolve_tasks(",".join(sft["tasks"])):
            exs = spec.load("train", seed=sft.get("data_seed", cfg.data_seed),
                            data_dir=cfg.data_dir or None)[:per_task]
            for t in training_text(exs):
                seen.update(re.findall(r"[a-z]+", t.lower()))
    except (TaskError, OSError):  # the training data is not here (another machine, a moved
        # folder): no note rather than a wrong one
        return []
    return [w for w in dict.fromkeys(re.findall(r"[a-z]+", text.lower())) if w not in seen]


def run_generate(cfg, device, dtype):
    path = cfg.dph or cfg.sft
    model, conf, tok = plumbing.load_init(path, device)
    if model.head is None:
        raise UsageError(f"{path} has no preference head to rank with; pass --dph")
    model.eval()
    prompt, max_new = generation_prompt(tok, cfg.system, cfg.generate, model.cfg.max_seq_len,
                                        cfg.max_new_tokens)
    unseen = unseen_words(cfg.generate, conf, cfg)
    if unseen:
        n = len(re.findall(r"[a-z]+", cfg.generate.lower()))
        print(f"note: {len(unseen)} of the prompt's {n} words never occur in the training text "
              f"({', '.join(unseen[:8])}): the model has not seen them, expect noise")
    # the KV cache of n answers, then the scoring pass: the prompt once, n answers as branches
    m = model.cfg
    cache = 2 * 4 * cfg.n * m.n_layers * m.kv_heads * m.head_dim * (len(prompt) + max_new)
    plumbing.check_fits(cache + plumbing.batch_bytes(m, 1, len(prompt) + cfg.n * (max_new + 1),
                                                 backward=False), device,
                      f"-n {cfg.n} answers of up to {max_new} tokens", "lower -n or "
                      "--max-new-tokens")
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    samples = generate(model, prompt, cfg.n, max_new, cfg.temperature, cfg.top_k, cfg.top_p,
                       stop_id=tok.im_end, generator=g)
    # every answer gets <|im_end|> appended: the head reads its hidden state there
    item = ChoiceItem(prompt, [s + [tok.im_end] for s in samples], 0, 0, [1] * len(samples))
    b = collate_choices([item], "shared", tok.pad, end_id=tok.im_end).to(device)
    with torch.no_grad(), plumbing.autocast(device, dtype):
        r = score_choices(model, b, rewards=True, logps=False)["rewards"].float().cpu()
    order = r.argsort(descending=True).tolist()
    print(f"prompt: {cfg.generate!r}; {cfg.n} samples ranked by the preference head:")
    for rank, i in enumerate(order, 1):
        print(f"{rank:>3}. reward {r[i]:+.3f}  {tok.decode(samples[i])!r}")
    return 0


def sample_and_score(model, tok, prompt, cfg, device, dtype, g):
    """Inference-time alignment on one prompt: the greedy answer and -n sampled answers, each
    sample with its reward (the head at the <|im_end|> appended to it) and its LM score (mean
    log-prob per token of the answer and its <|im_end|>: the LM's own view of the whole answer,
    defined for an empty one too). The n samples are decoded together with the KV cache."""
    max_new = min(cfg.max_new_tokens, model.cfg.max_seq_len - len(prompt) - 1)
    if max_new < 1:
        raise UsageError(f"the prompt ({len(prompt)} tokens) leaves no room to answer in the "
                         f"model's context of {model.cfg.max_seq_len}")
    greedy = generate(model, prompt, 1, max_new, 0.0, stop_id=tok.im_end)[0]
    samples = generate(model, prompt, cfg.n, max_new, cfg.temperature, cfg.top_k, cfg.top_p,
                       stop_id=tok.im_end, generator=g)
    item = ChoiceItem(prompt, [s + [tok.im_end] for s in samples], 0, 0, [1] * len(samples))
    b = collate_choices([item], "shared", tok.pad, end_id=tok.im_end).to(device)
    with torch.no_grad(), plumbing.autocast(device, dtype):
        res = score_choices(model, b, rewards=True, logps=True)
    lm = (res["logp"] / (res["n_content"] + 1)).float().cpu().tolist()
    return greedy, samples, res["rewards"].float().cpu().tolist(), lm


PICKERS = ("greedy", "first", "best_by_head", "best_by_lm", "any")


def best_of_n_summary(records: list) -> dict:
    """Exact match of each way to pick one answer per prompt: the greedy answer, the first
    sample, the sample with the highest reward (the paper's inference-time alignment), the one
    with the highest LM score; and `any` (some sample is right: the ceiling of any picker)."""
    hits = {p: [] for p in PICKERS}
    for r in records:
        ok = r["correct"]
        hits["greedy"].append(r["greedy_correct"])
        hits["first"].append(ok[0])
        hits["best_by_head"].append(ok[int(np.argmax(r["rewards"]))])
        hits["best_by_lm"].append(ok[int(np.argmax(r["lm"]))])
        hits["any"].append(any(ok))
    return {"prompts": len(records),
            "exact_match": {p: float(np.mean(v)) if v else float("nan") for p, v in hits.items()}}


def run_generate_from(cfg, device, dtype):
    """Best-of-N with the head on a task's test prompts, each answer checked against the gold."""
    path = cfg.dph
    model, _, tok = plumbing.load_init(path, device)
    if model.head is None:
        raise UsageError(f"{path} has no preference head to rank with; pass --dph")
    model.eval()
    (spec,) = resolve_tasks(cfg.generate_from)
    if spec.kind != "instruction":
        raise UsageError(f"--generate-from {spec.name}: needs an instruction task with one exact "
                         f"answer per prompt (e.g. synth/instruct), not a {spec.kind} task")
    split = cfg.split or spec.eval_split
    examples = spec.load(split, seed=cfg.data_seed, data_dir=cfg.data_dir or None)
    examples = examples[:cfg.max_examples or 50]
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    records = []
    for i, ex in enumerate(tqdm(examples, desc="best-of-n", dynamic_ncols=True)):
        prompt = render_prompt(tok, ex.messages)
        greedy, samples, rewards, lm = sample_and_score(model, tok, prompt, cfg, device, dtype, g)
        texts = [tok.decode(s).strip() for s in samples]
        rec = {"index": i, "prompt": ex.messages[-1]["content"], "answer": ex.answer,
               "greedy": tok.decode(greedy).strip(), "samples": texts, "rewards": rewards,
               "lm": lm, "correct": [t == ex.answer.strip() for t in texts]}
        rec["greedy_correct"] = rec["greedy"] == ex.answer.strip()
        records.append(rec)
        if i < cfg.show:
            head, lmi = int(np.argmax(rewards)), int(np.argmax(lm))
            tqdm.write(f"\n{rec['prompt']}  (answer: {ex.answer!r})")
            for j in np.argsort(rewards)[::-1]:
                marks = " ".join(m for m, on in (("<- head", j == head), ("<- LM", j == lmi),
                                                 ("(first)", j == 0)) if on)
                tqdm.write(f"  {'✓' if rec['correct'][j] else '✗'} reward {rewards[j]:+6.2f}  "
                           f"lm {lm[j]:6.2f}  {texts[j]!r} {marks}")
            tqdm.write(f"  greedy: {'✓' if rec['greedy_correct'] else '✗'} {rec['greedy']!r}")
    summary = best_of_n_summary(records)
    em = summary["exact_match"]
    print(f"\n{spec.name} {split}, {len(records)} prompts, N = {cfg.n} samples "
          f"(temperature {cfg.temperature}, top-p {cfg.top_p}); exact match ×100: "
          f"greedy {100 * em['greedy']:.1f}, first sample {100 * em['first']:.1f}, "
          f"best by head {100 * em['best_by_head']:.1f}, best by LM {100 * em['best_by_lm']:.1f} "
          f"(some sample right: {100 * em['any']:.1f})")
    os.makedirs(cfg.out, exist_ok=True)
    plumbing.write_text(os.path.join(cfg.out, "generate.json"), json.dumps(
        {"config": dataclasses.asdict(cfg), "task": spec.name, "split": split, **summary,
         "records": records}, indent=1) + "\n")
    return 0
