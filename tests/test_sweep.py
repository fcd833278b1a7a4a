"""experiments/sweep.py: the seed sweep's table (mean ± s.d. per family over seeds), the margins
between rows, and the report over finished sweeps, on hand-made results."""
import json
import statistics

import pytest

import sweep  # noqa: E402


def _run(seed, sft, dpo, dph):
    def row(a, b):
        return {"synth/a": a, "synth/b": b, "average": (a + b) / 2}
    return {"seed": seed, "table": {"SFT": row(*sft), "DPO": row(*dpo), "DPH": row(*dph)},
            "bestofn": {"exact_match": {"first": 0.1 * seed, "best_by_head": 0.2}}}


def test_summary_means_spreads_and_margins():
    runs = [_run(0, (0.5, 0.6), (0.55, 0.6), (0.6, 0.7)),
            _run(1, (0.4, 0.6), (0.45, 0.7), (0.5, 0.5)),
            _run(2, (0.6, 0.6), (0.65, 0.65), (0.7, 0.6))]
    s = sweep.summarise(runs)
    m, sd = s["rows"]["DPH"]["synth/a"]
    assert m == pytest.approx(60.0) and sd == pytest.approx(statistics.stdev([60, 50, 70]))
    assert s["rows"]["SFT"]["average"][0] == pytest.approx(55.0)
    d = s["margins"]["DPH-DPO"]
    assert d["per_seed"] == pytest.approx([7.5, -7.5, 0.0])
    assert d["average"][0] == pytest.approx(0.0, abs=1e-9)
    assert d["families_ge"] == 1 and d["families"] == 2  # a: 60 >= 55; b: 60 < 65
    assert s["bestofn"]["first"][0] == pytest.approx(10.0)
    text = sweep.format_summary(s)
    assert "60.0 ± 10.0" in text and "DPH-DPO: average" in text and "exact match" in text


def test_report_reads_finished_sweeps(tmp_path):
    s = sweep.summarise([_run(0, (0.5, 0.6), (0.55, 0.6), (0.6, 0.7)),
                         _run(1, (0.4, 0.6), (0.45, 0.7), (0.5, 0.5))])
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "summary.json").write_text(json.dumps(s))
    out = sweep.report(str(tmp_path), ["x"])
    assert "x" in out and "57.5 ± 10.6" in out.replace("  ", " ")
    with pytest.raises(RuntimeError, match="not found"):
        sweep.report(str(tmp_path), ["missing"])


@pytest.mark.parametrize("argv,named", [(["--threads", "-1"], "--threads"),
                                        (["--jobs", "0"], "--jobs"), (["--seeds", "a,b"], "--seeds")])
def test_bad_flags_exit_with_a_one_line_error_naming_the_flag(argv, named, capsys):
    with pytest.raises(SystemExit) as e:
        sweep.main(argv)
    assert e.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error:" in last and named in last


def test_head_vs_lm_centres_within_items(tmp_path):
    """The correlation ignores each item's offset (only rankings inside an item matter), and
    'same pick' counts the items where both readouts choose the same candidate."""
    lines = [  # item 1: the head is the LM readout shifted by +5 (perfectly correlated)
        {"task": "t", "dph": {"reward": [6.0, 4.0, 5.0], "lm_mean": [1.0, -1.0, 0.0]}},
        # item 2: opposite rankings
        {"task": "t", "dph": {"reward": [0.0, 1.0], "lm_mean": [1.0, 0.0]}},
        {"task": "t", "dph": {"reward": [1.0], "lm_mean": [0.0]}},  # one candidate: skipped
        {"task": "t", "sft": {"lm_mean": [0.0, 1.0]}}]  # no DPH readouts: skipped
    path = tmp_path / "predictions.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    r = sweep.head_vs_lm(str(path))
    assert r["items"] == 2 and r["same_pick"] == 0.5
    # centred: item 1 gives (1,-1,0)·(1,-1,0) = 2, item 2 (-.5,.5)·(.5,-.5) = -0.5;
    # norms sqrt(2.5) each: 1.5 / 2.5
    assert r["correlation"] == pytest.approx(0.6)


def _write_config(path, stage, steps, max_steps):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({stage: {"steps": steps, "max_steps": max_steps}}))


def test_a_checkpoint_left_by_an_interrupted_stage_is_not_taken_for_a_finished_one(
        tmp_path, monkeypatch):
    """Every --save-every steps a stage writes a complete checkpoint, config.json included: an
    SFT stopped at step 100 of 300 must be trained again, and so must everything after it."""
    import types
    ran = []

    def fake_stage(cmd, log, threads):
        ran.append(cmd[0])
        out = cmd[cmd.index("--out") + 1]
        if cmd[0] == "train_sft.py":
            _write_config(tmp_path / out, "sft", 300, 300)
        elif cmd[0] == "train_dph.py":
            _write_config(tmp_path / out, "dph", 1000, 1000)
        else:
            (tmp_path / out).mkdir(parents=True, exist_ok=True)
            (tmp_path / out / "results.json").write_text(json.dumps({"table": {}}))
            (tmp_path / out / "predictions.jsonl").write_text("")
        return 0.0

    monkeypatch.setattr(sweep, "stage", fake_stage)
    monkeypatch.chdir(tmp_path)
    a = types.SimpleNamespace(out="runs", name="x", reuse_sft="", sft="", dph="", eval="",
                              bestofn=0, n=8)
    seed0 = tmp_path / "runs" / "x" / "seed0"
    _write_config(seed0 / "sft", "sft", 100, 300)  # interrupted after its step-100 save
    _write_config(seed0 / "dph", "dph", 1000, 1000)  # finished, but from the partial SFT
    sweep.run_seed(0, a, 1)
    assert ran == ["train_sft.py", "train_dph.py", "evaluate.py"]
    ran.clear()
    sweep.run_seed(0, a, 1)  # everything finished now: nothing runs again
    assert ran == []
    _write_config(seed0 / "dph", "dph", 400, 1000)  # an interrupted DPH stage alone
    sweep.run_seed(0, a, 1)
    assert ran == ["train_dph.py", "evaluate.py"]
    assert sweep.finished(str(seed0 / "sft"), "sft") and not sweep.finished(str(tmp_path), "sft")
    # a reused SFT checkpoint must be a finished one
    _write_config(tmp_path / "partial", "sft", 200, 300)
    a.reuse_sft, a.name = str(tmp_path / "partial"), "y"
    with pytest.raises(RuntimeError, match="not a finished SFT run"):
        sweep.run_seed(0, a, 1)
