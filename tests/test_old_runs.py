"""--resume of runs written by the code as it was before its modules moved into plumbing/, tasks/,
tokenizer/ and inference/ (commit aa2957f). The old code, taken from git history, trains and is
killed mid-run; the current code resumes the run, and its final weights equal those of an
uninterrupted run of the old code (up to float rounding: the current code computes the LM head's
cross-entropy chunk by chunk, losses.token_logps, so its sums round differently). Skipped where
the checkout has no git history."""
import io
import os
import signal
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from plumbing.checkpoint import RESUME, load_train_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OLD = "aa2957f"  # the last commit before the move
ENV = {k: v for k, v in os.environ.items()
       if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "DPH_TEST_STEP_DELAY")}
ENV.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
# warmup 1: every resumed step is past the warmup, where both versions compute the same LR
COMMON = ["--max-steps", "6", "--save-every", "2", "--batch-size", "4", "--warmup-steps", "1",
          "--tasks", "synth/sentiment,synth/preference", "--max-examples", "48",
          "--eval-every", "1000", "--device", "cpu"]
SFT_ARGS = COMMON + ["--preset", "tiny", "--seq-len", "128", "--vocab-size", "400"]
DPH_ARGS = COMMON + ["--eval-pairs", "8"]


@pytest.fixture(scope="module")
def old_tree(tmp_path_factory):
    try:
        r = subprocess.run(["git", "-C", ROOT, "archive", OLD], capture_output=True, timeout=120)
    except (FileNotFoundError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"git is not usable here ({e})")
    if r.returncode != 0:
        pytest.skip(f"commit {OLD} is not in this checkout (no git history?): "
                    f"{r.stderr.decode(errors='replace').strip()[:200]}")
    d = tmp_path_factory.mktemp("old")
    tarfile.open(fileobj=io.BytesIO(r.stdout)).extractall(d)
    return str(d)


def run(tree, script, *args, env=None):
    r = subprocess.run([sys.executable, script, *args], cwd=tree, env=env or ENV,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{script} exit {r.returncode}\n{r.stderr[-3000:]}"
    return r


def killed_old_run(tree, script, args, out):
    """The old code, killed while it sleeps after its first checkpoint (step 2 of 6): each step
    is followed by a 3 s sleep, and config.json is the last file a checkpoint writes."""
    env = {**ENV, "DPH_TEST_STEP_DELAY": "3"}
    p = subprocess.Popen([sys.executable, script, *args, "--out", out], cwd=tree, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while not os.path.exists(os.path.join(out, "config.json")) and p.poll() is None:
        assert time.time() < deadline, "no checkpoint after 180 s"
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert p.returncode == -signal.SIGKILL, f"the old run ended (exit {p.returncode})"
    assert load_train_state(os.path.join(out, RESUME))["step"] == 2


def weights(path):
    return torch.load(os.path.join(path, "model.pt"), weights_only=True)


def assert_same_run(resumed, whole, at_kill):
    """The resumed run's weights match the uninterrupted run's: each tensor's distance to them is
    under 0.5% of how far the uninterrupted run moved that tensor after the kill (measured: at
    most 0.003%; a resume that got the schedule or the optimizer state wrong is off by far more)."""
    wr, ww = weights(resumed), weights(whole)
    assert wr.keys() == ww.keys() == at_kill.keys()
    for k in wr:
        moved = (ww[k] - at_kill[k]).abs().max().item()
        assert moved > 0, f"{k} did not train after the kill"
        gap = (wr[k] - ww[k]).abs().max().item()
        assert gap <= 0.005 * moved, f"{k}: resumed vs uninterrupted {gap:.3g}, moved {moved:.3g}"


def test_current_code_resumes_old_sft_and_dph_runs(old_tree, tmp_path):
    t = str(tmp_path)
    whole_sft, killed_sft = f"{t}/sft-whole", f"{t}/sft-killed"
    with ThreadPoolExecutor(1) as pool:  # the uninterrupted run beside the one to be killed
        whole = pool.submit(run, old_tree, "train_sft.py", *SFT_ARGS, "--out", whole_sft)
        killed_old_run(old_tree, "train_sft.py", SFT_ARGS, killed_sft)
        whole.result()
    at_kill = weights(killed_sft)
    r = run(ROOT, "train_sft.py", *SFT_ARGS, "--out", killed_sft, "--resume")
    assert f"resuming {killed_sft} at step 2 of 6" in r.stdout
    assert_same_run(killed_sft, whole_sft, at_kill)

    whole_dph, killed_dph = f"{t}/dph-whole", f"{t}/dph-killed"
    with ThreadPoolExecutor(1) as pool:
        whole = pool.submit(run, old_tree, "train_dph.py", *DPH_ARGS, "--init", whole_sft,
                            "--out", whole_dph)
        killed_old_run(old_tree, "train_dph.py", DPH_ARGS + ["--init", whole_sft], killed_dph)
        whole.result()
    at_kill = weights(killed_dph)
    r = run(ROOT, "train_dph.py", "--out", killed_dph, "--resume")
    assert f"resuming {killed_dph} at step 2 of 6" in r.stdout
    assert_same_run(killed_dph, whole_dph, at_kill)
    # and the resumed checkpoint loads and evaluates with the current code
    run(ROOT, "evaluate.py", "--sft", whole_sft, "--dph", killed_dph, "--max-examples", "8",
        "--out", f"{t}/eval", "--device", "cpu")
