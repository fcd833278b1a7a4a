"""Stage 2: Direct Preference Head training (SPEC §3; the paper's alignment stage).

Loads an SFT checkpoint, adds the preference head (pooler + w, no bias) and trains on
(prompt, chosen, rejected) pairs: choice tasks give chosen = the gold answer and rejected = a
wrong candidate drawn uniformly, afresh each time an example is visited; preference data is used
as given. The head's loss is the separable or the contrastive DPH objective with label
smoothing ε. Jointly (as in the paper's alignment stage) the LM may be trained with conservative
DPO against a frozen copy of the SFT model (--dpo-weight, 0 disables it and skips the reference
model). The backbone is pulled toward its SFT weights; the head decays toward zero.

    python train_dph.py --loss contrastive            # out/sft -> out/dph
    python train_dph.py --freeze-backbone --dpo-weight 0   # head only: LM outputs unchanged
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import random
import sys
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

import common
from common import UsageError, opt
from chat_tokenizer import ChatTokenizer
from data import (TaskSampler, apply_label_noise, collate_choices, make_pairs, score_choices)
from losses import dph_loss, dpo_loss, reward_penalty
from model import DPHModel, ModelConfig, PreferenceHead, save_checkpoint, save_train_state
from tasks import TaskError, resolve_tasks

PAIR_KINDS = ("choice", "preference")


@dataclass
class DPHConfig:
    init: str = opt("out/sft", "SFT checkpoint to start from")
    out: str = opt("out/dph", "output checkpoint directory")
    overwrite: bool = opt(False, "replace a previous run in --out")
    tasks: str = opt("", "tasks and mixtures (default: the SFT checkpoint's tasks)")
    data_dir: str = opt("", "folder with real datasets (default: $DPH_DATA)")
    data_seed: int = opt(0, "seed of the built-in suite's generator")
    loss: str = opt("separable", "DPH objective", ["separable", "contrastive"])
    label_smoothing: float = opt(0.1, "ε of the DPH loss, 0 <= ε < 0.5")
    dpo_weight: float = opt(1.0, "weight of the joint cDPO term on the LM (0: off, no reference)")
    beta: float = opt(0.1, "β of the cDPO term")
    dpo_label_smoothing: float = opt(0.1, "ε of the cDPO term")
    reward_penalty: float = opt(0.0, "λ of the optional reward penalty (not in the paper)")
    reward_penalty_kind: str = opt("squared", "λ·mean(r_w²+r_l²) or λ·mean((r_w+r_l)²)",
                                   ["squared", "sum"])
    freeze_backbone: bool = opt(False, "train the head only")
    pooler: str = opt("swiglu", "head pooler", list(PreferenceHead.POOLERS))
    pooler_dropout: float = opt(0.0, "dropout inside the pooler")
    layout: str = opt("shared", "shared: prompt once, answers as branches; padded: a row each",
                      ["shared", "padded"])
    batch_size: int = opt(16, "pairs per micro-batch")
    grad_accum: int = opt(1, "micro-batches per optimiser step")
    max_steps: int = opt(150, "optimiser steps")
    lr: float = opt(5e-4, "peak learning rate of the backbone")
    head_lr: float = opt(1e-3, "peak learning rate of the head and pooler")
    min_lr_ratio: float = opt(0.1, "final learning rate / peak")
    warmup_steps: int = opt(15, "linear warmup steps")
    prior_decay: float = opt(0.5, "decay of the backbone toward the SFT weights")
    head_decay: float = opt(0.1, "decay of the head and pooler toward zero")
    grad_clip: float = opt(1.0, "clip the gradient norm (0: off)")
    max_len: int = opt(0, "longest prompt + answer in tokens (0: the model's context)")
    label_noise: float = opt(0.0, "fraction of training labels flipped (robustness experiment)")
    max_examples: int = opt(0, "use at most this many training examples per task (0: all)")
    eval_every: int = opt(100, "steps between validation reward accuracies")
    eval_pairs: int = opt(256, "validation pairs per evaluation")
    seed: int = opt(0, "seed for the head's initialisation and the data order")
    device: str = opt("auto", "auto | cpu | cuda | mps")
    dtype: str = opt("auto", "auto | float32 | bfloat16 | float16 (autocast)")
    compile: bool = opt(False, "torch.compile the model")
    save_every: int = opt(100, "steps between resumable checkpoints in --out (0: at the end only)")
    resume: bool = opt(False, "continue the run in --out from its last checkpoint; unset flags "
                              "come from that run (starts at step 0 if there is none yet)")


def validate(cfg: DPHConfig):
    for name in ("label_smoothing", "dpo_label_smoothing"):
        v = getattr(cfg, name)
        if not 0.0 <= v < 0.5:
            raise UsageError(f"--{name.replace('_', '-')} must be in [0, 0.5), got {v}")
    for name in ("lr", "head_lr", "beta"):
        if getattr(cfg, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    for name in ("batch_size", "grad_accum", "max_steps"):
        if getattr(cfg, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if cfg.save_every < 0 or cfg.max_len < 0:
        raise UsageError("--save-every and --max-len must be >= 0")
    if cfg.dpo_weight < 0 or cfg.reward_penalty < 0:
        raise UsageError("--dpo-weight and --reward-penalty must be >= 0")
    if not 0 <= cfg.label_noise <= 1:
        raise UsageError(f"--label-noise must be in [0, 1], got {cfg.label_noise}")


def pair_loss(model, ref, batch, cfg, device, dtype, use_dpo):
    """Forward chosen and rejected together; return (loss, metrics)."""
    with common.autocast(device, dtype):
        res = score_choices(model, batch, rewards=True, logps=use_dpo)
    r = res["rewards"].float().view(-1, 2)  # (N, 2): [chosen, rejected]
    loss, metrics = dph_loss(r[:, 0], r[:, 1], cfg.loss, cfg.label_smoothing)
    if cfg.reward_penalty > 0:
        pen, pm = reward_penalty(r[:, 0], r[:, 1], cfg.reward_penalty, cfg.reward_penalty_kind)
        loss = loss + pen
        metrics.update(pm)
    if use_dpo:
        with torch.no_grad(), common.autocast(device, dtype):
            ref_lp = score_choices(ref, batch, rewards=False, logps=True)["logp"].float().view(-1, 2)
        lp = res["logp"].float().view(-1, 2)
        dloss, dm = dpo_loss(lp[:, 0], lp[:, 1], ref_lp[:, 0], ref_lp[:, 1], cfg.beta,
                             cfg.dpo_label_smoothing)
        loss = loss + cfg.dpo_weight * dloss
        metrics.update({"dpo/loss": dloss.detach(), "dpo/accuracies": dm["rewards/accuracies"],
                        "dpo/margins": dm["rewards/margins"]})
    return loss, metrics


@torch.no_grad()
def validation_rewards(model, items, cfg, device, dtype):
    """Reward accuracy and margin on fixed validation pairs."""
    model.eval()
    chosen, rejected = [], []
    for i in range(0, len(items), cfg.batch_size):
        b = collate_choices(items[i:i + cfg.batch_size], cfg.layout, 0).to(device)
        with common.autocast(device, dtype):
            r = score_choices(model, b, rewards=True, logps=False)["rewards"].float().view(-1, 2)
        chosen.append(r[:, 0])
        rejected.append(r[:, 1])
    model.train()
    c, r = torch.cat(chosen), torch.cat(rejected)
    return {"rewards/chosen": c.mean().item(), "rewards/rejected": r.mean().item(),
            "rewards/accuracies": (c > r).float().mean().item(),
            "rewards/margins": (c - r).mean().item(), "pairs": len(c)}


def check_fit(tok, train: dict, max_len: int, sample: int = 256):
    """Pairs whose answers cannot fit in max_len tokens (after cutting the prompt from the left)
    are skipped. When more than half of a task's first `sample` examples would be, that is an
    error (--max-len too small); when some would, a note."""
    rng = random.Random(0)  # its own generator: the training draws stay untouched
    for name, exs in train.items():
        probe = exs[:sample]
        dropped = len(probe) - len(make_pairs(tok, probe, rng, max_len))
        if 2 * dropped > len(probe):
            raise UsageError(f"--max-len {max_len} is too small for {name}: {dropped} of its first "
                             f"{len(probe)} examples cannot fit their answers")
        if dropped:
            print(f"note: {name}: {dropped} of the first {len(probe)} examples do not fit in "
                  f"{max_len} tokens and are skipped", file=sys.stderr)


def main(argv=None):
    cfg, _ = common.parse_config(DPHConfig, __doc__.splitlines()[0], argv)
    cfg, state = common.open_resume(cfg, argv)  # --resume: the stored config and training state
    validate(cfg)
    dist, device = common.init_distributed(cfg.device)
    common.seed_everything(cfg.seed)
    dtype = common.resolve_dtype(cfg.dtype, device)
    common.check_out(cfg.out, cfg.overwrite or cfg.resume)  # nothing is written before the input
    global_batch = dist.world * cfg.batch_size  # is checked; then rank 0 alone writes
    if state is not None and state["global_batch"] != global_batch:
        raise UsageError(f"--resume: {dist.world} process(es) x --batch-size {cfg.batch_size} is "
                         f"not the global batch {state['global_batch']} of the run in {cfg.out}")

    if state is not None:  # the run's own tokenizer, model with head, starting weights
        from tokenizers import Tokenizer
        tok = ChatTokenizer(Tokenizer.from_str(state["tokenizer"]))
        model = DPHModel(ModelConfig.from_dict(state["model_config"]), head=state["head"])
        model.load_state_dict(state["init"])
        prior = state["prior"]
        print(f"resuming {cfg.out} at step {state['step']} of {cfg.max_steps}")
    else:
        model, prior, tok = common.load_init(cfg.init)  # the tokenizer and shape come along
    tasks = cfg.tasks or ",".join(prior.get("sft", {}).get("tasks", ["builtin"]))
    specs = [s for s in resolve_tasks(tasks) if s.kind in PAIR_KINDS]
    if not specs:
        raise UsageError(f"--tasks {tasks}: no choice or preference task to make pairs from")
    if cfg.max_len > model.cfg.max_seq_len:
        raise UsageError(f"--max-len {cfg.max_len} exceeds the model's context "
                         f"{model.cfg.max_seq_len}")
    max_len = cfg.max_len or model.cfg.max_seq_len

    train = common.load_split(specs, "train", cfg.data_dir, cfg.data_seed, limit=cfg.max_examples)
    if cfg.label_noise:
        train = {k: apply_label_noise(v, cfg.label_noise, cfg.seed) for k, v in train.items()}
    check_fit(tok, train, max_len)
    val = common.trained_only(common.load_split(specs, "validation", cfg.data_dir, cfg.data_seed,
                                                required=False), train)
    val_exs = [ex for exs in val.values() for ex in exs]
    random.Random(cfg.seed).shuffle(val_exs)
    val_items = make_pairs(tok, val_exs, random.Random(12345), max_len)[:cfg.eval_pairs]
    # a fixed sample of training pairs: reward accuracy on them before and after training
    train_exs = [ex for exs in train.values() for ex in exs]
    random.Random(cfg.seed + 2).shuffle(train_exs)
    train_items = make_pairs(tok, train_exs[:cfg.eval_pairs], random.Random(54321), max_len)

    if state is None:
        model.cfg.dropout = 0.0  # dropout is off in this stage (pooler dropout is the head's own)
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        model.add_head(cfg.pooler, cfg.pooler_dropout)
    model.to(device).train()
    use_dpo = cfg.dpo_weight > 0 and not cfg.freeze_backbone
    if cfg.freeze_backbone:
        model.freeze_backbone()
        if cfg.dpo_weight > 0:
            print("--freeze-backbone: the LM cannot change, so the cDPO term is skipped")
    ref = None
    if use_dpo:  # the frozen reference π_ref of cDPO: a copy of the SFT model
        ref = copy.deepcopy(model.lm).eval().requires_grad_(False)
    common.print_config(cfg, "config")
    print(f"model: {model.describe()}; tasks: {', '.join(s.name for s in specs)}; "
          f"{sum(map(len, train.values()))} training examples; device {device}, {dtype}" +
          (f"; {dist.world} processes ({dist.backend}), global batch {global_batch} pairs"
           if dist.active else ""))

    # the starting weights (SFT backbone + fresh head): anchors of the prior regularisation and
    # the cDPO reference, stored for --resume so that it does not depend on --init staying put
    init_weights = state["init"] if state is not None else \
        {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    head_params = list(model.head.parameters())
    groups = [{"params": head_params, "lr_peak": cfg.head_lr}]
    if not cfg.freeze_backbone:
        groups.append({"params": list(model.lm.parameters()), "lr_peak": cfg.lr})
    opt_ = torch.optim.AdamW([{"params": g["params"], "lr": g["lr_peak"]} for g in groups],
                             betas=(0.9, 0.95), weight_decay=0.0)
    reg = common.PriorRegularizer(model.named_parameters(), cfg.prior_decay, cfg.head_decay,
                                  no_prior=("head.",))
    # Every rank draws the same global batch of pairs and trains on its own share of it, so the
    # run is the same (up to float rounding) for any number of processes with one global batch.
    sampler = TaskSampler(train, cfg.seed)
    pair_rng = random.Random(cfg.seed + 1)  # rejected answers: a fresh draw at every visit
    start, pairs_seen, seconds_before, last_val = 0, 0, 0.0, {}
    if state is not None:
        model.load_state_dict(state["model"])
        opt_.load_state_dict(state["optimizer"])
        sampler.load_state_dict(state["data"])
        common.set_plain_random_state(pair_rng, state["pair_rng"])
        common.set_rng_state(state["rng"][dist.rank % len(state["rng"])], device)
        start, pairs_seen, seconds_before = state["step"], state["pairs"], state["seconds"]
        last_val = state["validation"]
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
        seconds = seconds_before + time.time() - t_start
        sampler_state = sampler.state_dict()
        sampler_state["rng"] = common.plain_random_state(sampler.rng)
        save_train_state(cfg.out, {
            "stage": "dph", "step": done, "config": dataclasses.asdict(cfg),
            "world_size": dist.world, "global_batch": global_batch,
            "model_config": dataclasses.asdict(model.cfg), "head": model.head_cfg,
            "model": model.state_dict(), "init": init_weights, "optimizer": opt_.state_dict(),
            "data": sampler_state, "pair_rng": common.plain_random_state(pair_rng), "rng": rngs,
            "tokenizer": tok.to_json(), "prior": prior, "pairs": pairs_seen,
            "seconds": seconds, "validation": last_val})
        summary = {"tasks": [s.name for s in specs], "steps": done, "pairs": pairs_seen,
                   "seconds": round(seconds, 1), "validation": last_val}
        extra = {"stage": "dph", "sft": prior.get("sft", {}),
                 "dph": {**dataclasses.asdict(cfg), **summary}}
        if dist.active:
            extra["distributed"] = {"world_size": dist.world, "backend": dist.backend,
                                    "replica_sha256": digests}
        save_checkpoint(cfg.out, model, tok.to_json(), extra=extra)

    bar = tqdm(range(start, cfg.max_steps), desc=f"dph/{cfg.loss}", dynamic_ncols=True,
               initial=start, total=cfg.max_steps, disable=not dist.main)
    t_start, pairs_run = time.time(), 0
    if dist.main and start == 0 and train_items:
        log.log(0, "train_pairs", **validation_rewards(val_fwd, train_items, cfg, device, dtype))
    try:
        for step in bar:
            scale = common.lr_at(step, 1.0, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
            for g, spec in zip(opt_.param_groups, groups):
                g["lr"] = spec["lr_peak"] * scale
            agg = {}
            for micro in range(cfg.grad_accum):
                items, misses = [], 0
                while len(items) < global_batch:  # the global batch of pairs
                    new = make_pairs(tok, sampler.draw(1), pair_rng, max_len)
                    misses = 0 if new else misses + 1
                    if misses == 1000:
                        raise TaskError(f"1000 examples in a row do not fit in {max_len} tokens; "
                                        f"raise --max-len")
                    items += new
                batch = collate_choices(items[dist.rank::dist.world], cfg.layout,
                                        tok.pad).to(device)
                last = micro == cfg.grad_accum - 1
                with contextlib.nullcontext() if last or not dist.active else ddp.no_sync():
                    loss, metrics = pair_loss(fwd, ref, batch, cfg, device, dtype, use_dpo)
                    (loss / cfg.grad_accum).backward()
                pairs_seen += len(items)
                pairs_run += len(items)
                for k, x in {"loss": loss.detach(), **metrics}.items():
                    agg[k] = agg.get(k, 0.0) + float(x) / cfg.grad_accum
            agg = common.all_mean(agg, dist)  # every rank holds an equal share of the pairs
            if not math.isfinite(agg["loss"]):
                raise FloatingPointError(f"non-finite training loss ({agg['loss']}) at step "
                                         f"{step + 1}; stopped" + kept())
            gnorm = torch.nn.utils.clip_grad_norm_(
                [p for p in model.parameters() if p.requires_grad], cfg.grad_clip or float("inf"))
            opt_.step()
            reg.step(cfg.lr * scale, cfg.head_lr * scale)
            opt_.zero_grad(set_to_none=True)
            done = step + 1
            bar.set_postfix(loss=f"{agg['loss']:.3f}", acc=f"{agg['rewards/accuracies']:.2f}",
                            pairs_s=f"{pairs_run / (time.time() - t_start):.1f}")
            if step % 10 == 0 or done == cfg.max_steps:
                log.log(step, "train", grad_norm=float(gnorm), **agg)
            if dist.main and val_items and (done % cfg.eval_every == 0 or done == cfg.max_steps):
                last_val = validation_rewards(val_fwd, val_items, cfg, device, dtype)
                log.log(step, "validation", **last_val)
                tqdm.write(f"step {done}: validation reward accuracy "
                           f"{last_val['rewards/accuracies']:.3f}, "
                           f"margin {last_val['rewards/margins']:.2f}")
            if dist.main and train_items and done == cfg.max_steps:
                tp = validation_rewards(val_fwd, train_items, cfg, device, dtype)
                log.log(step, "train_pairs", **tp)
                tqdm.write(f"reward accuracy on {tp['pairs']} training pairs "
                           f"{tp['rewards/accuracies']:.3f}")
            if done == cfg.max_steps or (cfg.save_every and done % cfg.save_every == 0):
                save(done)
                last_saved = done
            common.debug_step_delay()
    finally:
        bar.close()
    if start == cfg.max_steps:  # resumed a finished run: write the checkpoint again
        save(cfg.max_steps)

    elapsed = seconds_before + time.time() - t_start
    print(f"saved {cfg.out}: {pairs_seen} pairs in {elapsed:.0f}s" + (
        f"; validation reward accuracy {last_val['rewards/accuracies']:.3f}" if last_val else ""))
    return 0


if __name__ == "__main__":
    common.run_main(main)
