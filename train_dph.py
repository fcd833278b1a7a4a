"""Stage 2: Direct Preference Head training (the paper's alignment stage).

Loads an SFT checkpoint, adds the preference head (pooler + w, no bias) and trains on
(prompt, chosen, rejected) pairs: choice tasks give chosen = the gold answer and rejected = every
wrong candidate (--rejected all, the default; beyond the paper, and cheap in the shared-prefix
layout), or one wrong candidate drawn uniformly afresh at each visit (--rejected one, the paper);
preference data is used as given; synth/instruct pairs its exact answer with near misses. The
head's loss is the separable or the contrastive DPH objective with label smoothing ε; with
several wrong candidates the contrastive loss is one softmax over the item's candidates
(--contrast softmax, the default, beyond the paper; losses.listwise_dph_loss, equal to the
paper's loss for one wrong candidate) or one pair per wrong candidate (--contrast pairs); cDPO
always takes one pair per wrong candidate. Jointly (as in the paper's alignment stage) the LM is
trained with conservative DPO against a frozen copy of the SFT model: the alignment loss is
w_dph·L_DPH + w_dpo·L_cDPO
(--dph-weight, --dpo-weight; 0 disables cDPO and skips the reference model). The backbone is
pulled toward its SFT weights (prior regularisation); the head decays toward zero.

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
from data import (REJECTED, TaskSampler, apply_label_noise, collate_choices, make_pairs,
                  pair_index, score_choices)
from frozen import StateCache, cached_pair_loss, cached_validation
from losses import CONTRAST_KINDS, dpo_loss, items_dph_loss, reward_penalty
from checkpoint import save_checkpoint, save_train_state
from model import DPHModel, ModelConfig, PreferenceHead
from tasks import InstructionExample, TaskError, resolve_tasks

PAIR_KINDS = ("choice", "preference", "instruction")  # instructions: those with distractors


@dataclass
class DPHConfig:
    init: str = opt("out/sft", "SFT checkpoint to start from, or a pretrained .gguf file or "
                                "Hugging Face model directory")
    out: str = opt("out/dph", "output checkpoint directory")
    overwrite: bool = opt(False, "replace a previous run in --out")
    tasks: str = opt("", "tasks and mixtures (default: the SFT checkpoint's tasks)")
    data_dir: str = opt("", "folder with real datasets (default: $DPH_DATA)")
    data_seed: int = opt(0, "seed of the built-in suite's generator")
    loss: str = opt("contrastive", "DPH objective (the authors' code defaults to separable, which "
                                   "fits less well here: README)", ["separable", "contrastive"])
    label_smoothing: float = opt(0.1, "ε of the DPH loss, 0 <= ε < 0.5")
    contrast: str = opt("softmax", "--loss contrastive on an item with several wrong answers: one "
                                   "softmax over its candidates (beyond the paper), or each "
                                   "(chosen, wrong) its own pair; the same for 2 candidates",
                        list(CONTRAST_KINDS))
    dph_weight: float = opt(1.0, "w_dph, weight of the DPH loss in the alignment loss")
    dpo_weight: float = opt(1.0, "w_dpo, weight of the joint cDPO term on the LM (0: off, no "
                                 "reference)")
    rejected: str = opt("all", "rejected answers per item: all wrong candidates (beyond the "
                               "paper), or one drawn afresh at each visit (the paper)",
                        list(REJECTED))
    beta: float = opt(0.1, "β of the cDPO term")
    dpo_label_smoothing: float = opt(0.1, "ε of the cDPO term")
    reward_penalty: float = opt(0.0, "λ of the optional reward penalty (not in the paper)")
    reward_penalty_kind: str = opt("squared", "λ·mean(r_w²+r_l²) or λ·mean((r_w+r_l)²)",
                                   ["squared", "sum"])
    freeze_backbone: bool = opt(False, "train the head only")
    new_head: bool = opt(False, "--init of a DPH checkpoint: replace its head with a fresh one "
                                "(default: continue training it)")
    pooler: str = opt("identity", "head pooler (the authors' released model: swiglu)",
                      list(PreferenceHead.POOLERS))
    pooler_dropout: float = opt(0.0, "dropout inside the pooler")
    layout: str = opt("shared", "shared: prompt once, answers as branches; padded: a row each",
                      ["shared", "padded"])
    batch_size: int = opt(16, "pairs per micro-batch")
    grad_accum: int = opt(1, "micro-batches per optimiser step")
    max_steps: int = opt(400, "optimiser steps")
    lr: float = opt(5e-4, "peak learning rate of the backbone")
    head_lr: float = opt(3e-3, "peak learning rate of the head and pooler")
    min_lr_ratio: float = opt(0.1, "final learning rate / peak")
    warmup_steps: int = opt(15, "linear warmup steps")
    prior_decay: float = opt(0.5, "decay of the backbone toward the SFT weights")
    head_decay: float = opt(0.1, "decay of the head and pooler toward zero")
    grad_clip: float = opt(1.0, "clip the gradient norm (0: off)")
    max_len: int = opt(0, "longest prompt + answer in tokens (0: the model's context)")
    label_noise: float = opt(0.0, "fraction of training labels flipped (robustness experiment)")
    max_examples: int = opt(0, "use at most this many training examples per task (0: all)")
    eval_every: int = opt(100, "steps between validation reward accuracies")
    eval_pairs: int = opt(256, "validation pairs per evaluation (0: none)")
    seed: int = opt(0, "seed for the head's initialisation and the data order")
    device: str = opt("auto", "auto | cpu | cuda | mps")
    dtype: str = opt("auto", "auto | float32 | bfloat16 | float16 (autocast)")
    compile: bool = opt(False, "torch.compile the model")
    save_every: int = opt(100, "steps between resumable checkpoints in --out (0: at the end only)")
    resume: bool = opt(False, "continue the run in --out from its last checkpoint; unset flags "
                              "come from that run (starts at step 0 if there is none yet)")


# The interval of every int and float flag (common.check_ranges; "max" = 2**63 - 1); a new
# numeric flag needs its entry here (tests/test_errors.py checks that every one has one).
RANGES = {
    "data_seed": "[0, max]", "seed": "[0, max]",
    "label_smoothing": "[0, 0.5)", "dpo_label_smoothing": "[0, 0.5)",
    # loss weights: beyond 1e4 to 1 the other term is noise (set it to 0 instead)
    "dph_weight": "[0, 10000]", "dpo_weight": "[0, 10000]", "reward_penalty": "[0, 10000]",
    "beta": "(0, 1000]",  # β·(log-ratio margin): beyond ~1e3 the cDPO term is a step function
    "pooler_dropout": "[0, 1)",
    "batch_size": "[1, 1048576]", "grad_accum": "[1, 1048576]",
    "max_steps": "[1, 1000000000]", "warmup_steps": "[0, 1000000000]",
    "lr": "(0, inf)", "head_lr": "(0, inf)", "min_lr_ratio": "[0, 1]",
    "prior_decay": "[0, 1000]", "head_decay": "[0, 1000]", "grad_clip": "[0, inf)",
    "max_len": "[0, 1048576]", "label_noise": "[0, 1]", "max_examples": "[0, max]",
    "eval_every": "[1, max]", "eval_pairs": "[0, 1048576]", "save_every": "[0, max]",
}


def validate(cfg: DPHConfig, argv=None):
    common.check_ranges(cfg, RANGES)
    no_dpo = ("the cDPO term is off (--dpo-weight 0)" if cfg.dpo_weight == 0 else
              "the cDPO term is off (--freeze-backbone)" if cfg.freeze_backbone else "")
    common.note_unused(argv, {"beta": no_dpo, "dpo_label_smoothing": no_dpo,
                              "reward_penalty_kind": "--reward-penalty is 0"
                              if cfg.reward_penalty == 0 else "",
                              "lr": "--freeze-backbone" if cfg.freeze_backbone else "",
                              "prior_decay": "--freeze-backbone" if cfg.freeze_backbone else "",
                              "contrast": "--loss separable has no contrast"
                              if cfg.loss == "separable" else ""})
    if getattr(cfg, "dph_weight", 1.0) == 0 and (cfg.dpo_weight == 0 or cfg.freeze_backbone):
        raise UsageError("--dph-weight 0 with no cDPO term (--dpo-weight 0 or "
                         "--freeze-backbone): there is nothing to train")


def continue_head(model, cfg: DPHConfig, argv=None):
    """A fresh head on an SFT checkpoint. An --init that has a head (a DPH checkpoint) keeps it
    and trains it further, with a note, unless --new-head; a --pooler that differs from the
    head's is an error then (it cannot apply to a trained head)."""
    if model.head is None or cfg.new_head:
        if model.head is not None:
            print(f"note: --new-head: the trained head of {cfg.init} is replaced by a fresh "
                  f"{cfg.pooler} head", file=sys.stderr)
        model.add_head(cfg.pooler, cfg.pooler_dropout)
        return
    kind = model.head_cfg.get("pooler")
    if "pooler" in common.explicit_flags(argv) and cfg.pooler != kind:
        raise UsageError(f"--pooler {cfg.pooler}: --init {cfg.init} has a trained {kind} head; "
                         f"pass --new-head to replace it")
    model.head.dropout.p = cfg.pooler_dropout
    model.head_cfg["dropout"] = cfg.pooler_dropout
    print(f"note: --init {cfg.init} has a trained {kind} head: training continues from it "
          f"(--new-head starts a fresh one)", file=sys.stderr)


def pair_loss(model, ref, batch, cfg, device, dtype, use_dpo):
    """The alignment loss w_dph·L_DPH + w_dpo·L_cDPO of one batch: chosen and rejected answers go
    through one forward pass; return (loss, metrics)."""
    with common.autocast(device, dtype):
        res = score_choices(model, batch, rewards=True, logps=use_dpo)
    w, l = pair_index(batch.n_branches, res["rewards"].device)
    r = res["rewards"].float()
    loss, metrics = items_dph_loss(r, batch.n_branches, cfg.loss, cfg.contrast,
                                   cfg.label_smoothing)
    loss = cfg.dph_weight * loss
    if cfg.reward_penalty > 0:
        pen, pm = reward_penalty(r[w], r[l], cfg.reward_penalty, cfg.reward_penalty_kind)
        loss = loss + pen
        metrics.update(pm)
    if use_dpo:
        with torch.no_grad(), common.autocast(device, dtype):
            ref_lp = score_choices(ref, batch, rewards=False, logps=True)["logp"].float()
        lp = res["logp"].float()
        dloss, dm = dpo_loss(lp[w], lp[l], ref_lp[w], ref_lp[l], cfg.beta,
                             cfg.dpo_label_smoothing)
        loss = loss + cfg.dpo_weight * dloss
        metrics.update({"dpo/loss": dloss.detach(), "dpo/accuracies": dm["rewards/accuracies"],
                        "dpo/margins": dm["rewards/margins"]})
    return loss, metrics


@torch.no_grad()
def validation_rewards(model, items, cfg, device, dtype, end_id):
    """Reward accuracy and margin on fixed validation pairs."""
    model.eval()
    chosen, rejected = [], []
    for i in range(0, len(items), cfg.batch_size):
        b = collate_choices(items[i:i + cfg.batch_size], cfg.layout, 0,
                             end_id=end_id).to(device)
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
    error (--max-len too small); when some would, a note. Returns the pairs made."""
    rng = random.Random(0)  # its own generator: the training draws stay untouched
    made = []
    for name, exs in train.items():
        probe = exs[:sample]
        pairs = make_pairs(tok, probe, rng, max_len)
        made += pairs
        dropped = len(probe) - len(pairs)
        if 2 * dropped > len(probe):
            raise UsageError(f"--max-len {max_len} is too small for {name}: {dropped} of its first "
                             f"{len(probe)} examples cannot fit their answers")
        if dropped:
            print(f"note: {name}: {dropped} of the first {len(probe)} examples do not fit in "
                  f"{max_len} tokens and are skipped", file=sys.stderr)
    return made


def check_memory(mcfg, cfg: DPHConfig, pairs: list, device):
    """One micro-batch of pairs of the median length seen must fit in the device (a lower bound:
    real batches hold longer pairs too)."""
    if not pairs:
        return
    if cfg.layout == "shared":  # a row per item: the prompt once, then every branch
        lengths = sorted(len(it.prompt) + sum(map(len, it.branches)) for it in pairs)
        rows = cfg.batch_size
    else:  # a row per answer
        lengths = sorted(len(it.prompt) + max(map(len, it.branches)) for it in pairs)
        rows = cfg.batch_size * min(len(it.branches) for it in pairs)
    common.check_fits(common.batch_bytes(mcfg, rows, lengths[len(lengths) // 2]), device,
                      f"one micro-batch of --batch-size {cfg.batch_size} pairs",
                      "lower it (--grad-accum keeps the batch)")


def main(argv=None):
    cfg, _ = common.parse_config(DPHConfig, __doc__.splitlines()[0], argv)
    cfg, state = common.open_resume(cfg, argv)  # --resume: the stored config and training state
    if state is not None and "contrast" not in state["config"]:  # a run from before --contrast
        cfg = dataclasses.replace(cfg, contrast="pairs")
    validate(cfg, argv)
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
    # instruction data makes pairs only where it knows wrong answers (synth/instruct does)
    plain = [n for n, exs in train.items() if exs and isinstance(exs[0], InstructionExample)
             and not any(ex.distractors for ex in exs)]
    train = {n: exs for n, exs in train.items() if n not in plain}
    specs = [s for s in specs if s.name not in plain]
    if not specs:
        raise UsageError(f"--tasks {tasks}: no choice or preference task to make pairs from")
    if cfg.label_noise:
        train = {k: apply_label_noise(v, cfg.label_noise, cfg.seed) for k, v in train.items()}
    check_memory(model.cfg, cfg, check_fit(tok, train, max_len), device)
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
        model.set_dropout(0.0)  # off in this stage (pooler dropout is the head's own)
        continue_head(model, cfg, argv)
    model.to(device).train()
    use_dpo = cfg.dpo_weight > 0 and not cfg.freeze_backbone
    if cfg.freeze_backbone:
        model.freeze_backbone()
        if cfg.dpo_weight > 0:
            print("--freeze-backbone: the LM cannot change, so the cDPO term is skipped")
    # frozen backbone, one process: its states at each answer's <|im_end|> are computed once per
    # example and the head trains on them (frozen.py); under torchrun the head's gradients go
    # through DDP, so every batch runs the backbone
    cache = StateCache(model, tok, max_len, device, dtype, cfg.batch_size) \
        if cfg.freeze_backbone and not dist.active else None

    def check_rewards(items):  # reward accuracy on fixed pairs
        if cache is not None:
            return cached_validation(model.head, cache, items)
        return validation_rewards(val_fwd, items, cfg, device, dtype, tok.im_end)
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
                 **({"pretrained": prior["pretrained"]} if "pretrained" in prior else {}),
                 "dph": {**dataclasses.asdict(cfg), **summary}}
        if dist.active:
            extra["distributed"] = {"world_size": dist.world, "backend": dist.backend,
                                    "replica_sha256": digests}
        save_checkpoint(cfg.out, model, tok.to_json(), extra=extra)

    bar = tqdm(range(start, cfg.max_steps), desc=f"dph/{cfg.loss}", dynamic_ncols=True,
               initial=start, total=cfg.max_steps, disable=not dist.main)
    t_start, pairs_run = time.time(), 0
    if dist.main and start == 0 and train_items:
        log.log(0, "train_pairs", **check_rewards(train_items))
    try:
        for step in bar:
            scale = common.lr_at(step, 1.0, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
            for g, spec in zip(opt_.param_groups, groups):
                g["lr"] = spec["lr_peak"] * scale
            agg = {}
            for micro in range(cfg.grad_accum):
                items, misses = [], 0
                while len(items) < global_batch:  # the global batch of pairs
                    exs = sampler.draw(1)
                    if cache is not None:
                        cache.add_examples(exs)  # every candidate, the first time only
                    new = make_pairs(tok, exs, pair_rng, max_len, cfg.rejected)
                    misses = 0 if new else misses + 1
                    if misses == 1000:
                        raise TaskError(f"1000 examples in a row do not fit in {max_len} tokens; "
                                        f"raise --max-len")
                    items += new
                last = micro == cfg.grad_accum - 1
                if cache is not None:  # the head alone, on cached states
                    loss, metrics = cached_pair_loss(model.head, cache, items, cfg)
                    (loss / cfg.grad_accum).backward()
                else:
                    batch = collate_choices(items[dist.rank::dist.world], cfg.layout,
                                            tok.pad, end_id=tok.im_end).to(device)
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
                last_val = check_rewards(val_items)
                log.log(step, "validation", **last_val)
                tqdm.write(f"step {done}: validation reward accuracy "
                           f"{last_val['rewards/accuracies']:.3f}, "
                           f"margin {last_val['rewards/margins']:.2f}")
            if dist.main and train_items and done == cfg.max_steps:
                tp = check_rewards(train_items)
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
