"""Tests for losses.py: reductions to the plain losses, closed-form optima, gradient signs,
numerical range, label-smoothing validation, metrics, log-likelihoods and SFT."""
import math

import pytest
import torch
import torch.nn.functional as F

from losses import (answer_logps, contrastive_dph_loss, dph_loss, dpo_loss, items_dph_loss,
                    listwise_dph_loss, reward_penalty, separable_dph_loss, sft_loss,
                    token_logps)

DPH_LOSSES = [separable_dph_loss, contrastive_dph_loss]
METRIC_KEYS = {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"}


def t(*xs, requires_grad=False):
    return torch.tensor(xs, dtype=torch.float64, requires_grad=requires_grad)


def log_sigmoid(x):  # independent reference, plain Python
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def dpo_on_rewards(r_w, r_l, beta=0.1, eps=0.0):
    """dpo_loss with rewards fed through the policy log-probs (reference at zero)."""
    return dpo_loss(r_w, r_l, torch.zeros_like(r_w), torch.zeros_like(r_l), beta=beta,
                    label_smoothing=eps)


# ----------------------------------------------------------------------------------------------
# ε = 0 reduces to the unsmoothed losses

R_W = [1.3, -0.4, 2.0, 0.0]
R_L = [0.2, 0.9, -1.5, 0.0]


def test_separable_eps0_is_plain():
    loss, _ = separable_dph_loss(t(*R_W), t(*R_L), 0.0)
    expected = (sum(-log_sigmoid(w) for w in R_W) / 4 + sum(-log_sigmoid(-l) for l in R_L) / 4)
    assert loss.item() == pytest.approx(expected, abs=1e-12)


def test_contrastive_eps0_is_plain():
    loss, _ = contrastive_dph_loss(t(*R_W), t(*R_L), 0.0)
    expected = sum(-log_sigmoid(w - l) for w, l in zip(R_W, R_L)) / 4
    assert loss.item() == pytest.approx(expected, abs=1e-12)


def test_dpo_eps0_is_plain():
    pw, pl, rw, rl = [-5.0, -3.0], [-7.0, -2.0], [-6.0, -3.5], [-6.5, -2.5]
    loss, _ = dpo_loss(t(*pw), t(*pl), t(*rw), t(*rl), beta=0.5, label_smoothing=0.0)
    expected = sum(-log_sigmoid(0.5 * ((a - c) - (b - d)))
                   for a, b, c, d in zip(pw, pl, rw, rl)) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-12)


def test_dpo_hand_value():
    # Δ = (π_w − ref_w) − (π_l − ref_l) = (−5 + 6) − (−7 + 6.5) = 1 − (−0.5) = 1.5
    # βΔ = 0.1 · 1.5 = 0.15
    # L = −0.9·log σ(0.15) − 0.1·log σ(−0.15),  log σ(x) = −log(1 + e^(−x))
    #   = 0.9·log(1 + e^(−0.15)) + 0.1·log(1 + e^(0.15)) ≈ 0.9·0.62096 + 0.1·0.77096 ≈ 0.63596
    expected = 0.9 * math.log(1 + math.exp(-0.15)) + 0.1 * math.log(1 + math.exp(0.15))
    loss, m = dpo_loss(t(-5.0), t(-7.0), t(-6.0), t(-6.5), beta=0.1, label_smoothing=0.1)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert loss.item() == pytest.approx(0.63596, abs=1e-4)
    # implicit rewards β(π − ref): chosen 0.1·1 = 0.1, rejected 0.1·(−0.5) = −0.05
    assert m["rewards/chosen"].item() == pytest.approx(0.1, abs=1e-9)
    assert m["rewards/rejected"].item() == pytest.approx(-0.05, abs=1e-9)
    assert m["rewards/margins"].item() == pytest.approx(0.15, abs=1e-9)
    assert m["rewards/accuracies"].item() == 1.0


# ----------------------------------------------------------------------------------------------
# Closed-form optima

def _minimise(loss_fn, init=(0.0, 0.0)):
    r_w = torch.tensor([init[0]], dtype=torch.float64, requires_grad=True)
    r_l = torch.tensor([init[1]], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([r_w, r_l], lr=1.0, max_iter=200, tolerance_grad=1e-12,
                            tolerance_change=1e-15, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = loss_fn(r_w, r_l)
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    return r_w.item(), r_l.item()


@pytest.mark.parametrize("eps", [0.1, 0.2])
def test_separable_reaches_optimum(eps):
    r_w, r_l = _minimise(lambda w, l: separable_dph_loss(w, l, eps)[0], init=(0.3, 0.5))
    target = math.log((1 - eps) / eps)
    assert r_w == pytest.approx(target, abs=1e-3)
    assert r_l == pytest.approx(-target, abs=1e-3)


@pytest.mark.parametrize("eps", [0.1, 0.2])
def test_contrastive_reaches_optimal_margin(eps):
    r_w, r_l = _minimise(lambda w, l: contrastive_dph_loss(w, l, eps)[0], init=(0.3, 0.5))
    assert r_w - r_l == pytest.approx(math.log((1 - eps) / eps), abs=1e-3)


@pytest.mark.parametrize("eps", [0.1, 0.2])
def test_dpo_reaches_optimal_margin(eps):
    beta = 0.1
    r_w, r_l = _minimise(lambda w, l: dpo_on_rewards(w, l, beta, eps)[0], init=(0.3, 0.5))
    assert beta * (r_w - r_l) == pytest.approx(math.log((1 - eps) / eps), abs=1e-3)


# ----------------------------------------------------------------------------------------------
# Gradient signs

def _grads(loss_fn, w, l):
    r_w, r_l = t(w, requires_grad=True), t(l, requires_grad=True)
    loss_fn(r_w, r_l)[0].backward()
    return r_w.grad.item(), r_l.grad.item()


ALL_PAIR_LOSSES = {
    "separable": lambda w, l: separable_dph_loss(w, l, 0.1),
    "contrastive": lambda w, l: contrastive_dph_loss(w, l, 0.1),
    "dpo": lambda w, l: dpo_on_rewards(w, l, 0.1, 0.1),
}


@pytest.mark.parametrize("name", list(ALL_PAIR_LOSSES))
def test_gradient_signs_at_zero(name):
    g_w, g_l = _grads(ALL_PAIR_LOSSES[name], 0.0, 0.0)
    assert g_w < 0  # raise the chosen reward
    assert g_l > 0  # lower the rejected reward


def test_gradient_flips_past_optimum():
    eps = 0.1
    opt = math.log((1 - eps) / eps)
    # contrastive: margin 2·x* is past the optimum, so descent shrinks it again
    g_w, g_l = _grads(lambda w, l: contrastive_dph_loss(w, l, eps), 2 * opt, 0.0)
    assert g_w > 0 and g_l < 0
    # closed form: dL/dm = −(1−ε)σ(−m) + εσ(m) = (0.1·81 − 0.9)/82 at m = 2·ln 9
    assert g_w == pytest.approx((0.1 * 81 - 0.9) / 82, abs=1e-12)
    # separable: r_w past +x*, r_l past −x*
    g_w, g_l = _grads(lambda w, l: separable_dph_loss(w, l, eps), 2 * opt, -2 * opt)
    assert g_w > 0 and g_l < 0
    # dpo: βΔ = 2·x*
    g_w, g_l = _grads(lambda w, l: dpo_on_rewards(w, l, 0.1, eps), 2 * opt / 0.1, 0.0)
    assert g_w > 0 and g_l < 0
    # and at the optimum itself the gradient vanishes
    g_w, _ = _grads(lambda w, l: contrastive_dph_loss(w, l, eps), opt, 0.0)
    assert g_w == pytest.approx(0.0, abs=1e-12)


# ----------------------------------------------------------------------------------------------
# Numerical range

@pytest.mark.parametrize("mag", [100.0, 1e4])
@pytest.mark.parametrize("name", list(ALL_PAIR_LOSSES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_finite_at_large_rewards(mag, name, dtype):
    fn = ALL_PAIR_LOSSES[name]
    for w, l in [(mag, -mag), (-mag, mag), (mag, mag), (-mag, -mag)]:
        r_w = torch.tensor([w], dtype=dtype, requires_grad=True)
        r_l = torch.tensor([l], dtype=dtype, requires_grad=True)
        loss, _ = fn(r_w, r_l)
        loss.backward()
        assert torch.isfinite(loss), (name, w, l)
        assert torch.isfinite(r_w.grad).all() and torch.isfinite(r_l.grad).all(), (name, w, l)
    # the worst case is large but exact: −log σ(−x) ≈ x for big x
    r_w, r_l = torch.tensor([-mag]), torch.tensor([mag])
    if name == "contrastive":
        assert fn(r_w, r_l)[0].item() == pytest.approx(0.9 * 2 * mag, rel=1e-4)


def test_contrastive_shift_invariant():
    g = torch.Generator().manual_seed(0)
    r_w, r_l = torch.randn(16, generator=g, dtype=torch.float64), torch.randn(16, generator=g,
                                                                            dtype=torch.float64)
    a, _ = contrastive_dph_loss(r_w, r_l, 0.1)
    b, _ = contrastive_dph_loss(r_w + 37.5, r_l + 37.5, 0.1)
    assert a.item() == pytest.approx(b.item(), abs=1e-12)
    # the separable loss is NOT shift invariant: it gives rewards an absolute scale
    c, _ = separable_dph_loss(r_w, r_l, 0.1)
    d, _ = separable_dph_loss(r_w + 37.5, r_l + 37.5, 0.1)
    assert abs(c.item() - d.item()) > 1.0


def test_separable_is_two_anchored_contrastive_problems():
    r_w, r_l = t(*R_W), t(*R_L)
    zero = torch.zeros_like(r_w)
    sep, _ = separable_dph_loss(r_w, r_l, 0.1)
    a, _ = contrastive_dph_loss(r_w, zero, 0.1)
    b, _ = contrastive_dph_loss(zero, r_l, 0.1)
    assert sep.item() == pytest.approx(a.item() + b.item(), abs=1e-12)


# ----------------------------------------------------------------------------------------------
# Label smoothing validation

LOSS_CALLS = {
    "separable": lambda eps: separable_dph_loss(t(1.0), t(0.0), label_smoothing=eps),
    "contrastive": lambda eps: contrastive_dph_loss(t(1.0), t(0.0), label_smoothing=eps),
    "dpo": lambda eps: dpo_loss(t(-1.0), t(-2.0), t(-1.5), t(-1.5), label_smoothing=eps),
    "dph_loss": lambda eps: dph_loss(t(1.0), t(0.0), "contrastive", label_smoothing=eps),
}


@pytest.mark.parametrize("name", list(LOSS_CALLS))
@pytest.mark.parametrize("eps", [0.5, 0.7, -0.1, float("nan")])
def test_bad_label_smoothing_raises(name, eps):
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        LOSS_CALLS[name](eps)


@pytest.mark.parametrize("name", list(LOSS_CALLS))
@pytest.mark.parametrize("eps", [0.0, 0.49])
def test_good_label_smoothing_accepted(name, eps):
    loss, _ = LOSS_CALLS[name](eps)
    assert torch.isfinite(loss) and loss.item() > 0


def test_dpo_bad_beta_raises():
    for beta in (0.0, -0.1):
        with pytest.raises(ValueError, match="beta"):
            dpo_loss(t(-1.0), t(-2.0), t(-1.5), t(-1.5), beta=beta)


def test_mismatched_shapes_raise():
    with pytest.raises(ValueError, match="same shape"):
        contrastive_dph_loss(t(1.0, 2.0), t(0.0))


# ----------------------------------------------------------------------------------------------
# Metrics

@pytest.mark.parametrize("fn", DPH_LOSSES)
def test_metrics_names_values_detached(fn):
    r_w = t(1.0, 0.0, 3.0, requires_grad=True)
    r_l = t(0.0, 2.0, 3.0, requires_grad=True)
    _, m = fn(r_w, r_l, 0.1)
    assert set(m) == METRIC_KEYS
    for v in m.values():
        assert v.dim() == 0 and not v.requires_grad
    assert m["rewards/chosen"].item() == pytest.approx(4 / 3)
    assert m["rewards/rejected"].item() == pytest.approx(5 / 3)
    assert m["rewards/accuracies"].item() == pytest.approx(1 / 3)  # ties are not wins
    assert m["rewards/accuracies"].is_floating_point()
    assert m["rewards/margins"].item() == pytest.approx(-1 / 3)


def test_dpo_metrics_keys_detached():
    pw = t(-5.0, -1.0, requires_grad=True)
    _, m = dpo_loss(pw, t(-7.0, -1.0), t(-6.0, -2.0), t(-6.5, -0.5), beta=0.1)
    assert set(m) == METRIC_KEYS
    assert all(not v.requires_grad for v in m.values())
    # margins β·Δ: row 0: 0.1·1.5 = 0.15 (win), row 1: 0.1·((−1+2) − (−1+0.5)) = 0.15 (win)
    assert m["rewards/accuracies"].item() == 1.0
    assert m["rewards/margins"].item() == pytest.approx(0.15)


def test_dph_loss_dispatch():
    r_w, r_l = t(*R_W), t(*R_L)
    assert dph_loss(r_w, r_l, "separable", 0.1)[0].item() == \
        separable_dph_loss(r_w, r_l, 0.1)[0].item()
    assert dph_loss(r_w, r_l, "contrastive", 0.1)[0].item() == \
        contrastive_dph_loss(r_w, r_l, 0.1)[0].item()
    assert dph_loss(r_w, r_l)[0].item() == separable_dph_loss(r_w, r_l)[0].item()
    with pytest.raises(ValueError, match="separable.*contrastive"):
        dph_loss(r_w, r_l, "sigmoid")


# ----------------------------------------------------------------------------------------------
# Reward penalty

def test_reward_penalty_values():
    r_w, r_l = t(1.0, -2.0, requires_grad=True), t(3.0, 0.5)
    loss, m = reward_penalty(r_w, r_l, 0.5, "squared")
    # 0.5 · mean(1 + 9, 4 + 0.25) = 0.5 · 7.125 = 3.5625
    assert loss.item() == pytest.approx(3.5625)
    assert set(m) == {"rewards/penalty"} and not m["rewards/penalty"].requires_grad
    assert m["rewards/penalty"].item() == pytest.approx(3.5625)
    loss, _ = reward_penalty(r_w, r_l, 0.5, "sum")
    # 0.5 · mean((1 + 3)², (−2 + 0.5)²) = 0.5 · mean(16, 2.25) = 0.5 · 9.125 = 4.5625
    assert loss.item() == pytest.approx(4.5625)
    loss.backward()
    # d/dr_w of 0.5 · mean((r_w + r_l)²) = 0.5 · 2(r_w + r_l) / 2 = (r_w + r_l)/2
    assert r_w.grad.tolist() == pytest.approx([2.0, -0.75])
    assert reward_penalty(r_w, r_l, 0.0)[0].item() == 0.0


def test_reward_penalty_errors():
    with pytest.raises(ValueError, match="squared"):
        reward_penalty(t(1.0), t(0.0), 0.1, "l1")
    with pytest.raises(ValueError, match="weight"):
        reward_penalty(t(1.0), t(0.0), -0.1)


# ----------------------------------------------------------------------------------------------
# Log-likelihoods

def _logits_and_labels(seed=0, B=2, T=5, V=7):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, requires_grad=True)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :2] = -100  # ignored prompt positions
    labels[1, -1] = -100  # ignored padding
    return logits, labels


def _sites(labels):
    """The (row, target, answer) sites of answers laid out as the rows of `labels`: row b is
    answer b, and each non-ignored position is one of its tokens."""
    B, T = labels.shape
    keep = labels != -100
    rows = torch.arange(B * T).view(B, T)[keep]
    return rows, labels[keep], torch.arange(B).unsqueeze(1).expand(B, T)[keep]


def _head(seed=0, N=10, C=6, V=7, dtype=torch.float64):
    """Hidden states and an LM head whose logits hidden @ weight.T are the reference."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, C, generator=g, dtype=dtype, requires_grad=True)
    weight = torch.randn(V, C, generator=g, dtype=dtype, requires_grad=True)
    return hidden, weight


def test_answer_logps_matches_hand_gather():
    _, labels = _logits_and_labels()
    hidden, weight = _head()
    row, tgt, seq = _sites(labels)
    lp = answer_logps(hidden, weight, row, tgt, seq, labels.size(0))
    assert lp.shape == (2,)
    logp = torch.log_softmax(hidden.detach() @ weight.detach().T, dim=-1).view(2, 5, -1)
    for b in range(labels.size(0)):
        want = sum(logp[b, s, labels[b, s]].item() for s in range(labels.size(1))
                   if labels[b, s] != -100)
        assert lp[b].item() == pytest.approx(want, rel=1e-9)
    assert (lp < 0).all()


def test_answer_logps_keep_subset_and_bf16():
    _, labels = _logits_and_labels()
    hidden, weight = _head(dtype=torch.float32)
    row, tgt, seq = _sites(labels)
    lp = answer_logps(hidden.detach().bfloat16(), weight.detach().bfloat16(), row, tgt, seq, 2)
    assert lp.dtype == torch.float32
    full = answer_logps(hidden.detach(), weight.detach(), row, tgt, seq, 2)
    assert full.dtype == torch.float32
    assert lp.tolist() == pytest.approx(full.tolist(), rel=5e-2)
    keep = torch.zeros_like(seq, dtype=torch.bool)
    keep[0] = True  # only the first site of answer 0
    part = answer_logps(hidden.detach(), weight.detach(), row, tgt, seq, 2, keep=keep)
    first = torch.log_softmax(hidden.detach()[row[0]] @ weight.detach().T, -1)[tgt[0]].item()
    assert part.tolist() == pytest.approx([first, 0.0], rel=1e-5, abs=1e-6)


def test_answer_logps_gradient_reaches_only_the_sites_rows():
    _, labels = _logits_and_labels()
    hidden, weight = _head()
    row, tgt, seq = _sites(labels)
    answer_logps(hidden, weight, row, tgt, seq, 2).sum().backward()
    assert torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all()
    # ignored positions (rows 0, 1 and 9) get no gradient at all
    assert (hidden.grad[[0, 1, 9]] == 0).all() and (hidden.grad[2:9] != 0).any(dim=1).all()


@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
def test_token_logps_equals_the_plain_log_softmax_values_and_gradients(chunk):
    """The chunked LM head is exact: the values and both gradients of log_softmax(h W^T) at the
    targets, for chunks that divide N, do not, and exceed it; and a non-uniform upstream
    gradient (as cDPO's log-ratio sends) reaches each row with its own weight."""
    hidden, weight = _head(N=10, C=6, V=11)
    targets = torch.randint(0, 11, (10,), generator=torch.Generator().manual_seed(1))
    up = torch.linspace(-2.0, 3.0, 10, dtype=torch.float64)
    got = token_logps(hidden, weight, targets, chunk_rows=chunk)
    (got * up).sum().backward()
    g_h, g_w = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    want = torch.log_softmax(hidden @ weight.T, -1).gather(1, targets[:, None]).squeeze(1)
    (want * up).sum().backward()
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_h, hidden.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_w, weight.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("chunk", [1, 4, 64])
def test_token_logps_sum_computes_its_gradient_early_and_exactly(chunk):
    """reduce=True: the gradient is computed in the forward pass and scaled by the upstream
    gradient in the backward pass; it equals the plain one, for any scale."""
    hidden, weight = _head(N=9, C=5, V=13)
    targets = torch.randint(0, 13, (9,), generator=torch.Generator().manual_seed(3))
    got = token_logps(hidden, weight, targets, reduce=True, chunk_rows=chunk)
    assert got.shape == ()
    (-0.37 * got).backward()
    g_h, g_w = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    want = torch.log_softmax(hidden @ weight.T, -1).gather(1, targets[:, None]).sum()
    (-0.37 * want).backward()
    torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(g_h, hidden.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_w, weight.grad, rtol=1e-10, atol=1e-12)
    with torch.no_grad():  # no gradient work at all, the same value
        assert token_logps(hidden, weight, targets, reduce=True).item() == pytest.approx(
            want.item(), rel=1e-12)


def test_token_logps_fp32_and_autocast_match_the_plain_computation():
    hidden, weight = _head(N=33, C=16, V=50, dtype=torch.float32)
    targets = torch.randint(0, 50, (33,), generator=torch.Generator().manual_seed(2))
    got = token_logps(hidden, weight, targets, chunk_rows=8)
    got.sum().backward()
    g_h, g_w = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    want = torch.log_softmax(hidden @ weight.T, -1).gather(1, targets[:, None]).squeeze(1)
    want.sum().backward()
    scale = want.abs().max().item()  # tolerances relative to the values' size
    torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-5 * scale)
    torch.testing.assert_close(g_h, hidden.grad, rtol=1e-4, atol=1e-5 * hidden.grad.abs().max().item())
    torch.testing.assert_close(g_w, weight.grad, rtol=1e-4, atol=1e-5 * weight.grad.abs().max().item())
    # under bf16 autocast the matmuls run in bf16, the softmax in fp32; gradients keep the dtypes
    hidden.grad = weight.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = token_logps(hidden, weight, targets, chunk_rows=8)
    low.sum().backward()
    assert low.dtype == torch.float32 and hidden.grad.dtype == weight.grad.dtype == torch.float32
    torch.testing.assert_close(low, want.detach(), rtol=5e-2, atol=5e-2 * scale)


def test_token_logps_rejects_mismatched_shapes_and_handles_no_rows():
    hidden, weight = _head(N=4, C=3, V=5)
    with pytest.raises(ValueError, match="disagree"):
        token_logps(hidden, weight, torch.zeros(3, dtype=torch.long))
    empty = token_logps(hidden[:0], weight, torch.zeros(0, dtype=torch.long))
    assert empty.shape == (0,)
    empty.sum().backward()
    assert (weight.grad == 0).all()


# ----------------------------------------------------------------------------------------------
# SFT

def test_sft_loss_equals_cross_entropy_on_targets():
    _, labels = _logits_and_labels()
    hidden, weight = _head()
    loss, m = sft_loss(hidden.view(2, 5, -1), weight, labels)
    keep = labels.reshape(-1) != -100
    expected = F.cross_entropy((hidden @ weight.T)[keep], labels.reshape(-1)[keep])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    assert m["tokens"].item() == 7
    assert m["loss/sft"].item() == pytest.approx(loss.item()) and not m["loss/sft"].requires_grad
    # the (N, C) form gives the same number, and the gradients are the plain cross-entropy's
    flat, _ = sft_loss(hidden, weight, labels.reshape(-1))
    assert flat.item() == pytest.approx(loss.item(), rel=1e-12)
    flat.backward()
    g_h, g_w = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    F.cross_entropy(hidden @ weight.T, labels.reshape(-1), ignore_index=-100).backward()
    torch.testing.assert_close(g_h, hidden.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_w, weight.grad, rtol=1e-10, atol=1e-12)


def test_sft_loss_all_ignored_is_zero_with_grad():
    hidden, weight = _head(N=6)
    labels = torch.full((6,), -100)
    loss, m = sft_loss(hidden, weight, labels)
    assert torch.isfinite(loss) and loss.item() == 0.0
    assert loss.requires_grad
    loss.backward()
    assert (hidden.grad == 0).all() and (weight.grad == 0).all()
    assert m["tokens"].item() == 0


# ----------------------------------------------------------------------------------------------
# The contrastive loss over all K candidates of an item (listwise_dph_loss, beyond the paper)

@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_listwise_is_contrastive_at_two_candidates(eps):
    g = torch.Generator().manual_seed(0)
    r = (3 * torch.randn(12, generator=g, dtype=torch.float64)).requires_grad_()
    lw, mw = listwise_dph_loss(r, [2] * 6, eps)
    con, mc = contrastive_dph_loss(r[0::2], r[1::2], eps)
    assert torch.allclose(lw, con, rtol=1e-12)
    assert torch.allclose(torch.autograd.grad(lw, r)[0],
                          torch.autograd.grad(con, r)[0], rtol=1e-10, atol=1e-14)
    for k in mc:
        assert torch.allclose(mw[k].double(), mc[k].double())


def test_listwise_hand_value_ragged():
    """Two items, K = 3 and 2: −(1−ε)·log p_w − ε·mean_wrong log p, by hand, then averaged."""
    eps = 0.2
    r = [1.0, -0.5, 2.0, 0.3, 0.7]
    def item(x):
        z = math.log(sum(math.exp(v) for v in x))
        lp = [v - z for v in x]
        return -(1 - eps) * lp[0] - eps * sum(lp[1:]) / (len(x) - 1)
    want = (item(r[:3]) + item(r[3:])) / 2
    got, m = listwise_dph_loss(t(*r), [3, 2], eps)
    assert got.item() == pytest.approx(want, rel=1e-12)
    # metrics over the (chosen, wrong) pairs: (1, -0.5), (1, 2), (0.3, 0.7)
    assert m["rewards/accuracies"].item() == pytest.approx(1 / 3)
    assert m["rewards/margins"].item() == pytest.approx((1.5 - 1.0 - 0.4) / 3)


def test_listwise_reaches_its_optimum():
    """Optimum: log(p_w / p_j) = log((1−ε)(K−1)/ε) for every wrong j; gradient 0 there."""
    eps, K = 0.1, 4
    gap = math.log((1 - eps) * (K - 1) / eps)
    r = t(gap, 0.0, 0.0, 0.0, requires_grad=True)
    loss, _ = listwise_dph_loss(r, [K], eps)
    (g,) = torch.autograd.grad(loss, r)
    assert g.abs().max().item() < 1e-12
    r2 = t(gap + 0.5, 0.0, 0.0, 0.0)
    assert listwise_dph_loss(r2, [K], eps)[0].item() > loss.item()


def test_listwise_finite_and_shift_invariant_with_padding():
    r = t(300.0, -400.0, 50.0, 1.0, 2.0, requires_grad=True)
    loss, _ = listwise_dph_loss(r, [3, 2], 0.1)
    (g,) = torch.autograd.grad(loss, r)
    assert torch.isfinite(loss) and torch.isfinite(g).all()
    shifted = listwise_dph_loss(r.detach() + t(7, 7, 7, -3, -3), [3, 2], 0.1)[0]
    assert shifted.item() == pytest.approx(loss.item(), rel=1e-12)


def test_listwise_bad_input_raises():
    with pytest.raises(ValueError, match="items of >= 2"):
        listwise_dph_loss(t(1.0, 2.0, 3.0), [1, 2])
    with pytest.raises(ValueError, match="items of >= 2"):
        listwise_dph_loss(t(1.0, 2.0, 3.0), [2, 2])
    with pytest.raises(ValueError, match="label_smoothing"):
        listwise_dph_loss(t(1.0, 2.0), [2], 0.5)


def test_items_dph_loss_dispatch():
    r = t(1.0, -0.5, 2.0, 0.3, 0.7)
    w, l = [0, 0, 3], [1, 2, 4]
    for kind in ("separable", "contrastive"):
        got = items_dph_loss(r, [3, 2], kind, "pairs", 0.1)[0]
        assert got.item() == pytest.approx(dph_loss(r[w], r[l], kind, 0.1)[0].item(), rel=1e-12)
    got = items_dph_loss(r, [3, 2], "contrastive", "softmax", 0.1)[0]
    assert got.item() == pytest.approx(listwise_dph_loss(r, [3, 2], 0.1)[0].item(), rel=1e-12)
    sep = items_dph_loss(r, [3, 2], "separable", "softmax", 0.1)[0]  # no contrast to change
    assert sep.item() == pytest.approx(dph_loss(r[w], r[l], "separable", 0.1)[0].item(), rel=1e-12)
    with pytest.raises(ValueError, match="unknown contrast"):
        items_dph_loss(r, [3, 2], "contrastive", "lists", 0.1)
