"""experiments/picks.py: the per-task pick shares and margins that show a collapsed head."""
import json

import pytest

from experiments.picks import main, summarise


def record(task, label, reward, lm):
    return json.dumps({"task": task, "index": 0, "label": label,
                       "dph": {"reward": reward, "lm_mean": lm}})


def test_a_head_that_always_says_yes_is_shown(tmp_path, capsys):
    # 4 boolq items, labels 0, 1, 0, 1; the head prefers candidate 1 ("yes") by 0.3 whatever the
    # label, plus 0.1 toward the gold answer; the LM follows the gold answer by 2
    lines = [record("synth/boolq", y, [0.1 * (y == 0), 0.3 + 0.1 * (y == 1)],
                    [-1.0 - 2 * (y != 0), -1.0 - 2 * (y != 1)]) for y in (0, 1, 0, 1)]
    s = summarise(lines)["synth/boolq"]
    assert s["items"] == 4 and s["gold_top"] == 0.5
    assert s["DPH"]["top"] == 1.0                       # always candidate 1
    assert s["DPH"]["margin"] == pytest.approx(0.1)     # (−0.2 + 0.4) / 2 per label
    assert s["DPO"]["top"] == 0.5 and s["DPO"]["margin"] == pytest.approx(2.0)
    f = tmp_path / "predictions.jsonl"
    f.write_text("\n".join(lines) + "\n")
    main([str(f)])
    assert "synth/boolq" in capsys.readouterr().out


def test_bad_lines_name_the_file_and_line(tmp_path):
    f = tmp_path / "predictions.jsonl"
    f.write_text(record("synth/boolq", 0, [1.0, 0.0], [0.0, -1.0]) + "\n{\"task\": 3}\n")
    with pytest.raises(SystemExit, match=r"predictions.jsonl: line 2"):
        main([str(f)])
    g = tmp_path / "sft_only.jsonl"  # evaluated without --dph: nothing to show
    g.write_text(json.dumps({"task": "synth/boolq", "label": 0, "dph": {"lm_mean": [0, 1]}}) + "\n")
    with pytest.raises(SystemExit, match="no classification items"):
        main([str(g)])
