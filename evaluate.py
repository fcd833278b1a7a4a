"""Evaluation (the paper's results tables) and its inference-time alignment procedure.

For every candidate answer of every example, one forward pass gives four readouts:

    reward    the preference head at the answer's <|im_end|> (the paper's DPH rows)
    lm_mean   mean log-prob per content token (the paper's LM readout: its SFT and DPO rows)
    lm_sum    summed log-prob ("acc" in lm-evaluation-harness)
    lm_char   log-prob per character ("acc_norm" in lm-evaluation-harness)

The prediction is the argmax candidate; metrics follow GLUE conventions (tasks/metrics.py). The
table has the paper's rows: SFT = lm_mean of --sft, DPO = lm_mean of --dph (the LM jointly trained
with cDPO), DPH = reward of --dph. --generate / --generate-from sample N answers and keep the one
the head rewards most (inference/best_of_n.py).

    python evaluate.py                                   # out/sft and out/dph on their tasks
    python evaluate.py --generate "Reverse the list: a b c" -n 8   # best-of-N with the head
    python evaluate.py --score pairs.jsonl --out scored.jsonl       # rewards for your own file
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

import plumbing
from data import ChoiceItem, collate_choices, score_choices, truncate_prompt
from inference import best_of_n, score
from plumbing import UsageError, inputs, opt
from tasks import ChoiceExample, MissingSplit, PreferenceExample, metrics as M, resolve_tasks
from tokenizer.chatml import answer_branch, render_prompt

ROWS = (("SFT", "sft", "lm_mean"), ("DPO", "dph", "lm_mean"), ("DPH", "dph", "reward"))


@dataclass
class EvalConfig(score.FileConfig, best_of_n.SamplingConfig):
    sft: str = opt("out/sft", "SFT checkpoint, or a pretrained .gguf / HF directory ('' to skip)")
    dph: str = opt("out/dph", "DPH checkpoint ('' to skip)")
    tasks: str = opt("", "tasks and mixtures (default: the tasks the checkpoints trained on)")
    split: str = opt("", "split to evaluate (default: each task's own evaluation split)")
    data_dir: str = opt("", "folder with real datasets (default: $DPH_DATA)")
    data_seed: int = opt(0, "seed of the built-in suite's generator")
    out: str = opt("out/eval", "where results.json and predictions.jsonl go")
    layout: str = opt("shared", "shared prefix or padded rows (same scores)", ["shared", "padded"])
    batch_size: int = opt(32, "examples per forward pass")
    max_examples: int = opt(0, "evaluate at most this many examples per task (0: all)")
    seed: int = opt(0, "sampling seed")
    device: str = opt("auto", "auto | cpu | cuda | mps")
    dtype: str = opt("auto", "auto | float32 | bfloat16 | float16 (autocast)")


# The interval of every int and float flag (plumbing.check_ranges; "max" = 2**63 - 1).
RANGES = {"data_seed": "[0, max]", "seed": "[0, max]", "batch_size": "[1, 1048576]",
          "max_examples": "[0, max]", **best_of_n.RANGES}


def validate(cfg: EvalConfig, argv=None):
    """Every flag checked before any work: ranges, the sampling settings, the outputs."""
    plumbing.check_ranges(cfg, RANGES)
    best_of_n.validate(cfg, argv)
    score.check_flags(cfg)  # one mode at a time, --out (and --pairs) writable


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
        prompt = truncate_prompt(render_prompt(tok, ex.messages), max(map(len, branches)),
                                 max_len, 1 + len(tok.piece("assistant\n")))
        if prompt is None:
            raise ValueError(f"{ex.task} example {i}: answers do not fit in {max_len} tokens")
        items.append(ChoiceItem(prompt, branches, label, i, [max(1, len(c)) for c in cands]))
    return items


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
    inputs.note_cut_prompts(tok, examples, items, ctx)
    plumbing.check_items_fit(model.cfg, items, cfg.layout, min(cfg.batch_size, len(items)),
                             device, f"--batch-size {cfg.batch_size} examples of "
                             f"{examples[0].task}", "lower --batch-size", backward=False)
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


def main(argv=None):
    cfg, _ = plumbing.parse_config(EvalConfig, __doc__.splitlines()[0], argv)
    validate(cfg, argv)
    plumbing.seed_everything(cfg.seed)
    device = plumbing.resolve_device(cfg.device)
    dtype = plumbing.resolve_dtype(cfg.dtype, device)
    for mode, run in zip(score.MODES, (best_of_n.run_generate, best_of_n.run_generate_from,
                                       score.score_file, score.generate_file)):
        if getattr(cfg, mode):  # inference/: best-of-N, or files of your own
            return run(cfg, device, dtype)

    models = {}
    for key, path in (("sft", cfg.sft), ("dph", cfg.dph)):
        if path:
            # a checkpoint, or a pretrained .gguf / Hugging Face directory (its zero-shot LM)
            m, conf, tok = plumbing.load_init(path, device)
            inputs.check_kind(key, path, m)
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
            entry[key] = {r: M.task_metrics(spec, examples, scored[key], r) for r in readouts}
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
            table[row] = {**per_task, **M.aggregates(per_task)}
    columns = [s.name for s in specs] + [c for c in ("glue", "gpt4all", "race", "average")
                                         if any(c in v for v in table.values())]
    text = M.format_table(table, columns)
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
