"""Plots of runs: training curves, reward distributions and per-task readouts (needs matplotlib).

    python -m tools.plots RUN_DIR [RUN_DIR ...] [--out DIR]

What each directory gets (PNG files, written beside the run unless --out is given):

    curves.png    a training run (train_sft.py / train_dph.py --out, it has metrics.jsonl):
                  the loss over steps (train, and validation where it was logged); for a DPH
                  run also the head's reward accuracy and reward margin (train steps, the
                  validation pairs and the training pairs scored in eval mode) and the cDPO
                  accuracy of the joint LM term. Dotted lines mark where a run was resumed.
    rewards.png   an evaluation (evaluate.py --out, it has predictions.jsonl): histograms of
                  the DPH head's reward for the gold candidate vs every other candidate, over
                  all examples of all tasks (needs an evaluation run with --dph)
    readouts.png  an evaluation (results.json): per-task grouped bars of the table's rows
                  (SFT / DPO / DPH), scores x100, the aggregate columns last

With --out and several RUN_DIRs the files are named after each run (DIR/<run>_curves.png).
matplotlib is an optional extra, not a requirement of the project: `pip install matplotlib`.
Without it the command stops with one line and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import plumbing
from plumbing import UsageError

METRICS, PREDICTIONS, RESULTS = "metrics.jsonl", "predictions.jsonl", "results.json"
AGGREGATES = ("glue", "gpt4all", "race", "average")  # evaluate.py's aggregate columns
DPI = 80
NO_MPL = "plots need matplotlib: pip install matplotlib"


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display), imported on first use."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError(NO_MPL) from None
    return plt


# ----------------------------------------------------------------------------------------------
# Reading the runs' files


def read_jsonl(path: str) -> list:
    """The JSON objects of a .jsonl file; a line cut short (a killed run) is skipped."""
    out = []
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
    return out


def read_json(path: str) -> dict:
    try:
        with open(path) as f:
            obj = json.load(f)
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(obj, dict):
        raise UsageError(f"{path}: expected a JSON object")
    return obj


def series(records: list, split: str, key: str) -> tuple:
    """(steps, values) of `key` in the records of `split`, in step order; None values dropped."""
    pts = sorted((r["step"], float(r[key])) for r in records
                 if r.get("split") == split and isinstance(r.get(key), (int, float))
                 and isinstance(r.get("step"), (int, float)))
    return [p[0] for p in pts], [p[1] for p in pts]


def is_dph(records: list) -> bool:
    return any("rewards/accuracies" in r for r in records if r.get("split") != "config")


def reward_pairs(preds: list) -> tuple:
    """(gold rewards, other rewards, examples, examples whose gold has the strictly top reward)
    from evaluate.py's predictions: the DPH head's reward of each candidate."""
    gold, other, n, top = [], [], 0, 0
    for p in preds:
        r, label = (p.get("dph") or {}).get("reward"), p.get("label")
        if not isinstance(r, list) or not isinstance(label, int) or not 0 <= label < len(r):
            continue
        n += 1
        g, rest = r[label], r[:label] + r[label + 1:]
        gold.append(g)
        other.extend(rest)
        top += all(g > x for x in rest)
    return gold, other, n, top


# ----------------------------------------------------------------------------------------------
# The figures


def _line(ax, xs, ys, label, **kw):
    if not xs:
        return
    marker = "o" if len(xs) <= 30 else None
    ax.plot(xs, ys, label=label, marker=marker, markersize=3, linewidth=1.2, **kw)


def _mark_resumes(axes, records):
    for r in records:
        if r.get("split") == "resume" and isinstance(r.get("step"), (int, float)):
            for ax in axes:
                ax.axvline(r["step"], color="grey", linestyle=":", linewidth=1)


def plot_curves(records: list, path: str, title: str) -> str:
    """curves.png of a training run's metrics.jsonl records."""
    plt = pyplot()
    dph = is_dph(records)
    panels = [("loss", [("train" + (" (total)" if dph else ""), "train", "loss"),
                        ("validation", "validation", "loss")])]
    if dph:
        panels[0][1].append(("train: cDPO term", "train", "dpo/loss"))
        for name, key in (("reward accuracy", "rewards/accuracies"),
                          ("reward margin", "rewards/margins")):
            panels.append((name, [("train", "train", key), ("validation", "validation", key),
                                  ("training pairs (eval mode)", "train_pairs", key)]))
        panels.append(("cDPO accuracy", [("train", "train", "dpo/accuracies")]))
    grid = (2, 2) if dph else (1, 1)
    fig, axes = plt.subplots(*grid, figsize=(4.6 * grid[1], 3.3 * grid[0] + 0.4), squeeze=False)
    axes = list(axes.flat)
    for ax, (name, lines) in zip(axes, panels):
        drawn = 0
        for label, split, key in lines:
            xs, ys = series(records, split, key)
            _line(ax, xs, ys, label)
            drawn += bool(xs)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if "accuracy" in name:
            ax.set_ylim(-0.02, 1.02)
        if "margin" in name:
            ax.axhline(0, color="black", linewidth=0.6)
        if drawn:
            ax.legend(fontsize=7)
        else:
            why = " (off: --dpo-weight 0 or --freeze-backbone)" if "cDPO" in name else ""
            ax.text(0.5, 0.5, f"not logged{why}", ha="center", va="center", fontsize=8,
                    transform=ax.transAxes, wrap=True)
    _mark_resumes(axes, records)
    fig.suptitle(f"{'DPH' if dph else 'SFT'} training: {title}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def plot_rewards(preds: list, path: str, title: str) -> str:
    """rewards.png: the head's reward of the gold candidate vs the others, all examples."""
    plt = pyplot()
    gold, other, n, top = reward_pairs(preds)
    finite = [x for x in gold + other if math.isfinite(x)]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    bins = [lo + (hi - lo) * i / 40 for i in range(41)]
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    mean = (lambda v: sum(v) / len(v) if v else float("nan"))
    ax.hist(gold, bins=bins, density=True, alpha=0.55, color="tab:green",
            label=f"gold (chosen), n={len(gold)}, mean {mean(gold):.3f}")
    ax.hist(other, bins=bins, density=True, alpha=0.55, color="tab:red",
            label=f"other candidates (rejected), n={len(other)}, mean {mean(other):.3f}")
    ax.set_xlabel("reward of the DPH head")
    ax.set_ylabel("density")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"reward distributions: {title}\n{n} examples, gold has the top reward in "
                 f"{100 * top / max(n, 1):.1f}%", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def plot_readouts(table: dict, path: str, title: str) -> str:
    """readouts.png: per-task grouped bars of results.json's table rows, scores x100."""
    plt = pyplot()
    rows = [r for r, v in table.items() if isinstance(v, dict)]
    cols = []
    for r in rows:
        cols += [c for c in table[r] if c not in cols]
    cols = [c for c in cols if c not in AGGREGATES] + [c for c in AGGREGATES if c in cols]
    width = 0.8 / max(len(rows), 1)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 + 0.35 * len(rows) * len(cols)), 4.0))
    for i, r in enumerate(rows):
        xs = [j + (i - (len(rows) - 1) / 2) * width for j, c in enumerate(cols)
              if isinstance(table[r].get(c), (int, float))]
        ys = [100 * table[r][c] for c in cols if isinstance(table[r].get(c), (int, float))]
        bars = ax.bar(xs, ys, width, label=r)
        if len(cols) * len(rows) <= 24:
            ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=1)
    n_tasks = sum(c not in AGGREGATES for c in cols)
    if 0 < n_tasks < len(cols):
        ax.axvline(n_tasks - 0.5, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels(cols, rotation=30 if len(cols) > 4 else 0, ha="right" if len(cols) > 4
                       else "center", fontsize=8)
    ax.set_ylabel("score ×100")
    ax.axhline(0, color="black", linewidth=0.6)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"readouts per task: {title}", fontsize=10)
    ax.margins(y=0.12)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------
# Command line


def plan(run_dir: str) -> list:
    """[(kind, data)] to plot for a directory, read and checked before anything is written."""
    if not os.path.isdir(run_dir):
        raise UsageError(f"{run_dir}: not a directory")
    files = {n: os.path.join(run_dir, n) for n in (METRICS, PREDICTIONS, RESULTS)}
    have = {n for n, p in files.items() if os.path.isfile(p)}
    if not have:
        raise UsageError(f"{run_dir}: neither a training run ({METRICS}) nor an evaluation "
                         f"({PREDICTIONS}, {RESULTS})")
    jobs = []
    if METRICS in have:
        records = read_jsonl(files[METRICS])
        if not any(r.get("split") in ("train", "validation", "train_pairs") for r in records):
            raise UsageError(f"{files[METRICS]}: no train or validation records yet")
        jobs.append(("curves", records))
    if PREDICTIONS in have:
        preds = read_jsonl(files[PREDICTIONS])
        if reward_pairs(preds)[2]:
            jobs.append(("rewards", preds))
        else:
            print(f"note: {files[PREDICTIONS]}: no DPH rewards (evaluate.py ran without --dph); "
                  f"no rewards.png", file=sys.stderr)
    if RESULTS in have:
        table = read_json(files[RESULTS]).get("table")
        if isinstance(table, dict) and any(isinstance(v, dict) and v for v in table.values()):
            jobs.append(("readouts", table))
        else:
            print(f"note: {files[RESULTS]}: an empty table; no readouts.png", file=sys.stderr)
    return jobs


def run_names(run_dirs: list) -> list:
    """Short distinct names of the runs (the directory's name, -2, -3 ... when repeated)."""
    names, seen = [], {}
    for d in run_dirs:
        base = os.path.basename(os.path.normpath(os.path.abspath(d))) or "run"
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return names


PLOTTERS = {"curves": plot_curves, "rewards": plot_rewards, "readouts": plot_readouts}


def parse_args(argv=None):
    p = plumbing.Parser(prog="python -m tools.plots", description=__doc__.splitlines()[0],
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="a training run's --out (metrics.jsonl) or an evaluation's --out "
                        "(predictions.jsonl, results.json)")
    p.add_argument("--out", default="", help="write the PNGs here instead of beside each run")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    jobs = [(d, plan(d)) for d in args.run_dirs]  # every input checked before a file is written
    pyplot()  # matplotlib present? (one line otherwise)
    if args.out:
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            raise UsageError(f"--out {args.out}: not a directory")
        os.makedirs(args.out, exist_ok=True)
    several = args.out and len(args.run_dirs) > 1
    for (d, todo), name in zip(jobs, run_names(args.run_dirs)):
        for kind, data in todo:
            fname = f"{name}_{kind}.png" if several else f"{kind}.png"
            path = os.path.join(args.out or d, fname)
            print(PLOTTERS[kind](data, path, name))
    return 0


if __name__ == "__main__":
    plumbing.run_main(main)
