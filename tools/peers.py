"""The project against Hugging Face transformers on the same work (`python -m tools.bench --peers`).

What a user would otherwise run: `LlamaForCausalLM` (with TRL's losses on top, which add nothing
to the model's cost) and `LlamaForSequenceClassification` for a reward model. Both sides get the
same shapes, fp32 (or --dtype), random weights of the same size, the same AdamW, the same threads,
and alternate in one process (tools.bench.compare), so each ratio is measured under one load.

    pretrain  LM training step, every position a target: project model + losses.sft_loss (the
              chunked LM head, losses.token_logps) vs LlamaForCausalLM(input_ids=x, labels=x)
    sft       SFT step, 4 documents of 128 tokens per row, each ending in a 32-token answer (25%
              of the positions are targets): project = document masks, positions restarting,
              log-probs at the targets only (train_sft.step_loss); HF = the packed row with plain
              causal attention and labels -100 elsewhere (HF has no document masks on CPU)
    reward    pairwise reward step (forward + backward + AdamW), pairs of a 384-token prompt and
              two 16-token answers: project = shared-prefix layout, the head at <|im_end|>;
              HF = LlamaForSequenceClassification, one row per answer. FLOP bound of the shared
              layout: (2·(384+16)) / (384+2·16) = 1.92x
    choice    multiple-choice scoring (no grad), items of a 384-token prompt and 4 candidates of
              16: project = one shared-prefix forward (data.score_choices); HF = the prompts once
              with the KV cache (logits only at the last prompt token), the cache repeated per
              candidate, then the candidates: log p of each candidate's tokens

Peer shapes (not the README presets): small d 256, 6 layers, 8 heads, FFN 1024; base d 512,
8 layers, 8 heads, FFN 1536; vocabulary 8192; rows of 512. transformers is never a requirement:
without it --peers is a one-line error.
"""
from __future__ import annotations

import inspect
import random

import torch
import torch.nn.functional as F

import plumbing
from data import ChoiceItem, collate_choices, score_choices
from losses import dph_loss, sft_loss
from model import DPHModel, ModelConfig, attention_mask
from pretrained.export import HEAD_PREFIX, hf_state_dict

SHAPES = {"small": dict(d_model=256, n_layers=6, n_heads=8, ffn_dim=1024),
          "base": dict(d_model=512, n_layers=8, n_heads=8, ffn_dim=1536),
          "tiny": dict(d_model=64, n_layers=2, n_heads=2, ffn_dim=172)}  # --quick
PAD, END = 0, 1  # token ids of the synthetic batches: padding and <|im_end|>


def require_transformers():
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise plumbing.UsageError("--peers compares with Hugging Face transformers, which is not "
                                  "installed: pip install transformers") from None
    return transformers


def configs(shape: str, vocab: int, ctx: int):
    """The project's ModelConfig and the equivalent transformers LlamaConfig."""
    from transformers import LlamaConfig
    s = SHAPES[shape]
    ours = ModelConfig(vocab_size=vocab, max_seq_len=ctx, **s)
    hf = LlamaConfig(vocab_size=vocab, hidden_size=s["d_model"], intermediate_size=s["ffn_dim"],
                     num_hidden_layers=s["n_layers"], num_attention_heads=s["n_heads"],
                     num_key_value_heads=s["n_heads"], max_position_embeddings=ctx,
                     rms_norm_eps=ours.norm_eps, tie_word_embeddings=True, pad_token_id=PAD,
                     attention_bias=False, mlp_bias=False, num_labels=1,
                     attn_implementation="sdpa")
    return ours, hf


def build(shape, vocab, ctx, device, kind="lm", seed=0):
    """(project model, HF model, parameters): the same random weights on both sides (the HF
    model gets the project's, through pretrained.export), so that the check below can compare
    their outputs; kind 'reward' adds the project's identity-pooler head and uses HF's
    sequence-classification model, whose score layer gets the head's weight."""
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification
    ours_cfg, hf_cfg = configs(shape, vocab, ctx)
    torch.manual_seed(seed)
    ours = DPHModel(ours_cfg, head=dict(pooler="identity") if kind == "reward" else None)
    hf = (LlamaForSequenceClassification if kind == "reward" else LlamaForCausalLM)(hf_cfg)
    sd = {k.replace(HEAD_PREFIX, ""): v for k, v in hf_state_dict(ours).items()}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:  # lm_head is tied to the embeddings
        raise RuntimeError(f"peer weights do not map: missing {missing}, unexpected {unexpected}")
    hf.tie_weights()
    n_ours = sum(p.numel() for p in ours.parameters())
    n_hf = sum(p.numel() for p in hf.parameters())
    if n_ours != n_hf:
        raise RuntimeError(f"peer models differ in size: project {n_ours}, HF {n_hf}")
    return ours.to(device), hf.to(device), n_ours


def check(name, ours, theirs, rtol=1e-4):
    """Before any timing: both sides computed the same numbers from the same weights (else the
    comparison would time different work). Returns the two values for the report."""
    a, b = ours.detach().double().cpu(), theirs.detach().double().cpu()
    err = float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))
    if not err <= rtol:
        raise RuntimeError(f"{name}: project and HF disagree on the same weights (relative "
                           f"{err:.2e}): the comparison would not time the same work")
    return {"project": round(float(a.flatten()[0]), 6), "hf": round(float(b.flatten()[0]), 6),
            "max_relative_difference": err}


def optimizer(model, device):
    return plumbing.make_optimizer([{"params": list(model.parameters()), "peak_lr": 1e-5}],
                                   device)


def train_step(model, opt, loss_fn, device, dtype):
    with plumbing.autocast(device, dtype):
        loss = loss_fn()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def lm_workloads(shape, kind, rows, T, vocab, device, dtype, seed=0):
    """The pretraining step (kind 'pretrain') or the SFT step with 25% targets ('sft'):
    {"project": fn, "hf": fn}, each fn() -> target tokens trained."""
    ours, hf, n = build(shape, vocab, T, device, seed=seed)
    ours.train(), hf.train()
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(2, vocab, (rows, T), generator=g)
    if kind == "pretrain":
        answer = torch.ones(rows, T, dtype=torch.bool)
        answer[:, 0] = False  # the first token has no context: HF never predicts it either
        doc = pos = None
    else:  # 4 documents of T/4 tokens, each ending in an answer of a quarter of its length
        L = T // 4
        j = torch.arange(T) % L
        answer = (j >= L - L // 4).expand(rows, T)
        doc = (torch.arange(T) // L).expand(rows, T).contiguous()
        pos = j.expand(rows, T).contiguous()
    tgt = torch.full((rows, T), -100)
    tgt[:, :-1] = torch.where(answer[:, 1:], x[:, 1:], -100)  # position t predicts token t+1
    labels = torch.where(answer, x, -100)  # HF shifts the labels itself
    if kind == "sft":  # no target across a document boundary (its first token is never one)
        assert not bool(answer[doc != torch.roll(doc, 1, 1)].any())
    x, tgt, labels = x.to(device), tgt.to(device), labels.to(device)
    mask = attention_mask(doc.to(device)) if doc is not None else None
    pos = pos.to(device) if pos is not None else None
    opt_o, opt_h = optimizer(ours, device), optimizer(hf, device)
    n_tgt = int((tgt != -100).sum())
    assert n_tgt == int((labels[:, 1:] != -100).sum())
    checked = None
    if kind == "pretrain":  # (SFT: HF attends across the documents, so its loss differs)
        with torch.no_grad():
            checked = check(f"pretrain {shape} loss", sft_loss(ours(x).hidden, ours.lm_weight,
                                                               tgt)[0], hf(input_ids=x,
                                                                          labels=labels).loss)

    def project():
        def loss():
            out = ours(x, pos, mask)
            return sft_loss(out.hidden, ours.lm_weight, tgt)[0]
        train_step(ours, opt_o, loss, device, dtype)
        return n_tgt

    def project_full_logits():  # the same step with the plain loss: every target's logits
        def loss():                # at once (the project's loss before losses.token_logps)
            out = ours(x, pos, mask)
            where = tgt != -100
            return F.cross_entropy(F.linear(out.hidden[where], ours.lm_weight).float(),
                                   tgt[where])
        train_step(ours, opt_o, loss, device, dtype)
        return n_tgt

    def peer():
        train_step(hf, opt_h, lambda: hf(input_ids=x, labels=labels).loss, device, dtype)
        return n_tgt
    return {"project": project, "hf": peer, "full_logits": project_full_logits}, n, checked


def choice_data(n_items, prompt_len, answer_len, k, vocab, seed):
    g = random.Random(seed)
    items = []
    for i in range(n_items):
        prompt = [g.randrange(2, vocab) for _ in range(prompt_len)]
        branches = [[g.randrange(2, vocab) for _ in range(answer_len - 1)] + [END]
                    for _ in range(k)]
        items.append(ChoiceItem(prompt, branches, 0, i, [answer_len - 1] * k))
    return items


def reward_workloads(shape, n_pairs, prompt_len, answer_len, vocab, device, dtype, seed=0):
    """Pairwise reward training step: fn() -> pairs."""
    ctx = prompt_len + 2 * answer_len
    ours, hf, n = build(shape, vocab, ctx, device, kind="reward", seed=seed)
    ours.train(), hf.train()
    items = choice_data(n_pairs, prompt_len, answer_len, 2, vocab, seed)
    b = collate_choices(items, "shared", PAD, end_id=END).to(device)
    rows = torch.tensor([it.prompt + br for it in items for br in it.branches], device=device)
    opt_o, opt_h = optimizer(ours, device), optimizer(hf, device)
    with torch.no_grad():  # the head at <|im_end|> = HF's score at the last token
        checked = check(f"reward {shape} rewards", score_choices(ours, b, logps=False)["rewards"],
                        hf(input_ids=rows).logits.squeeze(-1))

    def contrastive(r):
        r = r.float().view(-1, 2)
        return dph_loss(r[:, 0], r[:, 1], "contrastive", 0.1)[0]

    def project():
        train_step(ours, opt_o, lambda: contrastive(
            score_choices(ours, b, rewards=True, logps=False)["rewards"]), device, dtype)
        return n_pairs

    def peer():
        train_step(hf, opt_h, lambda: contrastive(hf(input_ids=rows).logits), device, dtype)
        return n_pairs
    return {"project": project, "hf": peer}, n, checked


def choice_workloads(shape, n_items, prompt_len, answer_len, k, vocab, device, dtype, seed=0):
    """Multiple-choice scoring, no grad: fn() -> items scored (each candidate's summed log p)."""
    ctx = prompt_len + k * answer_len
    ours, hf, n = build(shape, vocab, ctx, device, seed=seed)
    ours.eval(), hf.eval()
    items = choice_data(n_items, prompt_len, answer_len, k, vocab, seed)
    b = collate_choices(items, "shared", PAD, end_id=END).to(device)
    prompts = torch.tensor([it.prompt for it in items], device=device)  # (I, P)
    cands = torch.tensor([br for it in items for br in it.branches], device=device)  # (I·k, A)

    def project_logps():
        with torch.no_grad(), plumbing.autocast(device, dtype):
            return score_choices(ours, b, rewards=False, logps=True)["logp"]

    def project():
        project_logps().sum().item()
        return n_items

    # transformers 5.x names the KV cache `cache`; 4.x `past_key_values`
    name = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"

    def peer_logps():
        with torch.no_grad(), plumbing.autocast(device, dtype):
            out = hf(input_ids=prompts, use_cache=True, logits_to_keep=1)
            cache = getattr(out, name)
            cache.batch_repeat_interleave(k)
            rest = hf(input_ids=cands, **{name: cache}).logits  # (I·k, A, V)
            logits = torch.cat([out.logits[:, -1:].repeat_interleave(k, 0), rest[:, :-1]], 1)
            return F.log_softmax(logits.float(), -1).gather(-1, cands[..., None]).sum((1, 2))

    def peer():
        peer_logps().sum().item()
        return n_items
    checked = check(f"choice {shape} log p", project_logps(), peer_logps())
    return {"project": project, "hf": peer}, n, checked


def run(args, device, dtype, sync, compare, speedup, rate_summary, log) -> dict:
    """Every comparison, each in its own alternating rounds. Returns the results section."""
    transformers = require_transformers()
    q = args.quick
    T, rows, vocab = (64, 2, 512) if q else (512, 16, 8192)
    shapes = ["tiny"] if q else ["small", "base"]
    P, A, n_pairs, n_items = (48, 6, 2, 2) if q else (384, 16, 8, 8)
    jobs = []
    for s in shapes:
        jobs.append((f"pretrain {s}", "tokens", lambda s=s: lm_workloads(
            s, "pretrain", rows, T, vocab, device, dtype, args.seed)))
        jobs.append((f"sft25 {s}", "tokens", lambda s=s: lm_workloads(
            s, "sft", rows, T, vocab, device, dtype, args.seed)))
    s0 = shapes[0]
    jobs.append((f"reward {s0}", "pairs", lambda: reward_workloads(
        s0, n_pairs, P, A, vocab, device, dtype, args.seed)))
    jobs.append((f"choice {s0}", "items", lambda: choice_workloads(
        s0, n_items, P, A, 4, vocab, device, dtype, args.seed)))
    out = {"transformers": transformers.__version__, "rows": rows, "row_len": T, "vocab": vocab,
           "prompt_len": P, "answer_len": A, "pairs": n_pairs, "items": n_items,
           "shapes": {s: SHAPES[s] for s in shapes}, "work": {}}
    for name, unit, make in jobs:
        fns, n_params, checked = make()
        st = compare(fns, args.repeats, args.seconds, sync)
        out["work"][name] = {"unit": unit, "params": n_params, "same_output": checked,
                             "project": rate_summary(st["project"], f"{unit}_per_s"),
                             "hf": rate_summary(st["hf"], f"{unit}_per_s"),
                             "speedup": speedup(st["project"], st["hf"])}
        if "full_logits" in st:  # the chunked LM head vs all logits at once, same model
            out["work"][name]["vs_full_logits"] = speedup(st["project"], st["full_logits"])
        log(f"peers {name}: project/HF {out['work'][name]['speedup']}")
        del fns
    return out


def fmt(P: dict) -> list:
    L = [f"Against Hugging Face transformers {P['transformers']} (same shapes and weights' "
         f"sizes, alternating in one process; ratio = median of per-round ratios)",
         f"{'work':22s} {'unit':>9} {'project':>10} {'HF':>10} {'project/HF':>10} "
         f"{'rounds':>13}"]
    for name, w in P["work"].items():
        key = f"{w['unit']}_per_s"
        lo, hi = w["speedup"]["rounds_range"]
        L.append(f"{name:22s} {w['unit'] + '/s':>9} {w['project'][key]:10.1f} {w['hf'][key]:10.1f} "
                 f"{w['speedup']['median']:9.2f}x {lo:6.2f}-{hi:<6.2f}")
    full = {n: w["vs_full_logits"]["median"] for n, w in P["work"].items() if "vs_full_logits" in w}
    if full:
        L.append("the project's step with losses.token_logps vs all target logits at once: "
                 + ", ".join(f"{n} {v:.2f}x" for n, v in full.items()))
    return L
