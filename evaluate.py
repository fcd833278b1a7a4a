"""Evaluation and inference-time alignment (the paper's results tables, and its inference-time alignment by pruning candidate generations).

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

from tasks import metrics as M
import plumbing
from data import collate_choices, eval_items, score_choices
from inference import best_of_n
from plumbing import UsageError, opt
from tasks import SYSTEM_PROMPTS, MissingSplit, resolve_tasks
from tokenizer.chatml import render_prompt

ROWS = (("SFT", "sft", "lm_mean"), ("DPO", "dph", "lm_mean"), ("DPH", "dph", "reward"))


@dataclass
class EvalConfig:
    sft: str = opt("out/sft", "SFT checkpoint, or a pretrained .gguf / Hugging Face directory "
                              "(its zero-shot LM) ('' to skip)")
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
    seed: int = opt(0, "sampling seed")
    device: str = opt("auto", "auto | cpu | cuda | mps")
    dtype: str = opt("auto", "auto | float32 | bfloat16 | float16 (autocast)")


# The interval of every int and float flag (plumbing.check_ranges; "max" = 2**63 - 1).
RANGES = {
    "data_seed": "[0, max]", "seed": "[0, max]", "batch_size": "[1, 1048576]",
    "max_examples": "[0, max]", "show": "[0, max]",
    "n": "[1, 1024]",  # best-of-N: N answers decoded together, each with its KV cache
    "max_new_tokens": "[1, 1048576]", "temperature": "[0, 10000]", "top_k": "[0, 2147483647]",
    "top_p": "(0, 1]",
}
MIN_TEMPERATURE = 1e-4  # below it logits / T overflows float32: use 0, greedy decoding


def validate(cfg: EvalConfig, argv=None):
    """Every flag checked before any work: ranges, the generation settings, --out."""
    plumbing.check_ranges(cfg, RANGES)
    if 0 < cfg.temperature < MIN_TEMPERATURE:
        raise UsageError(f"--temperature {cfg.temperature}: use 0 for greedy decoding, or at "
                         f"least {MIN_TEMPERATURE}")
    given = plumbing.explicit_flags(argv)
    for name in ("generate", "generate_from"):
        if name in given and not getattr(cfg, name, "").strip():
            raise UsageError(f"--{name.replace('_', '-')}: empty "
                             f"{'prompt' if name == 'generate' else 'task'}")
    if cfg.generate and getattr(cfg, "generate_from", ""):
        raise UsageError("--generate and --generate-from: pick one")
    if (cfg.generate or getattr(cfg, "generate_from", "")) and not (cfg.dph or cfg.sft):
        raise UsageError("--generate needs a checkpoint with a preference head: pass --dph")
    plumbing.check_writable_dir(cfg.out, "--out")


# ----------------------------------------------------------------------------------------------
# Scoring


@torch.no_grad()
def score_task(model, tok, examples, cfg, device, dtype, has_head):
    """Per-example lists of per-candidate readouts. Non-finite readouts are an error: a score
    computed from them would be a number that means nothing."""
    ctx = model.cfg.max_seq_len
    try:
        items = eval_items(tok, examples, ctx)
    except ValueError as e:  # an answer longer than the context: every candidate must be scored
        raise UsageError(f"{e} (the model's context); scoring without it would change the "
                         f"task, so drop the example (or use --max-examples)") from None
    note_cut_prompts(tok, examples, items, ctx)
    if items:  # one chunk of items of the median length must fit in the device
        if cfg.layout == "shared":
            lengths, rows = [len(it.prompt) + sum(map(len, it.branches)) for it in items], 1
        else:
            lengths = [len(it.prompt) + max(map(len, it.branches)) for it in items]
            rows = max(len(it.branches) for it in items)
        plumbing.check_fits(plumbing.batch_bytes(model.cfg, rows * min(cfg.batch_size, len(items)),
                                             sorted(lengths)[len(lengths) // 2], backward=False),
                          device, f"--batch-size {cfg.batch_size} examples of "
                          f"{examples[0].task}", "lower --batch-size")
    out = []
    for i in range(0, len(items), cfg.batch_size):
        chunk = items[i:i + cfg.batch_size]
        b = collate_choices(chunk, cfg.layout, tok.pad, end_id=tok.im_end).to(device)
        with plumbing.autocast(device, dtype):
            res = score_choices(model, b, rewards=has_head, logps=True)
        res = {k: v.float().cpu() for k, v in res.items()}
        chars = torch.tensor(b.chars, dtype=torch.float32)
        readouts = {"lm_mean": res["logp_content"] / res["n_content"].clamp(min=1),
                    "lm_sum": res["logp_content"], "lm_char": res["logp_content"] / chars}
        if has_head:
            readouts["reward"] = res["rewards"]
        bad = [name for name, v in readouts.items() if not bool(torch.isfinite(v).all())]
        if bad:
            raise UsageError(f"{examples[0].task}: non-finite {bad[0]} readouts (the model's "
                             f"outputs overflow: weights of a diverged run?); no score is given")
        s = 0
        for it, k in zip(chunk, b.n_branches):
            out.append({"index": it.ref, "label": it.label,
                        **{name: v[s:s + k].tolist() for name, v in readouts.items()}})
            s += k
    return out


def check_kind(key: str, path: str, model):
    """--dph must hold a preference head (its rows are the DPO and DPH rows); --sft given a
    DPH checkpoint is scored by its language model, with a note."""
    if key == "dph" and model.head is None:
        raise UsageError(f"--dph {path}: no preference head (an SFT checkpoint?); pass it as "
                         f"--sft, or train a head on it with train_dph.py")
    if key == "sft" and model.head is not None:
        print(f"note: --sft {path} has a preference head (a DPH checkpoint): the SFT row reads "
              f"its language model", file=sys.stderr)


def note_cut_prompts(tok, examples, items, max_len):
    """A note when prompts had to be cut from the left to fit the model's context (as in
    training: after <bos>, so the oldest tokens go first, see data._truncate_prompt)."""
    cut = [it for it in items if len(it.prompt) + max(map(len, it.branches)) == max_len
           and len(it.prompt) < len(render_prompt(tok, examples[it.ref].messages))]
    if cut:
        print(f"note: {examples[0].task}: {len(cut)} of {len(items)} prompts are longer than the "
              f"model's context {max_len} with their answers and lose their first tokens",
              file=sys.stderr)


def predict(scores, label: int) -> int:
    """The argmax candidate; a tie at the top that includes the gold answer counts as wrong
    (another tied candidate is predicted): identical candidates, or a head that gives several
    answers the same reward, never score as correct by the order of the candidates."""
    s = np.asarray(scores)
    top = np.flatnonzero(s == s.max())
    if len(top) > 1 and label in top:
        return int(next(i for i in top if i != label))
    return int(top[0])


def task_metrics(spec, examples, scored, readout):
    ties = sum(int(np.sum(np.asarray(s[readout]) == max(s[readout])) > 1) for s in scored)
    if ties:
        print(f"note: {spec.name}: {ties} of {len(scored)} examples have tied top {readout} "
              f"scores (identical candidates?); a tie counts as wrong", file=sys.stderr)
    pred = np.array([predict(s[readout], s["label"]) for s in scored])
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


def main(argv=None):
    cfg, _ = plumbing.parse_config(EvalConfig, __doc__.splitlines()[0], argv)
    validate(cfg, argv)
    plumbing.seed_everything(cfg.seed)
    device = plumbing.resolve_device(cfg.device)
    dtype = plumbing.resolve_dtype(cfg.dtype, device)
    if cfg.generate:
        return best_of_n.run_generate(cfg, device, dtype)
    if cfg.generate_from:
        return best_of_n.run_generate_from(cfg, device, dtype)

    models = {}
    for key, path in (("sft", cfg.sft), ("dph", cfg.dph)):
        if path:
            # a checkpoint, or a pretrained .gguf / Hugging Face directory (its zero-shot LM)
            m, conf, tok = plumbing.load_init(path, device)
            check_kind(key, path, m)
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
    stage = models["dph"][2].get("dph", {}) if "dph" in models else {}
    if "DPO" in table and (stage.get("freeze_backbone") or stage.get("dpo_weight") == 0):
        why = "frozen" if stage.get("freeze_backbone") else "trained without cDPO (--dpo-weight 0)"
        print(f"note: the DPO row is the LM readout of {cfg.dph}, whose backbone was {why}: "
              f"not a DPO-aligned LM" + (", but its --init's LM unchanged"
                                         if stage.get("freeze_backbone") else ""))
    print(f"(scores ×100; {time.time() - t0:.0f}s; metrics per task in {cfg.out}/results.json)")

    os.makedirs(cfg.out, exist_ok=True)
    summary = {"config": dataclasses.asdict(cfg),
               "checkpoints": {k: getattr(cfg, k) for k in models},
               "rows": {r: f"{readout} of {key}" for r, key, readout in ROWS},
               "table": table, "tasks": results, "seconds": round(time.time() - t0, 1)}
    plumbing.write_text(os.path.join(cfg.out, "predictions.jsonl"),
                 "".join(json.dumps(p) + "\n" for p in predictions))
    plumbing.write_text(os.path.join(cfg.out, "results.json"), json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    plumbing.run_main(main)
