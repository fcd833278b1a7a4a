"""Stage 2: Direct Preference Head training (the paper's alignment stage).

Loads an SFT checkpoint, adds the preference head (pooler + w, no bias; w starts at zero,
--head-init, so the head moves the backbone only once it has learned what to read) and trains on
(prompt, chosen, rejected) pairs: choice tasks give chosen = the gold answer and rejected = every
wrong candidate (--rejected all, the default; beyond the paper, and cheap in the shared-prefix
layout), or one wrong candidate drawn uniformly afresh at each visit (--rejected one, the paper);
preference data is used as given; synth/instruct pairs its exact answer with near misses
(--balance-labels, ours and off by default, makes a yes/no task's gold answers equally
frequent). The head's loss is the separable or the contrastive DPH objective with label
smoothing ε; with several wrong candidates the contrastive loss is one softmax over the item's
candidates (--contrast softmax, the default, beyond the paper; losses.listwise_dph_loss, equal to
the paper's loss for one wrong candidate) or one pair per wrong candidate (--contrast pairs);
cDPO always takes one pair per wrong candidate. Jointly (as in the paper's alignment stage) the
LM is trained with conservative DPO against a frozen copy of the SFT model: the alignment loss
is w_dph·L_DPH + w_dpo·L_cDPO
(--dph-weight, --dpo-weight; 0 disables cDPO and skips the reference model). The backbone is
pulled toward its SFT weights (prior regularisation); the head decays toward zero.

    python train_dph.py --loss contrastive            # out/sft -> out/dph
    python train_dph.py --freeze-backbone --dpo-weight 0   # head only: LM outputs unchanged
"""
from __future__ import annotations

import copy
import dataclasses
import random
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

import plumbing
from data import REJECTED, TaskSampler, collate_choices, draw_pairs, score_choices
from losses import (CONTRAST_KINDS, decayed_parameters, dpo_loss, items_dph_loss, pair_index,
                    prior_regularization, reward_metrics, reward_penalty)
from model import PreferenceHead, use_attention
from plumbing import RunConfig, UsageError, inputs, opt
from plumbing.frozen import StateCache, cached_pair_loss, cached_validation

@dataclass
class DPHConfig(RunConfig):
    """The flags of this stage; RunConfig (plumbing/) has those both trainers share."""
    init: str = opt("out/sft", "SFT checkpoint, or a pretrained .gguf / Hugging Face directory")
    out: str = opt("out/dph", "output checkpoint directory")
    tasks: str = opt("", "tasks and mixtures (default: the SFT checkpoint's tasks)")
    loss: str = opt("contrastive", "DPH objective (the authors' code defaults to separable, which "
                                   "fits less well here: README)", ["separable", "contrastive"])
    label_smoothing: float = opt(0.1, "ε of the DPH loss, 0 <= ε < 0.5")
    contrast: str = opt("softmax", "contrastive loss on several wrong answers: one softmax over "
                                   "the candidates (beyond the paper), or a pair each",
                        list(CONTRAST_KINDS))
    dph_weight: float = opt(1.0, "w_dph, weight of the DPH loss in the alignment loss")
    dpo_weight: float = opt(1.0, "w_dpo, weight of the joint cDPO term (0: off, no reference)")
    rejected: str = opt("all", "rejected answers per item: every wrong candidate (beyond the "
                               "paper), or one drawn afresh each visit (the paper)", list(REJECTED))
    beta: float = opt(0.1, "β of the cDPO term")
    dpo_label_smoothing: float = opt(0.1, "ε of the cDPO term")
    reward_penalty: float = opt(0.0, "λ of the optional reward penalty (not in the paper)")
    reward_penalty_kind: str = opt("squared", "λ·mean(r_w²+r_l²) | λ·mean((r_w+r_l)²)",
                                   ["squared", "sum"])
    freeze_backbone: bool = opt(False, "train the head only")
    new_head: bool = opt(False, "--init of a DPH checkpoint: replace its trained head")
    pooler: str = opt("identity", "head pooler (the authors' released model: swiglu)",
                      list(PreferenceHead.POOLERS))
    pooler_dropout: float = opt(0.0, "dropout inside the pooler")
    head_init: str = opt("zero", "a fresh head's w: zero (every reward 0 at step 0, so the head's "
                                 "first gradients into the backbone are 0; ours) or normal(0, 0.02)",
                         ["zero", "normal"])
    balance_labels: bool = opt(False, "repeat the rarer gold answers of a fixed-answer task "
                                      "(yes/no) until all are equally frequent (ours)")
    layout: str = opt("shared", "shared: prompt once, answers as branches; padded: a row each",
                      ["shared", "padded"])
    batch_size: int = opt(12, "pairs per micro-batch")
    max_steps: int = opt(1000, "optimiser steps")
    lr: float = opt(5e-4, "peak learning rate of the backbone")
    head_lr: float = opt(3e-3, "peak learning rate of the head and pooler")
    warmup_steps: int = opt(15, "linear warmup steps")
    prior_decay: float = opt(0.5, "decay of the backbone toward the SFT weights")
    head_decay: float = opt(0.1, "decay of the head and pooler toward zero")
    max_len: int = opt(0, "longest prompt + answer in tokens (0: the model's context)")
    eval_every: int = opt(100, "steps between validation reward accuracies")
    eval_pairs: int = opt(256, "validation pairs per evaluation (0: none)")
    seed: int = opt(0, "seed for the head's initialisation and the data order")


# The interval of every int and float flag (plumbing.check_ranges; "max" = 2**63 - 1); a new
# numeric flag needs its entry here (tests/test_errors.py checks that every one has one).
RANGES = {
    **plumbing.RUN_RANGES,
    "label_smoothing": "[0, 0.5)", "dpo_label_smoothing": "[0, 0.5)",
    # loss weights: beyond 1e4 to 1 the other term is noise (set it to 0 instead)
    "dph_weight": "[0, 10000]", "dpo_weight": "[0, 10000]", "reward_penalty": "[0, 10000]",
    "beta": "(0, 1000]",  # β·(log-ratio margin): beyond ~1e3 the cDPO term is a step function
    "pooler_dropout": "[0, 1)", "head_lr": "(0, inf)", "head_decay": "[0, 1000]",
    "max_len": "[0, 1048576]", "eval_pairs": "[0, 1048576]",
}


def validate(cfg: DPHConfig, argv=None):
    plumbing.check_ranges(cfg, RANGES)
    no_dpo = ("the cDPO term is off (--dpo-weight 0)" if cfg.dpo_weight == 0 else
              "the cDPO term is off (--freeze-backbone)" if cfg.freeze_backbone else "")
    plumbing.note_unused(argv, {"beta": no_dpo, "dpo_label_smoothing": no_dpo,
                              "reward_penalty_kind": "--reward-penalty is 0"
                              if cfg.reward_penalty == 0 else "",
                              "lr": "--freeze-backbone" if cfg.freeze_backbone else "",
                              "prior_decay": "--freeze-backbone" if cfg.freeze_backbone else "",
                              "contrast": "--loss separable has no contrast"
                              if cfg.loss == "separable" else ""})
    if getattr(cfg, "dph_weight", 1.0) == 0 and (cfg.dpo_weight == 0 or cfg.freeze_backbone):
        raise UsageError("--dph-weight 0 with no cDPO term (--dpo-weight 0 or "
                         "--freeze-backbone): there is nothing to train")


def pair_loss(model, ref, batch, cfg, device, dtype, use_dpo):
    """The alignment loss w_dph·L_DPH + w_dpo·L_cDPO of one batch: chosen and rejected answers go
    through one forward pass; return (loss, metrics)."""
    with plumbing.autocast(device, dtype):
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
        with torch.no_grad(), plumbing.autocast(device, dtype):
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
    """Reward accuracy and margin on fixed (chosen, rejected) validation pairs."""
    model.eval()
    with plumbing.autocast(device, dtype):
        r = torch.cat([score_choices(model, collate_choices(
            items[i:i + cfg.batch_size], cfg.layout, 0, end_id=end_id).to(device), logps=False)[
            "rewards"].float().view(-1, 2) for i in range(0, len(items), cfg.batch_size)])
    model.train()
    return {**{k: v.item() for k, v in reward_metrics(r[:, 0], r[:, 1]).items()}, "pairs": len(r)}


def main(argv=None):
    run = plumbing.open_run(DPHConfig, __doc__.splitlines()[0], validate, argv,
                            added={"contrast": "pairs", "head_init": "normal"})  # older runs
    cfg, dist, device, dtype = run.cfg, run.dist, run.device, run.dtype
    if run.state is not None:  # the run's own tokenizer, model with head, starting weights
        (model, tok), init_config = run.resumed_model(), run.state["prior"]
    else:  # init_config: the --init checkpoint's config.json (its SFT settings and tasks)
        model, init_config, tok = plumbing.load_init(cfg.init)
    specs, train, val_items, train_items, max_len = inputs.dph_data(cfg, model, tok,
                                                                    init_config, device)
    if run.state is None:
        model.set_dropout(0.0)  # off in this stage (pooler dropout is the head's own)
        inputs.continue_head(model, cfg, argv)
    use_attention(model, cfg.attention)  # before the reference copy below, which keeps it
    model.to(device).train()
    use_dpo = cfg.dpo_weight > 0 and not cfg.freeze_backbone
    if cfg.freeze_backbone:
        model.freeze_backbone()
        if cfg.dpo_weight > 0:
            print("--freeze-backbone: the LM cannot change, so the cDPO term is skipped")
    # frozen backbone, one process: its states at each answer's <|im_end|> are computed once per
    # example and the head trains on them (plumbing/frozen.py); under torchrun the head's
    # gradients go through DDP, so every batch runs the backbone
    cache = StateCache(model, tok, max_len, device, dtype, cfg.batch_size) \
        if cfg.freeze_backbone and not dist.active else None
    # cDPO's frozen reference π_ref: a copy of the starting LM
    ref = copy.deepcopy(model.lm).eval().requires_grad_(False) if use_dpo else None
    run.announce(model, f"tasks: {', '.join(s.name for s in specs)}; "
                        f"{sum(map(len, train.values()))} training examples", "pairs")

    # The starting weights (SFT backbone + fresh head), stored for --resume so that it does not
    # depend on --init staying put: the backbone's anchors of the prior regularisation.
    init_weights = run.state["init"] if run.state is not None else \
        {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    decayed = decayed_parameters(model)
    backbone = [(n, p) for n, p in decayed if not n.startswith("head.")]
    head = [(n, p) for n, p in decayed if n.startswith("head.")]
    anchors = [init_weights[n].to(device) for n, _ in backbone]
    groups = [{"params": list(model.head.parameters()), "peak_lr": cfg.head_lr}]
    if not cfg.freeze_backbone:
        groups.append({"params": list(model.lm.parameters()), "peak_lr": cfg.lr})
    optimizer = plumbing.make_optimizer(groups, device)
    # Every rank draws the same global batch of pairs and trains on its own share of it, so the
    # run is the same (up to float rounding) for any number of processes with one global batch.
    sampler = TaskSampler(train, cfg.seed)
    pair_rng = random.Random(cfg.seed + 1)  # rejected answers: a fresh draw at every visit
    seen = {"pairs": 0, "run": 0, "validation": {}}
    if run.state is not None:
        sampler.load_state_dict(run.state["data"])
        plumbing.set_plain_random_state(pair_rng, run.state["pair_rng"])
        seen.update(pairs=run.state["pairs"], validation=run.state["validation"])

    def payload(done):  # what resume.pt and config.json hold besides the shared keys
        summary = {"tasks": [s.name for s in specs], "pairs": seen["pairs"],
                   "validation": seen["validation"]}
        return ({"head": model.head_cfg, "data": sampler.state_dict(), "prior": init_config,
                 "pair_rng": plumbing.plain_random_state(pair_rng), "pairs": seen["pairs"],
                 "validation": seen["validation"]},
                summary, {"stage": "dph", "sft": init_config.get("sft", {}),
                          **{k: init_config[k] for k in ("pretrained",) if k in init_config},
                          "dph": dataclasses.asdict(cfg)})
    fwd, val_fwd = run.begin(model, optimizer, tok, init_weights, payload)

    def check_rewards(items):  # reward accuracy on fixed pairs
        if cache is not None:
            return cached_validation(model.head, cache, items)
        return validation_rewards(val_fwd, items, cfg, device, dtype, tok.im_end)

    def micro_step(last):
        items = draw_pairs(sampler, tok, run.global_batch, pair_rng, max_len, cfg.rejected,
                           cache.add_examples if cache is not None else None)  # the global batch
        if cache is not None:  # the head alone, on cached states
            loss, metrics = cached_pair_loss(model.head, cache, items, cfg)
            (loss / cfg.grad_accum).backward()
        else:
            batch = collate_choices(items[dist.rank::dist.world], cfg.layout, tok.pad,
                                    end_id=tok.im_end).to(device)
            with run.sync(last):
                loss, metrics = pair_loss(fwd, ref, batch, cfg, device, dtype, use_dpo)
                (loss / cfg.grad_accum).backward()
        seen["pairs"] += len(items)
        seen["run"] += len(items)
        return {"loss": loss.detach(), **metrics}

    def decay(scale):  # the backbone toward its starting weights, the head toward zero
        prior_regularization(backbone, anchors, cfg.lr * scale, cfg.prior_decay)
        prior_regularization(head, None, cfg.head_lr * scale, cfg.head_decay)

    def after_step(step, done):
        if dist.main and val_items and (done % cfg.eval_every == 0 or done == cfg.max_steps):
            seen["validation"] = check_rewards(val_items)
            run.log.log(step, "validation", **seen["validation"])
            tqdm.write(f"step {done}: validation reward accuracy "
                       f"{seen['validation']['rewards/accuracies']:.3f}, "
                       f"margin {seen['validation']['rewards/margins']:.2f}")
        if dist.main and train_items and done == cfg.max_steps:
            tp = check_rewards(train_items)
            run.log.log(step, "train_pairs", **tp)
            tqdm.write(f"reward accuracy on {tp['pairs']} training pairs "
                       f"{tp['rewards/accuracies']:.3f}")

    if dist.main and run.start == 0 and train_items:
        run.log.log(0, "train_pairs", **check_rewards(train_items))
    pairs_s = lambda: seen["run"] / max(time.time() - run.t_start, 1e-9)  # noqa: E731
    run.loop(micro_step, decay, desc=f"dph/{cfg.loss}", after_step=after_step,
             postfix=lambda agg: {"loss": f"{agg['loss']:.3f}",
                                  "acc": f"{agg['rewards/accuracies']:.2f}",
                                  "pairs_s": f"{pairs_s():.1f}"})
    last_val = seen["validation"]
    print(f"saved {cfg.out}: {seen['pairs']} pairs in {run.seconds():.0f}s" + (
        f"; validation reward accuracy {last_val['rewards/accuracies']:.3f}" if last_val else ""))
    return 0


if __name__ == "__main__":
    plumbing.run_main(main)
