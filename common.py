"""What the three scripts share: flags from a config dataclass, device and dtype, seeding, the
learning-rate schedule, the paper's prior regularisation, logging and clean one-line errors, and
the reliability pieces of the training scripts: torchrun/DDP set-up, resumable training state
(RNG states, --resume config inheritance) and the output directory's life cycle.

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


def _one_line_error(msg: str, status: int):
    if is_main_process():  # every rank sees the same input and fails alike: say it once
        print(f"error: {' '.join(str(msg).split())}", file=sys.stderr)
    sys.exit(status)


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


def run_main(main):
    """Run a script's main(). User-facing errors become one line on stderr: bad flags or input
    (and unreadable paths) exit with status 2, a diverged run (FloatingPointError) with 3. Any
    other exception is a bug and keeps its traceback. A torchrun process group is torn down."""
    from checkpoint import CheckpointError
    from tasks import TaskError
    try:
        status = main()
    except (UsageError, TaskError, CheckpointError, FileNotFoundError, PermissionError,
            IsADirectoryError, NotADirectoryError) as e:
        msg = f"{e.filename}: {e.strerror or 'not found'}" \
            if isinstance(e, OSError) and e.filename and e.strerror else str(e)
        _one_line_error(msg, EXIT_USAGE)
    except FloatingPointError as e:
        _one_line_error(str(e), EXIT_DIVERGED)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    sys.exit(status)


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
    """sha256 over the bytes of every state-dict tensor, in order (model.pt holds the same, and
    config.json records it as weights_sha256)."""
    from checkpoint import state_digest
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
                     "eval_pairs", "device", "dtype", "compile", "data_dir", "batch_size"}


def open_resume(cfg, argv=None):
    """--resume: -> (cfg, state). state is the stored training state (checkpoint.RESUME in --out) and
    cfg the stored config with the flags the user set on top; state None = start at step 0.

    No RESUME file: start from step 0 when --out holds no checkpoint (a run killed before its
    first save, or the first launch of a job that is requeued with the same command); an error
    when it holds a checkpoint without resume state (it would be overwritten)."""
    from checkpoint import CONFIG, RESUME, load_train_state
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


class PriorRegularizer:
    """Decoupled weight decay toward the weights a stage started from (the paper's prior regularisation; the authors' code):
    θ ← θ − lr·λ·(θ − θ₀) after each optimiser step. Parameters with no prior (a new head) decay
    toward zero with their own λ. Embeddings, norms and biases are excluded."""

    def __init__(self, named_params, prior_decay: float, zero_decay: float = 0.0,
                 no_prior: tuple = ()):
        self.groups = []  # (param, anchor or None, λ)
        for name, p in named_params:
            if not p.requires_grad or p.dim() < 2 or "embed" in name:
                continue
            if any(name.startswith(prefix) for prefix in no_prior):
                if zero_decay > 0:
                    self.groups.append((p, None, zero_decay))
            elif prior_decay > 0:
                self.groups.append((p, p.detach().clone(), prior_decay))

    @torch.no_grad()
    def step(self, lr: float, zero_lr: float = None):
        """lr: the current learning rate of the anchored parameters; zero_lr: of the others."""
        zero_lr = lr if zero_lr is None else zero_lr
        for p, anchor, lam in self.groups:
            if anchor is None:
                p.mul_(1 - zero_lr * lam)
            else:
                p.sub_(p - anchor, alpha=lr * lam)


def make_optimizer(params, lr, betas=(0.9, 0.95), device=None):
    params = [p for p in params if p.requires_grad]
    kw = {"fused": True} if device is not None and device.type == "cuda" else {}
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=0.0, **kw)


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
    from chat_tokenizer import ChatTokenizer
    from checkpoint import TOKENIZER, CheckpointError, load_checkpoint
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


def check_vocab(tok, vocab_size: int, where: str):
    """A token id past the embedding table would index out of range mid-run: refuse up front."""
    from checkpoint import CheckpointError
    if len(tok) > vocab_size:
        raise CheckpointError(f"{where}: {len(tok)} tokens, but the model has {vocab_size} "
                              f"embedding rows (a tokenizer of another model?)")


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
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(keep)
            os.replace(tmp, path)

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


def check_finite(loss: torch.Tensor, step: int):
    if not torch.isfinite(loss).all():
        raise FloatingPointError(f"non-finite loss {float(loss)} at step {step}")


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


def start_run(model, cfg, dist, device, state, start: int):
    """What both training scripts do once their inputs are checked: per-rank seeds, the DDP
    wrapper (and torch.compile), then rank 0 alone prepares --out and opens metrics.jsonl.
    Returns (DDP module, forward module, module for rank-0 validation, MetricsLog)."""
    if state is None and dist.active:
        torch.manual_seed(cfg.seed + 7919 * dist.rank)  # dropout masks differ between ranks
    ddp = wrap_ddp(model, dist, device)
    fwd = torch.compile(ddp) if cfg.compile else ddp
    val_fwd = model if dist.active else fwd  # validation runs on rank 0 alone, outside DDP
    barrier(dist)  # every rank has checked its input; now rank 0 writes
    if dist.main:
        prepare_out(cfg.out, cfg.overwrite or cfg.resume, keep=state is not None)
    log = MetricsLog(os.path.join(cfg.out, "metrics.jsonl"),
                     resume_step=start if state is not None else None, enabled=dist.main)
    log.log(start, "config" if state is None else "resume", **dataclasses.asdict(cfg))
    return ddp, fwd, val_fwd, log
