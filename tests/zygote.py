"""Run the command-line scripts as forked processes of one warm interpreter (tests only).

Starting Python and importing torch costs ~3 s of CPU per process, far more than a tiny-preset
run itself. This helper imports the project once, then forks a child per job: the child sets its
environment, points fds 1 and 2 at files, sets sys.argv and runs the script as __main__, exactly
as `python script.py args...` would, and its exit status is the job's. Nothing has touched torch
ops, threads or the tokenizers library in this process before it forks.

Protocol: one JSON line on stdin per batch, {"jobs": [{"argv": [script, args...], "env": {...},
"stdout": path, "stderr": path, "timeout": s}, ...], "workers": n}; one JSON line on stdout back,
{"results": [returncode, ...]} (-signal when killed).

    python tests/zygote.py  (started by tests/test_reliability.py)
"""
import json
import os
import runpy
import signal
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.chdir(ROOT)

import torch  # noqa: E402,F401  the expensive imports, once
import plumbing  # noqa: E402,F401
import data  # noqa: E402,F401
import evaluate  # noqa: E402,F401
import losses  # noqa: E402,F401
import model  # noqa: E402,F401
from plumbing import checkpoint  # noqa: E402,F401
import tasks.registry  # noqa: E402,F401  the task registry: the suite and the readers
import train_dph  # noqa: E402,F401
import train_sft  # noqa: E402,F401


def child(job):
    code = 1
    try:
        os.environ.update(job.get("env", {}))
        for fd, path in ((1, job["stdout"]), (2, job["stderr"])):
            f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(f, fd)
            os.close(f)
        sys.argv = list(job["argv"])
        try:
            runpy.run_path(sys.argv[0], run_name="__main__")
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: B036  a crash shows its traceback, as in a real process
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run_batch(jobs, workers):
    results, running, queue = [None] * len(jobs), {}, list(enumerate(jobs))
    while queue or running:
        while queue and len(running) < workers:
            i, job = queue.pop(0)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                child(job)
            running[pid] = (i, time.time() + job.get("timeout", 300))
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            for p, (i, deadline) in running.items():
                if time.time() > deadline:
                    os.kill(p, signal.SIGKILL)
            time.sleep(0.01)
            continue
        i, _ = running.pop(pid)
        results[i] = os.waitstatus_to_exitcode(status)
    return results


def main():
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        batch = json.loads(line)
        print(json.dumps({"results": run_batch(batch["jobs"], batch.get("workers", 1))}),
              flush=True)


if __name__ == "__main__":
    main()
