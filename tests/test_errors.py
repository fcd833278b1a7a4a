"""Every bad input gets the promised clean error: one line "error: ..." on stderr, exit status 2,
nothing written to --out (README, "Exit statuses"). One test per kind of bad input: flag values
(non-finite, out of range, crashing), sizes that cannot fit, checkpoints (broken configs, NaN
weights, the wrong kind, weights that do not belong to their config.json, file modes), data
(answers longer than the context, duplicate candidates, ties), --out, and generation settings.

The flag checks run in-process (validate() of each script over every numeric flag); what needs a
whole script runs as processes forked from the pre-imported interpreter of tests/zygote.py, all in
one batch, on checkpoints of random tiny models written here (no training needed)."""
import dataclasses
import json
import math
import os
import shutil
import stat
import typing

import pytest
import torch

import plumbing
import evaluate
from tasks import metrics
import train_dph
import train_sft
from plumbing.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, save_train_state
from model import DPHModel, padded_vocab, preset
from test_reliability import Zygote, _listing, cmd, error_line

SCRIPTS = {"train_sft.py": (train_sft.SFTConfig, train_sft.validate, train_sft.RANGES),
           "train_dph.py": (train_dph.DPHConfig, train_dph.validate, train_dph.RANGES),
           "evaluate.py": (evaluate.EvalConfig, evaluate.validate, evaluate.RANGES)}


def numeric_fields(cls):
    hints = typing.get_type_hints(cls)
    return [f.name for f in dataclasses.fields(cls) if hints[f.name] in (int, float)]


def flag(name):
    return "--" + name.replace("_", "-")


def validate_argv(script, argv, tmp_path):
    """parse + validate of a script, as its main() does first; --out in tmp_path."""
    cls, validate, _ = SCRIPTS[script]
    argv = [*argv, "--out", str(tmp_path / "out")]
    cfg, _ = plumbing.parse_config(cls, "", argv)
    validate(cfg, argv)
    return cfg


# ----------------------------------------------------------------------------------------------
# 1-3. Flag values: every numeric flag has its own interval; NaN and inf never pass


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_every_numeric_flag_declares_its_range(script):
    cls, _, ranges = SCRIPTS[script]
    missing = [flag(n) for n in numeric_fields(cls) if n not in ranges]
    assert not missing, f"{script}: give these flags an interval in RANGES: {missing}"
    assert not set(ranges) - set(numeric_fields(cls)), "RANGES names a flag that does not exist"


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_defaults_pass_and_extremes_are_refused(script, tmp_path):
    """The sweep: every numeric flag with NaN, ±inf, -1, 0 and an absurdly large value is either
    accepted (inside its interval) or refused with a UsageError naming the flag; never another
    exception. Each refusal is checked against the declared interval."""
    cls, _, ranges = SCRIPTS[script]
    validate_argv(script, [], tmp_path)  # the defaults are valid
    hints = typing.get_type_hints(cls)
    for name in numeric_fields(cls):
        for v in (["nan", "inf", "-inf", "-1", "0", "1e300"] if hints[name] is float
                  else ["-1", "0", str(10**30)]):
            try:
                validate_argv(script, [f"{flag(name)}={v}"], tmp_path)
                accepted = True
            except plumbing.UsageError as e:
                assert flag(name) in str(e), (name, v, e)
                accepted = False
            if hints[name] is float and not math.isfinite(float(v)):
                assert not accepted, f"{flag(name)} {v} accepted"
            spec = ranges[name]
            lo, hi = (plumbing._bound(t.strip(), hints[name]) for t in spec[1:-1].split(","))
            x = float(v)
            inside = math.isfinite(x) and (x > lo if spec[0] == "(" else x >= lo) and \
                (x < hi if spec[-1] == ")" else x <= hi)
            if not (script == "evaluate.py" and name == "temperature" and 0 < x < 1e-4):
                assert accepted == inside, (script, name, v, accepted)


@pytest.mark.parametrize("script,args,expected", [
    ("train_sft.py", ["--lr", "nan"], "--lr must be a finite number"),
    ("train_dph.py", ["--beta", "inf"], "--beta must be a finite number"),
    ("train_dph.py", ["--dpo-weight", "nan"], "--dpo-weight must be a finite number"),
    ("train_dph.py", ["--lr", "nan"], "--lr must be a finite number"),
    ("train_sft.py", ["--grad-clip", "-1"], "--grad-clip must be >= 0"),
    ("train_sft.py", ["--min-lr-ratio", "-1"], "--min-lr-ratio must be in [0, 1]"),
    ("train_sft.py", ["--warmup-steps", "-10"], "--warmup-steps must be in [0,"),
    ("train_dph.py", ["--max-examples", "-1"], "--max-examples must be >= 0"),
    ("train_sft.py", ["--eval-every", "0"], "--eval-every must be positive"),
    ("train_dph.py", ["--eval-every", "0"], "--eval-every must be positive"),
    ("train_sft.py", ["--dropout", "1.5"], "--dropout must be in [0, 1)"),
    ("train_sft.py", ["--attn-dropout", "1"], "--attn-dropout must be in [0, 1)"),
    ("train_dph.py", ["--pooler-dropout", "2"], "--pooler-dropout must be in [0, 1)"),
    ("train_dph.py", ["--dph-weight", "0", "--dpo-weight", "0"], "nothing to train"),
    ("train_sft.py", ["--seed", str(2**64)], "--seed must be in [0,"),
    ("train_sft.py", ["--weight-decay", "1e30"], "--weight-decay must be in [0, 1000]"),
    ("train_dph.py", ["--dpo-weight", "1e30"], "--dpo-weight must be in [0, 10000]"),
    ("evaluate.py", ["--temperature", "-1"], "--temperature must be in [0, 10000]"),
    ("evaluate.py", ["--top-k", "-3"], "--top-k must be in [0,"),
    ("evaluate.py", ["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    ("evaluate.py", ["--max-new-tokens", "-5"], "--max-new-tokens must be in [1,"),
    ("evaluate.py", ["--temperature", "nan"], "--temperature must be a finite number"),
])
def test_bad_flag_values_are_usage_errors(script, args, expected, tmp_path):
    with pytest.raises(plumbing.UsageError) as e:
        validate_argv(script, args, tmp_path)
    assert expected in str(e.value)
    assert not (tmp_path / "out").exists()


def test_flags_without_effect_get_a_note(tmp_path, capsys):
    validate_argv("train_sft.py", ["--prior-decay", "0.3"], tmp_path)
    validate_argv("train_dph.py", ["--dpo-weight", "0", "--beta", "0.5"], tmp_path)
    validate_argv("train_dph.py", ["--loss", "separable", "--contrast", "pairs"], tmp_path)
    err = capsys.readouterr().err
    assert "note: --contrast has no effect: --loss separable has no contrast" in err
    assert "note: --prior-decay has no effect: it pulls toward the --init weights" in err
    assert "note: --beta has no effect: the cDPO term is off (--dpo-weight 0)" in err


@pytest.mark.parametrize("name", ["tpu", "mps", "cuda:99", "cpu:3", "gpu"])
def test_unusable_devices_are_usage_errors(name):
    if name == "mps" and getattr(torch.backends, "mps", None) is not None \
            and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    with pytest.raises(plumbing.UsageError, match=f"--device {name}"):
        plumbing.resolve_device(name)


# ----------------------------------------------------------------------------------------------
# 4. What cannot fit in memory is refused before any work


def test_what_cannot_fit_in_memory_is_refused():
    mcfg = preset("tiny")
    cpu = torch.device("cpu")
    plumbing.check_fits(plumbing.batch_bytes(mcfg, 2, 128), cpu, "small", "")  # fits anywhere
    with pytest.raises(plumbing.UsageError, match="needs at least .* GiB, more than"):
        plumbing.check_fits(plumbing.batch_bytes(mcfg, 2, 1_000_000), cpu, "--seq-len 1000000", "")


# ----------------------------------------------------------------------------------------------
# 10-11. Checkpoints: atomic as a whole, and readable by others (mode 0644 under umask 022)


def test_weights_that_do_not_belong_to_config_json_are_refused(tmp_path, make_model, tok,
                                                               monkeypatch):
    ck = str(tmp_path / "ck")
    save_checkpoint(ck, make_model(seed=0), tok.to_json(), extra={"stage": "dph"})
    load_checkpoint(ck)
    good_config = (tmp_path / "ck" / "config.json").read_text()
    # a kill between the model.pt and config.json renames of the next save
    replace = os.replace

    def killed_at_config(a, b):
        if os.path.basename(b) == "config.json":
            raise KeyboardInterrupt
        replace(a, b)
    monkeypatch.setattr(os, "replace", killed_at_config)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(ck, make_model(seed=1), tok.to_json(), extra={"stage": "dph"})
    monkeypatch.undo()
    assert (tmp_path / "ck" / "config.json").read_text() == good_config  # the old config
    with pytest.raises(CheckpointError, match="not the weights config.json was saved with"):
        load_checkpoint(ck)


def test_checkpoint_files_respect_the_umask(tmp_path, make_model, tok):
    old = os.umask(0o022)
    try:
        save_checkpoint(str(tmp_path), make_model(), tok.to_json())
        save_train_state(str(tmp_path), {"step": 1, "config": {}, "model": {}, "optimizer": {}})
    finally:
        os.umask(old)
    for name in ("model.pt", "model.safetensors", "config.json", "tokenizer.json", "resume.pt"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o644, name


# ----------------------------------------------------------------------------------------------
# 8. Ties never score as correct; user data with duplicate answers is refused


def test_a_tie_at_the_top_counts_as_wrong():
    assert metrics.predict([1.0, 1.0, 0.0], 0) == 1  # the gold answer ties: wrong
    assert metrics.predict([1.0, 1.0, 0.0], 2) == 0
    assert metrics.predict([0.0, 2.0, 1.0], 1) == 1


@pytest.mark.parametrize("record,expected", [
    ({"prompt": "Pick one.", "candidates": ["yes", "no", "yes"], "label": 0},
     "candidates 0 and 2 are the same answer"),
    ({"prompt": "Be nice.", "chosen": "Sure.", "rejected": "Sure."},
     "chosen and rejected are the same answer"),
])
def test_duplicate_answers_in_user_data_are_refused(tmp_path, record, expected):
    from tasks.loaders import jsonl_task
    from tasks import TaskError
    f = tmp_path / "dup.jsonl"
    f.write_text(json.dumps(record) + "\n")
    with pytest.raises(TaskError, match=expected):
        jsonl_task(str(f))


def test_generation_prompt_keeps_the_system_prompt_and_user_header(tok):
    from inference.best_of_n import generation_prompt
    from tokenizer.chatml import render_prompt
    system, user = "You are a helpful assistant.", "word " * 500
    prompt, max_new = generation_prompt(tok, system, user, 256, 64)
    assert len(prompt) + max_new + 1 <= 256 and max_new == 64
    head = render_prompt(tok, [{"role": "system", "content": system}])[:-1 - len(
        tok.piece("assistant\n"))] + [tok.im_start] + tok.piece("user\n")
    assert prompt[:len(head)] == head
    assert prompt[-1 - len(tok.piece("assistant\n")):] == [tok.im_start] + tok.piece(
        "assistant\n")
    short, _ = generation_prompt(tok, system, "Hello there", 256, 64)
    assert short == render_prompt(tok, [{"role": "system", "content": system},
                                                 {"role": "user", "content": "Hello there"}])


# ----------------------------------------------------------------------------------------------
# 6. Non-finite readouts are refused, never turned into a score


def test_non_finite_readouts_are_refused(make_model, tok):
    from tasks import resolve_tasks
    model = make_model()
    with torch.no_grad():
        model.head.score.weight.fill_(3e38)  # finite weights whose rewards overflow
        model.head.pooler.w2.bias.fill_(10.0)
    (spec,) = resolve_tasks("synth/sentiment")
    exs = spec.load("validation", seed=0)[:2]
    cfg = evaluate.EvalConfig(batch_size=2)
    with pytest.raises(plumbing.UsageError, match="non-finite reward readouts"):
        evaluate.score_task(model, tok, exs, cfg, torch.device("cpu"), torch.float32, True)


# ----------------------------------------------------------------------------------------------
# Whole scripts: broken checkpoints (5), NaN weights (6), the wrong kind (7), data (8),
# --out (9), generation (12), sizes (4); one batch of forked processes


def _write(path, tok, head=None, stage="sft", seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = preset("tiny", **{"vocab_size": padded_vocab(len(tok)), **overrides})
    extra = {"stage": stage, "sft": {"tasks": ["synth/sentiment"]}}
    save_checkpoint(str(path), DPHModel(cfg, head=head), tok.to_json(), extra=extra)
    return str(path)


def _edit_config(path, **changes):
    f = os.path.join(path, "config.json")
    c = json.load(open(f))
    c.update(changes)
    json.dump(c, open(f, "w"))


@pytest.fixture(scope="module")
def runs(tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("errors")
    sft = _write(d / "sft", tok)
    dph = _write(d / "dph", tok, head={"pooler": "swiglu"}, stage="dph", seed=1)
    broken = {}
    for name, change in {"bogus_pooler": {"head": {"pooler": "bogus"}},
                         "head_string": {"head": "swiglu"}}.items():
        broken[name] = shutil.copytree(dph, d / name)
        _edit_config(broken[name], **change)
    broken["negative_d_model"] = shutil.copytree(sft, d / "negative_d_model")
    c = json.load(open(d / "sft" / "config.json"))
    _edit_config(broken["negative_d_model"], model={**c["model"], "d_model": -64})
    bad_tok = shutil.copytree(dph, d / "bad_tok")
    (bad_tok / "tokenizer.json").write_text('{"version": ')
    _edit_config(bad_tok, tokenizer_sha256=None)  # a damaged file, not a mismatched one
    small_vocab = _write(d / "small_vocab", tok, head={"pooler": "swiglu"}, vocab_size=64)
    nan = shutil.copytree(dph, d / "nan")
    w = torch.load(nan / "model.pt", weights_only=True)
    w = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in w.items()}
    torch.save(w, nan / "model.pt")
    _edit_config(nan, weights_sha256=None)

    long_answer = d / "long_answer.jsonl"
    long_answer.write_text(json.dumps({"prompt": "Count.", "candidates": [
        "one", " ".join(f"w{i}" for i in range(400))], "label": 0, "split": "test"}) + "\n")
    long_prompt = d / "long_prompt.jsonl"
    long_prompt.write_text(json.dumps({"prompt": "word " * 600, "candidates": ["yes", "no"],
                                       "label": 0, "split": "test"}) + "\n")
    a_file = d / "a_file"
    a_file.write_text("x")

    ev = ["--device", "cpu", "--tasks", "synth/sentiment", "--max-examples", "4"]
    gen = ["--device", "cpu", "--sft", "", "--dph", dph, "-n", "2", "--max-new-tokens", "4"]
    sft_args = ["--preset", "tiny", "--max-steps", "1", "--batch-size", "2", "--seq-len", "256",
                "--tasks", "synth/sentiment", "--max-examples", "8", "--device", "cpu"]
    dph_args = ["--max-steps", "1", "--batch-size", "2", "--tasks", "synth/sentiment",
                "--max-examples", "8", "--eval-pairs", "4", "--device", "cpu"]
    cases = {  # name: (script, args, expected exit status, expected text, --out or None)
        # 5. broken checkpoints, in both scripts
        **{f"{n}_{s}": (s, (ev + ["--sft", "", "--dph", p]) if s == "evaluate.py"
                        else dph_args + ["--init", p], 2, "config.json: bad model config", None)
           for n, p in broken.items() for s in ("evaluate.py", "train_dph.py")},
        "corrupt_tokenizer": ("evaluate.py", ev + ["--sft", "", "--dph", str(bad_tok)], 2,
                              "tokenizer.json: not a usable tokenizer", None),
        "tokenizer_too_big": ("evaluate.py", ev + ["--sft", "", "--dph", small_vocab], 2,
                              "embedding rows", None),
        # 6. NaN weights
        "nan_weights": ("evaluate.py", ev + ["--sft", "", "--dph", str(nan)], 2,
                        "non-finite weights", None),
        # 7. the wrong kind of checkpoint
        "sft_as_dph": ("evaluate.py", ev + ["--sft", "", "--dph", sft], 2,
                       "no preference head", None),
        "dph_init_other_pooler": ("train_dph.py", dph_args + ["--init", dph, "--pooler",
                                                              "affine"], 2,
                                  "pass --new-head to replace it", None),
        "dph_init_continues_head": ("train_dph.py", dph_args + ["--init", dph, "--dpo-weight",
                                                                "0"], 0,
                                    "training continues from it", None),
        "sft_init_drops_head": ("train_sft.py", sft_args + ["--init", dph], 0,
                                "so the head is dropped", None),
        # 8. data
        "answer_longer_than_context": ("evaluate.py", ev + ["--sft", sft, "--dph", "",
                                                            "--tasks", f"jsonl:{long_answer}"],
                                       2, "do not fit in 256 tokens", None),
        "prompt_cut_note": ("evaluate.py", ev + ["--sft", sft, "--dph", "",
                                                 "--tasks", f"jsonl:{long_prompt}"],
                            0, "lose their first tokens", None),
        # 9. --out
        "out_is_a_file_dph": ("train_dph.py", dph_args + ["--init", sft], 2,
                              "exists and is not a directory", str(a_file)),
        "out_is_a_file_sft": ("train_sft.py", sft_args, 2, "exists and is not a directory",
                              str(a_file)),
        "out_checked_first": ("evaluate.py", ev + ["--sft", "/no/such/checkpoint"], 2,
                              "exists and is not a directory", str(a_file)),
        # 12. generation
        "generate_long_prompt": ("evaluate.py", gen + ["--generate", "word " * 2000], 0,
                                 "the system prompt is kept", None),
        "generate_empty": ("evaluate.py", gen + ["--generate", ""], 2, "--generate: empty",
                           None),
        "top_p_zero": ("evaluate.py", gen + ["--generate", "Hi", "--top-p", "0"], 2,
                       "--top-p must be in (0, 1]", None),
        "n_huge": ("evaluate.py", gen + ["--generate", "Hi", "-n", "10000"], 2,
                   "-n/--n must be in [1, 1024]", None),
        # flags: FlexAttention has no backward on the CPU
        "flex_on_cpu_sft": ("train_sft.py", sft_args + ["--attention", "flex"], 2,
                            "--attention flex: FlexAttention trains on CUDA only", None),
        "flex_on_cpu_dph": ("train_dph.py", dph_args + ["--init", sft, "--attention", "flex"], 2,
                            "--attention flex: FlexAttention trains on CUDA only", None),
        # 4. sizes
        "seq_len_huge": ("train_sft.py", [a if a != "256" else "1000000" for a in sft_args], 2,
                         "needs at least", None),
    }
    z = Zygote(str(d))
    argvs, outs, before = [], {}, {}
    for name, (script, args, _, _, out) in cases.items():
        outs[name] = out or str(d / f"out_{name}")
        before[name] = _listing(outs[name])
        argvs.append(cmd(script, *args, "--out", outs[name]))
    try:
        results = dict(zip(cases, z.run_many(argvs, workers=2, timeout=120)))
    finally:
        z.close()
    return {name: (cases[name][2], cases[name][3], outs[name], before[name], results[name])
            for name in cases}, {"dph": dph}


CASES = ["bogus_pooler_evaluate.py", "bogus_pooler_train_dph.py", "head_string_evaluate.py",
         "head_string_train_dph.py", "negative_d_model_evaluate.py",
         "negative_d_model_train_dph.py", "corrupt_tokenizer", "tokenizer_too_big", "nan_weights",
         "sft_as_dph", "dph_init_other_pooler", "dph_init_continues_head", "sft_init_drops_head",
         "answer_longer_than_context", "prompt_cut_note", "out_is_a_file_dph",
         "out_is_a_file_sft", "out_checked_first", "generate_long_prompt", "generate_empty",
         "top_p_zero", "n_huge", "flex_on_cpu_sft", "flex_on_cpu_dph", "seq_len_huge"]


@pytest.mark.parametrize("case", CASES)
def test_script_reports_cleanly(runs, case):
    status, expected, out, before, r = runs[0][case]
    assert r.returncode == status, f"exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr, r.stderr
    if status == 2:
        assert expected in error_line(r.stderr), r.stderr
        lines = [ln for ln in r.stderr.replace("\r", "\n").splitlines() if ln.strip()]
        assert all("%|" in ln for ln in lines[:-1]), r.stderr  # one line after a progress bar
        assert _listing(out) == before  # nothing written to --out
    else:
        assert expected in r.stderr, r.stderr


def test_continued_and_dropped_heads_are_saved_as_announced(runs):
    results = runs[0]
    dropped = json.load(open(os.path.join(results["sft_init_drops_head"][2], "config.json")))
    assert dropped["head"] is None
    continued = results["dph_init_continues_head"][2]
    start = torch.load(os.path.join(runs[1]["dph"], "model.pt"), weights_only=True)
    after = torch.load(os.path.join(continued, "model.pt"), weights_only=True)
    # the head trained on from the checkpoint's head (a fresh one starts elsewhere: seed 0)
    k = "head.score.weight"
    assert (after[k] - start[k]).abs().max() < 0.05 * start[k].abs().max() + 1e-3
