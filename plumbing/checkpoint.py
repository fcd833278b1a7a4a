"""Checkpoint files: a directory with model.safetensors and model.pt (the same tensors, twice),
config.json and tokenizer.json, and resume.pt beside them while a run is in progress.

    save_checkpoint, load_checkpoint
                              the weights (from the uncompiled module) as model.pt and as
                              model.safetensors (which other tools read), config.json (shape,
                              head, the stages' settings, sha256 of the weights and tokenizer)
                              and tokenizer.json, each written atomically; loading checks all
                              of them
    save_train_state, load_train_state
                              resume.pt: everything --resume needs, in one file
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
from dataclasses import asdict, fields
from typing import Optional

import torch

from model import DPHModel, ModelConfig
from pretrained.safetensors import load_file, save_file

WEIGHTS, CONFIG, TOKENIZER = "model.pt", "config.json", "tokenizer.json"
SAFETENSORS = "model.safetensors"  # the same tensors as model.pt; read first when present
WEIGHT_FILES = (SAFETENSORS, WEIGHTS)
RESUME = "resume.pt"  # the training state of a run in progress (train_sft.py / train_dph.py)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file."""


def atomic_write(path, write):
    """write(tmp) fills a temporary file beside `path`, which then replaces `path` in one rename:
    a kill leaves the old file or the new one, never a part. Mode 0644 (what open() gives)."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    try:
        umask = os.umask(0)  # mkstemp makes 0600: give the file the mode open() would (0644)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def safe_load(f):
    """torch.load(weights_only=True) on the CPU: a pickle carrying code is refused. A missing,
    corrupt or unsafe file is a CheckpointError naming it."""
    if not os.path.isfile(f):
        raise CheckpointError(f"{f}: not found")
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file or a pickle that is not plain tensors
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{f}: cannot be loaded safely ({first})") from None


def save_checkpoint(path, model: DPHModel, tokenizer_json: Optional[str] = None,
                    extra: Optional[dict] = None):
    """Write model weights (from the uncompiled module) as model.pt and model.safetensors,
    tokenizer.json and config.json into the directory `path`, each file atomically (a temporary
    file, then os.replace). config.json goes last: a directory with a config.json holds a
    complete checkpoint. `extra` (plain JSON) is stored in config.json.

    The checkpoint is atomic as a whole too: config.json records the sha256 of the weights (and
    of the tokenizer), and load_checkpoint refuses weights that are not the ones its config.json
    was written with (a kill between the renames leaves new weights beside an old config)."""
    os.makedirs(path, exist_ok=True)
    raw = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    raw = getattr(raw, "module", raw)  # DistributedDataParallel wrapper
    state = {k: v.detach().cpu().clone() for k, v in raw.state_dict().items()}
    config = {"model": asdict(raw.cfg), "head": raw.head_cfg, **(extra or {}),
              "weights_sha256": state_digest(state)}
    if tokenizer_json is not None:
        config["tokenizer_sha256"] = hashlib.sha256(tokenizer_json.encode()).hexdigest()
    atomic_write(os.path.join(path, WEIGHTS), lambda p: torch.save(state, p))
    save_file(state, os.path.join(path, SAFETENSORS), metadata={"format": "pt"})
    if tokenizer_json is not None:
        def write_tokenizer(p):
            with open(p, "w") as f:
                f.write(tokenizer_json)
        atomic_write(os.path.join(path, TOKENIZER), write_tokenizer)

    def write_config(p):
        with open(p, "w") as f:
            json.dump(config, f, indent=2)
            f.write("\n")
    atomic_write(os.path.join(path, CONFIG), write_config)


def state_digest(state: dict) -> str:
    """sha256 over the bytes of every tensor of a state dict, in order."""
    h = hashlib.sha256()
    for v in state.values():
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def read_config(path) -> dict:
    f = os.path.join(path, CONFIG)
    if not os.path.isfile(f):
        raise CheckpointError(f"{f}: not found (is {path} a checkpoint directory?)")
    try:
        with open(f) as fh:
            return json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f}: not valid JSON ({e})") from None


def _check_model_config(cfg: "ModelConfig"):
    """Plausible values for every field (by its declared type): positive ints, finite floats,
    real booleans; a shape that cannot be built is refused before anything is allocated."""
    for f in fields(cfg):
        v, kind = getattr(cfg, f.name), str(f.type)
        if kind == "bool" and not isinstance(v, bool):
            raise ValueError(f"{f.name} must be true or false, got {v!r}")
        if kind in ("int", "Optional[int]") and not (v is None and kind != "int") and (
                not isinstance(v, int) or isinstance(v, bool) or v <= 0):
            raise ValueError(f"{f.name} must be a positive integer, got {v!r}")
        if kind == "float" and (not isinstance(v, (int, float)) or isinstance(v, bool)
                                or not math.isfinite(v) or v < 0):
            raise ValueError(f"{f.name} must be a finite number >= 0, got {v!r}")
    if not cfg.dropout < 1 or not cfg.attn_dropout < 1 or not cfg.rope_theta > 0:
        raise ValueError(f"dropout {cfg.dropout} and attn_dropout {cfg.attn_dropout} must be "
                         f"below 1 and rope_theta {cfg.rope_theta} positive")
    if cfg.max_seq_len > 2**21:  # its RoPE table is built whatever the weights say
        raise ValueError(f"max_seq_len {cfg.max_seq_len} is beyond 2**21 positions")


def _check_head_config(head):
    if head is None:
        return
    if not isinstance(head, dict):
        raise ValueError(f"'head' must be an object like {{\"pooler\": \"swiglu\"}}, got {head!r}")
    p = head.get("dropout", 0.0)
    if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0 <= p < 1:
        raise ValueError(f"head dropout must be in [0, 1), got {p!r}")
    d = head.get("ffn_dim")
    if d is not None and (not isinstance(d, int) or isinstance(d, bool) or d <= 0):
        raise ValueError(f"head ffn_dim must be a positive integer, got {d!r}")


def load_checkpoint(path, device="cpu") -> tuple:
    """Rebuild the exact model saved in `path`. Returns (model, config dict). The weights come
    from model.safetensors, or from model.pt in a checkpoint that has no model.safetensors (one
    written before it existed); model.pt is read with torch.load(weights_only=True): a pickle
    carrying code is refused. Everything that can be wrong with a checkpoint is a
    CheckpointError naming the file: a config.json that does not describe a model (the shapes
    are tried on the meta device first, so nothing big is allocated for a bogus one), weights
    of another shape, weights that are not the ones config.json was saved with (its
    weights_sha256), or non-finite weights.

    When both weight files are there, both are checked, and they must hold the same tensors:
    a checkpoint whose two copies of the weights disagree (one of them replaced, edited or cut
    short) is refused rather than loaded from whichever copy happens to be read."""
    config = read_config(path)
    cf = os.path.join(path, CONFIG)
    if not isinstance(config, dict):
        raise CheckpointError(f"{cf}: not a checkpoint config (a JSON object)")
    try:
        if not isinstance(config.get("model"), dict):
            raise ValueError("no 'model' object")
        cfg = ModelConfig.from_dict(config["model"])
        _check_model_config(cfg)
        _check_head_config(config.get("head"))
        # a big model's shapes come from the meta device (nothing allocated; ~2 s to set up),
        # a small one is simply built (the common case: a few ms)
        head = config.get("head") or {}
        hffn = head.get("ffn_dim") or cfg.ffn_dim
        numel = (2 * cfg.vocab_size * cfg.d_model + cfg.max_seq_len * cfg.d_model + cfg.n_layers
                 * (4 * cfg.d_model ** 2 + 3 * cfg.d_model * cfg.ffn_dim) + 3 * cfg.d_model * hffn)
        with torch.device("meta") if numel > 2**27 else contextlib.nullcontext():
            built = DPHModel(cfg, head=config.get("head"))
        shapes = {k: v.shape for k, v in built.state_dict().items()}
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{cf}: bad model config ({first})") from None
    st, pt = os.path.join(path, SAFETENSORS), os.path.join(path, WEIGHTS)
    want = config.get("weights_sha256")
    if not os.path.isfile(st) and not os.path.isfile(pt):
        raise CheckpointError(f"{st}: not found (nor {WEIGHTS})")
    if not os.path.isfile(st):  # a checkpoint written before model.safetensors existed
        f, state = pt, _read_weights(pt, shapes, want)
    else:
        other = None
        if os.path.isfile(pt):  # checked first and let go: one copy in memory at a time
            checked = _read_weights(pt, shapes, want)
            other = state_digest(checked) if want is None else None
            del checked
        f, state = st, _read_weights(st, shapes, want)
        if other is not None and state_digest(state) != other:
            raise CheckpointError(f"{st}: not the same weights as {WEIGHTS} beside it (and "
                                  f"{CONFIG} records no weights_sha256 to tell which is right)")
    model = built if built.lm.embed.weight.device.type != "meta" else \
        DPHModel(cfg, head=config.get("head"))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{f}: does not match {CONFIG} ({str(e).splitlines()[0]})") from None
    return model.to(device), config


def _read_weights(f, shapes: dict, want) -> dict:
    """The state dict in model.pt or model.safetensors `f` (in the file's order, which the digest
    is taken in), checked against `shapes` (the model config.json describes): every tensor there
    with its shape, the sha256 `want` (when config.json records one), finite values."""
    if f.endswith(".safetensors"):
        if not os.path.isfile(f):
            raise CheckpointError(f"{f}: not found")
        try:
            state = load_file(f, keep_dtype=True)
        except Exception as e:  # a truncated or corrupt file
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{f}: cannot be read as safetensors ({first})") from None
    else:
        state = safe_load(f)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                              for v in state.values()):
        raise CheckpointError(f"{f}: expected a dict of tensors")
    state = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in state.items()}
    bad = sorted(set(shapes) ^ set(state)) or [k for k in shapes if state[k].shape != shapes[k]]
    if bad:
        k = bad[0]
        what = (f"{k}: {tuple(state[k].shape)} in the file, {tuple(shapes[k])} in {CONFIG}"
                if k in state and k in shapes else f"{k} is only in "
                f"{'the file' if k in state else CONFIG}")
        raise CheckpointError(f"{f}: does not match {CONFIG} ({len(bad)} tensor(s) differ; "
                              f"{what})")
    if want is not None and state_digest(state) != want:
        raise CheckpointError(f"{f}: not the weights {CONFIG} was saved with (a save cut short "
                              f"between the two files?); --resume the run to write them again")
    nonfinite = [k for k, v in state.items() if v.is_floating_point() and
                 not bool(torch.isfinite(v).all())]
    if nonfinite:
        raise CheckpointError(f"{f}: non-finite weights (NaN or inf) in {len(nonfinite)} "
                              f"tensor(s), e.g. {nonfinite[0]}")
    return state


def check_vocab(tok, vocab_size: int, where: str):
    """A token id past the embedding table would index out of range mid-run: refuse up front."""
    if len(tok) > vocab_size:
        raise CheckpointError(f"{where}: {len(tok)} tokens, but the model has {vocab_size} "
                              f"embedding rows (a tokenizer of another model?)")


def save_train_state(path, state: dict):
    """Write `state` (tensors and plain Python types only) to path/resume.pt in one atomic
    replace: a kill leaves the previous resume.pt or the new one, never a mix of steps."""
    os.makedirs(path, exist_ok=True)
    atomic_write(os.path.join(path, RESUME), lambda p: torch.save(state, p))


def load_train_state(f) -> dict:
    """Read a resume.pt with torch.load(weights_only=True): a pickle carrying code is refused."""
    state = safe_load(f)
    need = ("step", "config", "model", "optimizer")
    if not isinstance(state, dict) or any(k not in state for k in need):
        raise CheckpointError(f"{f}: not a training state (expected keys {', '.join(need)})")
    return state
