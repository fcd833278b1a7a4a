"""Stage 1: supervised fine-tuning (the paper's SFT stage of its three-stage pipeline).

The model learns to answer every task in the mixture: token cross-entropy on the assistant content
and its <|im_end|> only, over conversations packed into rows of seq_len with a block-diagonal
mask and restarted positions. From scratch it first trains a byte-level BPE on the training text;
with --init it continues from a checkpoint (e.g. a model pretrained on --tasks text:corpus.txt)
and pulls the weights toward that starting point (prior regularisation, λ = --prior-decay).

    python train_sft.py                       # built-in suite, `small` preset, writes out/sft
    python train_sft.py --preset tiny --max-steps 50 --out /tmp/sft
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

import common
from common import UsageError, opt
from chat_tokenizer import SPECIALS, ChatTokenizer, training_text
from data import IGNORE, PackedBatch, SFTStream, apply_label_noise, sft_document
from losses import sft_loss
from checkpoint import save_checkpoint, save_train_state
from model import DPHModel, ModelConfig, padded_vocab, preset
from tasks import TextExample, resolve_tasks


@dataclass
class SFTConfig:
    tasks: str = opt("builtin", "comma-separated tasks and mixtures (see README)")
    data_dir: str = opt("", "folder with real datasets (default: $DPH_DATA)")
    data_seed: int = opt(0, "seed of the built-in suite's generator")
    out: str = opt("out/sft", "output checkpoint directory")
    init: str = opt("", "start from this checkpoint, a .gguf file or a Hugging Face model "
                           "directory instead of from scratch")
    overwrite: bool = opt(False, "replace a previous run in --out")
    preset: str = opt("small", "model shape", ["tiny", "small", "base", "paper"])
    tokenizer: str = opt("", "tokenizer.json, or a folder with GPT-2's encoder.json + vocab.bpe; "
                             "default: train a byte-level BPE on the training text")
    vocab_size: int = opt(8192, "vocabulary size of a newly trained BPE")
    seq_len: int = opt(256, "tokens per packed row")
    batch_size: int = opt(16, "rows per micro-batch")
    grad_accum: int = opt(1, "micro-batches per optimiser step")
    max_steps: int = opt(300, "optimiser steps")
    lr: float = opt(2e-3, "peak learning rate")
    min_lr_ratio: float = opt(0.1, "final learning rate / peak")
    warmup_steps: int = opt(20, "linear warmup steps")
    weight_decay: float = opt(0.1, "decay toward zero when training from scratch")
    prior_decay: float = opt(0.5, "decay toward the --init weights (prior regularisation)")
    grad_clip: float = opt(1.0, "clip the gradient norm (0: off)")
    kshot: int = opt(5, "distinct examples of one task per conversation (the paper: 5)")
    proportional: bool = opt(False, "sample tasks in proportion to their size (default uniform)")
    label_noise: float = opt(0.0, "fraction of training labels flipped (robustness experiment)")
    max_examples: int = opt(0, "use at most this many training examples per task (0: all)")
    eval_every: int = opt(100, "steps between validation losses")
    eval_batches: int = opt(4, "validation batches per evaluation")
    dropout: float = opt(0.0, "dropout in the backbone")
    seed: int = opt(0, "seed for initialisation and data order")
    device: str = opt("auto", "auto | cpu | cuda | mps")
    dtype: str = opt("auto", "auto | float32 | bfloat16 | float16 (autocast)")
    compile: bool = opt(False, "torch.compile the model")
    save_every: int = opt(100, "steps between resumable checkpoints in --out (0: at the end only)")
    resume: bool = opt(False, "continue the run in --out from its last checkpoint; unset flags "
                              "come from that run (starts at step 0 if there is none yet)")


# The interval of every int and float flag (common.check_ranges; "max" = 2**63 - 1). Upper
# bounds on sizes stop what no machine could hold before any work; the memory of one micro-batch
# is checked against the device once the model's shape is known.
RANGES = {
    "data_seed": "[0, max]", "seed": "[0, max]",
    "vocab_size": f"[{256 + len(SPECIALS)}, 1048576]",  # at least the bytes and the specials
    "seq_len": "[32, 1048576]", "batch_size": "[1, 1048576]", "grad_accum": "[1, 1048576]",
    "max_steps": "[1, 1000000000]", "warmup_steps": "[0, 1000000000]",
    "lr": "(0, inf)", "min_lr_ratio": "[0, 1]",
    # decays: θ moves by lr·λ of its distance to the anchor per step; λ beyond 1e3 only diverges
    "weight_decay": "[0, 1000]", "prior_decay": "[0, 1000]", "grad_clip": "[0, inf)",
    "kshot": "[1, 256]", "label_noise": "[0, 1]", "max_examples": "[0, max]",
    "eval_every": "[1, max]", "eval_batches": "[1, 65536]", "dropout": "[0, 1)",
    "save_every": "[0, max]",
}


def validate(cfg: SFTConfig, argv=None):
    common.check_ranges(cfg, RANGES)
    common.note_unused(argv, {"prior_decay": "it pulls toward the --init weights; no --init given"
                              if not cfg.init else "",
                              "weight_decay": "with --init, --prior-decay is the decay"
                              if cfg.init else ""})
    if cfg.init and cfg.tokenizer:
        raise UsageError("--tokenizer: a run with --init uses the checkpoint's own tokenizer")


def fits(mcfg, cfg: SFTConfig, device):
    """One micro-batch (rows of --seq-len, with their dense mask) must fit in the device."""
    common.check_fits(common.batch_bytes(mcfg, cfg.batch_size, cfg.seq_len), device,
                      f"one micro-batch of --batch-size {cfg.batch_size} x --seq-len "
                      f"{cfg.seq_len}", "lower them (--grad-accum keeps the batch)")


@torch.no_grad()
def validation_loss(model, stream, n, device, dtype):
    model.eval()
    total, count = 0.0, 0
    for _ in range(n):
        b = stream.next_batch()
        loss, m = step_loss(model, b, device, dtype)
        total += float(loss) * int(m["tokens"])
        count += int(m["tokens"])
    model.train()
    return total / max(1, count)


def step_loss(model, b, device, dtype):
    """Cross-entropy on the trained positions only: logits are never built elsewhere."""
    from model import attention_mask
    idx, tgt, pos, doc = (t.to(device, non_blocking=True) for t in (b.idx, b.targets, b.pos, b.doc))
    where = tgt != -100
    with common.autocast(device, dtype):
        out = model(idx, pos, attention_mask(doc), logits_at=where)
    return sft_loss(out.logits.float(), tgt[where])


def check_fit(tok, train: dict, seq_len: int, sample: int = 256):
    """--seq-len too small for the answers: a conversation whose last answer (with its header and
    <|im_end|>) cannot fit in a row is dropped (its prompt is cut from the left first). When more
    than half of a task's first `sample` examples would be dropped that is an error; when some
    would, a note."""
    for name, exs in train.items():
        probe = [ex for ex in exs[:sample] if not isinstance(ex, TextExample)]
        dropped = sum(sft_document(tok, [ex], seq_len) is None for ex in probe)
        if 2 * dropped > len(probe):
            raise UsageError(f"--seq-len {seq_len} is too small for {name}: {dropped} of its first "
                             f"{len(probe)} examples cannot fit their answer in a row")
        if dropped:
            print(f"note: {name}: {dropped} of the first {len(probe)} examples do not fit in "
                  f"--seq-len {seq_len} and are skipped", file=sys.stderr)


def shard(b: PackedBatch, dist: common.Dist) -> PackedBatch:
    """This rank's rows of a global batch: rows rank, rank + world, ... (strided, so that every
    rank gets rows of similar fullness). One process: the whole batch."""
    if not dist.active:
        return b
    rows = slice(dist.rank, None, dist.world)
    idx, tgt, pos, doc = (t[rows].contiguous() for t in (b.idx, b.targets, b.pos, b.doc))
    return PackedBatch(idx, tgt, pos, doc, int((doc >= 0).sum()))


def main(argv=None):
    cfg, _ = common.parse_config(SFTConfig, __doc__.splitlines()[0], argv)
    cfg, state = common.open_resume(cfg, argv)  # --resume: the stored config and training state
    validate(cfg, argv)
    dist, device = common.init_distributed(cfg.device)
    common.seed_everything(cfg.seed)
    dtype = common.resolve_dtype(cfg.dtype, device)
    specs = resolve_tasks(cfg.tasks)
    common.check_out(cfg.out, cfg.overwrite or cfg.resume)  # nothing is written before the input
    global_batch = dist.world * cfg.batch_size  # is checked; then rank 0 alone writes
    if state is not None and state["global_batch"] != global_batch:
        raise UsageError(f"--resume: {dist.world} process(es) x --batch-size {cfg.batch_size} is "
                         f"not the global batch {state['global_batch']} of the run in {cfg.out}")

    if state is None and not cfg.init:  # the shape is known before any data: check it first
        fits(preset(cfg.preset), cfg, device)

    t0 = time.time()
    train = common.load_split(specs, "train", cfg.data_dir, cfg.data_seed, limit=cfg.max_examples)
    if cfg.label_noise:
        train = {k: apply_label_noise(v, cfg.label_noise, cfg.seed) for k, v in train.items()}
    val = common.trained_only(common.load_split(specs, "validation", cfg.data_dir,
                                                cfg.data_seed, limit=200, required=False), train)

    if state is not None:  # the run's own tokenizer, shape and starting weights
        from tokenizers import Tokenizer
        tok = ChatTokenizer(Tokenizer.from_str(state["tokenizer"]))
        model = DPHModel(ModelConfig.from_dict(state["model_config"]))
        if state["init"] is not None:
            model.load_state_dict(state["init"])
        print(f"resuming {cfg.out} at step {state['step']} of {cfg.max_steps}")
    elif cfg.init:  # continue from a checkpoint: its tokenizer and shape come along
        model, prior, tok = common.load_init(cfg.init)
        inherited = prior.get("sft", {})
        print(f"continuing from {cfg.init} ({inherited.get('tasks', 'unknown tasks')})")
        ignored = sorted({"preset", "vocab_size"} & common.explicit_flags(argv))
        if ignored:
            print(f"note: --init: the model's shape and tokenizer come from {cfg.init}; "
                  f"{', '.join('--' + n.replace('_', '-') for n in ignored)} not used",
                  file=sys.stderr)
        if model.head is not None:  # SFT trains the LM; a stale head must not ride along
            print(f"note: --init {cfg.init} has a preference head; SFT trains the language "
                  f"model only, so the head is dropped (train_dph.py adds a new one)",
                  file=sys.stderr)
            model.head, model.head_cfg = None, None
        if "dropout" in common.explicit_flags(argv):
            model.set_dropout(cfg.dropout)
    else:
        if cfg.tokenizer:
            tok = ChatTokenizer.from_pretrained_files(cfg.tokenizer)
        elif not dist.active:
            texts = [t for exs in train.values() for t in training_text(exs)]
            tok = ChatTokenizer.train(texts, cfg.vocab_size)
        else:  # trained once, on rank 0, so that every rank surely has the same vocabulary
            from tokenizers import Tokenizer
            texts = [t for exs in train.values() for t in training_text(exs)] if dist.main else []
            tok_json = ChatTokenizer.train(texts, cfg.vocab_size).to_json() if dist.main else None
            tok = ChatTokenizer(Tokenizer.from_str(common.broadcast_object(tok_json, dist)))
        mcfg = preset(cfg.preset, vocab_size=max(padded_vocab(len(tok)),
                                                 preset(cfg.preset).vocab_size
                                                 if cfg.preset == "paper" else 0),
                      dropout=cfg.dropout)
        if cfg.seq_len > mcfg.max_seq_len:
            print(f"note: --seq-len {cfg.seq_len} is longer than the {cfg.preset} preset's "
                  f"context {mcfg.max_seq_len}: the new model's context is {cfg.seq_len}",
                  file=sys.stderr)
            mcfg = dataclasses.replace(mcfg, max_seq_len=cfg.seq_len)
        model = DPHModel(mcfg)
    if cfg.seq_len > model.cfg.max_seq_len:
        raise UsageError(f"--seq-len {cfg.seq_len} exceeds the model's context "
                         f"{model.cfg.max_seq_len}")
    fits(model.cfg, cfg, device)
    check_fit(tok, train, cfg.seq_len)
    model.to(device).train()
    common.print_config(cfg, "config")
    print(f"model: {model.describe()}; vocabulary {len(tok)}; device {device}, {dtype}; "
          f"data ready in {time.time() - t0:.1f}s" +
          (f"; {dist.world} processes ({dist.backend}), global batch {global_batch} rows"
           if dist.active else ""))

    # Every rank draws the same global batch and trains on its own rows of it, so the run is the
    # same (up to float rounding) for any number of processes with the same global batch.
    stream = SFTStream(tok, train, cfg.seq_len, global_batch, cfg.seed, cfg.kshot,
                       cfg.proportional)
    val_stream = SFTStream(tok, val, cfg.seq_len, cfg.batch_size, cfg.seed + 1, cfg.kshot) \
        if val and dist.main else None
    # the starting weights: anchors of the prior regularisation, stored for --resume
    init_weights = state["init"] if state is not None else (
        {k: v.detach().cpu().clone() for k, v in model.state_dict().items()} if cfg.init else None)
    reg = common.PriorRegularizer(model.named_parameters(),
                                  cfg.prior_decay if cfg.init else 0.0,
                                  0.0 if cfg.init else cfg.weight_decay,
                                  no_prior=() if cfg.init else ("",))
    opt_ = common.make_optimizer(model.parameters(), cfg.lr, device=device)
    start, tokens_seen, seconds_before = 0, 0, 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        opt_.load_state_dict(state["optimizer"])
        stream.load_state_dict(state["data"])
        if val_stream is not None and state.get("val_data") is not None:
            val_stream.load_state_dict(state["val_data"])
        common.set_rng_state(state["rng"][dist.rank % len(state["rng"])], device)
        start, tokens_seen, seconds_before = state["step"], state["tokens"], state["seconds"]
    ddp, fwd, val_fwd, log = common.start_run(model, cfg, dist, device, state, start)
    last_saved = start if state is not None else None

    def kept():
        return (f"; {cfg.out} keeps the checkpoint of step {last_saved}" if last_saved
                else "; no checkpoint was saved")

    def save(done):
        """resume.pt first (complete or absent), then model.pt, tokenizer.json, config.json."""
        if not common.all_finite(model):
            raise FloatingPointError(f"non-finite weights after step {done}; stopped" + kept())
        digests = common.check_replicas(model, dist)
        rngs = common.gather_objects(common.rng_state(device), dist)
        if not dist.main:
            return
        data = stream.state_dict()
        data["sampler"]["rng"] = common.plain_random_state(stream.sampler.rng)
        save_train_state(cfg.out, {
            "stage": "sft", "step": done, "config": dataclasses.asdict(cfg),
            "world_size": dist.world, "global_batch": global_batch,
            "model_config": dataclasses.asdict(model.cfg), "model": model.state_dict(),
            "init": init_weights, "optimizer": opt_.state_dict(), "data": data,
            "val_data": val_stream.state_dict() if val_stream is not None else None,
            "rng": rngs, "tokenizer": tok.to_json(), "tokens": tokens_seen,
            "seconds": seconds_before + time.time() - t_start})
        summary = {"tasks": [s.name for s in specs], "steps": done, "tokens": tokens_seen,
                   "seconds": round(seconds_before + time.time() - t_start, 1),
                   "packing_efficiency": round(stream.efficiency, 4),
                   "dropped_documents": stream.stats["dropped"]}
        extra = {"stage": "sft", "sft": {**dataclasses.asdict(cfg), **summary}}
        if dist.active:
            extra["distributed"] = {"world_size": dist.world, "backend": dist.backend,
                                    "replica_sha256": digests}
        save_checkpoint(cfg.out, model, tok.to_json(), extra=extra)

    bar = tqdm(range(start, cfg.max_steps), desc="sft", dynamic_ncols=True, initial=start,
               total=cfg.max_steps, disable=not dist.main)
    t_start, tokens_run = time.time(), 0
    try:
        for step in bar:
            lr = common.lr_at(step, cfg.lr, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
            for g in opt_.param_groups:
                g["lr"] = lr
            loss_sum = 0.0
            for micro in range(cfg.grad_accum):
                b = stream.next_batch()  # the global batch
                mine = shard(b, dist)
                # DDP averages the ranks' gradients; weighting each rank's token mean by its share
                # of the global batch's tokens makes that average the global token mean
                scale = 1.0 if not dist.active else dist.world * int(
                    (mine.targets != IGNORE).sum()) / max(1, int((b.targets != IGNORE).sum()))
                last = micro == cfg.grad_accum - 1
                with contextlib.nullcontext() if last or not dist.active else ddp.no_sync():
                    loss, m = step_loss(fwd, mine, device, dtype)
                    if dist.active:
                        loss = loss * scale
                    (loss / cfg.grad_accum).backward()
                loss_sum += float(loss.detach()) / cfg.grad_accum
                tokens_seen += b.tokens
                tokens_run += b.tokens
            loss_sum = common.all_mean({"loss": loss_sum}, dist)["loss"]
            if not math.isfinite(loss_sum):
                raise FloatingPointError(f"non-finite training loss ({loss_sum}) at step "
                                         f"{step + 1}; stopped" + kept())
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                   cfg.grad_clip or float("inf"))
            opt_.step()
            reg.step(lr)
            opt_.zero_grad(set_to_none=True)
            done = step + 1
            tps = tokens_run / (time.time() - t_start)
            bar.set_postfix(loss=f"{loss_sum:.3f}", tok_s=f"{tps:,.0f}")
            if step % 10 == 0 or done == cfg.max_steps:
                log.log(step, "train", loss=loss_sum, lr=lr, grad_norm=float(gnorm),
                        tokens=tokens_seen, tokens_per_s=tps, packing=stream.efficiency)
            if val_stream and (done % cfg.eval_every == 0 or done == cfg.max_steps):
                vl = validation_loss(val_fwd, val_stream, cfg.eval_batches, device, dtype)
                log.log(step, "validation", loss=vl)
                tqdm.write(f"step {done}: train loss {loss_sum:.3f}, validation loss {vl:.3f}")
            if done == cfg.max_steps or (cfg.save_every and done % cfg.save_every == 0):
                save(done)
                last_saved = done
            common.debug_step_delay()
    finally:
        bar.close()
    if start == cfg.max_steps:  # resumed a finished run: write the checkpoint again
        save(cfg.max_steps)

    elapsed = seconds_before + time.time() - t_start
    print(f"saved {cfg.out}: {tokens_seen:,} tokens in {elapsed:.0f}s "
          f"({tokens_seen / max(elapsed, 1e-9):,.0f} tok/s), packing efficiency "
          f"{stream.efficiency:.1%}, {stream.stats['dropped']} documents too long")
    return 0


if __name__ == "__main__":
    common.run_main(main)
