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
