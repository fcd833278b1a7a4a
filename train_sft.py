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

import dataclasses
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

import plumbing
from data import PackedBatch, SFTStream
from losses import decayed_parameters, prior_regularization, sft_loss
from model import attention_mask, preset, use_attention
from plumbing import RunConfig, UsageError, inputs, opt
from tasks import resolve_tasks
from tasks.noise import apply_label_noise
from tokenizer.chat import SPECIALS
from tokenizer.chatml import IGNORE


@dataclass
class SFTConfig(RunConfig):
    """The flags of this stage; RunConfig (plumbing/) has those both trainers share."""
    tasks: str = opt("builtin", "comma-separated tasks and mixtures (see README)")
    out: str = opt("out/sft", "output checkpoint directory")
    init: str = opt("", "start from this checkpoint, a .gguf file or a Hugging Face model "
                           "directory instead of from scratch")
    preset: str = opt("small", "model shape", ["tiny", "small", "base", "paper"])
    tokenizer: str = opt("", "tokenizer.json, or a folder with GPT-2's encoder.json + vocab.bpe; "
                             "default: train a byte-level BPE on the training text")
    vocab_size: int = opt(8192, "vocabulary size of a newly trained BPE")
    seq_len: int = opt(256, "tokens per packed row")
    batch_size: int = opt(12, "rows per micro-batch")
    max_steps: int = opt(300, "optimiser steps")
    lr: float = opt(2e-3, "peak learning rate")
    warmup_steps: int = opt(20, "linear warmup steps")
    weight_decay: float = opt(0.1, "decay toward zero when training from scratch")
    prior_decay: float = opt(0.5, "decay toward the --init weights (prior regularisation)")
    kshot: int = opt(5, "distinct examples of one task per conversation (the paper: 5)")
    proportional: bool = opt(False, "sample tasks in proportion to their size (default uniform)")
    eval_every: int = opt(100, "steps between validation losses")
    eval_batches: int = opt(4, "validation batches per evaluation")
    dropout: float = opt(0.1, "dropout on the embeddings and residual branches (with --init: "
                              "the checkpoint's own unless given)")
    attn_dropout: float = opt(0.1, "dropout on the attention weights (with --init: the "
                                   "checkpoint's own unless given)")


# The interval of every int and float flag (plumbing.check_ranges; "max" = 2**63 - 1); the
# memory of one micro-batch is checked against the device once the model's shape is known.
RANGES = {
    **plumbing.RUN_RANGES,
    "vocab_size": f"[{256 + len(SPECIALS)}, 1048576]",  # at least the bytes and the specials
    "seq_len": "[32, 1048576]", "weight_decay": "[0, 1000]", "kshot": "[1, 256]",
    "eval_batches": "[1, 65536]", "dropout": "[0, 1)",
    "attn_dropout": "[0, 1)",
}


def validate(cfg: SFTConfig, argv=None):
    plumbing.check_ranges(cfg, RANGES)
    plumbing.note_unused(argv, {"prior_decay": "it pulls toward the --init weights; no --init given"
                              if not cfg.init else "",
                              "weight_decay": "with --init, --prior-decay is the decay"
                              if cfg.init else ""})
    if cfg.init and cfg.tokenizer:
        raise UsageError("--tokenizer: a run with --init uses the checkpoint's own tokenizer")


def fits(mcfg, cfg: SFTConfig, device):
    """One micro-batch (rows of --seq-len, with their dense mask) must fit in the device."""
    plumbing.check_fits(plumbing.batch_bytes(mcfg, cfg.batch_size, cfg.seq_len), device,
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
    """Cross-entropy on the trained positions only (losses.sft_loss: logits are never built
    elsewhere, nor all held at once)."""
    idx, tgt, pos, doc = (t.to(device, non_blocking=True) for t in (b.idx, b.targets, b.pos, b.doc))
    with plumbing.autocast(device, dtype):
        out = model(idx, pos, attention_mask(doc))
        return sft_loss(out.hidden, model.lm_weight, tgt)


def main(argv=None):
    run = plumbing.open_run(SFTConfig, __doc__.splitlines()[0], validate, argv)
    cfg, dist, device, dtype = run.cfg, run.dist, run.device, run.dtype
    specs = resolve_tasks(cfg.tasks)
    if run.state is None and not cfg.init:  # the shape is known before any data: check it first
        fits(preset(cfg.preset), cfg, device)
    t0 = time.time()
    train = plumbing.load_split(specs, "train", cfg.data_dir, cfg.data_seed,
                                limit=cfg.max_examples)
    if cfg.label_noise:
        train = {k: apply_label_noise(v, cfg.label_noise, cfg.seed) for k, v in train.items()}
    val = plumbing.trained_only(plumbing.load_split(specs, "validation", cfg.data_dir,
                                                    cfg.data_seed, limit=200, required=False),
                                train)
    model, tok = inputs.sft_model(cfg, run, train, argv)
    if cfg.seq_len > model.cfg.max_seq_len:
        raise UsageError(f"--seq-len {cfg.seq_len} exceeds the model's context "
                         f"{model.cfg.max_seq_len}")
    fits(model.cfg, cfg, device)
    inputs.check_sft_fit(tok, train, cfg.seq_len)
    if cfg.attention == "flex" and model.cfg.attn_dropout > 0:
        raise UsageError(f"--attention flex has no attention dropout and this run's is "
                         f"{model.cfg.attn_dropout}: add --attn-dropout 0 (or --attention sdpa)")
    use_attention(model, cfg.attention)
    model.to(device).train()
    run.announce(model, f"vocabulary {len(tok)}; data ready in {time.time() - t0:.1f}s", "rows")

    # Every rank draws the same global batch and trains on its own rows of it, so the run is the
    # same (up to float rounding) for any number of processes with the same global batch.
    stream = SFTStream(tok, train, cfg.seq_len, run.global_batch, cfg.seed, cfg.kshot,
                       cfg.proportional)
    val_stream = SFTStream(tok, val, cfg.seq_len, cfg.batch_size, cfg.seed + 1, cfg.kshot) \
        if val and dist.main else None
    # The starting weights, stored for --resume. With --init they anchor the prior
    # regularisation (λ = --prior-decay); from scratch the weights decay toward zero instead.
    init_weights = run.state["init"] if run.state is not None else (
        {k: v.detach().cpu().clone() for k, v in model.state_dict().items()} if cfg.init else None)
    decayed = decayed_parameters(model)
    anchors = [init_weights[n].to(device) for n, _ in decayed] if cfg.init else None
    lam = cfg.prior_decay if cfg.init else cfg.weight_decay
    optimizer = plumbing.make_optimizer([{"params": list(model.parameters()),
                                          "peak_lr": cfg.lr}], device)
    seen = {"tokens": 0, "run": 0}
    if run.state is not None:
        stream.load_state_dict(run.state["data"])
        if val_stream is not None and run.state.get("val_data") is not None:
            val_stream.load_state_dict(run.state["val_data"])
        seen["tokens"] = run.state["tokens"]

    def payload(done):  # what resume.pt and config.json hold besides the shared keys
        summary = {"tasks": [s.name for s in specs], "tokens": seen["tokens"],
                   "packing_efficiency": round(stream.efficiency, 4),
                   "dropped_documents": stream.stats["dropped"]}
        return ({"data": stream.state_dict(), "tokens": seen["tokens"],
                 "val_data": val_stream.state_dict() if val_stream is not None else None},
                summary, {"stage": "sft", "sft": dataclasses.asdict(cfg)})
    fwd, val_fwd = run.begin(model, optimizer, tok, init_weights, payload)

    def micro_step(last):
        b = stream.next_batch()  # the global batch; this rank trains on its own rows of it
        idx, tgt, pos, doc = plumbing.my_rows(dist, b.idx, b.targets, b.pos, b.doc)
        mine = PackedBatch(idx, tgt, pos, doc, int((doc >= 0).sum()))
        # DDP averages the ranks' gradients; weighting each rank's token mean by its share of
        # the global batch's tokens makes that average the global token mean
        scale = 1.0 if not dist.active else dist.world * int(
            (mine.targets != IGNORE).sum()) / max(1, int((b.targets != IGNORE).sum()))
        with run.sync(last):
            loss, _ = step_loss(fwd, mine, device, dtype)
            loss = loss * scale
            (loss / cfg.grad_accum).backward()
        seen["tokens"] += b.tokens
        seen["run"] += b.tokens
        return {"loss": loss.detach()}

    def decay(scale):
        prior_regularization(decayed, anchors, cfg.lr * scale, lam)

    def after_step(step, done):
        if val_stream and (done % cfg.eval_every == 0 or done == cfg.max_steps):
            vl = validation_loss(val_fwd, val_stream, cfg.eval_batches, device, dtype)
            run.log.log(step, "validation", loss=vl)
            tqdm.write(f"step {done}: validation loss {vl:.3f}")

    def tokens_per_s():
        return seen["run"] / max(time.time() - run.t_start, 1e-9)

    run.loop(micro_step, decay, desc="sft", after_step=after_step,
             postfix=lambda agg: {"loss": f"{agg['loss']:.3f}", "tok_s": f"{tokens_per_s():,.0f}"},
             log_extra=lambda: {"tokens": seen["tokens"], "tokens_per_s": tokens_per_s(),
                                "packing": stream.efficiency})
    elapsed = run.seconds()
    print(f"saved {cfg.out}: {seen['tokens']:,} tokens in {elapsed:.0f}s "
          f"({seen['tokens'] / max(elapsed, 1e-9):,.0f} tok/s), packing efficiency "
          f"{stream.efficiency:.1%}, {stream.stats['dropped']} documents too long")
    return 0


if __name__ == "__main__":
    plumbing.run_main(main)
