"""Run plumbing shared by train_sft.py, train_dph.py and evaluate.py: nothing here is the method.

    flags        a config dataclass -> argparse flags (RunConfig: the fields both trainers have),
                 interval checks of every numeric flag, notes on flags that have no effect
    errors       run_main: bad input is one line on stderr and exit status 2, never a traceback
    devices      --device / --dtype, autocast, seeds and every RNG's state
    torchrun     one process per device; DDP averages the gradients
    --resume     the stored run's config and training state come back
    inputs       checkpoints to start from, the tasks' splits, memory checks
    outputs      --out's life cycle and metrics.jsonl
    Run          the training loop both trainers share: LR schedule, gradient accumulation and
                 clipping, the optimiser step and prior regularisation, logging, validation,
                 resumable checkpoints (plumbing/checkpoint.py writes them atomically)

Exit statuses of the scripts (run_main):
    0  done
    2  bad flags or input (one line on stderr, "error: ..."); nothing was written to --out
    3  training diverged (non-finite loss or weights); stopped, the last good checkpoint is kept
    1  anything else: a bug, shown with its traceback
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import json
import math
import os
import random
import sys
import time
import typing

import numpy as np
import torch
from tqdm import tqdm

from plumbing.checkpoint import (CONFIG, RESUME, TOKENIZER, CheckpointError, atomic_write,
                                 check_vocab, load_checkpoint, load_train_state, save_checkpoint,
                                 save_train_state, state_digest)


class UsageError(ValueError):
    """A bad flag value or input: printed as one line, exit status 2."""


def opt(default, help: str, choices=None, alias=None):
    """A config field with its --help text (and argparse choices, and a short alias like -n)."""
    return dataclasses.field(default=default,
                             metadata={"help": help, "choices": choices, "alias": alias})


EXIT_USAGE, EXIT_DIVERGED = 2, 3


def is_main_process() -> bool:
    """Rank 0 under torchrun (RANK is set before the process starts); True otherwise."""
    return int(os.environ.get("RANK", "0")) == 0


def _one_line_error(msg: str, status: int, leave: bool = True):
    if is_main_process():  # every rank sees the same input and fails alike: say it once
        print(f"error: {' '.join(str(msg).split())}", file=sys.stderr)
    if leave:
        sys.exit(status)
    return status


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors (unknown flag, bad value, a value outside `choices`) are one
    line, "error: ...", exit status 2, like every other bad-input error of the scripts."""

    def error(self, message):
        _one_line_error(f"{message} (see {self.prog} --help)", EXIT_USAGE)


def build_parser(cls, description: str) -> argparse.ArgumentParser:
    """argparse flags generated from a config dataclass: field foo_bar -> --foo-bar."""
    # no abbreviated flags: --resume must know exactly which flags the user set
    p = Parser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
               allow_abbrev=False)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        flags = ["--" + f.name.replace("_", "-")] + ([meta["alias"]] if meta.get("alias") else [])
        kind = hints[f.name]
        if kind is bool:
            p.add_argument(*flags, action=argparse.BooleanOptionalAction, default=f.default,
                           help=meta.get("help", ""))
        else:
            p.add_argument(*flags, type=kind, default=f.default, choices=meta.get("choices"),
                           help=meta.get("help", ""), metavar=None if meta.get("choices") else
                           f.name.upper())
    return p


def parse_config(cls, description: str, argv=None, extra=None):
    p = build_parser(cls, description)
    if extra:
        extra(p)
    ns = p.parse_args(argv)
    names = {f.name for f in dataclasses.fields(cls)}
    cfg = cls(**{k: v for k, v in vars(ns).items() if k in names})
    return cfg, ns


INT_MAX = 2**63 - 1  # the largest seed or count torch and numpy take


def _bound(text: str, kind):
    return {"inf": math.inf, "-inf": -math.inf, "max": INT_MAX}.get(text) if \
        text in ("inf", "-inf", "max") else kind(float(text) if kind is float else int(text))


def check_ranges(cfg, ranges: dict):
    """Every int and float field of the config dataclass `cfg` inside its own interval.

    ranges: field name -> interval, e.g. "(0, inf)", "[0, 0.5)", "[1, max]" (max: INT_MAX).
    A float is also refused when it is NaN or infinite, whatever its interval. A numeric field
    with no declared interval is only checked for finiteness here (tests require one for every
    field). Raises UsageError naming the flag, the interval and the value."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        kind = hints[f.name]
        if kind not in (int, float) or isinstance(getattr(cfg, f.name), bool):
            continue
        v, flag = getattr(cfg, f.name), "--" + f.name.replace("_", "-")
        if f.metadata.get("alias"):
            flag = f"{f.metadata['alias']}/{flag}"
        if kind is float and not math.isfinite(v):
            raise UsageError(f"{flag} must be a finite number, got {v}")
        spec = ranges.get(f.name)
        if spec is None:
            continue
        lo_open, hi_open = spec[0] == "(", spec[-1] == ")"
        lo, hi = (_bound(t.strip(), kind) for t in spec[1:-1].split(","))
        if (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi):
            continue
        below = v <= lo if lo_open else v < lo
        if below and hi in (math.inf, INT_MAX):
            if (lo, lo_open) == (0, True) or (lo, kind) == (1, int):
                raise UsageError(f"{flag} must be positive, got {v}")
            raise UsageError(f"{flag} must be {'>' if lo_open else '>='} {lo}, got {v}")
        raise UsageError(f"{flag} must be in {spec.replace('max', str(INT_MAX))}, got {v}")


def note_unused(argv, reasons: dict):
    """A note for each flag the user set that has no effect here: {field: reason, or ''}."""
    given = explicit_flags(argv)
    for name, why in reasons.items():
        if why and name in given:
            print(f"note: --{name.replace('_', '-')} has no effect: {why}", file=sys.stderr)


def explicit_flags(argv=None) -> set:
    """Config field names the user set on the command line (so inherited values yield to them)."""
    argv = sys.argv[1:] if argv is None else argv
    return {a[2:].split("=")[0].replace("-", "_").removeprefix("no_") for a in argv
            if a.startswith("--")}


def print_config(cfg, title: str):
    print(f"{title}: " + json.dumps(dataclasses.asdict(cfg), indent=None, sort_keys=False))


def tune_malloc() -> str:
    """glibc: serve every allocation from the heap and never give freed memory back (mallopt
    M_MMAP_MAX = 0, M_TRIM_THRESHOLD and M_TOP_PAD large). By default glibc maps each large
    block (activations, gradients) fresh from the kernel and unmaps it on free, so every step
    pays page faults again; on a 2-core VM that cost 10-15% of an SFT step on padded rows and
    5-10% on packed ones, and 25-35% of a padded evaluation batch. The process keeps its peak
    memory. run_main does this for every script unless DPH_MALLOC=default."""
    import ctypes
    import ctypes.util
    import platform
    name = ctypes.util.find_library("c")
    if not name or platform.system() != "Linux":
        return "default (not glibc)"
    try:
        libc = ctypes.CDLL(name)
        M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
        ok = (libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1
              and libc.mallopt(M_TOP_PAD, 64 << 20) == 1)
    except (OSError, AttributeError):
        return "default (mallopt unavailable)"
    return "tuned (mallopt: M_MMAP_MAX=0, M_TRIM_THRESHOLD=2^31-1, M_TOP_PAD=64MiB)" if ok \
        else "default (mallopt refused)"


def run_main(main):
    """Run a script's main(). User-facing errors become one line on stderr: bad flags or input
    (and unreadable paths) exit with status 2, a diverged run (FloatingPointError) with 3. Any
    other exception is a bug and keeps its traceback. Under torchrun the process group is torn
    down and the process leaves at once, with main()'s status (the comment below says why)."""
    if os.environ.get("DPH_MALLOC", "tuned") != "default":
        tune_malloc()
    try:
        status = _main_status(main)
    except BaseException:  # a bug: its traceback, then the process group's teardown below
        if not _process_group_up():
            raise
        import traceback
        traceback.print_exc()
        status = 1
    if _process_group_up():
        torch.distributed.destroy_process_group()
        # Leave without the interpreter's shutdown. Once DDP has used a gloo process group,
        # PyTorch (2.13 at least) keeps it alive after destroy_process_group, and one of its
        # worker threads may free a finished collective's tensors while Python shuts down:
        # that aborts the process (SIGABRT, "terminate called without an active exception")
        # after the run has saved everything, in a few short runs of a hundred on 2 CPU cores.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


def _process_group_up() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _main_status(main) -> int:
    """main()'s exit status; user-facing errors as one line on stderr and their status."""
    from tasks import TaskError
    try:
        status = main()
    except (UsageError, TaskError, CheckpointError, FileNotFoundError, PermissionError,
            IsADirectoryError, NotADirectoryError) as e:
        msg = f"{e.filename}: {e.strerror or 'not found'}" \
            if isinstance(e, OSError) and e.filename and e.strerror else str(e)
        status = _one_line_error(msg, EXIT_USAGE, leave=False)
    except FloatingPointError as e:
        status = _one_line_error(str(e), EXIT_DIVERGED, leave=False)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        status = 130
    except SystemExit as e:  # e.g. argparse's --help, or a usage error (Parser.error)
        status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    return 0 if status is None else status


# ----------------------------------------------------------------------------------------------
# Device, dtype, seeds


def resolve_device(name: str) -> torch.device:
    """auto: cuda, then mps, then cpu. 'cpu' never probes CUDA."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device {name}: choose from auto, cpu, cuda, cuda:N, mps")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} "
                             f"CUDA device(s)")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) is not None
                                     and torch.backends.mps.is_available()):
        raise UsageError(f"--device {name}: MPS is not available on this machine")
    if device.type == "cpu" and device.index not in (None, 0):
        raise UsageError(f"--device {name}: use --device cpu")
    return device


def resolve_dtype(name: str, device: torch.device):
    """auto: bfloat16 autocast on a CUDA card that supports it, float32 elsewhere."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise UsageError(f"--dtype {name}: choose from auto, {', '.join(table)}")
    return table[name]


def autocast(device: torch.device, dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state(device: torch.device) -> dict:
    """Every global RNG as plain lists/ints/floats and tensors (torch.load(weights_only=True)
    reads it back; tuples become lists so a JSON round trip would keep it exact too)."""
    version, internal, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    s = {"python": [version, list(internal), gauss],
         "numpy": [[int(k) for k in keys], int(pos), int(has_gauss), float(cached)],
         "torch": torch.get_rng_state()}
    if device.type == "cuda":  # never probed on a CPU run
        s["cuda"] = torch.cuda.get_rng_state(device)
    return s


def set_rng_state(s: dict, device: torch.device):
    version, internal, gauss = s["python"]
    random.setstate((version, tuple(internal), gauss))
    keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state(("MT19937", np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(s["torch"])
    if device.type == "cuda" and "cuda" in s:
        torch.cuda.set_rng_state(s["cuda"], device)


def plain_random_state(rng: random.Random) -> list:
    """A random.Random's state as [version, [625 ints], gauss] (see rng_state)."""
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def set_plain_random_state(rng: random.Random, s):
    rng.setstate((s[0], tuple(s[1]), s[2]))


# ----------------------------------------------------------------------------------------------
# torchrun: one process per device, DDP averages the gradients


@dataclasses.dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str = ""

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def init_distributed(device_name: str):
    """-> (Dist, device). Under torchrun (WORLD_SIZE > 1) join the process group: nccl on CUDA
    (one device per process, cuda:LOCAL_RANK), gloo on the CPU. Outside torchrun: one process.
    Non-zero ranks stay quiet on stdout; rank 0 prints and writes files."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), resolve_device(device_name)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    device = resolve_device(device_name)
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise UsageError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA "
                             f"devices; lower --nproc-per-node")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise UsageError(f"--device {device_name}: multi-process training runs on cuda or cpu")
    torch.distributed.init_process_group(backend)
    if rank != 0:
        sys.stdout = open(os.devnull, "w")
    return Dist(rank, world, local, backend), device


def wrap_ddp(model, dist: Dist, device):
    """DistributedDataParallel around `model` when several processes train, else `model`."""
    if not dist.active:
        return model
    # the only buffer (the RoPE table) is a constant: no need to sync it before every forward
    import inspect
    params = inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters
    no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else \
        {"broadcast_buffers": False}
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, **no_sync)


class DDP(torch.nn.parallel.DistributedDataParallel):
    """DDP that also exposes DPHModel.reward: the head reads the hidden states the wrapped
    forward returned, and its gradients are averaged like every other parameter's."""

    def reward(self, hidden, index):
        return self.module.reward(hidden, index)

    @property
    def lm_weight(self):  # the LM head, which the losses apply to the hidden states
        return self.module.lm_weight


def my_rows(dist: Dist, *tensors) -> list:
    """This rank's rows of each (B, ...) tensor of a global batch: rows rank, rank + world, ...
    (strided, so that every rank gets rows of similar fullness). One process: all of them."""
    if not dist.active:
        return list(tensors)
    return [t[dist.rank::dist.world].contiguous() for t in tensors]


def all_mean(values: dict, dist: Dist) -> dict:
    """Average floats over the ranks (for logging and the finite-loss check: every rank must
    see the same value and stop together)."""
    if not dist.active or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    if dist.backend == "nccl":
        t = t.cuda()
    torch.distributed.all_reduce(t)
    return {k: float(v) / dist.world for k, v in zip(keys, t.tolist())}


def broadcast_object(obj, dist: Dist):
    """Rank 0's `obj` on every rank (e.g. a tokenizer trained once)."""
    if not dist.active:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj, dist: Dist) -> list:
    if not dist.active:
        return [obj]
    out = [None] * dist.world
    torch.distributed.all_gather_object(out, obj)
    return out


def barrier(dist: Dist):
    if dist.active:
        torch.distributed.barrier()


def weights_digest(model) -> str:
    """sha256 over the bytes of every state-dict tensor, in order (model.pt and model.safetensors
    hold the same, and config.json records it as weights_sha256)."""
    return state_digest(model.state_dict())


def check_replicas(model, dist: Dist) -> list:
    """Every rank's weights digest; DDP keeps the replicas bit-identical, so a difference is a
    bug (raised, with a traceback)."""
    if not dist.active:
        return []
    digests = gather_objects(weights_digest(model), dist)
    if len(set(digests)) != 1:
        raise RuntimeError(f"the ranks' weights diverged: {digests}")
    return digests


def all_finite(model) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def debug_step_delay():
    """DPH_TEST_STEP_DELAY (seconds): sleep after each optimiser step. For tests only: it gives
    a SIGKILL time to land mid-run; the numbers are unaffected."""
    delay = float(os.environ.get("DPH_TEST_STEP_DELAY", "0") or 0)
    if delay > 0:
        time.sleep(delay)


# ----------------------------------------------------------------------------------------------
# --resume: the run's own config comes back with its state

# Flags that may differ from the run being resumed; any other flag given with --resume must equal
# the stored value (it would change the run). Unset flags are inherited from the stored run.
RESUME_MAY_CHANGE = {"out", "overwrite", "resume", "save_every", "eval_every", "eval_batches",
                     "eval_pairs", "device", "dtype", "compile", "attention", "data_dir",
                     "batch_size"}


def open_resume(cfg, argv=None):
    """--resume: -> (cfg, state). state is the stored training state (checkpoint.RESUME in --out) and
    cfg the stored config with the flags the user set on top; state None = start at step 0.

    No RESUME file: start from step 0 when --out holds no checkpoint (a run killed before its
    first save, or the first launch of a job that is requeued with the same command); an error
    when it holds a checkpoint without resume state (it would be overwritten)."""
    if not getattr(cfg, "resume", False):
        return cfg, None
    f = os.path.join(cfg.out, RESUME)
    if not os.path.exists(f):
        if os.path.exists(os.path.join(cfg.out, CONFIG)):
            raise UsageError(f"--resume: {cfg.out} holds a checkpoint but no {RESUME} to resume "
                             f"from; pass --overwrite to start again or --out to write elsewhere")
        print(f"note: --resume: no {RESUME} in {cfg.out}; starting at step 0", file=sys.stderr)
        return cfg, None
    state = load_train_state(f)
    saved, names = state["config"], {f.name for f in dataclasses.fields(cfg)}
    merged = {k: v for k, v in saved.items() if k in names}
    for name in sorted(explicit_flags(argv) & names):
        new = getattr(cfg, name)
        if name in RESUME_MAY_CHANGE:
            merged[name] = new
        elif name in saved and new != saved[name]:
            flag = "--" + name.replace("_", "-")
            raise UsageError(f"--resume: {flag} {new} differs from the run in {cfg.out} "
                             f"({flag} {saved[name]}); drop the flag, or start a new run")
    merged.update(out=cfg.out, resume=True)
    return type(cfg)(**merged), state


# ----------------------------------------------------------------------------------------------
# Optimisation


def lr_at(step: int, lr: float, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """Linear warmup to lr, then cosine decay to min_ratio * lr at `total` steps."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(groups: list, device) -> torch.optim.AdamW:
    """AdamW (β = 0.9, 0.95) over parameter groups [{"params": [...], "peak_lr": float}], fused on
    CUDA. Its own weight decay is off: the trainers decay toward anchors (losses.py)."""
    groups = [{"params": [p for p in g["params"] if p.requires_grad], "lr": g["peak_lr"],
               "peak_lr": g["peak_lr"]} for g in groups]
    kw = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=groups[0]["lr"], betas=(0.9, 0.95), weight_decay=0.0,
                             **kw)


# ----------------------------------------------------------------------------------------------
# Output directory and logging


def load_init(path: str, device="cpu"):
    """A checkpoint to start from (or to evaluate) -> (model, config dict, ChatTokenizer). Its
    tokenizer must be there, be the one saved with it, and fit the model's embedding table.
    A .gguf file or a Hugging Face model directory loads as a pretrained backbone (pretrained/);
    its config dict is {"pretrained": {format, path, architecture, name}}."""
    import pretrained
    if pretrained.is_pretrained(path):
        model, info, tok = pretrained.load_pretrained(path)
        return model.to(device), {"pretrained": info}, tok
    from tokenizer.chat import ChatTokenizer
    f = os.path.join(path, TOKENIZER)
    if os.path.isdir(path) and not os.path.isfile(f):
        raise CheckpointError(f"{f}: not found (a checkpoint carries its tokenizer)")
    model, config = load_checkpoint(path, device)
    want = config.get("tokenizer_sha256")
    if want is not None and os.path.isfile(f):
        import hashlib
        with open(f, "rb") as fh:
            if hashlib.sha256(fh.read()).hexdigest() != want:
                raise CheckpointError(f"{f}: not the tokenizer config.json was saved with")
    try:
        tok = ChatTokenizer.from_file(f)
    except Exception as e:  # the tokenizers library raises a bare Exception on bad JSON
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{f}: not a usable tokenizer ({first})") from None
    check_vocab(tok, model.cfg.vocab_size, f)
    return model, config, tok


RUN_FILES = ("metrics.jsonl", "resume.pt")  # besides the marker: what marks a previous run


def check_writable_dir(path: str, flag: str):
    """`path` is a directory, or can be made one: not a file, nothing in the way above it, and
    its nearest existing parent is writable. Writes nothing."""
    if not path:
        raise UsageError(f"{flag}: empty path")
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{flag} {path}: exists and is not a directory")
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UsageError(f"{flag} {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: {parent} is not writable")


def memory_bytes(device: torch.device) -> int:
    """What the device holds: a CUDA card's memory, else the machine's physical memory."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 2**62  # unknown: refuse nothing


def batch_bytes(mcfg, rows: int, length: int, backward: bool = True) -> int:
    """A lower bound on the memory of one forward (and backward) pass over `rows` rows of
    `length` tokens with a dense attention mask: the boolean masks attention_mask builds (three
    at its peak: at least 3 bytes per query-key pair; an attention kernel's additive copy comes
    on top) and the activations at 2 bytes each (bfloat16; float32 takes twice that), every
    layer's kept for the backward pass, one layer's without it."""
    layers = mcfg.n_layers if backward else 1
    acts = 2 * rows * length * layers * (8 * mcfg.d_model + 3 * mcfg.ffn_dim)
    return 3 * rows * length * length + acts


def check_fits(nbytes: int, device: torch.device, what: str, hint: str):
    """Refuse up front what cannot fit in the device's memory (an estimate, from below)."""
    total = memory_bytes(device)
    if nbytes > total:
        raise UsageError(f"{what} needs at least {nbytes / 2**30:,.1f} GiB, more than the "
                         f"{total / 2**30:,.1f} GiB of {device}; {hint}")


def check_fit(flag: str, value: int, dropped: dict):
    """Examples too long for `flag` are skipped. dropped: task -> (dropped, probed) over the
    first examples of each task. When more than half of a task's would be dropped that is an
    error (the flag is too small); when some would, a note."""
    for name, (n, of) in dropped.items():
        if 2 * n > of:
            raise UsageError(f"{flag} {value} is too small for {name}: {n} of its first {of} "
                             f"examples cannot fit their answers")
        if n:
            print(f"note: {name}: {n} of the first {of} examples do not fit in {flag} {value} "
                  f"and are skipped", file=sys.stderr)


def check_items_fit(mcfg, items: list, layout: str, rows: int, device, what: str, hint: str,
                    backward: bool = True):
    """`rows` items of the median length (prompt + answers as branches, or a padded row per
    answer) in one forward (and backward) pass must fit in the device: a lower bound."""
    if not items:
        return
    if layout == "shared":  # a row per item: the prompt once, then every branch
        lengths = sorted(len(it.prompt) + sum(map(len, it.branches)) for it in items)
    else:  # a row per answer
        lengths = sorted(len(it.prompt) + max(map(len, it.branches)) for it in items)
        rows *= min(len(it.branches) for it in items)
    check_fits(batch_bytes(mcfg, rows, lengths[len(lengths) // 2], backward), device, what, hint)


def check_out(path: str, overwrite: bool, marker: str = "config.json"):
    """Refuse a directory holding a previous run unless --overwrite; writes nothing, so the
    scripts call it before their other checks and prepare_out only once the input is good."""
    check_writable_dir(path, "--out")
    if any(os.path.exists(os.path.join(path, n)) for n in (marker, *RUN_FILES)) and not overwrite:
        raise UsageError(f"{path} holds a previous run; pass --overwrite to replace it "
                         f"or --out to write elsewhere")


def prepare_out(path: str, overwrite: bool, marker: str = "config.json", keep: bool = False):
    """Create the output directory. A previous run in it is refused unless --overwrite, which
    removes its marker (config.json: without it the rest is not a checkpoint), metrics and
    resume state. keep=True (--resume) keeps them. Temporary files of a killed writer go."""
    if not keep:
        check_out(path, overwrite, marker)
        for name in (marker, *RUN_FILES):
            if os.path.exists(os.path.join(path, name)):
                os.remove(os.path.join(path, name))
    os.makedirs(path, exist_ok=True)
    for tmp in glob.glob(os.path.join(path, ".tmp-*")):
        os.remove(tmp)


def write_text(path: str, text: str):
    """A results file, written atomically (plumbing/checkpoint.py: atomic_write)."""
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    atomic_write(path, write)


class MetricsLog:
    """metrics.jsonl: one JSON object per event, with step, split and time. `resume_step`: drop
    the records a resumed run will write again (steps from there on), keep the rest. `enabled`
    False (ranks other than 0) writes nothing."""

    def __init__(self, path: str, resume_step: int = None, enabled: bool = True):
        self.path, self.t0, self.enabled = path, time.time(), enabled
        if enabled and resume_step is not None and os.path.exists(path):
            with open(path) as f:
                keep = [line for line in f if line.strip()
                        and _keep_record(line, resume_step)]

            def write(tmp):
                with open(tmp, "w") as f:
                    f.writelines(keep)
            atomic_write(path, write)

    def log(self, step: int, split: str, **values):
        if not self.enabled:
            return None
        rec = {"step": step, "split": split, "time": round(time.time() - self.t0, 3)}
        rec.update({k: (float(v) if isinstance(v, (torch.Tensor, np.floating)) else v)
                    for k, v in values.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        return rec


def _keep_record(line: str, resume_step: int) -> bool:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError:  # a line cut short by a kill
        return False
    return rec.get("split") == "config" or rec.get("step", 0) < resume_step


def load_split(specs, split: str, data_dir: str, seed: int, kinds=None, limit: int = 0,
               required: bool = True) -> dict:
    """Examples of each task for a split: {task name: [examples]}. `kinds` filters task kinds.
    A task that lacks the split (e.g. a dataset distributed without a train set) is skipped with
    a note; if every task lacks it, that is an error when `required`."""
    from tasks import MissingSplit, TaskError
    out, missing = {}, []
    for spec in specs:
        if kinds is not None and spec.kind not in kinds:
            continue
        try:
            exs = spec.load(split, seed=seed, data_dir=data_dir or None)
        except MissingSplit as e:
            missing.append(spec.name)
            print(f"note: skipping {spec.name} for {split}: {e}", file=sys.stderr)
            continue
        if not exs:
            raise TaskError(f"{spec.name}: the {split} split is empty")
        out[spec.name] = exs[:limit] if limit else exs
    if not out and required:
        raise TaskError(f"no {split} data for {', '.join(missing) or 'the selected tasks'}")
    return out


def trained_only(val: dict, train: dict) -> dict:
    """The validation examples of the tasks being trained on: the validation loss (SFT) and the
    validation reward accuracy (DPH) measure held-out data of the training tasks. A task with a
    validation split but no train split (e.g. BoolQ or PIQA in some copies) is left to
    evaluate.py, which scores it zero-shot; mixing it in would hide the training curve."""
    left = sorted(set(val) - set(train))
    if left:
        print(f"note: {', '.join(left)}: not trained here, so not in the validation metrics "
              "(evaluate.py scores them)", file=sys.stderr)
    return {k: v for k, v in val.items() if k in train}




# ----------------------------------------------------------------------------------------------
# The run both trainers share


@dataclasses.dataclass
class RunConfig:
    """The flags both training scripts have; each script's config adds its own and may give
    these other defaults."""
    out: str = opt("out/run", "output checkpoint directory")
    overwrite: bool = opt(False, "replace a previous run in --out")
    data_dir: str = opt("", "folder with real datasets (default: $DPH_DATA)")
    data_seed: int = opt(0, "seed of the built-in suite's generator")
    label_noise: float = opt(0.0, "fraction of training labels flipped (robustness experiment)")
    max_examples: int = opt(0, "use at most this many training examples per task (0: all)")
    batch_size: int = opt(16, "examples per micro-batch")
    grad_accum: int = opt(1, "micro-batches per optimiser step")
    max_steps: int = opt(300, "optimiser steps")
    lr: float = opt(1e-3, "peak learning rate")
    min_lr_ratio: float = opt(0.1, "final learning rate / peak")
    warmup_steps: int = opt(20, "linear warmup steps")
    prior_decay: float = opt(0.5, "decay toward the starting weights (prior regularisation)")
    grad_clip: float = opt(1.0, "clip the gradient norm (0: off)")
    eval_every: int = opt(100, "steps between validations")
    seed: int = opt(0, "seed for initialisation and data order")
    device: str = opt("auto", "auto | cpu | cuda | mps")
    dtype: str = opt("auto", "auto | float32 | bfloat16 | float16 (autocast)")
    compile: bool = opt(False, "torch.compile the model")
    attention: str = opt("sdpa", "kernel for masked batches: sdpa (dense mask) | flex "
                                 "(FlexAttention, skips hidden blocks; CUDA, no attention dropout)",
                         choices=["sdpa", "flex"])
    save_every: int = opt(100, "steps between resumable checkpoints in --out (0: at the end only)")
    resume: bool = opt(False, "continue the run in --out from its last checkpoint; unset flags "
                              "come from that run (starts at step 0 if there is none yet)")


# The interval of every int and float flag of RunConfig (check_ranges; "max" = 2**63 - 1).
# Upper bounds on sizes stop what no machine could hold before any work; decays move θ by lr·λ
# of its distance to the anchor per step, and λ beyond 1e3 only diverges.
RUN_RANGES = {
    "data_seed": "[0, max]", "seed": "[0, max]", "label_noise": "[0, 1]",
    "max_examples": "[0, max]", "batch_size": "[1, 1048576]", "grad_accum": "[1, 1048576]",
    "max_steps": "[1, 1000000000]", "warmup_steps": "[0, 1000000000]", "lr": "(0, inf)",
    "min_lr_ratio": "[0, 1]", "prior_decay": "[0, 1000]", "grad_clip": "[0, inf)",
    "eval_every": "[1, max]", "save_every": "[0, max]",
}


def open_run(cls, description: str, validate, argv=None, added: dict = None) -> "Run":
    """Flags -> a Run whose input is checked and nothing written yet. --resume brings back the
    stored config and training state; `added`: {flag field: the value a run stored before that
    flag existed effectively used}."""
    cfg, _ = parse_config(cls, description, argv)
    cfg, state = open_resume(cfg, argv)
    for name, value in (added or {}).items():
        if state is not None and name not in state["config"]:
            cfg = dataclasses.replace(cfg, **{name: value})
    validate(cfg, argv)
    dist, device = init_distributed(cfg.device)
    if cfg.attention == "flex" and torch.device(device).type != "cuda":
        raise UsageError(f"--attention flex: FlexAttention trains on CUDA only (PyTorch has no "
                         f"backward for it on {torch.device(device).type}); use --attention sdpa")
    seed_everything(cfg.seed)
    dtype = resolve_dtype(cfg.dtype, device)
    check_out(cfg.out, cfg.overwrite or cfg.resume)  # nothing is written before the input is
    run = Run(cfg, state, dist, device, dtype)       # checked; then rank 0 alone writes
    if state is not None and state["global_batch"] != run.global_batch:
        raise UsageError(f"--resume: {dist.world} process(es) x --batch-size {cfg.batch_size} is "
                         f"not the global batch {state['global_batch']} of the run in {cfg.out}")
    return run


class Run:
    """One training run: config, devices, the stored state of a resumed run, and the loop.

        run = open_run(...)          flags checked, nothing written
        run.resumed_model()          --resume: the run's own tokenizer, shape, starting weights
        run.begin(model, opt, ...)   restore the training state, DDP / compile, prepare --out
        run.loop(micro_step, ...)    optimise; validate and save on schedule
    """

    def __init__(self, cfg, state, dist: Dist, device, dtype):
        self.cfg, self.state, self.dist, self.device, self.dtype = cfg, state, dist, device, dtype
        self.global_batch = dist.world * cfg.batch_size
        self.start = state["step"] if state is not None else 0
        self.seconds_before = state["seconds"] if state is not None else 0.0
        self.last_saved = self.start if state is not None else None
        self.t_start = time.time()

    def resumed_model(self):
        """--resume: (model at its starting weights, tokenizer) as the run stored them."""
        from model import DPHModel, ModelConfig
        from tokenizer.chat import ChatTokenizer
        s = self.state
        tok = ChatTokenizer.from_json(s["tokenizer"])
        model = DPHModel(ModelConfig.from_dict(s["model_config"]), head=s.get("head"))
        if s["init"] is not None:
            model.load_state_dict(s["init"])
        print(f"resuming {self.cfg.out} at step {s['step']} of {self.cfg.max_steps}")
        return model, tok

    def announce(self, model, what: str, unit: str):
        """The config and a line on the model, the data, the device and the processes."""
        print_config(self.cfg, "config")
        dist = self.dist
        print(f"model: {model.describe()}; {what}; device {self.device}, {self.dtype}" + (
            f"; {dist.world} processes ({dist.backend}), global batch {self.global_batch} {unit}"
            if dist.active else ""))

    def begin(self, model, optimizer, tok, init_weights, payload):
        """Restore model, optimiser and RNGs of a resumed run; per-rank seeds; the DDP wrapper
        (and torch.compile); rank 0 prepares --out and opens metrics.jsonl. `payload(done)` ->
        (stage state for resume.pt, summary, config.json extras) when a checkpoint is saved.
        Returns (forward module, module for rank-0 validation)."""
        cfg, dist, state = self.cfg, self.dist, self.state
        self.model, self.optimizer, self.tok, self.init_weights = model, optimizer, tok, init_weights
        self.payload = payload
        self.peak_lrs = [g["lr"] for g in optimizer.param_groups]
        if state is not None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            set_rng_state(state["rng"][dist.rank % len(state["rng"])], self.device)
        elif dist.active:
            torch.manual_seed(cfg.seed + 7919 * dist.rank)  # dropout masks differ between ranks
        self.ddp = wrap_ddp(model, dist, self.device)
        fwd = torch.compile(self.ddp) if cfg.compile else self.ddp
        val_fwd = model if dist.active else fwd  # validation runs on rank 0 alone, outside DDP
        barrier(dist)  # every rank has checked its input; now rank 0 writes
        if dist.main:
            prepare_out(cfg.out, cfg.overwrite or cfg.resume, keep=state is not None)
        self.log = MetricsLog(os.path.join(cfg.out, "metrics.jsonl"),
                              resume_step=self.start if state is not None else None,
                              enabled=dist.main)
        self.log.log(self.start, "config" if state is None else "resume",
                     **dataclasses.asdict(cfg))
        return fwd, val_fwd

    def seconds(self) -> float:
        return self.seconds_before + time.time() - self.t_start

    def kept(self) -> str:
        return (f"; {self.cfg.out} keeps the checkpoint of step {self.last_saved}"
                if self.last_saved else "; no checkpoint was saved")

    def sync(self, last: bool):
        """DDP averages gradients on the last micro-batch of a step only."""
        return contextlib.nullcontext() if last or not self.dist.active else self.ddp.no_sync()

    def save(self, done: int):
        """resume.pt first (complete or absent), then model.pt, model.safetensors,
        tokenizer.json, config.json."""
        model, dist = self.model, self.dist
        if not all_finite(model):
            raise FloatingPointError(f"non-finite weights after step {done}; stopped" + self.kept())
        digests = check_replicas(model, dist)
        rngs = gather_objects(rng_state(self.device), dist)
        if not dist.main:
            return
        stage_state, summary, extra = self.payload(done)
        save_train_state(self.cfg.out, {
            "stage": extra["stage"], "step": done, "config": dataclasses.asdict(self.cfg),
            "world_size": dist.world, "global_batch": self.global_batch,
            "model_config": dataclasses.asdict(model.cfg), "model": model.state_dict(),
            "init": self.init_weights, "optimizer": self.optimizer.state_dict(), "rng": rngs,
            "tokenizer": self.tok.to_json(), "seconds": self.seconds(), **stage_state})
        extra[extra["stage"]].update(steps=done, seconds=round(self.seconds(), 1), **summary)
        if dist.active:
            extra["distributed"] = {"world_size": dist.world, "backend": dist.backend,
                                    "replica_sha256": digests}
        save_checkpoint(self.cfg.out, model, self.tok.to_json(), extra=extra)
        self.last_saved = done

    def loop(self, micro_step, decay, *, desc: str, postfix, after_step=None, log_extra=None):
        """Optimise from the start step to --max-steps. Each step: the scheduled LR (linear
        warmup, cosine decay) in every parameter group; --grad-accum calls of micro_step(last),
        each a forward and backward returning float metrics with "loss"; their mean over the
        ranks (a non-finite loss stops the run); clipping; the optimiser step; decay(scale),
        the prior regularisation at the scheduled LR. Then logging, after_step(step, done)
        (validation) and the scheduled checkpoints; log_extra() adds to the training log."""
        cfg, model = self.cfg, self.model
        bar = tqdm(range(self.start, cfg.max_steps), desc=desc, dynamic_ncols=True,
                   initial=self.start, total=cfg.max_steps, disable=not self.dist.main)
        self.t_start = time.time()
        try:
            for step in bar:
                scale = lr_at(step, 1.0, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
                for g, peak in zip(self.optimizer.param_groups, self.peak_lrs):
                    g["lr"] = peak * scale
                agg = {}
                for micro in range(cfg.grad_accum):
                    for k, x in micro_step(micro == cfg.grad_accum - 1).items():
                        agg[k] = agg.get(k, 0.0) + float(x) / cfg.grad_accum
                agg = all_mean(agg, self.dist)
                if not math.isfinite(agg["loss"]):
                    raise FloatingPointError(f"non-finite training loss ({agg['loss']}) at step "
                                             f"{step + 1}; stopped" + self.kept())
                gnorm = torch.nn.utils.clip_grad_norm_(
                    [p for p in model.parameters() if p.requires_grad],
                    cfg.grad_clip or float("inf"))
                self.optimizer.step()
                decay(scale)
                self.optimizer.zero_grad(set_to_none=True)
                done = step + 1
                bar.set_postfix(**postfix(agg))
                if step % 10 == 0 or done == cfg.max_steps:
                    self.log.log(step, "train", grad_norm=float(gnorm), lr=cfg.lr * scale, **agg,
                                 **(log_extra() if log_extra is not None else {}))
                if after_step is not None:
                    after_step(step, done)
                if done == cfg.max_steps or (cfg.save_every and done % cfg.save_every == 0):
                    self.save(done)
                debug_step_delay()
        finally:
            bar.close()
        if self.start == cfg.max_steps:  # resumed a finished run: write the checkpoint again
            self.save(cfg.max_steps)
