"""Which answers does each readout pick? A check for a collapsed head, from evaluate.py's
predictions.jsonl.

A collapsed preference head does not pick at random: on the tasks whose candidates are the same
words for every item (yes / no, positive / negative, True / Neither / False) it gives one word a
higher reward whatever the prompt, so it picks that word on (nearly) every item, while the test
labels are close to balanced. This prints, per task, for the DPH row (the head's reward) and the
DPO row (the same model's LM readout, lm_mean):

    top      the share of items on which the readout picks its most-picked candidate position
             (1.00: always the same answer), beside the share of the most common gold label
    margin   the mean reward (or mean log-prob) of the gold answer minus the mean of the others,
             within each item: how much of the readout follows the prompt

    python experiments/picks.py out/eval/predictions.jsonl
    python experiments/picks.py out/sweep/NAME/seed0/eval/predictions.jsonl --tasks synth/boolq

Candidate positions stand for answers only where every item lists the same candidates in the same
order (the built-in label tasks); for the others (RACE's lettered options) `top` says little.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import Counter, defaultdict

READOUTS = (("DPH", "reward"), ("DPO", "lm_mean"))


def summarise(lines, tasks=None) -> dict:
    """predictions.jsonl lines -> {task: {"items", "gold_top", row: {"top", "margin"}}}."""
    by_task = defaultdict(list)
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            p = json.loads(line)
            by_task[p["task"]].append((p["label"], p["dph"]))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"line {n}: not a predictions.jsonl record with a 'dph' "
                             f"checkpoint ({e})") from None
    out = {}
    for task, items in by_task.items():
        if tasks and task not in tasks:
            continue
        items = [(y, d) for y, d in items if isinstance(y, int) and "reward" in d]
        if not items:
            continue
        res = {"items": len(items),
               "gold_top": Counter(y for y, _ in items).most_common(1)[0][1] / len(items)}
        for row, key in READOUTS:
            picks, margins = Counter(), []
            for y, d in items:
                s = d[key]
                picks[s.index(max(s))] += 1
                others = [v for i, v in enumerate(s) if i != y]
                margins.append(s[y] - sum(others) / len(others))
            res[row] = {"top": picks.most_common(1)[0][1] / len(items),
                        "margin": statistics.mean(margins)}
        out[task] = res
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("predictions", help="evaluate.py's predictions.jsonl (a run with --dph)")
    p.add_argument("--tasks", default="", help="comma-separated task names (default: all)")
    a = p.parse_args(argv)
    try:
        with open(a.predictions) as f:
            s = summarise(f, set(filter(None, a.tasks.split(","))))
    except (OSError, ValueError) as e:
        sys.exit(f"error: {a.predictions}: {e}")
    if not s:
        sys.exit(f"error: {a.predictions}: no classification items with a head's rewards")
    print(f"{'task':22s} {'items':>5s} {'gold top':>8s}   {'DPH top':>7s} {'margin':>7s}   "
          f"{'DPO top':>7s} {'margin':>7s}")
    for task, r in s.items():
        print(f"{task:22s} {r['items']:5d} {r['gold_top']:8.2f}   {r['DPH']['top']:7.2f} "
              f"{r['DPH']['margin']:+7.2f}   {r['DPO']['top']:7.2f} {r['DPO']['margin']:+7.2f}")


if __name__ == "__main__":
    main()
