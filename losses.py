"""Training objectives for Direct Preference Heads (DPH) and the LM head.

Paper: Hadji-Kyriacou & Arandjelović, "Would I Lie To You? Inference Time Alignment of Language
Models using Direct Preference Heads", NeurIPS 2024 (arXiv 2405.20053).

Paper <-> code
    the paper's Separable DPH objective (smoothed per-completion targets)  separable_dph_loss
    the paper's Contrastive DPH objective (smoothed reward difference)     contrastive_dph_loss
    either of the two, chosen by name (``--loss``)                         dph_loss
    Contrastive DPH over all K candidates of an item (NOT in the paper)    listwise_dph_loss
    the DPH loss of a batch of items [chosen, wrong...] (``--contrast``)    items_dph_loss
    reward penalty (NOT in the paper; added later by the authors)          reward_penalty
    the paper's link to Conservative DPO (cDPO), on the LM head            dpo_loss
    log π(y|x) of each answer, for dpo_loss                                answer_logps
    log p of each target token, without the full logits tensor            token_logps
    supervised fine-tuning (token cross-entropy)                           sft_loss
    the paper's prior regularisation (decay toward the starting weights)   prior_regularization

Notation: r_w / r_l are the head's rewards for the chosen ("winning") and rejected ("losing")
completion, ε is the label smoothing (0 ≤ ε < 0.5), σ the logistic function. Every sigmoid loss
here is the same smoothed logistic loss

    ℓ_ε(x) = −(1−ε)·log σ(x) − ε·log σ(−x),

the expected log-loss when the label is flipped with probability ε. Its minimum is at
x* = log((1−ε)/ε), finite for ε > 0 (the gradient changes sign past x*), which is what makes
label smoothing a defence against noisy labels. With that ℓ_ε:

    L_sep = mean ℓ_ε(r_w) + mean ℓ_ε(−r_l)      (two contrastive problems against a zero anchor)
    L_con = mean ℓ_ε(r_w − r_l)
    L_dpo = mean ℓ_ε(β·Δ),  Δ = (log π_w − log π_ref,w) − (log π_l − log π_ref,l)

Each loss returns ``(loss, metrics)``; metrics are detached scalar tensors named as the DPO
ecosystem names them (``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``,
``rewards/margins``). This file depends on torch alone and can be copied into another project.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn.functional as F

Metrics = Dict[str, torch.Tensor]

DPH_LOSS_KINDS = ("separable", "contrastive")
CONTRAST_KINDS = ("pairs", "softmax")
PENALTY_KINDS = ("squared", "sum")


# ----------------------------------------------------------------------------------------------
# Helpers

def _check_label_smoothing(label_smoothing: float) -> None:
    # written as `not (a <= x < b)` so that NaN is rejected too
    if not (0.0 <= float(label_smoothing) < 0.5):
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")


def _check_pair(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> None:
    if r_chosen.shape != r_rejected.shape:
        raise ValueError(f"chosen and rejected must have the same shape, "
                         f"got {tuple(r_chosen.shape)} and {tuple(r_rejected.shape)}")


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> fp32; fp32 and fp64 are kept as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _smoothed_logistic(x: torch.Tensor, eps: float) -> torch.Tensor:
    """ℓ_ε(x) = −(1−ε)·log σ(x) − ε·log σ(−x), elementwise. logsigmoid keeps it finite for any x."""
    return -(1.0 - eps) * F.logsigmoid(x) - eps * F.logsigmoid(-x)


@torch.no_grad()
def reward_metrics(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> Metrics:
    r_chosen, r_rejected = _upcast(r_chosen.detach()), _upcast(r_rejected.detach())
    return {
        "rewards/chosen": r_chosen.mean(),
        "rewards/rejected": r_rejected.mean(),
        "rewards/accuracies": (r_chosen > r_rejected).float().mean(),
        "rewards/margins": (r_chosen - r_rejected).mean(),
    }


# ----------------------------------------------------------------------------------------------
# DPH objectives (the paper's Separable and Contrastive DPH)

def separable_dph_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor,
                       label_smoothing: float = 0.0) -> Tuple[torch.Tensor, Metrics]:
    """The paper's Separable DPH objective: each completion is its own binary decision.

        L_sep = mean_B[−(1−ε)·log σ(r_w) − ε·log σ(−r_w)]
              + mean_B[−(1−ε)·log σ(−r_l) − ε·log σ(r_l)]

    Optimum: r_w* = log((1−ε)/ε), r_l* = −log((1−ε)/ε) (unbounded when ε = 0). Rewards get an
    absolute meaning: positive = good.

    Args:
        r_chosen: (B,) rewards of the chosen completions.
        r_rejected: (B,) rewards of the rejected completions.
        label_smoothing: ε, 0 ≤ ε < 0.5.
    Returns:
        loss: () scalar; metrics: dict of detached () tensors.
    """
    _check_label_smoothing(label_smoothing)
    _check_pair(r_chosen, r_rejected)
    r_w, r_l = _upcast(r_chosen), _upcast(r_rejected)
    loss = (_smoothed_logistic(r_w, label_smoothing).mean()
            + _smoothed_logistic(-r_l, label_smoothing).mean())
    return loss, reward_metrics(r_chosen, r_rejected)


def contrastive_dph_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor,
                         label_smoothing: float = 0.0) -> Tuple[torch.Tensor, Metrics]:
    """The paper's Contrastive DPH objective: a smoothed Bradley–Terry loss on the reward difference.

        L_con = mean_B[−(1−ε)·log σ(r_w − r_l) − ε·log σ(r_l − r_w)]

    The same form as cDPO with no reference model and no β. Optimal margin r_w − r_l =
    log((1−ε)/ε) (≈ 2.20 at ε = 0.1); invariant to adding one constant to both rewards.

    Args:
        r_chosen: (B,) rewards of the chosen completions.
        r_rejected: (B,) rewards of the rejected completions.
        label_smoothing: ε, 0 ≤ ε < 0.5.
    Returns:
        loss: () scalar; metrics: dict of detached () tensors.
    """
    _check_label_smoothing(label_smoothing)
    _check_pair(r_chosen, r_rejected)
    margin = _upcast(r_chosen) - _upcast(r_rejected)  # (B,)
    loss = _smoothed_logistic(margin, label_smoothing).mean()
    return loss, reward_metrics(r_chosen, r_rejected)


def dph_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, kind: str = "separable",
             label_smoothing: float = 0.0) -> Tuple[torch.Tensor, Metrics]:
    """Either DPH objective by name: ``kind`` in ("separable", "contrastive"). Shapes as above."""
    if kind == "separable":
        return separable_dph_loss(r_chosen, r_rejected, label_smoothing)
    if kind == "contrastive":
        return contrastive_dph_loss(r_chosen, r_rejected, label_smoothing)
    raise ValueError(f"unknown DPH loss kind {kind!r}; choose one of {DPH_LOSS_KINDS}")


def listwise_dph_loss(rewards: torch.Tensor, n_candidates, label_smoothing: float = 0.0
                      ) -> Tuple[torch.Tensor, Metrics]:
    """The Contrastive DPH objective over all K candidates of an item at once. NOT in the paper,
    which scores one (chosen, rejected) pair; this is its Plackett–Luce (softmax) form, for items
    with one right answer and K−1 wrong ones. With p = softmax of the item's K rewards,

        L_list = mean_items[−(1−ε)·log p_w − ε·mean_{j wrong} log p_j]

    At K = 2, p_w = σ(r_w − r_l) and p_l = σ(r_l − r_w), so L_list is exactly the contrastive
    loss L_con; the pair form (one term per wrong candidate) would instead count an item with
    many wrong candidates many times, and push every wrong reward down separately. Optimum: each
    wrong log-odds log(p_w/p_j) = log((1−ε)(K−1)/ε), finite for ε > 0.

    Args:
        rewards: (N,) rewards; item i's K_i candidates are consecutive, its chosen one first.
        n_candidates: sequence of K_i ≥ 2, summing to N.
        label_smoothing: ε, 0 ≤ ε < 0.5.
    Returns:
        loss: () scalar; metrics: dict of detached () tensors, over the (chosen, wrong) pairs.
    """
    _check_label_smoothing(label_smoothing)
    sizes = [int(k) for k in n_candidates]
    if min(sizes, default=2) < 2 or sum(sizes) != rewards.shape[0] or rewards.dim() != 1:
        raise ValueError(f"rewards {tuple(rewards.shape)} must be flat and split into items of "
                         f">= 2 candidates, got sizes {sizes[:8]}")
    r = _upcast(rewards)
    # (B, K_max), padded with −inf so that padding takes no softmax mass
    grid = torch.nn.utils.rnn.pad_sequence(list(torch.split(r, sizes)), batch_first=True,
                                           padding_value=float("-inf"))
    logp = torch.log_softmax(grid, dim=1)
    k = torch.tensor(sizes, device=r.device)
    wrong = torch.arange(grid.shape[1], device=r.device)[None, :] < k[:, None]
    wrong[:, 0] = False
    mean_wrong = torch.where(wrong, logp, torch.zeros_like(logp)).sum(1) / (k - 1)
    loss = (-(1.0 - label_smoothing) * logp[:, 0] - label_smoothing * mean_wrong).mean()
    first = torch.cumsum(k, 0) - k  # each item's chosen index in `rewards`
    chosen = torch.repeat_interleave(first, k - 1)
    rejected = torch.tensor([i for s, n in zip(first.tolist(), sizes) for i in range(s + 1, s + n)],
                            device=r.device, dtype=torch.long)
    return loss, reward_metrics(rewards[chosen], rewards[rejected])


def items_dph_loss(rewards: torch.Tensor, n_candidates, kind: str = "contrastive",
                   contrast: str = "softmax", label_smoothing: float = 0.0
                   ) -> Tuple[torch.Tensor, Metrics]:
    """The DPH loss of a batch of items whose candidates are [chosen, wrong_1, ..., wrong_k],
    flat in ``rewards`` as in listwise_dph_loss: every (chosen, wrong_j) is one pair of
    ``dph_loss(kind)``, except that the contrastive loss with contrast "softmax" is
    listwise_dph_loss (one term per item). Items of two candidates give the same loss either
    way; the separable loss has no contrast and ignores it."""
    if contrast not in CONTRAST_KINDS:
        raise ValueError(f"unknown contrast {contrast!r}; choose one of {CONTRAST_KINDS}")
    if kind == "contrastive" and contrast == "softmax":
        return listwise_dph_loss(rewards, n_candidates, label_smoothing)
    w, l = pair_index(n_candidates, rewards.device)
    return dph_loss(rewards[w], rewards[l], kind, label_smoothing)


def pair_index(n_branches: list, device=None):
    """(chosen, rejected) answer indices of every pair in a batch whose items have branches
    [chosen, rejected_1, ..., rejected_k]: item i gives the k pairs (chosen_i, rejected_i,j)."""
    chosen, rejected, s = [], [], 0
    for k in n_branches:
        chosen += [s] * (k - 1)
        rejected += range(s + 1, s + k)
        s += k
    return (torch.tensor(chosen, device=device), torch.tensor(rejected, device=device))


def reward_penalty(r_chosen: torch.Tensor, r_rejected: torch.Tensor, weight: float,
                   kind: str = "squared") -> Tuple[torch.Tensor, Metrics]:
    """Optional penalty on reward size. NOT in the paper (the authors' code added it later).

        kind "squared": λ·mean_B(r_w² + r_l²)     keeps both rewards near zero
        kind "sum":     λ·mean_B((r_w + r_l)²)    keeps the pair centred on zero (fixes the
                                                  shift that the contrastive loss leaves free)
    Args:
        r_chosen, r_rejected: (B,) rewards.
        weight: λ ≥ 0.
    Returns:
        loss: () scalar; metrics: {"rewards/penalty": detached ()}.
    """
    if weight < 0:
        raise ValueError(f"reward penalty weight must be >= 0, got {weight}")
    _check_pair(r_chosen, r_rejected)
    r_w, r_l = _upcast(r_chosen), _upcast(r_rejected)
    if kind == "squared":
        loss = weight * (r_w.pow(2) + r_l.pow(2)).mean()
    elif kind == "sum":
        loss = weight * (r_w + r_l).pow(2).mean()
    else:
        raise ValueError(f"unknown reward penalty kind {kind!r}; choose one of {PENALTY_KINDS}")
    return loss, {"rewards/penalty": loss.detach()}


# ----------------------------------------------------------------------------------------------
# LM-head objectives: log-likelihoods, cDPO, SFT

def answer_logps(hidden: torch.Tensor, weight: torch.Tensor, site_row: torch.Tensor,
                 site_tgt: torch.Tensor, site_seq: torch.Tensor, n_answers: int,
                 keep: torch.Tensor = None) -> torch.Tensor:
    """log π(y|x) of every answer: the sum over its tokens (and its <|im_end|>) of
    log p(y_t | x, y_<t), the quantity cDPO compares against the reference model's.

    The answers' tokens are "sites": site m predicts token site_tgt[m] from row site_row[m] of
    `hidden` and belongs to answer site_seq[m] (data.collate_choices builds them). In the
    shared-prefix layout the prompt's last row predicts the first token of every answer.

    Args:
        hidden: (N, C) final hidden states; weight: (V, C) the LM head (token_logps);
        site_row, site_tgt, site_seq: (M,); keep: (M,) bool, sum only these sites (e.g. the
        content tokens, without <|im_end|>).
    Returns:
        (n_answers,) fp32 summed log-probabilities.
    """
    if keep is not None:
        site_row, site_tgt, site_seq = site_row[keep], site_tgt[keep], site_seq[keep]
    lp = token_logps(hidden[site_row], weight, site_tgt)  # (M,)
    return torch.zeros(n_answers, device=lp.device, dtype=lp.dtype).index_add(0, site_seq, lp)


def token_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                reduce: bool = False, chunk_rows: int = 0) -> torch.Tensor:
    """log p(targets[i] | hidden[i]) = z[t] − logsumexp(z), z = weight @ hidden[i], for each row
    (or their sum, reduce=True), without the (N, V) logits: chunk_rows rows at a time are
    projected, normalised and dropped (default: 4M logits a chunk). Exact: the same values and
    gradients as log_softmax(hidden @ weight.T) gathered at the targets.

    The gradient of a sum is the same for every upstream gradient up to its scale, so with
    reduce=True it is computed in the forward pass, while each chunk's logits exist, and the
    backward pass only scales it: three matmuls per chunk, as without chunks. Per row, the
    backward pass recomputes each chunk's logits: four.

    Args:
        hidden: (N, C); weight: (V, C); targets: (N,) long in [0, V). Under autocast the
        matmuls run in its dtype; the softmax and the sums are fp32 or wider.
    Returns:
        (N,) or () fp32 (fp64 for fp64 inputs).
    """
    if hidden.shape[:-1] != targets.shape or hidden.dim() != 2:
        raise ValueError(f"hidden (N, C) and targets (N,) disagree: {tuple(hidden.shape)} vs "
                         f"{tuple(targets.shape)}")
    chunk = chunk_rows or max(1, (1 << 22) // weight.shape[0])
    early = (reduce and torch.is_grad_enabled() and (hidden.requires_grad, weight.requires_grad))
    return _TokenLogps.apply(hidden, weight, targets, chunk, reduce, early or None)


class _TokenLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, reduce, early):
        dev = hidden.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else \
            torch.promote_types(hidden.dtype, weight.dtype)
        acc = torch.promote_types(dtype, torch.float32)  # the softmax and the sums
        out = torch.empty(hidden.shape[0], device=hidden.device, dtype=acc)
        lse = torch.empty_like(out)
        ctx.chunk, ctx.dtype, ctx.reduce, ctx.early = chunk, dtype, reduce, early is not None
        with torch.autocast(dev, enabled=False):
            if early is not None:  # (need d_hidden, need d_weight)
                ctx.save_for_backward(*_chunks(hidden, weight, targets, chunk, dtype, lse, out,
                                               need=early))
            else:
                _chunks(hidden, weight, targets, chunk, dtype, lse, out)
                ctx.save_for_backward(hidden, weight, targets, lse)
        return out.sum() if reduce else out

    @staticmethod
    def backward(ctx, grad):
        if ctx.early:  # the gradient of the sum, computed in the forward pass: scale it
            return *(None if d is None else d * grad.to(d.dtype) for d in ctx.saved_tensors), \
                None, None, None, None
        hidden, weight, targets, lse = ctx.saved_tensors
        grad = grad.expand(hidden.shape[0]) if ctx.reduce else grad
        with torch.autocast(hidden.device.type, enabled=False):
            d_hidden, d_weight = _chunks(hidden, weight, targets, ctx.chunk, ctx.dtype, lse,
                                         grad=grad, need=ctx.needs_input_grad[:2])
        return d_hidden, d_weight, None, None, None, None


def _chunks(hidden, weight, targets, chunk, dtype, lse, out=None, grad=None, need=(False, False)):
    """One pass over chunks of rows, each projected to its logits z = h W^T. With `out`: fill
    lse and out = log p at the targets. With need = (d_hidden?, d_weight?): also the gradients
    of Σ_i grad_i·log p_i (grad None: all ones), from d log p_t / dz = onehot(t) − softmax(z)."""
    acc = lse.dtype
    w = weight.to(dtype)
    d_hidden = torch.empty_like(hidden) if need[0] else None
    d_weight = torch.zeros(weight.shape, device=weight.device, dtype=acc) if need[1] else None
    for s in range(0, hidden.shape[0], chunk):
        h, t = hidden[s:s + chunk].to(dtype), targets[s:s + chunk, None]
        z = (h @ w.T).to(acc)  # (n, V): the only logits that exist
        if out is not None:
            lse[s:s + chunk] = torch.logsumexp(z, dim=-1)
            out[s:s + chunk] = z.gather(1, t).squeeze(1) - lse[s:s + chunk]
        if not any(need):
            continue
        g = torch.ones_like(t, dtype=acc) if grad is None else grad[s:s + chunk, None].to(acc)
        dz = z.sub_(lse[s:s + chunk, None]).exp_().mul_(-g).scatter_add_(1, t, g).to(dtype)
        if d_hidden is not None:
            d_hidden[s:s + chunk] = dz @ w
        if d_weight is not None and dtype == acc:
            d_weight.addmm_(dz.T, h)
        elif d_weight is not None:  # half-precision products, summed in fp32
            d_weight += (dz.T @ h).to(acc)
    return d_hidden, None if d_weight is None else d_weight.to(weight.dtype)


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
             beta: float = 0.1, label_smoothing: float = 0.0) -> Tuple[torch.Tensor, Metrics]:
    """Conservative DPO (cDPO; Rafailov et al. 2023, Mitchell 2023), trained jointly with the head.

        Δ = [log π(y_w|x) − log π_ref(y_w|x)] − [log π(y_l|x) − log π_ref(y_l|x)]
        L_dpo = mean_B[−(1−ε)·log σ(βΔ) − ε·log σ(−βΔ)]

    Optimal βΔ = log((1−ε)/ε). Metrics hold the implicit rewards β·(log π − log π_ref).

    Args:
        policy_chosen_logps, policy_rejected_logps: (B,) summed log π of each completion.
        ref_chosen_logps, ref_rejected_logps: (B,) the same under the frozen reference model.
        beta: β > 0, the KL strength.
        label_smoothing: ε, 0 ≤ ε < 0.5 (ε = 0: plain DPO).
    Returns:
        loss: () scalar; metrics: dict of detached () tensors.
    """
    _check_label_smoothing(label_smoothing)
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    _check_pair(policy_chosen_logps, policy_rejected_logps)
    chosen = _upcast(policy_chosen_logps) - _upcast(ref_chosen_logps)  # (B,)
    rejected = _upcast(policy_rejected_logps) - _upcast(ref_rejected_logps)  # (B,)
    loss = _smoothed_logistic(beta * (chosen - rejected), label_smoothing).mean()
    return loss, reward_metrics(beta * chosen, beta * rejected)


def sft_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
             ignore_index: int = -100) -> Tuple[torch.Tensor, Metrics]:
    """Supervised fine-tuning: token-mean cross-entropy over the non-ignored targets,

        L_sft = −(1/N) Σ_{t: y_t ≠ ignore} log p(y_t | x, y_<t),

    computed from the hidden states and the LM head (token_logps), so that the logits of ignored
    positions are never computed, and the others never all held at once.

    Args:
        hidden: (N, C) or (B, T, C) final hidden states; weight: (V, C) the LM head;
        labels: (N,) or (B, T), already aligned (position t's target is token t+1).
    Returns:
        loss: () scalar (0, still connected to the graph, if there are no targets);
        metrics: {"loss/sft": detached (), "tokens": () long, the number N of targets}.
    """
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden (..., C) and labels (...) disagree: "
                         f"{tuple(hidden.shape)} vs {tuple(labels.shape)}")
    keep = labels != ignore_index
    n_tokens = keep.sum()
    # sum / max(N, 1): the mean when N > 0, and a graph-connected 0 when every target is ignored
    loss = -token_logps(hidden[keep], weight, labels[keep], reduce=True) / n_tokens.clamp(min=1)
    return loss, {"loss/sft": loss.detach(), "tokens": n_tokens.detach()}


# ----------------------------------------------------------------------------------------------
# Prior regularisation


def decayed_parameters(model) -> list:
    """[(name, parameter)] that prior regularisation acts on: the trainable matrices, not the
    embeddings, norms or biases."""
    return [(n, p) for n, p in model.named_parameters()
            if p.requires_grad and p.dim() >= 2 and "embed" not in n]


@torch.no_grad()
def prior_regularization(params: list, anchors, lr: float, lam: float):
    """The paper's prior regularisation (the authors' code), applied after each optimiser step:

        θ ← θ − lr·λ·(θ − θ₀)

    a decoupled weight decay toward the weights θ₀ the stage started from, which keeps the
    fine-tuned model near its prior. anchors: one θ₀ per parameter, or None for θ₀ = 0 (plain
    decoupled weight decay: a model trained from scratch, or a new head).

    Args:
        params: [(name, parameter)] (decayed_parameters); anchors: [tensor] or None;
        lr: the current learning rate of these parameters; lam: λ.
    """
    if lam == 0:
        return
    for i, (_, p) in enumerate(params):
        if anchors is None:
            p.mul_(1 - lr * lam)
        else:
            p.sub_(p - anchors[i], alpha=lr * lam)
