"""Seed sweep: SFT -> DPH -> evaluate for several seeds, and the paper-style table as mean ± s.d.

One seed's table is not a result: float rounding differs between CPU types, so a single run's
numbers move from one machine to the next, and at the quick start's scale a seed moves a family
by several points. This script runs the three stages of the quick start once per seed and reports
each family's score as mean ± s.d. over the seeds, the spread of the averages, and the margins
between the rows (the paper's claim is DPH > DPO > SFT).

    python experiments/sweep.py --seeds 0,1,2                  # the quick start, three seeds
    python experiments/sweep.py --seeds 0,1,2 --jobs 2         # two seeds at a time, a core each
    python experiments/sweep.py --name separable --reuse-sft out/sweep/default/seed{seed}/sft \\
        --dph "--loss separable"                               # an ablation on the same SFT runs

Each run lives in OUT/NAME/seed<s>/{sft,dph,eval}; a stage whose output is complete (a training
stage's checkpoint at its last step, not one of the resumable ones written along the way) is not
run again (delete the folder to redo it), so an interrupted sweep continues where it stopped.
`--bestofn K` also runs evaluate.py's inference-time alignment measurement on K synth/instruct
test prompts per seed (in seed<s>/bestofn-KxN, N samples each). The summary goes to OUT/NAME/summary.json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = ("SFT", "DPO", "DPH")


def stage(cmd: list, log: str, threads: int) -> float:
    """Run one stage as its own process (its output to `log`); return its wall time."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    t = time.time()
    with open(log, "w") as f:
        rc = subprocess.call([sys.executable] + cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                             env=env)
    if rc != 0:
        tail = open(log).read().strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"{' '.join(cmd[:1])} exited {rc} (see {log}): {tail[0]}")
    return time.time() - t


def finished(path: str, stage: str) -> bool:
    """Whether `path` holds the FINAL checkpoint of a training stage. Every --save-every steps
    a run writes a complete, resumable checkpoint (config.json included), so an interrupted run
    leaves one behind; its config.json records the steps done, which must reach max_steps."""
    cfg = os.path.join(path, "config.json")
    if not os.path.exists(cfg):
        return False
    with open(cfg) as f:
        s = json.load(f).get(stage, {})
    return s.get("steps", s.get("max_steps")) == s.get("max_steps")


def run_seed(seed: int, a, threads: int) -> dict:
    d = os.path.join(a.out, a.name, f"seed{seed}")
    os.makedirs(d, exist_ok=True)
    sft = a.reuse_sft.format(seed=seed) if a.reuse_sft else os.path.join(d, "sft")
    dph, ev = os.path.join(d, "dph"), os.path.join(d, "eval")
    times = {}
    if a.reuse_sft and not finished(sft, "sft"):
        raise RuntimeError(f"--reuse-sft {sft}: not a finished SFT run (no config.json, or "
                           f"stopped before its last step)")
    if not a.reuse_sft and not finished(sft, "sft"):
        times["sft"] = stage(["train_sft.py", "--seed", str(seed), "--out", sft, "--overwrite"]
                             + shlex.split(a.sft), os.path.join(d, "sft.log"), threads)
    # a stage run again invalidates what was computed from its old output
    if "sft" in times or not finished(dph, "dph"):
        times["dph"] = stage(["train_dph.py", "--init", sft, "--seed", str(seed), "--out", dph,
                              "--overwrite"] + shlex.split(a.dph), os.path.join(d, "dph.log"),
                             threads)
    if "dph" in times or not os.path.exists(os.path.join(ev, "results.json")):
        times["eval"] = stage(["evaluate.py", "--sft", sft, "--dph", dph, "--out", ev]
                              + shlex.split(a.eval), os.path.join(d, "eval.log"), threads)
    res = json.load(open(os.path.join(ev, "results.json")))
    out = {"seed": seed, "table": res["table"], "seconds": times,
           "head_vs_lm": head_vs_lm(os.path.join(ev, "predictions.jsonl"))}
    if a.bestofn:
        bo = os.path.join(d, f"bestofn-{a.bestofn}x{a.n}", "generate.json")  # one per size
        if "dph" in times or not os.path.exists(bo):
            times["bestofn"] = stage(["evaluate.py", "--dph", dph, "--sft", "",
                                      "--generate-from", "synth/instruct", "-n", str(a.n),
                                      "--max-examples", str(a.bestofn), "--seed", str(seed),
                                      "--out", os.path.dirname(bo)],
                                     os.path.join(d, "bestofn.log"), threads)
        out["bestofn"] = json.load(open(bo))
    return out


def head_vs_lm(path: str) -> dict:
    """How much the head says beyond the LM readout of the same (DPH) model, over every test
    item: the Pearson correlation of the two readouts after centring each within its item (only
    the ranking inside an item matters), and how often both pick the same candidate."""
    xs, ys, same, n = [], [], 0, 0
    for line in open(path):
        d = json.loads(line).get("dph", {})
        r, lm = d.get("reward"), d.get("lm_mean")
        if not r or not lm or len(r) < 2:
            continue
        xs += [v - statistics.mean(r) for v in r]
        ys += [v - statistics.mean(lm) for v in lm]
        same += max(range(len(r)), key=r.__getitem__) == max(range(len(lm)), key=lm.__getitem__)
        n += 1
    if n == 0:
        return {}
    sx = math.sqrt(sum(x * x for x in xs)) or 1.0
    sy = math.sqrt(sum(y * y for y in ys)) or 1.0
    return {"correlation": sum(x * y for x, y in zip(xs, ys)) / (sx * sy), "same_pick": same / n,
            "items": n}


def mean_sd(xs: list) -> tuple:
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarise(runs: list) -> dict:
    """Per row and column: mean and s.d. over seeds (×100), plus margins between rows."""
    cols = list(next(iter(runs[0]["table"].values())))
    summary = {"seeds": [r["seed"] for r in runs], "rows": {}, "margins": {}}
    for row in ROWS:
        if all(row in r["table"] for r in runs):
            summary["rows"][row] = {c: mean_sd([100 * r["table"][row][c] for r in runs])
                                    for c in cols}
    for a, b in (("DPH", "DPO"), ("DPO", "SFT"), ("DPH", "SFT")):
        if a in summary["rows"] and b in summary["rows"]:
            diffs = [100 * (r["table"][a]["average"] - r["table"][b]["average"]) for r in runs]
            fams = [c for c in cols if c not in ("average", "glue", "gpt4all", "race")]
            wins = sum(summary["rows"][a][c][0] >= summary["rows"][b][c][0] for c in fams)
            summary["margins"][f"{a}-{b}"] = {"average": mean_sd(diffs), "per_seed": diffs,
                                              "families_ge": wins, "families": len(fams)}
    if all(r.get("head_vs_lm") for r in runs):
        summary["head_vs_lm"] = {k: mean_sd([r["head_vs_lm"][k] for r in runs])
                                 for k in ("correlation", "same_pick")}
    if all("bestofn" in r for r in runs):
        pickers = runs[0]["bestofn"]["exact_match"].keys()
        summary["bestofn"] = {p: mean_sd([100 * r["bestofn"]["exact_match"][p] for r in runs])
                              for p in pickers}
    return summary


def format_summary(s: dict) -> str:
    rows = s["rows"]
    cols = list(next(iter(rows.values())))
    short = [c.split("/")[-1][:11] for c in cols]
    cell = {row: [f"{m:.1f} ± {sd:.1f}" for m, sd in (rows[row][c] for c in cols)] for row in rows}
    w = [max(len(h), *(len(cell[r][i]) for r in rows)) for i, h in enumerate(short)]
    lines = [f"mean ± s.d. over seeds {', '.join(map(str, s['seeds']))} (scores ×100)",
             "model  " + "  ".join(h.rjust(n) for h, n in zip(short, w))]
    for row in rows:
        lines.append(f"{row:<6} " + "  ".join(v.rjust(n) for v, n in zip(cell[row], w)))
    for k, m in s["margins"].items():
        per = ", ".join(f"{x:+.1f}" for x in m["per_seed"])
        lines.append(f"{k}: average {m['average'][0]:+.1f} ± {m['average'][1]:.1f} (per seed "
                     f"{per}); {m['families_ge']} of {m['families']} families "
                     f"{k.split('-')[0]} >= {k.split('-')[1]} on the seed mean")
    if "head_vs_lm" in s:
        (c, csd), (p, psd) = s["head_vs_lm"]["correlation"], s["head_vs_lm"]["same_pick"]
        lines.append(f"head vs LM readout of the DPH model, within each test item: correlation "
                     f"{c:.2f} ± {csd:.2f}, the same pick on {100 * p:.0f} ± {100 * psd:.0f}% "
                     f"of items")
    if "bestofn" in s:
        lines.append("inference-time alignment, synth/instruct exact match: " + ", ".join(
            f"{p} {m:.1f} ± {sd:.1f}" for p, (m, sd) in s["bestofn"].items()))
    return "\n".join(lines)


def report(root: str, names: list) -> str:
    """One line per sweep already run: each row's average, mean ± s.d. over its seeds."""
    lines = [f"{'configuration':<24} " + "  ".join(f"{r:>11}" for r in ROWS) + "  seeds"]
    for name in names:
        path = os.path.join(root, name, "summary.json")
        if not os.path.exists(path):
            raise RuntimeError(f"{path}: not found (run the sweep --name {name} first)")
        s = json.load(open(path))
        cells = [f"{s['rows'][r]['average'][0]:.1f} ± {s['rows'][r]['average'][1]:.1f}"
                 if r in s["rows"] else "-" for r in ROWS]
        extra = ""
        if "bestofn" in s:
            extra = "  best-of-N EM: " + ", ".join(f"{p} {m:.1f} ± {sd:.1f}"
                                                  for p, (m, sd) in s["bestofn"].items())
        lines.append(f"{name:<24} " + "  ".join(f"{c:>11}" for c in cells) +
                     f"  {len(s['seeds'])}" + extra)
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--out", default="out/sweep", help="root folder of the runs")
    p.add_argument("--name", default="default", help="subfolder of this configuration")
    p.add_argument("--sft", default="", help="extra flags for train_sft.py, one string")
    p.add_argument("--dph", default="--loss contrastive",
                   help="flags for train_dph.py, one string (default: the quick start's "
                        "'--loss contrastive')")
    p.add_argument("--eval", default="", help="extra flags for evaluate.py, one string")
    p.add_argument("--reuse-sft", default="",
                   help="SFT checkpoint per seed instead of training one, with {seed}")
    p.add_argument("--jobs", type=int, default=1,
                   help="seeds run at once; each gets cores/jobs threads (default 1)")
    p.add_argument("--threads", type=int, default=0,
                   help="threads per stage (default: cores/jobs)")
    p.add_argument("--bestofn", type=int, default=0,
                   help="also measure best-of-N on this many synth/instruct test prompts")
    p.add_argument("-n", type=int, default=8, help="samples per prompt for --bestofn")
    p.add_argument("--report", default="",
                   help="print the averages of these finished sweeps (comma-separated names)")
    a = p.parse_args(argv)
    if a.report:
        try:
            print(report(a.out, [n for n in a.report.split(",") if n]))
        except RuntimeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    try:
        seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds {a.seeds!r}: expected comma-separated integers")
    if not seeds or a.jobs < 1 or a.bestofn < 0 or a.n < 1 or a.threads < 0:
        p.error("--seeds must name a seed; --jobs and -n must be >= 1, --bestofn and --threads "
                ">= 0")
    if a.reuse_sft and "{seed}" not in a.reuse_sft and len(seeds) > 1:
        p.error("--reuse-sft needs {seed} in the path when several seeds run")
    threads = a.threads or max(1, (os.cpu_count() or 1) // a.jobs)
    t0 = time.time()
    try:
        with ThreadPoolExecutor(a.jobs) as pool:
            runs = list(pool.map(lambda s: run_seed(s, a, threads), seeds))
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    s = summarise(runs)
    s["seconds"] = {r["seed"]: r["seconds"] for r in runs}
    s["wall_seconds"] = round(time.time() - t0, 1)
    s["config"] = {"sft": a.sft, "dph": a.dph, "eval": a.eval, "reuse_sft": a.reuse_sft}
    print(format_summary(s))
    with open(os.path.join(a.out, a.name, "summary.json"), "w") as f:
        json.dump(s, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
