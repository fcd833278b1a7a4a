"""Stage 1: supervised fine-tuning (SPEC §3 "SFT loss", §6 batching; paper §4.1).

The model learns to answer every task in the mixture: token cross-entropy on the assistant content
and its <|im_end|> only, over conversations packed into rows of seq_len with a block-diagonal
mask and restarted positions. From scratch it first trains a byte-level BPE on the training text;
with --init it continues from a checkpoint (e.g. a model pretrained on --tasks text:corpus.txt)
and pulls the weights toward that starting point (prior regularisation, λ = --prior-decay).

    python train_sft.py                       # built-in suite, `small` preset, writes out/sft
    python train_sft.py --preset tiny --max-steps 50 --out /tmp/sft
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

import common
from common import UsageError, opt
from data import ChatTokenizer, SFTStream, apply_label_noise, training_text
from losses import sft_loss
from model import DPHModel, load_checkpoint, padded_vocab, preset, save_checkpoint
from tasks import resolve_tasks


@dataclass
class SFTConfig:
    tasks: str = opt("builtin", "comma-separated tasks and mixtures (see README)")
    data_dir: str = opt("", "folder with real datasets (default: $DPH_DATA)")
    data_seed: int = opt(0, "seed of the built-in suite's generator")
    out: str = opt("out/sft", "output checkpoint directory")
    init: str = opt("", "start from this checkpoint instead of from scratch")
    overwrite: bool = opt(False, "replace a previous run in --out")
    preset: str = opt("small", "model shape", ["tiny", "small", "base", "paper"])
    tokenizer: str = opt("", "tokenizer.json, or a folder with GPT-2's encoder.json + vocab.bpe; "
                             "default: train a byte-level BPE on the training text")
    vocab_size: int = opt(8192, "vocabulary size of a newly trained BPE")
    seq_len: int = opt(512, "tokens per packed row")
    batch_size: int = opt(16, "rows per micro-batch")
    grad_accum: int = opt(1, "micro-batches per optimiser step")
    max_steps: int = opt(400, "optimiser steps")
    lr: float = opt(2e-3, "peak learning rate")
    min_lr_ratio: float = opt(0.1, "final learning rate / peak")
    warmup_steps: int = opt(40, "linear warmup steps")
    weight_decay: float = opt(0.1, "decay toward zero when training from scratch")
    prior_decay: float = opt(0.5, "decay toward the --init weights (prior regularisation)")
    grad_clip: float = opt(1.0, "clip the gradient norm (0: off)")
    kshot: int = opt(1, "distinct examples of one task per conversation")
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


def validate(cfg: SFTConfig):
    if cfg.lr <= 0:
        raise UsageError(f"--lr must be positive, got {cfg.lr}")
    for name in ("batch_size", "grad_accum", "max_steps", "seq_len", "kshot", "vocab_size"):
        if getattr(cfg, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if not 0 <= cfg.label_noise <= 1:
        raise UsageError(f"--label-noise must be in [0, 1], got {cfg.label_noise}")
    if cfg.seq_len < 32:
        raise UsageError(f"--seq-len {cfg.seq_len} is too small for a conversation")


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


def main(argv=None):
    cfg, _ = common.parse_config(SFTConfig, __doc__.splitlines()[0], argv)
    validate(cfg)
    common.seed_everything(cfg.seed)
    device = common.resolve_device(cfg.device)
    dtype = common.resolve_dtype(cfg.dtype, device)
    specs = resolve_tasks(cfg.tasks)
    common.prepare_out(cfg.out, cfg.overwrite)

    t0 = time.time()
    train = common.load_split(specs, "train", cfg.data_dir, cfg.data_seed, limit=cfg.max_examples)
    if cfg.label_noise:
        train = {k: apply_label_noise(v, cfg.label_noise, cfg.seed) for k, v in train.items()}
    val = common.load_split(specs, "validation", cfg.data_dir, cfg.data_seed, limit=200,
                            required=False)

    if cfg.init:  # continue from a checkpoint: its tokenizer and shape come along
        model, prior = load_checkpoint(cfg.init)
        tok = ChatTokenizer.from_file(os.path.join(cfg.init, "tokenizer.json"))
        inherited = prior.get("sft", {})
        print(f"continuing from {cfg.init} ({inherited.get('tasks', 'unknown tasks')})")
    else:
        if cfg.tokenizer:
            tok = ChatTokenizer.from_pretrained_files(cfg.tokenizer)
        else:
            texts = [t for exs in train.values() for t in training_text(exs)]
            tok = ChatTokenizer.train(texts, cfg.vocab_size)
        mcfg = preset(cfg.preset, vocab_size=max(padded_vocab(len(tok)),
                                                 preset(cfg.preset).vocab_size
                                                 if cfg.preset == "paper" else 0),
                      dropout=cfg.dropout)
        if cfg.seq_len > mcfg.max_seq_len:
            mcfg = dataclasses.replace(mcfg, max_seq_len=cfg.seq_len)
        model = DPHModel(mcfg)
    if cfg.seq_len > model.cfg.max_seq_len:
        raise UsageError(f"--seq-len {cfg.seq_len} exceeds the model's context "
                         f"{model.cfg.max_seq_len}")
    model.to(device).train()
    common.print_config(cfg, "config")
    print(f"model: {model.describe()}; vocabulary {len(tok)}; device {device}, {dtype}; "
          f"data ready in {time.time() - t0:.1f}s")

    stream = SFTStream(tok, train, cfg.seq_len, cfg.batch_size, cfg.seed, cfg.kshot,
                       cfg.proportional)
    val_stream = SFTStream(tok, val, cfg.seq_len, cfg.batch_size, cfg.seed + 1, cfg.kshot) \
        if val else None
    opt_ = common.make_optimizer(model.parameters(), cfg.lr, device=device)
    reg = common.PriorRegularizer(model.named_parameters(),
                                  cfg.prior_decay if cfg.init else 0.0,
                                  0.0 if cfg.init else cfg.weight_decay,
                                  no_prior=() if cfg.init else ("",))
    fwd = torch.compile(model) if cfg.compile else model
    log = common.MetricsLog(os.path.join(cfg.out, "metrics.jsonl"))
    log.log(0, "config", **dataclasses.asdict(cfg))

    bar = tqdm(range(cfg.max_steps), desc="sft", dynamic_ncols=True)
    tokens_seen, t_start = 0, time.time()
    for step in bar:
        lr = common.lr_at(step, cfg.lr, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
        for g in opt_.param_groups:
            g["lr"] = lr
        loss_sum = 0.0
        for _ in range(cfg.grad_accum):
            b = stream.next_batch()
            loss, m = step_loss(fwd, b, device, dtype)
            (loss / cfg.grad_accum).backward()
            loss_sum += float(loss.detach()) / cfg.grad_accum
            tokens_seen += b.tokens
        if not math.isfinite(loss_sum):
            raise FloatingPointError(f"non-finite loss at step {step}; nothing was saved")
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
        opt_.step()
        reg.step(lr)
        opt_.zero_grad(set_to_none=True)
        tps = tokens_seen / (time.time() - t_start)
        bar.set_postfix(loss=f"{loss_sum:.3f}", tok_s=f"{tps:,.0f}")
        if step % 10 == 0 or step == cfg.max_steps - 1:
            log.log(step, "train", loss=loss_sum, lr=lr, grad_norm=float(gnorm), tokens=tokens_seen,
                    tokens_per_s=tps, packing=stream.efficiency)
        if val_stream and ((step + 1) % cfg.eval_every == 0 or step == cfg.max_steps - 1):
            vl = validation_loss(fwd, val_stream, cfg.eval_batches, device, dtype)
            log.log(step, "validation", loss=vl)
            tqdm.write(f"step {step + 1}: train loss {loss_sum:.3f}, validation loss {vl:.3f}")

    elapsed = time.time() - t_start
    summary = {"tasks": [s.name for s in specs], "steps": cfg.max_steps, "tokens": tokens_seen,
               "seconds": round(elapsed, 1), "packing_efficiency": round(stream.efficiency, 4),
               "dropped_documents": stream.stats["dropped"]}
    save_checkpoint(cfg.out, model, tok.to_json(),
                    extra={"stage": "sft", "sft": {**dataclasses.asdict(cfg), **summary}})
    print(f"saved {cfg.out}: {tokens_seen:,} tokens in {elapsed:.0f}s "
          f"({tokens_seen / elapsed:,.0f} tok/s), packing efficiency {stream.efficiency:.1%}, "
          f"{stream.stats['dropped']} documents too long")
    return 0


if __name__ == "__main__":
    common.run_main(main)
