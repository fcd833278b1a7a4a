"""Evaluation and inference-time alignment (SPEC §7; the paper's results tables and best-of-N).

For every candidate answer of every example, one forward pass gives four readouts:

    reward    the preference head at the answer's <|im_end|> (the paper's DPH rows)
    lm_mean   mean log-prob per content token (the paper's LM readout: its SFT and DPO rows)
    lm_sum    summed log-prob ("acc" in lm-evaluation-harness)
    lm_char   log-prob per character ("acc_norm" in lm-evaluation-harness)

The prediction is the argmax candidate; metrics follow GLUE conventions (metrics.py). The table
has the paper's rows: SFT = lm_mean of --sft, DPO = lm_mean of --dph (the LM jointly trained with
cDPO), DPH = reward of --dph.

    python evaluate.py                                   # out/sft and out/dph on their tasks
    python evaluate.py --generate "Reverse the list: a b c" -n 8   # best-of-N with the head
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

import common
import metrics as M
from common import UsageError, opt
from chat_tokenizer import ChatTokenizer
from data import ChoiceItem, answer_branch, collate_choices, eval_items, \
    render_prompt, score_choices
from model import generate, load_checkpoint
from tasks import SYSTEM_PROMPTS, MissingSplit, resolve_tasks

ROWS = (("SFT", "sft", "lm_mean"), ("DPO", "dph", "lm_mean"), ("DPH", "dph", "reward"))


@dataclass
class EvalConfig:
    sft: str = opt("out/sft", "SFT checkpoint ('' to skip)")
    dph: str = opt("out/dph", "DPH checkpoint ('' to skip)")
    tasks: str = opt("", "tasks and mixtures (default: the tasks the checkpoints trained on)")
    split: str = opt("", "split to evaluate (default: each task's test split, or validation "
                         "where test labels are not public)")
    data_dir: str = opt("", "folder with real datasets (default: $DPH_DATA)")
    data_seed: int = opt(0, "seed of the built-in suite's generator")
    out: str = opt("out/eval", "where results.json and predictions.jsonl go")
    layout: str = opt("shared", "shared prefix or padded rows (identical scores)",
                      ["shared", "padded"])
    batch_size: int = opt(32, "examples per forward pass")
    max_examples: int = opt(0, "evaluate at most this many examples per task (0: all)")
    generate: str = opt("", "a user message: sample -n answers and rank them by reward")
    n: int = opt(8, "answers to sample with --generate", alias="-n")
    max_new_tokens: int = opt(64, "longest sampled answer")
    temperature: float = opt(0.8, "sampling temperature")
    top_k: int = opt(0, "sample from the k most likely tokens (0: all)")
    top_p: float = opt(0.95, "nucleus sampling mass")
    system: str = opt(SYSTEM_PROMPTS["chat"], "system prompt for --generate")
    seed: int = opt(0, "sampling seed")
    device: str = opt("auto", "auto | cpu | cuda | mps")
    dtype: str = opt("auto", "auto | float32 | bfloat16 | float16 (autocast)")


# ----------------------------------------------------------------------------------------------
# Scoring


@torch.no_grad()
def score_task(model, tok, examples, cfg, device, dtype, has_head):
    """Per-example lists of per-candidate readouts."""
    items = eval_items(tok, examples, model.cfg.max_seq_len)
    out = []
    for i in range(0, len(items), cfg.batch_size):
        chunk = items[i:i + cfg.batch_size]
        b = collate_choices(chunk, cfg.layout, tok.pad).to(device)
        with common.autocast(device, dtype):
            res = score_choices(model, b, rewards=has_head, logps=True)
        res = {k: v.float().cpu() for k, v in res.items()}
        chars = torch.tensor(b.chars, dtype=torch.float32)
        readouts = {"lm_mean": res["logp_content"] / res["n_content"].clamp(min=1),
                    "lm_sum": res["logp_content"], "lm_char": res["logp_content"] / chars}
        if has_head:
            readouts["reward"] = res["rewards"]
        s = 0
        for it, k in zip(chunk, b.n_branches):
            out.append({"index": it.ref, "label": it.label,
                        **{name: v[s:s + k].tolist() for name, v in readouts.items()}})
            s += k
    return out


def task_metrics(spec, examples, scored, readout):
    pred = np.array([int(np.argmax(s[readout])) for s in scored])
    gold = np.array([s["label"] for s in scored])
    ex0 = examples[0]
    values = None
    if "pearson" in spec.metrics or "spearman" in spec.metrics:
        values = np.array([examples[s["index"]].value for s in scored], dtype=float)
    cands = getattr(ex0, "candidates", None) or []
    positive = cands.index("yes") if "yes" in cands else 1
    m = M.compute(spec.metrics or ("acc",), pred, gold, values=values, positive=positive)
    correct = (pred == gold).astype(float)
    m.setdefault("acc", float(correct.mean()))
    m["acc_stderr"] = M.acc_stderr(correct)
    m["score"] = M.task_score({k: v for k, v in m.items() if k in (spec.metrics or ("acc",))})
    return m


def aggregates(per_task: dict) -> dict:
    """Mean over all tasks, plus the paper's aggregates for whichever groups are present."""
    out = {"average": float(np.mean(list(per_task.values())))} if per_task else {}
    glue = M.glue_score(per_task)
    if glue is not None:
        out["glue"] = glue
    g4 = M.gpt4all_average(per_task)
    if g4 is not None:
        out["gpt4all"] = g4
    if "race/middle" in per_task and "race/high" in per_task:
        out["race"] = M.race_average(per_task["race/middle"], per_task["race/high"])
    return out


def format_table(table: dict, columns: list) -> str:
    short = [c.split("/")[-1][:11] for c in columns]
    w = [max(6, len(s)) for s in short]
    lines = ["model  " + "  ".join(s.rjust(n) for s, n in zip(short, w))]
    for row, vals in table.items():
        lines.append(f"{row:<6} " + "  ".join(
            (f"{100 * vals[c]:.1f}" if c in vals else "-").rjust(n) for c, n in zip(columns, w)))
    return "\n".join(lines)


def write_atomic(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------


def run_generate(cfg, device, dtype):
    path = cfg.dph or cfg.sft
    model, _ = load_checkpoint(path, device)
    if model.head is None:
        raise UsageError(f"{path} has no preference head to rank with; pass --dph")
    model.eval()
    tok = ChatTokenizer.from_file(os.path.join(path, "tokenizer.json"))
    prompt = render_prompt(tok, [{"role": "system", "content": cfg.system},
                                 {"role": "user", "content": cfg.generate}])
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    max_new = min(cfg.max_new_tokens, model.cfg.max_seq_len - len(prompt) - 1)
    samples = generate(model, prompt, cfg.n, max_new, cfg.temperature, cfg.top_k, cfg.top_p,
                       stop_id=tok.im_end, generator=g)
    # every answer gets <|im_end|> appended: the head reads its hidden state there
    item = ChoiceItem(prompt, [s + [tok.im_end] for s in samples], 0, 0, [1] * len(samples))
    b = collate_choices([item], "shared", tok.pad).to(device)
    with torch.no_grad(), common.autocast(device, dtype):
        r = score_choices(model, b, rewards=True, logps=False)["rewards"].float().cpu()
    order = r.argsort(descending=True).tolist()
    print(f"prompt: {cfg.generate!r}; {cfg.n} samples ranked by the preference head:")
    for rank, i in enumerate(order, 1):
        print(f"{rank:>3}. reward {r[i]:+.3f}  {tok.decode(samples[i])!r}")
    return 0


def main(argv=None):
    cfg, _ = common.parse_config(EvalConfig, __doc__.splitlines()[0], argv)
    common.seed_everything(cfg.seed)
    device = common.resolve_device(cfg.device)
    dtype = common.resolve_dtype(cfg.dtype, device)
    if cfg.n <= 0 or cfg.batch_size <= 0:
        raise UsageError("-n and --batch-size must be positive")
    if cfg.generate:
        return run_generate(cfg, device, dtype)

    models = {}
    for key, path in (("sft", cfg.sft), ("dph", cfg.dph)):
        if path:
            m, conf = load_checkpoint(path, device)
            tok = ChatTokenizer.from_file(os.path.join(path, "tokenizer.json"))
            models[key] = (m.eval(), tok, conf)
    if not models:
        raise UsageError("nothing to evaluate: pass --sft and/or --dph")
    conf = next(iter(models.values()))[2]
    tasks = cfg.tasks or ",".join(conf.get("sft", {}).get("tasks", ["builtin"]))
    specs = [s for s in resolve_tasks(tasks) if s.kind in ("choice", "preference")]
    if not specs:
        raise UsageError(f"--tasks {tasks}: no choice or preference task to evaluate")

    t0 = time.time()
    results, predictions, table = {}, [], {}
    for spec in tqdm(specs, desc="evaluate", dynamic_ncols=True):
        split = cfg.split or spec.eval_split
        try:
            examples = spec.load(split, seed=cfg.data_seed, data_dir=cfg.data_dir or None)
        except MissingSplit as e:
            tqdm.write(f"note: skipping {spec.name}: {e}")
            continue
        if cfg.max_examples:
            examples = examples[:cfg.max_examples]
        entry = {"split": split, "n": len(examples)}
        scored = {}
        for key, (model, tok, _) in models.items():
            scored[key] = score_task(model, tok, examples, cfg, device, dtype,
                                     model.head is not None)
            readouts = [r for r in ("reward", "lm_mean", "lm_sum", "lm_char") if r in scored[key][0]]
            entry[key] = {r: task_metrics(spec, examples, scored[key], r) for r in readouts}
        results[spec.name] = entry
        for j in range(len(examples)):
            rec = {"task": spec.name, "index": scored[next(iter(scored))][j]["index"],
                   "label": scored[next(iter(scored))][j]["label"]}
            for key in scored:
                rec[key] = {k: v for k, v in scored[key][j].items() if k not in ("index", "label")}
            predictions.append(rec)

    specs = [s for s in specs if s.name in results]
    if not specs:
        raise UsageError("no task had data to evaluate")
    for row, key, readout in ROWS:
        if key in models and all(readout in results[s.name][key] for s in specs):
            per_task = {s.name: results[s.name][key][readout]["score"] for s in specs}
            table[row] = {**per_task, **aggregates(per_task)}
    columns = [s.name for s in specs] + [c for c in ("glue", "gpt4all", "race", "average")
                                         if any(c in v for v in table.values())]
    text = format_table(table, columns)
    print(text)
    print(f"(scores ×100; {time.time() - t0:.0f}s; metrics per task in {cfg.out}/results.json)")

    os.makedirs(cfg.out, exist_ok=True)
    summary = {"config": dataclasses.asdict(cfg),
               "checkpoints": {k: getattr(cfg, k) for k in models},
               "rows": {r: f"{readout} of {key}" for r, key, readout in ROWS},
               "table": table, "tasks": results, "seconds": round(time.time() - t0, 1)}
    write_atomic(os.path.join(cfg.out, "predictions.jsonl"),
                 "".join(json.dumps(p) + "\n" for p in predictions))
    write_atomic(os.path.join(cfg.out, "results.json"), json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    common.run_main(main)
