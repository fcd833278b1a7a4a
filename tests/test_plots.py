"""tools/plots.py: PNGs from tiny hand-made metrics.jsonl / results.json / predictions.jsonl (no
training), and the one-line error when matplotlib is not installed (an optional extra)."""
import json
import os
import subprocess
import sys

import pytest

from plumbing import UsageError
from tools import plots

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG = b"\x89PNG\r\n\x1a\n"


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def sft_run(d):
    d.mkdir()
    write_jsonl(d / "metrics.jsonl", [
        {"step": 0, "split": "config", "time": 0.0, "preset": "tiny"},
        *({"step": s, "split": "train", "time": 1.0 + s, "loss": 6.0 - 0.1 * s, "lr": 1e-3,
           "tokens": 4096, "tokens_per_s": 2000.0} for s in (0, 10, 20, 29)),
        {"step": 29, "split": "validation", "time": 40.0, "loss": 4.4},
    ])
    return d


def dph_run(d, resumed=False):
    d.mkdir()
    rw = lambda s: {"rewards/chosen": -1.0 + 0.01 * s, "rewards/rejected": -1.2,  # noqa: E731
                    "rewards/accuracies": 0.5 + 0.01 * s, "rewards/margins": 0.01 * s}
    recs = [{"step": 0, "split": "config", "time": 0.0},
            {"step": 0, "split": "train_pairs", "time": 1.0, "pairs": 128, **rw(0)}]
    for s in (0, 10, 20, 29):
        recs.append({"step": s, "split": "train", "time": 2.0 + s, "loss": 1.4 - 0.01 * s,
                     "dpo/loss": 0.69, "dpo/accuracies": 0.6, "dpo/margins": 0.1,
                     "grad_norm": 0.4, "lr": 5e-4, **rw(s)})
        if resumed and s == 10:
            recs.append({"step": 11, "split": "resume", "time": 0.0})
    recs += [{"step": 29, "split": "validation", "time": 40.0, "pairs": 256, **rw(29)},
             {"step": 29, "split": "train_pairs", "time": 41.0, "pairs": 128, **rw(29)}]
    write_jsonl(d / "metrics.jsonl", recs)
    (d / "metrics.jsonl").open("a").write('{"step": 30, "split": "tra')  # a line cut by a kill
    return d


def eval_run(d, with_dph=True):
    d.mkdir()
    preds = []
    for task, k in (("synth/sentiment", 2), ("synth/preference", 4)):
        for i in range(12):
            label = i % k
            rec = {"task": task, "index": i, "label": label,
                   "sft": {"lm_mean": [-3.0 - 0.1 * j for j in range(k)]}}
            if with_dph:
                rec["dph"] = {"reward": [0.5 if j == label else -0.3 * j for j in range(k)],
                              "lm_mean": [-3.0] * k}
            preds.append(rec)
    write_jsonl(d / "predictions.jsonl", preds)
    rows = {"SFT": {"synth/sentiment": 0.55, "synth/preference": 0.875, "average": 0.7125}}
    if with_dph:
        rows["DPO"] = {"synth/sentiment": 0.55, "synth/preference": 0.85, "average": 0.7}
        rows["DPH"] = {"synth/sentiment": 0.6, "synth/preference": 0.9, "average": 0.75}
    (d / "results.json").write_text(json.dumps({"table": rows, "tasks": {}, "rows": {}}))
    return d


def is_png(path):
    return os.path.isfile(path) and open(path, "rb").read(8) == PNG


def test_training_and_evaluation_plots_beside_the_runs(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="matplotlib is an optional extra (pip install matplotlib)")
    sft, dph, ev = sft_run(tmp_path / "sft"), dph_run(tmp_path / "dph", resumed=True), \
        eval_run(tmp_path / "eval")
    assert plots.main([str(sft), str(dph), str(ev)]) == 0
    want = [sft / "curves.png", dph / "curves.png", ev / "rewards.png", ev / "readouts.png"]
    for p in want:
        assert is_png(p), p
    assert capsys.readouterr().out.split() == [str(p) for p in want]  # each path written


def test_out_dir_names_files_after_the_runs(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="matplotlib is an optional extra (pip install matplotlib)")
    a, b = sft_run(tmp_path / "sft"), dph_run(tmp_path / "dph")
    out = tmp_path / "plots"
    assert plots.main([str(a), str(b), "--out", str(out)]) == 0
    assert sorted(os.listdir(out)) == ["dph_curves.png", "sft_curves.png"]
    assert all(is_png(out / f) for f in os.listdir(out))
    assert not os.path.exists(a / "curves.png")  # nothing beside the runs
    one = tmp_path / "one"
    plots.main([str(a), "--out", str(one)])
    assert os.listdir(one) == ["curves.png"]
    capsys.readouterr()


def test_evaluation_without_dph_has_no_rewards_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="matplotlib is an optional extra (pip install matplotlib)")
    ev = eval_run(tmp_path / "eval", with_dph=False)
    assert plots.main([str(ev)]) == 0
    assert is_png(ev / "readouts.png") and not os.path.exists(ev / "rewards.png")
    assert "no DPH rewards" in capsys.readouterr().err


def test_reward_pairs_split_gold_from_the_others():
    preds = [{"label": 1, "dph": {"reward": [0.0, 2.0, 1.0]}},
             {"label": 0, "dph": {"reward": [1.0, 1.0]}},  # a tie at the top is not a win
             {"label": 0, "sft": {"lm_mean": [0.0, 1.0]}}]  # no head: left out
    gold, other, n, top = plots.reward_pairs(preds)
    assert (gold, other, n, top) == ([2.0, 1.0], [0.0, 1.0, 1.0], 2, 1)


def test_a_directory_with_neither_file_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="empty: neither a training run"):
        plots.main([str(tmp_path / "empty")])
    with pytest.raises(UsageError, match="not a directory"):
        plots.main([str(tmp_path / "missing")])
    d = tmp_path / "fresh"
    d.mkdir()
    write_jsonl(d / "metrics.jsonl", [{"step": 0, "split": "config", "time": 0.0}])
    with pytest.raises(UsageError, match="no train or validation records"):
        plots.main([str(d)])


def run_cli(args, hide_matplotlib):
    """python -m tools.plots ARGS through plumbing.run_main, matplotlib made unimportable first
    when hide_matplotlib (a None in sys.modules makes `import matplotlib` raise ImportError)."""
    code = ("import sys\n"
            + ("sys.modules['matplotlib'] = None\n" if hide_matplotlib else "")
            + "import plumbing, tools.plots as P\n"
            f"sys.argv = ['plots'] + {list(args)!r}\n"
            "plumbing.run_main(P.main)\n")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_without_matplotlib_one_line_and_status_2(tmp_path):
    run = sft_run(tmp_path / "sft")
    r = run_cli([str(run)], hide_matplotlib=True)
    assert r.returncode == 2, r.stderr
    assert r.stderr == "error: plots need matplotlib: pip install matplotlib\n"
    assert r.stdout == "" and os.listdir(run) == ["metrics.jsonl"]  # nothing written
    r = run_cli([str(tmp_path / "nowhere")], hide_matplotlib=True)  # inputs are checked first
    assert r.returncode == 2 and r.stderr.strip().endswith("nowhere: not a directory")
