"""Reliability of the training scripts: exact resume after SIGKILL, a diverged run that
stops and keeps its last good checkpoint, one-line errors (exit status 2, nothing written) on
bad input, safe loading of the resume state, and torchrun/DDP runs that match one process.

The scripts run as processes on the `tiny` preset on the CPU, one thread each
(OMP_NUM_THREADS=1: same float results on every run, and no thread hand-off on a small machine).
The runs that are killed and the torchrun launches start a fresh interpreter; the others are
forked from one warm interpreter (tests/zygote.py), which saves ~3 s of imports per run. Runs
that do not depend on each other run side by side."""
import dataclasses
import glob
import hashlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

import plumbing
from plumbing.checkpoint import (RESUME, CheckpointError, load_train_state, save_checkpoint,
                        save_train_state)
from model import DPHModel, padded_vocab, preset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {k: v for k, v in os.environ.items()
       if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                    "DPH_TEST_STEP_DELAY")}
ENV.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")

TASKS = "synth/sentiment,synth/preference"
SFT_ARGS = ["--preset", "tiny", "--max-steps", "12", "--save-every", "3", "--batch-size", "4",
            "--seq-len", "128", "--tasks", TASKS, "--eval-every", "1000", "--max-examples", "64",
            "--vocab-size", "512", "--device", "cpu"]
DPH_ARGS = ["--max-steps", "12", "--save-every", "3", "--batch-size", "4", "--tasks", TASKS,
            "--max-examples", "64", "--eval-pairs", "16", "--eval-every", "1000",
            "--device", "cpu"]


def cmd(script, *args):
    return [sys.executable, os.path.join(ROOT, script), *map(str, args)]


class Zygote:
    """Runs `cmd(...)` command lines as processes forked from one interpreter that has imported
    torch and the project already (tests/zygote.py): each is the script run as __main__ with its
    own argv, environment, stdout/stderr and exit status, without ~3 s of start-up each."""

    def __init__(self, logs):
        self.logs, self.n = logs, 0
        self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "zygote.py")],
                                     cwd=ROOT, env=ENV, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert json.loads(self.proc.stdout.readline())["ready"]

    def run_many(self, argvs, workers=2, env=None, timeout=180):
        jobs = []
        for argv in argvs:
            self.n += 1
            base = os.path.join(self.logs, f"job{self.n}")
            jobs.append({"argv": argv[1:], "env": env or {}, "timeout": timeout,
                         "stdout": base + ".out", "stderr": base + ".err"})
        self.proc.stdin.write(json.dumps({"jobs": jobs, "workers": workers}) + "\n")
        self.proc.stdin.flush()
        codes = json.loads(self.proc.stdout.readline())["results"]
        return [subprocess.CompletedProcess(argv, code, open(j["stdout"]).read(),
                                            open(j["stderr"]).read())
                for argv, j, code in zip(argvs, jobs, codes)]

    def run(self, argv, **kw):
        return self.run_many([argv], **kw)[0]

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    z = Zygote(str(tmp_path_factory.mktemp("logs")))
    yield z
    z.close()


def run(argv, env=None, timeout=180):
    """A real interpreter from scratch (what SIGKILL and torchrun need)."""
    return subprocess.run(argv, cwd=ROOT, env=env or ENV, capture_output=True, text=True,
                          timeout=timeout)


def ok(r):
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r


def weights(path):
    return torch.load(os.path.join(path, "model.pt"), weights_only=True)


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def train_losses(path):
    with open(os.path.join(path, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    return [(r["step"], r["loss"]) for r in recs if r["split"] == "train"]


def error_line(stderr):
    """The last line of stderr (a progress bar may come before it), checked to be one error."""
    lines = [ln for ln in stderr.replace("\r", "\n").splitlines() if ln.strip()]
    assert "Traceback" not in stderr, stderr
    assert lines and lines[-1].startswith("error: "), stderr
    return lines[-1]


@pytest.fixture(scope="module")
def sft_ckpt(zygote, tmp_path_factory):
    """An uninterrupted SFT run (also the --init of the DPH runs)."""
    out = str(tmp_path_factory.mktemp("sft") / "uninterrupted")
    ok(zygote.run(cmd("train_sft.py", *SFT_ARGS, "--out", out)))
    return out


# ----------------------------------------------------------------------------------------------
# SIGKILL at a random step, then --resume: the same final weights as an uninterrupted run


def kill_after_first_checkpoint(script, args, out, seed):
    """Start a run, wait for its first checkpoint, SIGKILL it a random moment later (steps are
    slowed by DPH_TEST_STEP_DELAY so that the kill lands mid-run). Returns the step stored."""
    rng = random.Random(seed)
    env = {**ENV, "DPH_TEST_STEP_DELAY": "0.2"}
    with open(out + ".log", "w") as log:
        p = subprocess.Popen(cmd(script, *args, "--out", out), cwd=ROOT, env=env,
                             stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while not os.path.exists(os.path.join(out, RESUME)) and p.poll() is None:
            assert time.time() < deadline, "no checkpoint after 120 s"
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.5))
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert p.returncode == -signal.SIGKILL, \
        f"the run ended (exit {p.returncode}) before the kill:\n{open(out + '.log').read()}"
    step = load_train_state(os.path.join(out, RESUME))["step"]
    assert 3 <= step < 12 and step % 3 == 0
    return step


def check_resumed_equals_uninterrupted(resumed, uninterrupted):
    a, b = weights(uninterrupted), weights(resumed)
    assert max_diff(a, b) == 0.0, "resumed weights differ"  # exact on the CPU
    assert train_losses(resumed) == train_losses(uninterrupted)  # and the log has no repeats
    assert not glob.glob(os.path.join(resumed, ".tmp-*"))


def test_sft_sigkill_then_resume_is_exact(zygote, sft_ckpt, tmp_path):
    out = str(tmp_path / "killed")
    step = kill_after_first_checkpoint("train_sft.py", SFT_ARGS, out, seed=1)
    # a requeued job repeats its command line with --resume
    r = ok(zygote.run(cmd("train_sft.py", *SFT_ARGS, "--out", out, "--resume")))
    assert f"resuming {out} at step {step} of 12" in r.stdout
    check_resumed_equals_uninterrupted(out, sft_ckpt)
    assert load_train_state(os.path.join(out, RESUME))["step"] == 12


def test_dph_sigkill_then_resume_is_exact(zygote, sft_ckpt, tmp_path):
    whole, out = str(tmp_path / "uninterrupted"), str(tmp_path / "killed")
    args = DPH_ARGS + ["--init", sft_ckpt]
    with ThreadPoolExecutor(1) as pool:  # the reference run, beside the run to be killed
        ref = pool.submit(zygote.run, cmd("train_dph.py", *args, "--out", whole))
        step = kill_after_first_checkpoint("train_dph.py", args, out, seed=2)
        ok(ref.result())
    # --resume alone: every other setting comes from the run in --out
    r = ok(zygote.run(cmd("train_dph.py", "--out", out, "--resume")))
    assert f"resuming {out} at step {step} of 12" in r.stdout
    check_resumed_equals_uninterrupted(out, whole)


# ----------------------------------------------------------------------------------------------
# A diverged run stops with one line naming the step and keeps its last good checkpoint


@pytest.fixture(scope="module")
def diverged(zygote, sft_ckpt, tmp_path_factory):
    d = tmp_path_factory.mktemp("diverged")
    runs = {  # warmup 1: the full learning rate at once; diverges at step 2 on the CPU
        # lr 1e8: the loss of step 2 is NaN; lr 1e4: the weights after step 2 are not finite
        "sft": ("loss", cmd("train_sft.py", *SFT_ARGS, "--save-every", "1", "--lr", "1e8",
                            "--warmup-steps", "1", "--out", d / "sft")),
        "dph": ("weights", cmd("train_dph.py", *DPH_ARGS, "--init", sft_ckpt, "--save-every",
                               "1", "--lr", "1e4", "--head-lr", "1e4", "--warmup-steps", "1",
                               "--out", d / "dph")),
    }
    results = zygote.run_many([argv for _, argv in runs.values()])
    return {name: (what, str(d / name), r) for (name, (what, _)), r in zip(runs.items(), results)}


@pytest.mark.parametrize("script", ["sft", "dph"])
def test_non_finite_stops_and_keeps_last_good_checkpoint(diverged, script):
    what, out, r = diverged[script]
    assert r.returncode == plumbing.EXIT_DIVERGED, r.stderr[-2000:]
    line = error_line(r.stderr)
    assert f"non-finite {'training loss' if what == 'loss' else 'weights'}" in line
    assert "step 2" in line and f"{out} keeps the checkpoint of step 1" in line
    state = load_train_state(os.path.join(out, RESUME))
    assert state["step"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert all(torch.isfinite(v).all() for v in weights(out).values())
    config = json.load(open(os.path.join(out, "config.json")))
    assert config[script]["steps"] == 1


# ----------------------------------------------------------------------------------------------
# Bad input: one line "error: ..." on stderr, exit status 2, nothing written to --out


def _good_checkpoint(path, tok, **overrides):
    torch.manual_seed(0)
    cfg = preset("tiny", **{"vocab_size": padded_vocab(len(tok)), **overrides})
    save_checkpoint(str(path), DPHModel(cfg), tokenizer_json=tok.to_json(),
                    extra={"stage": "sft", "sft": {"tasks": ["synth/sentiment"]}})
    return str(path)


@pytest.fixture(scope="module")
def bad_input(zygote, tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    good = _good_checkpoint(d / "good", tok)

    other_arch = shutil.copytree(good, d / "other_arch")  # config.json: d_model 64
    _good_checkpoint(d / "d32", tok, d_model=32, ffn_dim=86)
    shutil.copy(d / "d32" / "model.pt", other_arch / "model.pt")  # weights: d_model 32
    small_vocab = _good_checkpoint(d / "small_vocab", tok, vocab_size=64)  # tokenizer: ~400
    corrupt = shutil.copytree(good, d / "corrupt")
    data = (corrupt / "model.pt").read_bytes()
    (corrupt / "model.pt").write_bytes(data[: len(data) // 2])
    no_tok = shutil.copytree(good, d / "no_tok")
    (no_tok / "tokenizer.json").unlink()

    malformed = d / "malformed.jsonl"
    malformed.write_text('{"prompt": "Is the sky blue?", "candidates": ["yes", "no"], '
                         '"label": 0}\n{"prompt": "Is grass red?", "candidates": [\n')
    long_answers = d / "long.jsonl"
    words = " ".join(f"word{i}" for i in range(120))
    long_answers.write_text("".join(  # a validation line too: no "skipping" note
        json.dumps({"prompt": f"Write out item {i}.", "response": f"{i} {words}",
                    "split": "validation" if i == 0 else "train"}) + "\n" for i in range(40)))

    previous = shutil.copytree(good, d / "previous")  # a finished run without --overwrite
    (previous / "metrics.jsonl").write_text('{"step": 0, "split": "config", "time": 0}\n')
    bad_resume = d / "bad_resume"
    bad_resume.mkdir()
    (bad_resume / RESUME).write_bytes(b"PK\x03\x04 not a zip archive at all")

    sft = ["--preset", "tiny", "--max-steps", "2", "--batch-size", "2", "--seq-len", "64",
           "--tasks", "synth/sentiment", "--max-examples", "16", "--vocab-size", "300",
           "--device", "cpu"]
    dph = ["--max-steps", "2", "--batch-size", "2", "--tasks", "synth/sentiment",
           "--max-examples", "16", "--eval-pairs", "8", "--device", "cpu"]
    cases = {  # name: (script, args, expected in the error line, --out or None for a new dir)
        "unknown_task": ("train_sft.py", sft + ["--tasks", "synth/sentiment,no/such_task"],
                         "unknown task 'no/such_task'", None),
        "malformed_jsonl": ("train_sft.py", sft + ["--tasks", f"jsonl:{malformed}"],
                            f"{malformed}:2: bad JSON", None),
        "epsilon_half": ("train_dph.py", dph + ["--init", good, "--label-smoothing", "0.5"],
                         "--label-smoothing must be in [0, 0.5)", None),
        "negative_lr_sft": ("train_sft.py", sft + ["--lr", "-0.001"],
                            "--lr must be positive", None),
        "negative_lr_dph": ("train_dph.py", dph + ["--init", good, "--lr=-1e-4"],
                            "--lr must be positive", None),
        "seq_len_too_small": ("train_sft.py", sft + ["--tasks", f"jsonl:{long_answers}"],
                              "--seq-len 64 is too small for jsonl:", None),
        "max_len_too_small": ("train_dph.py", dph + ["--init", good, "--max-len", "6"],
                              "--max-len 6 is too small for synth/sentiment", None),
        "other_architecture": ("train_dph.py", dph + ["--init", other_arch],
                               "model.pt: does not match config.json", None),
        "other_vocabulary": ("train_sft.py", sft + ["--init", small_vocab],
                             "embedding rows", None),
        "corrupt_checkpoint": ("train_dph.py", dph + ["--init", corrupt],
                               "model.pt: cannot be loaded safely", None),
        "missing_tokenizer": ("train_dph.py", dph + ["--init", no_tok],
                              "tokenizer.json: not found", None),
        "previous_run": ("train_sft.py", sft, "holds a previous run; pass --overwrite",
                         str(previous)),
        "bad_choice": ("train_sft.py", sft + ["--preset", "huge"],
                       "argument --preset: invalid choice: 'huge'", None),
        "corrupt_resume_state": ("train_dph.py", dph + ["--resume"],
                                 f"{RESUME}: cannot be loaded safely", str(bad_resume)),
    }
    argvs, outs, before = [], {}, {}
    for name, (script, args, _, out) in cases.items():
        outs[name] = out or str(d / f"out_{name}")
        before[name] = _listing(outs[name])
        argvs.append(cmd(script, *args, "--out", outs[name]))
    results = dict(zip(cases, zygote.run_many(argvs, workers=2)))
    return {name: (cases[name][2], outs[name], before[name], results[name]) for name in cases}


def _listing(path):
    """{file: (size, mtime)} of a directory, None if it does not exist."""
    if not os.path.isdir(path):
        return None
    return {f: (os.path.getsize(os.path.join(path, f)), os.path.getmtime(os.path.join(path, f)))
            for f in sorted(os.listdir(path))}


BAD_CASES = ["unknown_task", "malformed_jsonl", "epsilon_half", "negative_lr_sft",
             "negative_lr_dph", "seq_len_too_small", "max_len_too_small", "other_architecture",
             "other_vocabulary", "corrupt_checkpoint", "missing_tokenizer", "previous_run",
             "bad_choice", "corrupt_resume_state"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_one_line_exit_2_nothing_written(bad_input, case):
    expected, out, before, r = bad_input[case]
    assert r.returncode == 2, f"exit {r.returncode}\n{r.stderr[-3000:]}"
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: "), r.stderr
    assert expected in r.stderr, r.stderr
    assert _listing(out) == before  # no new directory, or the old one untouched


# ----------------------------------------------------------------------------------------------
# In-process: safe loading, exact RNG round trips, atomic writes, --resume's config


class Payload:
    """Unpickling this runs `touch <path>`: the classic malicious checkpoint."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_resume_state_code_payload_refused(tmp_path):
    pwned = tmp_path / "pwned"
    state = {"step": 3, "config": {}, "model": {}, "optimizer": {"state": Payload(str(pwned))}}
    torch.save(state, tmp_path / RESUME)
    with pytest.raises(CheckpointError, match=f"{RESUME}: cannot be loaded safely"):
        load_train_state(str(tmp_path / RESUME))
    assert not pwned.exists(), "the payload ran"
    torch.load(tmp_path / RESUME, weights_only=False)  # the payload is live
    assert pwned.exists()


def test_resume_state_of_a_real_run_is_plain_data(sft_ckpt):
    """Everything in resume.pt loads under weights_only=True and holds what --resume needs."""
    s = load_train_state(os.path.join(sft_ckpt, RESUME))
    assert {"step", "config", "model", "optimizer", "data", "rng", "tokenizer", "global_batch",
            "init", "model_config"} <= set(s)
    assert s["step"] == 12 and s["config"]["max_steps"] == 12
    assert isinstance(s["data"]["sampler"]["rng"][1], list)  # no tuples: JSON-safe too
    json.dumps({k: s[k] for k in ("config", "data", "model_config")})
    assert all(torch.equal(v, weights(sft_ckpt)[k]) for k, v in s["model"].items())


def test_rng_states_round_trip_exactly_through_torch_and_json():
    plumbing.seed_everything(123)
    for _ in range(3):  # some draws, including a cached gaussian
        random.random(), random.gauss(0, 1), np.random.randn(), torch.rand(2)
    state = plumbing.rng_state(torch.device("cpu"))
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    plain = json.loads(json.dumps({"python": loaded["python"], "numpy": loaded["numpy"]}))
    expect = (random.random(), random.gauss(0, 1), np.random.randn(), torch.rand(3))
    plumbing.seed_everything(999)
    plumbing.set_rng_state({**plain, "torch": loaded["torch"]}, torch.device("cpu"))
    got = (random.random(), random.gauss(0, 1), np.random.randn(), torch.rand(3))
    assert got[:3] == expect[:3] and torch.equal(got[3], expect[3])

    r = random.Random(5)
    r.random()
    s = json.loads(json.dumps(plumbing.plain_random_state(r)))
    r2 = random.Random(0)
    plumbing.set_plain_random_state(r2, s)
    assert [r.random() for _ in range(5)] == [r2.random() for _ in range(5)]


def test_resume_state_write_is_atomic(tmp_path, monkeypatch):
    """A writer that dies mid-file leaves the previous resume.pt whole and no temporary file."""
    save_train_state(str(tmp_path), {"step": 3, "config": {}, "model": {}, "optimizer": {}})
    good = (tmp_path / RESUME).read_bytes()

    def dies_midway(obj, f):
        with open(f, "wb") as fh:
            fh.write(good[:10])
        raise KeyboardInterrupt  # stands for a kill between the first byte and the rename

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        save_train_state(str(tmp_path), {"step": 6, "config": {}, "model": {}, "optimizer": {}})
    assert (tmp_path / RESUME).read_bytes() == good
    assert os.listdir(tmp_path) == [RESUME]


def test_checkpoint_config_written_last(tmp_path, monkeypatch, make_model, tok):
    order, replace = [], os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (order.append(os.path.basename(b)),
                                                    replace(a, b)))
    save_checkpoint(str(tmp_path), make_model(), tokenizer_json=tok.to_json())
    assert order[-1] == "config.json" and set(order) == {"model.pt", "model.safetensors",
                                                         "tokenizer.json", "config.json"}


def _fake_run(tmp_path, **cfg_values):
    from train_sft import SFTConfig
    cfg = SFTConfig(**{**dict(out=str(tmp_path), lr=1e-3, max_steps=50), **cfg_values})
    save_train_state(str(tmp_path), {"step": 10, "config": dataclasses.asdict(cfg),
                                     "model": {}, "optimizer": {}})
    return SFTConfig


def test_resume_inherits_config_and_refuses_conflicting_flags(tmp_path):
    SFTConfig = _fake_run(tmp_path)
    argv = ["--out", str(tmp_path), "--resume", "--eval-every", "7"]
    cfg, _ = plumbing.parse_config(SFTConfig, "", argv)
    cfg, state = plumbing.open_resume(cfg, argv)
    assert state["step"] == 10
    assert (cfg.lr, cfg.max_steps, cfg.eval_every, cfg.resume) == (1e-3, 50, 7, True)

    argv = ["--out", str(tmp_path), "--resume", "--lr", "0.002"]
    cfg, _ = plumbing.parse_config(SFTConfig, "", argv)
    with pytest.raises(plumbing.UsageError, match="--lr 0.002 differs from the run"):
        plumbing.open_resume(cfg, argv)
    argv = ["--out", str(tmp_path), "--resume", "--lr", "0.001"]  # the same value is fine
    plumbing.open_resume(plumbing.parse_config(SFTConfig, "", argv)[0], argv)


def test_resume_without_state(tmp_path):
    from train_sft import SFTConfig
    empty = tmp_path / "empty"
    argv = ["--out", str(empty), "--resume"]
    cfg, state = plumbing.open_resume(plumbing.parse_config(SFTConfig, "", argv)[0], argv)
    assert state is None and cfg.resume  # nothing to resume: a first launch starts at step 0
    (tmp_path / "config.json").write_text("{}")  # a checkpoint without resume state
    argv = ["--out", str(tmp_path), "--resume"]
    with pytest.raises(plumbing.UsageError, match="no resume.pt to resume from"):
        plumbing.open_resume(plumbing.parse_config(SFTConfig, "", argv)[0], argv)


def test_overwrite_removes_the_previous_runs_markers(tmp_path):
    for name in ("config.json", "metrics.jsonl", RESUME, ".tmp-123model.pt"):
        (tmp_path / name).write_text("x")
    with pytest.raises(plumbing.UsageError, match="holds a previous run"):
        plumbing.prepare_out(str(tmp_path), overwrite=False)
    plumbing.prepare_out(str(tmp_path), overwrite=True)
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------------------------
# torchrun: two CPU processes (gloo) = one process with the same global batch


def _torchrun(*args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            *map(str, args)]


@pytest.mark.skipif(not torch.distributed.is_available()
                    or not torch.distributed.is_gloo_available(), reason="no gloo backend")
@pytest.mark.parametrize("script", ["train_sft.py", "train_dph.py"])
def test_torchrun_two_ranks_match_one_process(zygote, script, sft_ckpt, tmp_path):
    # no dropout in SFT: each rank draws its own dropout masks, so only a dropout-free run can
    # match the one-process run (the DPH stage has none anyway)
    args = (SFT_ARGS + ["--dropout", "0", "--attn-dropout", "0"] if script == "train_sft.py"
            else DPH_ARGS + ["--init", sft_ckpt]) + ["--save-every", "0"]
    two, one = str(tmp_path / "two"), str(tmp_path / "one")
    with ThreadPoolExecutor(1) as pool:  # the one-process run beside the two ranks
        r1 = pool.submit(zygote.run, cmd(script, *args, "--batch-size", "8", "--out", one))
        r2 = run(_torchrun(os.path.join(ROOT, script), *args, "--batch-size", "4", "--out", two))
        ok(r2), ok(r1.result())
    assert r2.stdout.count("saved ") == 1  # rank 0 alone prints

    # (a) both ranks hold identical weights: each rank hashed its own, rank 0 saved them
    dist = json.load(open(os.path.join(two, "config.json")))["distributed"]
    assert dist["world_size"] == 2 and dist["backend"] == "gloo"
    h = hashlib.sha256()
    for v in weights(two).values():
        h.update(v.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    assert dist["replica_sha256"] == [h.hexdigest()] * 2

    # (b) 2 ranks x batch 4 = 1 process x batch 8: each rank trained on its own half of the
    # same global batch (different halves, or the sum would not match), gradients averaged
    assert max_diff(weights(two), weights(one)) < 1e-5


_RUN_MAIN_UNDER_A_PROCESS_GROUP = """
import sys, torch
import plumbing
torch.distributed.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[2],
                                     rank=0, world_size=1)
model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))  # what keeps the group
model(torch.ones(1, 2)).sum().backward()
out = [None]
torch.distributed.all_gather_object(out, {"rank": 0})  # a collective on Python tensors

def main():
    what = sys.argv[1]
    if what == "usage":
        raise plumbing.UsageError("--flag: bad value")
    if what == "bug":
        raise RuntimeError("a bug")
    print("main ran", flush=False)  # still printed: run_main flushes before it leaves
    return 0

plumbing.run_main(main)
"""


@pytest.mark.skipif(not torch.distributed.is_available()
                    or not torch.distributed.is_gloo_available(), reason="no gloo backend")
@pytest.mark.parametrize("what, status", [("ok", 0), ("usage", 2), ("bug", 1)])
def test_run_main_under_a_process_group_keeps_the_exit_status(what, status):
    """Under torchrun, run_main tears the process group down and leaves without the
    interpreter's shutdown (a gloo worker thread can abort it there, see run_main). What the
    run printed and its exit status must survive that: 0, 2 with the one-line error, 1 with
    the traceback."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in ENV.items() if k != "PYTHONUNBUFFERED"}  # stdout: a buffered pipe
    r = run([sys.executable, "-c", _RUN_MAIN_UNDER_A_PROCESS_GROUP, what, str(port)],
            env={**env, "PYTHONPATH": ROOT}, timeout=120)
    assert r.returncode == status, r.stderr
    if what == "ok":
        assert r.stdout.strip().endswith("main ran")
    elif what == "usage":
        assert error_line(r.stderr) == "error: --flag: bad value"
    else:
        assert "Traceback" in r.stderr and "RuntimeError: a bug" in r.stderr


@pytest.mark.parametrize("env, tuned", [(None, True), ("tuned", True), ("default", False)])
def test_scripts_tune_the_allocator_unless_told_not_to(monkeypatch, env, tuned):
    """run_main (every script's entry point) keeps freed memory in the heap (glibc mallopt), so
    steps do not pay page faults again; DPH_MALLOC=default leaves the allocator alone."""
    import plumbing
    calls = []
    monkeypatch.setattr(plumbing, "tune_malloc", lambda: calls.append(1) or "tuned")
    if env is None:
        monkeypatch.delenv("DPH_MALLOC", raising=False)
    else:
        monkeypatch.setenv("DPH_MALLOC", env)
    with pytest.raises(SystemExit) as e:
        plumbing.run_main(lambda: 0)
    assert e.value.code == 0 and calls == ([1] if tuned else [])


def test_tune_malloc_reports_what_it_did():
    import platform
    import plumbing
    state = plumbing.tune_malloc()  # in this test process: harmless (memory is kept, not lost)
    assert state.startswith("tuned") or state.startswith("default")
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert state.startswith("tuned")
