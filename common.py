"""What the three scripts share: flags from a config dataclass, device and dtype, seeding, the
learning-rate schedule, prior regularisation (SPEC §3), logging and clean one-line errors."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
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


def build_parser(cls, description: str) -> argparse.ArgumentParser:
    """argparse flags generated from a config dataclass: field foo_bar -> --foo-bar."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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


def explicit_flags(argv=None) -> set:
    """Config field names the user set on the command line (so inherited values yield to them)."""
    argv = sys.argv[1:] if argv is None else argv
    return {a[2:].split("=")[0].replace("-", "_").removeprefix("no_") for a in argv
            if a.startswith("--")}


def print_config(cfg, title: str):
    print(f"{title}: " + json.dumps(dataclasses.asdict(cfg), indent=None, sort_keys=False))


def run_main(main):
    """Run a script's main(); user-facing errors become one line on stderr and exit status 2."""
    from model import CheckpointError
    from tasks import TaskError
    try:
        sys.exit(main())
    except (UsageError, TaskError, CheckpointError, FileNotFoundError) as e:
        msg = str(e) if not isinstance(e, FileNotFoundError) or not e.filename else \
            f"{e.filename}: {e.strerror or 'not found'}"
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


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
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    return torch.device(name)


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


# ----------------------------------------------------------------------------------------------
# Optimisation


def lr_at(step: int, lr: float, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """Linear warmup to lr, then cosine decay to min_ratio * lr at `total` steps."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class PriorRegularizer:
    """Decoupled weight decay toward the weights a stage started from (SPEC §3, authors' code):
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


def prepare_out(path: str, overwrite: bool, marker: str = "config.json"):
    """Refuse to write into a directory holding a previous run unless --overwrite."""
    if os.path.exists(os.path.join(path, marker)) or os.path.exists(os.path.join(path, "metrics.jsonl")):
        if not overwrite:
            raise UsageError(f"{path} holds a previous run; pass --overwrite to replace it "
                             f"or --out to write elsewhere")
        for name in ("metrics.jsonl", marker):
            if os.path.exists(os.path.join(path, name)):
                os.remove(os.path.join(path, name))
    os.makedirs(path, exist_ok=True)


class MetricsLog:
    """metrics.jsonl: one JSON object per event, with step, split and time."""

    def __init__(self, path: str):
        self.path, self.t0 = path, time.time()

    def log(self, step: int, split: str, **values):
        rec = {"step": step, "split": split, "time": round(time.time() - self.t0, 3)}
        rec.update({k: (float(v) if isinstance(v, (torch.Tensor, np.floating)) else v)
                    for k, v in values.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        return rec


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
