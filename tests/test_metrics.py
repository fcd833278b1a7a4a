"""tasks/metrics.py against values worked out by hand (the arithmetic is in the comments)."""
import math

import pytest
from tasks import metrics  # noqa: E402

# One small binary case used by several tests:
#   idx   0 1 2 3 4
#   pred  1 1 0 0 1
#   gold  1 0 1 0 1
#   TP = {0, 4} = 2, FP = {1} = 1, FN = {2} = 1, TN = {3} = 1
PRED = [1, 1, 0, 0, 1]
GOLD = [1, 0, 1, 0, 1]


def test_accuracy():
    assert metrics.accuracy(PRED, GOLD) == pytest.approx(3 / 5)  # right at 0, 3, 4
    with pytest.raises(ValueError):
        metrics.accuracy([1, 0], [1])


def test_f1_binary():
    # 2·TP / (2·TP + FP + FN) = 4 / (4 + 1 + 1) = 2/3
    assert metrics.f1_binary(PRED, GOLD) == pytest.approx(2 / 3)
    # positive = 0: TP = {3}, FP = {2} (pred 0, gold 1), FN = {1} (pred 1, gold 0): 2 / (2 + 1 + 1)
    assert metrics.f1_binary(PRED, GOLD, positive=0) == pytest.approx(0.5)


def test_f1_no_predicted_positives_is_zero():
    # TP = 0 (nothing predicted positive) -> precision undefined -> F1 = 0, no division error
    assert metrics.f1_binary([0, 0, 0], [1, 0, 1]) == 0.0
    # and no positives anywhere at all
    assert metrics.f1_binary([0, 0], [0, 0]) == 0.0


def test_mcc():
    # (TP·TN − FP·FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (2·1 − 1·1) / sqrt(3·3·2·2) = 1/6
    assert metrics.matthews_corrcoef(PRED, GOLD) == pytest.approx(1 / 6)
    assert metrics.matthews_corrcoef([0, 1, 1], [0, 1, 1]) == pytest.approx(1.0)
    assert metrics.matthews_corrcoef([1, 0, 0], [0, 1, 1]) == pytest.approx(-1.0)
    # symmetric in which class is called positive: swap 0 <-> 1 on both sides, same value
    assert metrics.matthews_corrcoef([1 - p for p in PRED], [1 - g for g in GOLD]) == pytest.approx(1 / 6)


def test_mcc_undefined_is_zero():
    # all predictions in one class: (TP+FP)(TN+FN) has a zero factor -> 0 by convention
    assert metrics.matthews_corrcoef([1, 1, 1, 1], [1, 0, 1, 0]) == 0.0
    # all gold labels in one class
    assert metrics.matthews_corrcoef([1, 0, 1], [0, 0, 0]) == 0.0


def test_pearson():
    # x = [1,2,3] -> dx = [-1,0,1];  y = [2,4,7], mean 13/3 -> dy = [-7/3, -1/3, 8/3]
    # Σdxdy = 7/3 + 8/3 = 5;  Σdx² = 2;  Σdy² = (49 + 1 + 64)/9 = 114/9
    # r = 5 / sqrt(2 · 114/9) = 15 / sqrt(228) ≈ 0.99340
    assert metrics.pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(15 / math.sqrt(228))
    assert metrics.pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert metrics.pearson([2, 2, 2], [1, 2, 3]) == 0.0  # constant side: undefined -> 0


def test_spearman_with_ties():
    # x = [1, 2, 2, 3] -> average ranks [1, 2.5, 2.5, 4];  y = [1, 3, 2, 4] -> ranks [1, 3, 2, 4]
    # centred: dx = [-1.5, 0, 0, 1.5], dy = [-1.5, .5, -.5, 1.5]
    # Σdxdy = 2.25 + 2.25 = 4.5;  Σdx² = 4.5;  Σdy² = 5  ->  r = 4.5 / sqrt(22.5) = sqrt(0.9)
    assert metrics.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(math.sqrt(0.9))
    # monotone but non-linear: rank correlation 1 where Pearson is not
    assert metrics.spearman([1, 2, 3, 4], [1, 10, 100, 1000]) == pytest.approx(1.0)


def test_average_ranks():
    # values 10, 20, 20, 20, 5 -> sorted 5(1) 10(2) 20,20,20 (3,4,5 -> mean 4)
    assert list(metrics._average_ranks([10, 20, 20, 20, 5])) == [2.0, 4.0, 4.0, 4.0, 1.0]


def test_acc_stderr():
    # [1,0,1,1]: mean .75; sample variance = (3·.0625 + .5625)/3 = .25; std .5; / sqrt(4) = .25
    assert metrics.acc_stderr([1, 0, 1, 1]) == pytest.approx(0.25)
    assert metrics.acc_stderr([1, 1, 1]) == 0.0
    assert math.isnan(metrics.acc_stderr([1]))


def test_compute_dispatch():
    out = metrics.compute(["acc", "f1", "mcc", "acc_stderr"], PRED, GOLD)
    assert out["acc"] == pytest.approx(0.6)
    assert out["f1"] == pytest.approx(2 / 3)
    assert out["mcc"] == pytest.approx(1 / 6)
    # correct = [1,0,0,1,1]: mean .6, sample var = (3·.16 + 2·.36)/4 = .3, stderr = sqrt(.3/5)
    assert out["acc_stderr"] == pytest.approx(math.sqrt(0.3 / 5))
    assert all(isinstance(v, float) for v in out.values())


def test_compute_correlations_use_graded_values():
    # STS-B style: integer predictions against the float gold similarity, not against the
    # rounded label. pred [1,2,3] vs values [2,4,7] -> 15/sqrt(228) as in test_pearson.
    out = metrics.compute(["pearson", "spearman"], [1, 2, 3], [2, 4, 7], values=[2.0, 4.0, 7.0])
    assert out["pearson"] == pytest.approx(15 / math.sqrt(228))
    assert out["spearman"] == pytest.approx(1.0)
    # the labels alone (round(values) would differ) are not what is correlated
    out2 = metrics.compute(["pearson"], [1, 2, 3], [0, 0, 0], values=[2.0, 4.0, 7.0])
    assert out2["pearson"] == pytest.approx(out["pearson"])
    with pytest.raises(ValueError):
        metrics.compute(["bleu"], [0], [0])


def test_f1_positive_passed_through_compute():
    assert metrics.compute(["f1"], PRED, GOLD, positive=0)["f1"] == pytest.approx(0.5)


def test_task_score():
    assert metrics.task_score({"f1": 0.8, "acc": 0.7}) == pytest.approx(0.75)
    assert metrics.task_score({"acc": 0.7, "acc_stderr": 0.01}) == pytest.approx(0.7)
    assert metrics.task_score(0.3) == 0.3


def test_glue_score():
    per_task = {
        "glue/cola": {"mcc": 0.2},
        "glue/mrpc": {"f1": 0.8, "acc": 0.6},  # task score .7
        "glue/mnli": {"acc": 0.5},  # MNLI = mean(.5, .7) = .6, counted once
        "glue/mnli_mm": {"acc": 0.7},
        "glue/wnli": {"acc": 0.1},
        "hellaswag": {"acc": 0.9},  # not GLUE: ignored
    }
    # -WNLI: mean(.2, .7, .6) = .5;  +WNLI: mean(.2, .7, .6, .1) = .4
    assert metrics.glue_score(per_task) == pytest.approx(0.5)
    assert metrics.glue_score(per_task, include_wnli=True) == pytest.approx(0.4)
    # matched alone counts as MNLI when mismatched is missing: mean(.2, .5) = .35
    assert metrics.glue_score({"cola": 0.2, "mnli": 0.5}) == pytest.approx(0.35)
    assert metrics.glue_score({"hellaswag": 0.5}) is None


def test_gpt4all_average():
    # plain mean of the GPT4All tasks present: (.3 + .6) / 2
    per_task = {"hellaswag": 0.3, "piqa": {"acc": 0.6}, "glue/cola": {"mcc": 0.9}}
    assert metrics.gpt4all_average(per_task) == pytest.approx(0.45)
    full = {t: 0.5 for t in metrics.GPT4ALL_TASKS}
    assert len(full) == 7 and metrics.gpt4all_average(full) == pytest.approx(0.5)


def test_race_average():
    # (1436·.5 + 3498·.6) / 4934 = (718 + 2098.8) / 4934 = 2816.8 / 4934
    assert metrics.race_average(0.5, 0.6) == pytest.approx(2816.8 / 4934)
    assert metrics.race_average({"acc": 0.4}, {"acc": 0.4}) == pytest.approx(0.4)
