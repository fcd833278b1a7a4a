"""evaluate.py --score and --generate-file: files of your own, scored and reranked by the head."""
import json

import pytest

import evaluate
from plumbing.checkpoint import save_checkpoint
from tasks import PreferenceExample, TaskError
from tasks.loaders import jsonl_task

PAIRS = [("Is the sky blue on a clear day?", "yes", "no"),
         ("Is the sea wide?", "yes it is", "no"),
         ("Name three colours", "red, blue and green", "a cat"),
         ("What is the capital of France?", "Paris", "a spider"),
         ("How many legs does a spider have?", "eight", "three")]


@pytest.fixture
def ckpt(tmp_path, tok, tiny):
    """A DPH checkpoint whose head gives rewards of order 1 (the `tiny` fixture's weights)."""
    path = str(tmp_path / "dph")
    save_checkpoint(path, tiny, tok.to_json(), extra={"stage": "dph"})
    return path


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


def test_score_equals_evaluate_rewards_and_reports_pair_accuracy(ckpt, tmp_path, capsys):
    src = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": p, "chosen": c, "rejected": r, "split": "test", "id": i}
        for i, (p, c, r) in enumerate(PAIRS)])
    # evaluate.py's own readout of the same items, as a jsonl: task
    assert evaluate.main(["--sft", "", "--dph", ckpt, "--tasks", f"jsonl:{src}", "--device", "cpu",
                          "--batch-size", "2", "--out", str(tmp_path / "eval")]) == 0
    want = [p["dph"]["reward"] for p in read_jsonl(tmp_path / "eval" / "predictions.jsonl")]
    out = str(tmp_path / "scored.jsonl")
    assert evaluate.main(["--dph", ckpt, "--score", src, "--out", out, "--logp", "--device", "cpu",
                          "--batch-size", "2"]) == 0
    got = read_jsonl(out)
    assert [g["id"] for g in got] == list(range(len(PAIRS)))  # every line, in order, kept whole
    for g, w in zip(got, want):
        assert g["reward_chosen"] == pytest.approx(w[0], rel=1e-5, abs=1e-6)
        assert g["reward_rejected"] == pytest.approx(w[1], rel=1e-5, abs=1e-6)
        assert g["logp_chosen"] < 0 and g["logp_rejected"] < 0
    acc = sum(g["reward_chosen"] > g["reward_rejected"] for g in got) / len(got)
    assert f"pair accuracy (reward of chosen > rejected) {acc:.4f}" in capsys.readouterr().out


def test_score_other_kinds_and_batching_do_not_change_rewards(ckpt, tmp_path):
    rows = [{"prompt": "Say hi", "response": "Hello there"},
            {"messages": [{"role": "user", "content": "Pick a colour"}],
             "candidates": ["red", "blue", "green"], "label": 1},
            {"prompt": PAIRS[0][0], "chosen": PAIRS[0][1], "rejected": PAIRS[0][2]}]
    src = write_jsonl(tmp_path / "mixed.jsonl", rows)
    outs = []
    for bs in ("1", "3"):
        out = str(tmp_path / f"s{bs}.jsonl")
        assert evaluate.main(["--dph", ckpt, "--score", src, "--out", out, "--device", "cpu",
                              "--batch-size", bs]) == 0
        outs.append(read_jsonl(out))
    one, three = outs
    assert isinstance(one[0]["reward"], float) and len(one[1]["rewards"]) == 3
    flat = [lambda o: [o[0]["reward"]], lambda o: o[1]["rewards"],
            lambda o: [o[2]["reward_chosen"], o[2]["reward_rejected"]]]
    for f in flat:
        assert f(one) == pytest.approx(f(three), rel=1e-5, abs=1e-6)


def test_score_bad_line_names_file_and_line_and_writes_nothing(ckpt, tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n"
                   + json.dumps({"prompt": "a", "chosen": "b"}) + "\n")
    out = tmp_path / "scored.jsonl"
    with pytest.raises(TaskError, match=r"bad\.jsonl:2: "):
        evaluate.main(["--dph", ckpt, "--score", str(src), "--out", str(out), "--device", "cpu"])
    assert not out.exists() and not list(tmp_path.glob(".tmp-*"))


def test_generate_file_writes_best_of_n_and_pairs_train_dph_reads(ckpt, tmp_path):
    src = write_jsonl(tmp_path / "prompts.jsonl", [
        {"prompt": "Tell me a story about a cat", "id": "a"},
        {"messages": [{"role": "user", "content": "Name three colours"}], "id": "b"}])
    out, pairs = str(tmp_path / "bon.jsonl"), str(tmp_path / "pairs.jsonl")
    assert evaluate.main(["--dph", ckpt, "--generate-file", src, "--out", out, "--pairs", pairs,
                          "-n", "4", "--max-new-tokens", "6", "--temperature", "1.0",
                          "--device", "cpu"]) == 0
    got = read_jsonl(out)
    assert [g["id"] for g in got] == ["a", "b"]
    for g in got:
        assert len(g["samples"]) == len(g["rewards"]) == 4
        assert g["best_index"] == max(range(4), key=g["rewards"].__getitem__)
        assert g["best"] == g["samples"][g["best_index"]]
    # the (best, worst) lines are preference data train_dph.py --tasks jsonl: reads back
    lines = read_jsonl(pairs)
    assert 1 <= len(lines) <= 2
    spec = jsonl_task(pairs)
    exs = spec.load("train")
    assert spec.kind == "preference" and all(isinstance(e, PreferenceExample) for e in exs)
    assert [e.chosen for e in exs] == [ln["chosen"] for ln in lines]


def test_modes_are_exclusive(ckpt, tmp_path):
    from plumbing import UsageError
    src = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi"}])
    with pytest.raises(UsageError, match="--score and --generate-file: pick one"):
        evaluate.main(["--dph", ckpt, "--score", src, "--generate-file", src, "--device", "cpu"])
    with pytest.raises(UsageError, match="--pairs: only with --generate-file"):
        evaluate.main(["--dph", ckpt, "--score", src, "--pairs", str(tmp_path / "x.jsonl")])
