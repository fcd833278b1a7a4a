"""Evaluation metrics and benchmark aggregates (the paper's GLUE and GPT4All tables). numpy only.

Per-task metrics take integer predictions (the index of the chosen candidate) and integer gold
labels; every function returns a plain Python float, on the 0..1 scale for accuracy and F1 and
-1..1 for correlations (multiply by 100 for the paper's tables).

GLUE conventions followed here (Wang et al., 2019, "GLUE", §4 and the leaderboard):
- CoLA: Matthews correlation. MRPC and QQP: F1 of the positive class ("paraphrase" /
  "duplicate", the "yes" candidate at index 1 in loaders.py) and accuracy. STS-B: Pearson and
  Spearman correlation. MNLI: accuracy on the matched and on the mismatched set. Everything else
  (SST-2, QNLI, RTE, WNLI): accuracy.
- STS-B is scored here as a 6-way choice task (candidates "0".."5"), so the correlations are
  between the predicted INTEGER and the real-valued gold similarity. That loses a
  little against a regression head that predicts a float (a perfect predictor rounded to the
  nearest integer scores 0.985 Pearson / 0.984 Spearman on the dev set), the price of reading it
  out of a reward head.
- A task's score is the mean of its metrics (MRPC = (F1 + acc) / 2, STS-B = (Pearson +
  Spearman) / 2); MNLI counts as ONE task whose score is the mean of matched and mismatched
  accuracy. The GLUE score is the unweighted mean of task scores: "GLUE -WNLI" over the eight
  tasks CoLA, SST-2, MRPC, QQP, STS-B, MNLI, QNLI, RTE; "GLUE +WNLI" adds WNLI as a ninth.
  The diagnostic set (AX) never counts. When some tasks were not evaluated the mean is over
  those present, so compare scores only across runs with the same task set.

Other aggregates: the GPT4All average is the plain mean of the seven GPT4All tasks' accuracies
(HellaSwag, OpenBookQA, WinoGrande, ARC-Easy, ARC-Challenge, BoolQ, PIQA); the RACE average is
the mean over middle and high weighted by their test-set sizes, 1436 : 3498 questions.

Undefined values: MCC, Pearson and Spearman are 0.0 when a side is constant (a model that always
answers the same has no correlation with the gold labels; sklearn does the same for MCC);
F1 is 0.0 when there are no true positives; acc_stderr is nan for fewer than two examples.

evaluate.py turns per-candidate readouts into the paper's table with predict (the argmax; a tie
at the top counts as wrong), task_metrics, aggregates and format_table.
"""
from __future__ import annotations

import math
import sys

import numpy as np

# ----------------------------------------------------------------------------------------------
# Per-task metrics


def _pair(pred, gold):
    p, g = np.asarray(pred), np.asarray(gold)
    if p.shape != g.shape or p.ndim != 1:
        raise ValueError(f"pred and gold must be 1-D of one length, got {p.shape} and {g.shape}")
    if p.size == 0:
        raise ValueError("no examples to score")
    return p, g


def accuracy(pred, gold) -> float:
    """Fraction of predictions equal to the gold label."""
    p, g = _pair(pred, gold)
    return float(np.mean(p == g))


def f1_binary(pred, gold, positive=1) -> float:
    """F1 of the class ``positive`` = 2·TP / (2·TP + FP + FN); 0.0 when TP = 0.

    For MRPC and QQP the positive class is "paraphrase" / "duplicate", the "yes" candidate, which
    loaders.py puts at index 1 (candidates ["no", "yes"]), hence the default.
    """
    p, g = _pair(pred, gold)
    tp = int(np.sum((p == positive) & (g == positive)))
    fp = int(np.sum((p == positive) & (g != positive)))
    fn = int(np.sum((p != positive) & (g == positive)))
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def matthews_corrcoef(pred, gold) -> float:
    """Matthews correlation coefficient, (TP·TN − FP·FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)).

    Written in the general K-class form (Gorodkin 2004), which is exactly the binary formula for
    two classes and does not care which class is called positive. 0.0 when undefined (all
    predictions, or all gold labels, in one class).
    """
    p, g = _pair(pred, gold)
    classes = np.unique(np.concatenate([p, g]))
    conf = np.array([[np.sum((g == a) & (p == b)) for b in classes] for a in classes],
                    dtype=np.float64)  # (K, K): rows gold, columns predicted
    t = conf.sum(axis=1)  # gold count per class
    q = conf.sum(axis=0)  # predicted count per class
    c, s = np.trace(conf), conf.sum()
    denom = math.sqrt((s * s - q @ q) * (s * s - t @ t))
    return 0.0 if denom == 0 else float((c * s - t @ q) / denom)


def pearson(x, y) -> float:
    """Pearson correlation of x and y; 0.0 when either is constant."""
    a, b = _pair(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64))
    a, b = a - a.mean(), b - b.mean()
    denom = math.sqrt(float(a @ a) * float(b @ b))
    return 0.0 if denom == 0 else float(a @ b / denom)


def _average_ranks(x) -> np.ndarray:
    """Ranks 1..n, tied values sharing the mean of the ranks they span (scipy's 'average')."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    sx = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sx[j + 1] == sx[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1  # mean of ranks i+1 .. j+1
        i = j + 1
    return ranks


def spearman(x, y) -> float:
    """Spearman rank correlation: Pearson of the average ranks (ties share a rank)."""
    a, b = _pair(x, y)
    return pearson(_average_ranks(a), _average_ranks(b))


def acc_stderr(correct) -> float:
    """Standard error of the mean of a 0/1 vector: sample std (n−1) / sqrt(n), as
    lm-evaluation-harness reports ``acc_stderr``. nan for fewer than two examples."""
    c = np.asarray(correct, dtype=np.float64)
    if c.size < 2:
        return float("nan")
    return float(np.std(c, ddof=1) / math.sqrt(c.size))


METRICS = ("acc", "f1", "mcc", "pearson", "spearman", "acc_stderr")


def compute(metric_names, pred, gold, values=None, positive=None) -> dict:
    """Compute the named metrics: {name: float}.

    pred, gold: integer candidate indices. values: the graded gold target where the task has one
    (STS-B similarity); "pearson"/"spearman" correlate the integer prediction with ``values``
    (falling back to ``gold`` when no values are given). positive: the F1 positive class
    (default 1, the "yes" candidate of MRPC/QQP).
    """
    out = {}
    for name in metric_names:
        if name == "acc":
            out[name] = accuracy(pred, gold)
        elif name == "f1":
            out[name] = f1_binary(pred, gold, positive=1 if positive is None else positive)
        elif name == "mcc":
            out[name] = matthews_corrcoef(pred, gold)
        elif name in ("pearson", "spearman"):
            target = gold if values is None else values
            out[name] = (pearson if name == "pearson" else spearman)(pred, target)
        elif name == "acc_stderr":
            p, g = _pair(pred, gold)
            out[name] = acc_stderr(p == g)
        else:
            raise ValueError(f"unknown metric {name!r}; known: {', '.join(METRICS)}")
    return out


# ----------------------------------------------------------------------------------------------
# Aggregates

GLUE_TASKS = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte")  # GLUE -WNLI
GPT4ALL_TASKS = ("hellaswag", "openbookqa", "winogrande", "arc/easy", "arc/challenge", "boolq",
                 "piqa")
RACE_SIZES = {"middle": 1436, "high": 3498}  # RACE test questions per level


def task_score(metric_dict) -> float:
    """A task's single number: the mean of its metrics ({"f1": .8, "acc": .7} -> .75).
    Standard errors (``*_stderr``) are not metrics and are ignored. A bare number passes through."""
    if isinstance(metric_dict, (int, float)):
        return float(metric_dict)
    vals = [float(v) for k, v in metric_dict.items() if not k.endswith("_stderr")]
    if not vals:
        raise ValueError("task_score: no metrics given")
    return float(np.mean(vals))


def _short(name: str) -> str:
    # Accept both registry names ("glue/cola") and bare ones ("cola").
    return name[len("glue/"):] if name.startswith("glue/") else name


def glue_score(per_task: dict, include_wnli: bool = False):
    """GLUE score: mean of task scores over the GLUE tasks present in ``per_task``.

    per_task maps task name ("glue/cola" or "cola", "glue/mnli", "glue/mnli_mm", ...) to a metric
    dict or a task score. MNLI counts once: the mean of matched ("mnli") and mismatched
    ("mnli_mm") when both are given, else whichever is. include_wnli=False gives "GLUE -WNLI"
    (the paper's headline number), True gives "GLUE +WNLI". None when no GLUE task is present.
    """
    scores = {_short(k): task_score(v) for k, v in per_task.items()}
    mnli = [scores[k] for k in ("mnli", "mnli_mm") if k in scores]
    if mnli:
        scores["mnli"] = float(np.mean(mnli))
    names = GLUE_TASKS + (("wnli",) if include_wnli else ())
    present = [scores[t] for t in names if t in scores]
    return float(np.mean(present)) if present else None


def gpt4all_average(per_task: dict):
    """Plain mean over the seven GPT4All tasks present; None when none is present."""
    present = [task_score(per_task[t]) for t in GPT4ALL_TASKS if t in per_task]
    return float(np.mean(present)) if present else None


def race_average(middle, high) -> float:
    """RACE overall accuracy from the two levels, weighted by test size (1436 : 3498), which is
    what accuracy over the pooled test set would be."""
    m, h = task_score(middle), task_score(high)
    wm, wh = RACE_SIZES["middle"], RACE_SIZES["high"]
    return (wm * m + wh * h) / (wm + wh)


# ----------------------------------------------------------------------------------------------
# From per-candidate readouts to the paper's table (evaluate.py)


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
    m = compute(spec.metrics or ("acc",), pred, gold, values=values, positive=positive)
    correct = (pred == gold).astype(float)
    m.setdefault("acc", float(correct.mean()))
    m["acc_stderr"] = acc_stderr(correct)
    m["score"] = task_score({k: v for k, v in m.items() if k in (spec.metrics or ("acc",))})
    return m


def aggregates(per_task: dict) -> dict:
    """Mean over all tasks, plus the paper's aggregates for whichever groups are present."""
    out = {"average": float(np.mean(list(per_task.values())))} if per_task else {}
    glue = glue_score(per_task)
    if glue is not None:
        out["glue"] = glue
    g4 = gpt4all_average(per_task)
    if g4 is not None:
        out["gpt4all"] = g4
    if "race/middle" in per_task and "race/high" in per_task:
        out["race"] = race_average(per_task["race/middle"], per_task["race/high"])
    return out


def format_table(table: dict, columns: list) -> str:
    short = [c.split("/")[-1][:11] for c in columns]
    w = [max(6, len(s)) for s in short]
    lines = ["model  " + "  ".join(s.rjust(n) for s, n in zip(short, w))]
    for row, vals in table.items():
        lines.append(f"{row:<6} " + "  ".join(
            (f"{100 * vals[c]:.1f}" if c in vals else "-").rjust(n) for c, n in zip(columns, w)))
    return "\n".join(lines)
