"""Benchmark: how fast the project trains, scores and generates, vs the naive layouts.

Every comparison is a ratio measured within one run: the variants of a comparison are measured in
alternation (round robin, the order reversed every round), each for --seconds, --repeats times,
and the reported rate is the median over rounds; a ratio is the median of the per-round ratios.
On a shared machine absolute numbers drift with the load; the ratios much less.

    1. peak      fp32 (or --dtype) matmul GFLOP/s of this machine, best of a few square sizes
    2. sft       training step (forward + backward + AdamW step) for each --presets, vocabulary
                 8192, rows of --seq-len: packed with document masks (the training path), packed
                 with plain causal attention (no masks), and padded one conversation per row;
                 tokens/s and MFU (formula below); packing efficiency on the built-in mixture,
                 and on a real mixture when $DPH_DATA is set
    3. dph       DPH training pairs/s (forward + backward of rewards + loss; and with the cDPO
                 term: LM logits on the answer tokens and the reference model's forward),
                 shared-prefix vs padded, on RACE-shaped items (prompt 384, answers 16 tokens)
    4. eval      evaluation candidates/s (no grad, 4 candidates per item), same shape
    5. generate  tokens/s for 128 new tokens with and without the KV cache
    6. frozen    head-only training pairs/s with a frozen backbone (train_dph.py
                 --freeze-backbone): the backbone run on every step vs the head on cached
                 <|im_end|> states (frozen.StateCache), and the one-time cost of filling the cache
    7. memory    peak memory of each measurement: on the CPU the peak resident set (VmHWM) of a
                 fresh subprocess per measurement, reset just before the measured step; on CUDA
                 torch.cuda.max_memory_allocated

MFU (model FLOPs utilisation), the issue's formula, per real (non-pad) token:
    MFU = (6·N_non-embedding + 12·L·d·ctx) · tokens/s ÷ peak
with ctx the row length. It counts no LM-head FLOPs (the tied output projection). Since the
SFT step computes logits only at positions that have a target, we also report
    MFU+logits = [(6·N_ne + 12·L·d·ctx) · tokens + 6·d·V · targets] / s ÷ peak
(6·d·V per TARGET token, forward + backward of the output projection). The peak is the matmul
rate measured in the same round as the step (so both see the same machine load); MFU against
the best peak of the whole run is reported too.

    python -m tools.bench                          # small + base on this machine (~8 min on 2 cores)
    python -m tools.bench --quick                  # tiny preset, seconds; the smoke test runs this
    python -m tools.bench --device cuda --dtype bfloat16 --presets paper --choice-preset paper \
        --seq-len 2048 --sft-batch 8 --dph-batch 32 --eval-batch 32   # what README reports
"""
from __future__ import annotations

import os
import sys

# OpenMP threads that spin while they wait for work (libgomp's default) make every small op
# wait for a time slice when the cores are shared with other processes: on 2 busy cores a
# KV-cached decoding step ran 20x slower and a `base` SFT step 1.7-3x slower than with
# PASSIVE waiting. libgomp reads this when torch is imported, so it is set before that import;
# --omp-wait-policy default leaves the environment alone.
_WAIT = "passive"
for _i, _a in enumerate(sys.argv):
    if _a == "--omp-wait-policy" and _i + 1 < len(sys.argv):
        _WAIT = sys.argv[_i + 1]
    elif _a.startswith("--omp-wait-policy="):
        _WAIT = _a.split("=", 1)[1]
if _WAIT in ("passive", "active"):
    os.environ.setdefault("OMP_WAIT_POLICY", _WAIT.upper())

import argparse
import importlib.util
import json
import platform
import random
import statistics
import subprocess
import tempfile
import time

import torch

import plumbing
from data import (ChoiceItem, PackedBatch, SFTStream, TaskSampler, collate_choices,
                  collate_packed, score_choices)
from inference.generate import generate
from losses import dph_loss, dpo_loss, sft_loss
from model import PRESETS, DPHModel, attention_mask, preset, use_attention
from tokenizer.chat import ChatTokenizer, training_text
from tokenizer.chatml import IGNORE, sft_document

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository

SECTIONS = ("peak", "packing", "sft", "dph", "eval", "generate", "frozen", "memory")
# not run by default: needs transformers (--peers, or --sections peers)
OPTIONAL_SECTIONS = ("peers",)
REAL_TASKS = "glue/sst2,glue/cola,glue/mrpc,glue/rte,glue/stsb,boolq,arc/easy,piqa,winogrande"
SFT_MODES = {  # name -> what it is
    "packed_masked": "packed, document masks (training path)",
    "packed_causal": "packed, plain causal (no masks)",
    "padded": "padded, one conversation per row",
}
# on CUDA, also the same packed batches through FlexAttention with a block mask (--attention flex)
FLEX_MODE = {"packed_flex": "packed, document masks, FlexAttention"}


def sft_modes(device) -> dict:
    flex = importlib.util.find_spec("torch.nn.attention.flex_attention") is not None
    return {**SFT_MODES, **(FLEX_MODE if device.type == "cuda" and flex else {})}
TARGETS = {  # name -> (op, threshold)
    "packing efficiency": (">=", 0.95),
    "eval shared/padded": (">=", 3.0),
    "DPH shared/padded": (">=", 1.8),
    "KV-cache speedup": (">=", 5.0),
    "SFT MFU": (">=", 0.50),
    "doc-mask cost": ("<=", 0.15),
    "peers pretrain small": (">=", 1.25),  # the project vs Hugging Face (tools/peers.py)
    "peers pretrain base": (">=", 1.15),
    "peers sft25": (">=", 1.6),
    "peers reward": (">=", 1.85),
    "peers choice": (">=", 2.0),
}
PEER_WORK = {"pretrain": "LM training step, every position a target",
             "sft25": "SFT step, 25% of positions targets, 4 documents per row",
             "reward": "pairwise reward step", "choice": "multiple-choice scoring (HF: KV cache)"}



def padded_sft_batch(tok, examples: list, seq_len: int) -> PackedBatch:
    """One conversation per row, right-padded: the naive layout the benchmark compares with."""
    docs = [d for d in (sft_document(tok, [ex], seq_len) for ex in examples) if d is not None]
    T = max(len(d.ids) for d in docs)
    return collate_packed([[d] for d in docs], T, tok.pad)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--presets", default=None,
                   help="model presets for the SFT section (default: small,base; --quick: tiny)")
    p.add_argument("--choice-preset", default=None,
                   help="preset for the DPH, evaluation and generation sections "
                        "(default: small; --quick: tiny)")
    p.add_argument("--out", default="bench.json", help="write the results here (JSON)")
    p.add_argument("--quick", action="store_true",
                   help="smoke mode: tiny preset, short rows, one short round (seconds)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    p.add_argument("--dtype", default="auto",
                   help="auto | float32 | bfloat16 | float16 (autocast; the peak uses it too)")
    p.add_argument("--compile", action="store_true", help="torch.compile the models")
    p.add_argument("--seconds", type=float, default=None,
                   help="a round repeats its calls until one variant has run this long "
                        "(default 2, quick 0.05)")
    p.add_argument("--repeats", type=int, default=None,
                   help="rounds per comparison (default 5, quick 1; DPH and evaluation: twice "
                        "that; generation: at most 3)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: default)")
    p.add_argument("--malloc", default="tuned", choices=["tuned", "default"],
                   help="tuned: glibc keeps freed memory for reuse (mallopt: no mmap, no trim); "
                        "memory is always measured with the default allocator")
    p.add_argument("--omp-wait-policy", default="passive", choices=["passive", "active", "default"],
                   help="OMP_WAIT_POLICY set before torch is imported (an existing environment "
                        "variable wins); 'default' leaves it unset")
    p.add_argument("--peers", action="store_true",
                   help="also compare with Hugging Face transformers on the same work "
                        "(tools/peers.py; needs transformers installed)")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--seq-len", type=int, default=None, help="SFT row length (default 512)")
    p.add_argument("--vocab-size", type=int, default=0,
                   help="model vocabulary (0: 8192, or the preset's own, e.g. paper's 50272)")
    p.add_argument("--sft-batch", type=int, default=None, help="packed rows per SFT step (4)")
    p.add_argument("--prompt-len", type=int, default=None, help="RACE-shaped prompt tokens (384)")
    p.add_argument("--answer-len", type=int, default=None,
                   help="tokens per answer including <|im_end|> (16)")
    p.add_argument("--dph-batch", type=int, default=None, help="pairs per DPH step (8)")
    p.add_argument("--eval-batch", type=int, default=None, help="items per evaluation batch (8)")
    p.add_argument("--candidates", type=int, default=4, help="candidates per evaluation item")
    p.add_argument("--gen-prompt", type=int, default=None, help="generation prompt tokens (128)")
    p.add_argument("--gen-tokens", type=int, default=None, help="new tokens to generate (128)")
    p.add_argument("--gen-samples", type=int, default=4, help="samples generated in one batch")
    p.add_argument("--packing-batches", type=int, default=None,
                   help="batches drawn to measure packing efficiency (200; quick 10)")
    p.add_argument("--real-tasks", default=REAL_TASKS,
                   help="real mixture for packing efficiency when $DPH_DATA is set")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memory-child", default="", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    q = a.quick
    defaults = dict(presets="tiny" if q else "small,base", choice_preset="tiny" if q else "small",
                    seconds=0.05 if q else 2.0, repeats=1 if q else 5, seq_len=128 if q else 512,
                    sft_batch=2 if q else 4, prompt_len=48 if q else 384,
                    answer_len=6 if q else 16, dph_batch=2 if q else 8, eval_batch=2 if q else 8,
                    gen_prompt=16 if q else 128, gen_tokens=12 if q else 128,
                    packing_batches=10 if q else 200)
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.sections = [s.strip() for s in a.sections.split(",") if s.strip()]
    if a.peers and "peers" not in a.sections:
        a.sections.append("peers")
    bad = [s for s in a.sections if s not in SECTIONS + OPTIONAL_SECTIONS]
    if bad:
        p.error(f"--sections: unknown {bad}; choose from {', '.join(SECTIONS + OPTIONAL_SECTIONS)}")
    a.presets = [s.strip() for s in a.presets.split(",") if s.strip()]
    return a


# ----------------------------------------------------------------------------------------------
# Process settings


# ----------------------------------------------------------------------------------------------
# Timing: alternate the variants of a comparison, report medians


def make_sync(device):
    if device.type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def timed(fn, seconds, sync):
    """Call fn() (which returns the work units it did) until `seconds` have passed, at least
    once. Returns units per second."""
    units, t0 = 0.0, time.perf_counter()
    while True:
        units += fn()
        sync()
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            return units / elapsed


def compare(variants: dict, repeats: int, seconds: float, sync, warmup: int = 1) -> dict:
    """variants: name -> fn. Warm each up (`warmup` calls; with torch.compile the callers ask for
    enough to see every batch shape before timing), then `repeats` rounds. A round calls every
    variant once, in turn (the order reversed every other round), and again while none has run
    for `seconds` yet: all variants make the same number of calls, side by side, so a change in
    the machine's load hits them alike, and a best-of-N compares equal N. Returns
    name -> {"calls": rate of each call, "rounds": rate of each round} in units/s."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
        sync()
    names = list(variants)
    out = {k: {"calls": [], "rounds": []} for k in names}
    for r in range(repeats):
        order = names if r % 2 == 0 else names[::-1]
        units, spent = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0)
        while max(spent.values()) < seconds or not any(spent.values()):
            for k in order:
                t0 = time.perf_counter()
                u = variants[k]()
                sync()
                dt = time.perf_counter() - t0
                units[k] += u
                spent[k] += dt
                out[k]["calls"].append(u / dt)
        for k in names:
            out[k]["rounds"].append(units[k] / spent[k])
    return out


def med(xs):
    return float(statistics.median(xs))


def best(st):
    """The fastest call: the one least disturbed by other processes (as timeit advises)."""
    return max(st["calls"])


def speedup(a, b) -> dict:
    """a vs b: the median of the per-round ratios (what the targets use), their range, and the
    ratio of the fastest calls (every variant made the same number of calls)."""
    per_round = [x / y for x, y in zip(a["rounds"], b["rounds"])]
    return {"median": round(med(per_round), 3),
            "rounds_range": [round(min(per_round), 3), round(max(per_round), 3)],
            "best_calls": round(best(a) / best(b), 3)}


def rate_summary(st, unit, nd=2) -> dict:
    """The median over rounds (reported) and the fastest call."""
    return {unit: round(med(st["rounds"]), nd), f"{unit}_best": round(best(st), nd),
            "calls": len(st["calls"])}


# ----------------------------------------------------------------------------------------------
# Machine and peak


def machine_info(device, dtype) -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"nproc": os.cpu_count(), "cpu": cpu, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "python": platform.python_version(),
            "device": str(device), "dtype": str(dtype).replace("torch.", ""),
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
            "malloc": MALLOC_STATE}
    if hasattr(os, "getloadavg"):
        info["load_start"] = [round(x, 2) for x in os.getloadavg()]
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def matmul_fn(n, device, dtype):
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)

    def fn():
        torch.matmul(a, b)
        return 2.0 * n ** 3 / 1e9  # GFLOP
    return fn


def measure_peak(args, device, dtype, sync) -> dict:
    """Best matmul GFLOP/s over a few square sizes (after warmup). The best size is kept for the
    per-round peak measured alongside the SFT steps."""
    mdt = dtype  # the MFU denominator is the peak of the precision the model computes in
    sizes = [256, 512] if args.quick else ([4096, 8192] if device.type == "cuda"
                                           else [1024, 2048, 3072])
    fns = {f"{n}": matmul_fn(n, device, mdt) for n in sizes}
    s = compare(fns, max(2, args.repeats), max(args.seconds / 2, 0.02), sync)
    by_size = {k: round(best(v), 1) for k, v in s.items()}
    top = max(by_size, key=by_size.get)
    return {"gflops": by_size[top], "size": int(top), "by_size": by_size,
            "dtype": str(mdt).replace("torch.", ""), "op": "torch.matmul, square n×n"}


# ----------------------------------------------------------------------------------------------
# Data: built-in suite conversations, packing, RACE-shaped items


def builtin_data(args):
    from tasks import resolve_tasks
    specs = resolve_tasks("builtin")
    n = 60 if args.quick else None
    train = {s.name: s.load("train", seed=args.seed, n=n) for s in specs}
    tok = ChatTokenizer.train([t for exs in train.values() for t in training_text(exs)], 8192)
    return tok, train


def packing_efficiency(tok, train, args) -> dict:
    stream = SFTStream(tok, train, args.seq_len, args.sft_batch, seed=args.seed)
    t0 = time.perf_counter()
    for _ in range(args.packing_batches):
        stream.next_batch()
    el = time.perf_counter() - t0
    st = stream.stats
    return {"efficiency": round(stream.efficiency, 4), "batches": args.packing_batches,
            "rows": args.packing_batches * args.sft_batch, "seq_len": args.seq_len,
            "documents": st["documents"], "dropped": st["dropped"],
            "tokens_per_doc": round(st["tokens"] / max(1, st["documents"]), 1),
            "batches_per_s": round(args.packing_batches / el, 1)}


def real_packing(args) -> dict:
    root = os.environ.get("DPH_DATA", "")
    if not root:
        return {"skipped": "DPH_DATA is not set"}
    from tasks import TaskError, resolve_tasks
    try:
        specs = resolve_tasks(args.real_tasks)
        train = plumbing.load_split(specs, "train", root, args.seed, required=False,
                                  limit=2000 if args.quick else 20000)
    except (TaskError, FileNotFoundError) as e:
        return {"skipped": f"{type(e).__name__}: {e}"}
    if not train:
        return {"skipped": "no task of --real-tasks has a train split under $DPH_DATA"}
    gpt2 = os.path.join(root, "gpt2_tokenizer")
    if os.path.isfile(os.path.join(gpt2, "encoder.json")):
        tok = ChatTokenizer.from_gpt2(os.path.join(gpt2, "encoder.json"),
                                      os.path.join(gpt2, "vocab.bpe"))
        tname = "GPT-2 BPE + chat tokens"
    else:
        tok = ChatTokenizer.train([t for exs in train.values() for t in training_text(exs)], 8192)
        tname = "byte-level BPE trained on the mixture (8192)"
    res = packing_efficiency(tok, train, args)
    res.update(tasks=sorted(train), tokenizer=tname,
               skipped_tasks=[s.name for s in specs if s.name not in train])
    return res


def sft_batches(tok, train, args, n=2):
    """n packed batches (SFTStream, the training path) and padded batches of conversations drawn
    from the same mixture with the same seed, grouped to about the same number of real tokens."""
    stream = SFTStream(tok, train, args.seq_len, args.sft_batch, seed=args.seed)
    packed = [stream.next_batch() for _ in range(n)]
    sampler = TaskSampler(train, args.seed)
    padded = []
    for b in packed:
        exs, tokens = [], 0
        while tokens < b.tokens:
            ex = sampler.draw(1)[0]
            exs.append(ex)
            tokens += len(tok.encode(ex.messages[-1]["content"])) + 24  # rough, corrected below
        pb = padded_sft_batch(tok, exs, args.seq_len)
        while pb.tokens > b.tokens and len(exs) > 1:  # trim to the packed batch's real tokens
            exs.pop()
            pb = padded_sft_batch(tok, exs, args.seq_len)
        padded.append(pb)
    return packed, padded


def race_items(n, prompt_len, answer_len, k, vocab_lo, vocab_hi, tok, seed):
    """Synthetic RACE-shaped ChoiceItems: prompt = <bos> + random ids + the assistant header
    (prompt_len tokens in all), k answers of answer_len tokens each ending in <|im_end|>."""
    g = random.Random(seed)
    header = [tok.im_start] + tok.piece("assistant\n")
    items = []
    for i in range(n):
        body = [g.randrange(vocab_lo, vocab_hi) for _ in range(prompt_len - 1 - len(header))]
        prompt = [tok.bos] + body + header
        branches = [[g.randrange(vocab_lo, vocab_hi) for _ in range(answer_len - 1)] + [tok.im_end]
                    for _ in range(k)]
        items.append(ChoiceItem(prompt, branches, 0, i, [4 * (answer_len - 1)] * k))
    return items


# ----------------------------------------------------------------------------------------------
# Workloads: each returns fn() -> units done. Built the same way in the parent (timing) and in a
# fresh child process (memory), from plain data.


def build_model(name, args, device, head=False):
    torch.manual_seed(args.seed)
    vocab = args.vocab_size or PRESETS[name].get("vocab_size", 8192)
    cfg = preset(name, vocab_size=vocab)
    need = max(args.seq_len, args.prompt_len + args.candidates * args.answer_len,
               args.gen_prompt + args.gen_tokens)
    if cfg.max_seq_len < need:
        cfg = preset(name, vocab_size=vocab, max_seq_len=need)
    m = DPHModel(cfg, head=dict(pooler="swiglu") if head else None)
    return m.to(device)


def maybe_compile(model, args):
    if not args.compile:
        return model
    # the variants of a comparison are separate models running the same code, and dynamo keeps
    # one cache per code object: raise its recompile limit so that no variant falls back to eager
    cfg = torch._dynamo.config
    for k in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, k):
            setattr(cfg, k, max(64, getattr(cfg, k)))
    return torch.compile(model)


def make_optimizer(model, device):
    """The optimizer the training scripts use (plumbing.make_optimizer)."""
    return plumbing.make_optimizer([{"params": list(model.parameters()), "peak_lr": 1e-5}],
                                   device)


def sft_workload(name, mode, batches, args, device, dtype):
    model = build_model(name, args, device).train()
    use_attention(model, "flex" if mode == "packed_flex" else "sdpa")
    fwd = maybe_compile(model, args)
    opt = make_optimizer(model, device)
    batches = [PackedBatch(*(t.to(device) for t in (b.idx, b.targets, b.pos, b.doc)), b.tokens)
               for b in batches]
    state = {"i": 0}

    def fn():
        b = batches[state["i"] % len(batches)]
        state["i"] += 1
        if mode in ("packed_masked", "packed_flex"):  # what train_sft.step_loss does
            pos, mask = b.pos, attention_mask(b.doc)
        else:  # plain causal: is_causal SDPA, positions 0..T-1
            pos, mask = None, None
        with plumbing.autocast(device, dtype):  # logits only where there is a target
            out = fwd(b.idx, pos, mask)
            loss, _ = sft_loss(out.hidden, model.lm_weight, b.targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return b.tokens
    return model, fn


def choice_batches(items, per_batch, layout, pad_id, device):
    end = items[0].branches[0][-1]  # race_items ends every branch in <|im_end|>
    return [collate_choices(items[i:i + per_batch], layout, pad_id, end_id=end).to(device)
            for i in range(0, len(items), per_batch)]


def dph_workload(name, layout, use_dpo, items, pad_id, args, device, dtype):
    """Forward + backward of the DPH loss (+ cDPO on the LM, with the frozen reference's
    forward) on pairs, as train_dph.pair_loss does. No optimizer step."""
    model = build_model(name, args, device, head=True).train()
    fwd = maybe_compile(model, args)
    ref = None
    if use_dpo:
        ref = build_model(name, args, device).lm.eval().requires_grad_(False)
        ref = maybe_compile(ref, args)
    batches = choice_batches(items, args.dph_batch, layout, pad_id, device)
    state = {"i": 0}

    def fn():
        b = batches[state["i"] % len(batches)]
        state["i"] += 1
        with plumbing.autocast(device, dtype):
            res = score_choices(fwd, b, rewards=True, logps=use_dpo)
        r = res["rewards"].float().view(-1, 2)
        loss, _ = dph_loss(r[:, 0], r[:, 1], "separable", 0.1)
        if use_dpo:
            with torch.no_grad(), plumbing.autocast(device, dtype):
                ref_lp = score_choices(ref, b, rewards=False, logps=True)["logp"]
            lp, ref_lp = res["logp"].float().view(-1, 2), ref_lp.float().view(-1, 2)
            dloss, _ = dpo_loss(lp[:, 0], lp[:, 1], ref_lp[:, 0], ref_lp[:, 1], 0.1, 0.1)
            loss = loss + dloss
        loss.backward()
        for p in model.parameters():
            p.grad = None
        return len(b.n_branches)  # pairs
    return model, fn


def eval_workload(name, layout, items, pad_id, args, device, dtype):
    """What evaluate.py does per batch: one no-grad forward, rewards and LM log-probs."""
    model = build_model(name, args, device, head=True).eval()
    fwd = maybe_compile(model, args)
    batches = choice_batches(items, args.eval_batch, layout, pad_id, device)
    state = {"i": 0}

    def fn():
        b = batches[state["i"] % len(batches)]
        state["i"] += 1
        with torch.no_grad(), plumbing.autocast(device, dtype):
            res = score_choices(fwd, b, rewards=True, logps=True)
        res["rewards"].sum().item()  # wait for the result
        return b.n_seqs  # candidates
    return model, fn


def gen_workload(name, use_cache, prompt, args, device, dtype):
    model = build_model(name, args, device).eval()  # generate() is not compiled
    g = torch.Generator(device=device)

    def fn():
        g.manual_seed(args.seed)
        with plumbing.autocast(device, dtype):
            out = generate(model, prompt, n=args.gen_samples, max_new_tokens=args.gen_tokens,
                           temperature=1.0, use_cache=use_cache, generator=g)
        return sum(len(o) for o in out)  # no stop token: gen_samples * gen_tokens
    return model, fn


def workload(spec, data, args, device, dtype):
    kind = spec["kind"]
    if kind == "sft":
        batches = data["padded"] if spec["mode"] == "padded" else data["packed"]
        return sft_workload(spec["preset"], spec["mode"], batches, args, device, dtype)
    if kind == "dph":
        return dph_workload(spec["preset"], spec["layout"], spec["dpo"], data["dph_items"],
                            data["pad"], args, device, dtype)
    if kind == "eval":
        return eval_workload(spec["preset"], spec["layout"], data["eval_items"], data["pad"],
                             args, device, dtype)
    if kind == "generate":
        return gen_workload(spec["preset"], spec["cache"], data["gen_prompt"], args, device, dtype)
    raise ValueError(kind)


def spec_name(s):
    if s["kind"] == "sft":
        return f"sft/{s['preset']}/{s['mode']}"
    if s["kind"] == "dph":
        return f"dph/{s['preset']}/{'head+dpo' if s['dpo'] else 'head'}/{s['layout']}"
    if s["kind"] == "eval":
        return f"eval/{s['preset']}/{s['layout']}"
    return f"generate/{s['preset']}/{'cache' if s['cache'] else 'no_cache'}"


# ----------------------------------------------------------------------------------------------
# Memory: a fresh process per measurement (CPU), or the CUDA allocator's peak


def _status_kib(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0). getrusage's ru_maxrss is not used: after
    fork+exec it starts at the PARENT's peak (the kernel carries it over exec), so a child
    launched from a big process would report the parent's memory."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_memory_here(spec, data, args, device, dtype) -> dict:
    """Build the workload, then measure one call; an SFT step gets a warm-up call first (so the
    AdamW state exists, as in every step but the first). step_mib: the peak during the measured
    call minus what was resident just before it."""
    model, fn = workload(spec, data, args, device, dtype)
    if spec["kind"] == "sft" or args.compile:
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return {"peak_mib": round(peak / 2**20, 1), "step_mib": round((peak - base) / 2**20, 1)}
    exact = _reset_peak_rss()
    before = _status_kib("VmRSS")
    fn()
    peak = _status_kib("VmHWM")
    return {"peak_mib": round(peak / 1024, 1), "step_mib": round(max(0, peak - before) / 1024, 1),
            "exact_reset": exact}


def memory_child(path):
    """Entry point of the subprocess: read the specs and data, measure, print one JSON line."""
    blob = torch.load(path, weights_only=False)  # our own temporary file
    args = argparse.Namespace(**blob["args"])
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(blob["device"])
    dtype = getattr(torch, blob["dtype"])
    out = {}
    for spec in blob["specs"]:
        out[spec_name(spec)] = measure_memory_here(spec, blob["data"], args, device, dtype)
    print("MEMORY " + json.dumps(out))


def measure_memory(specs, data, args, device, dtype) -> dict:
    if device.type == "cuda":
        items = {spec_name(s): measure_memory_here(s, data, args, device, dtype) for s in specs}
        return {"method": "torch.cuda.max_memory_allocated (in process); step_mib = peak - "
                          "allocated before the measured call", "items": items}
    if not os.path.exists("/proc/self/status"):
        return {"skipped": "needs Linux /proc for the peak resident set"}
    items = {}
    groups = [specs] if args.quick else [[s] for s in specs]
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "job.pt")
        for group in groups:
            torch.save({"args": vars(args), "device": str(device),
                        "dtype": str(dtype).replace("torch.", ""), "specs": group,
                        "data": data}, path)
            r = subprocess.run([sys.executable, "-m", "tools.bench", "--memory-child", path],
                               capture_output=True, text=True, cwd=ROOT)
            line = [ln for ln in r.stdout.splitlines() if ln.startswith("MEMORY ")]
            if r.returncode != 0 or not line:
                err = (r.stderr.strip().splitlines() or ["no output"])[-1]
                for s in group:
                    items[spec_name(s)] = {"error": err}
                continue
            items.update(json.loads(line[0][len("MEMORY "):]))
    how = ("one fresh subprocess for all measurements (--quick; later ones may reuse memory "
           "freed by earlier ones)" if args.quick else "a fresh subprocess per measurement")
    return {"method": f"peak resident set VmHWM (/proc/self/status), reset with clear_refs "
                      f"before the measured call (SFT: after a warm-up step); {how}; "
                      f"peak_mib = whole process (Python, torch, model, optimizer state), "
                      f"step_mib = peak - RSS before the measured call",
            "items": items}


# ----------------------------------------------------------------------------------------------
# Attention kernel actually dispatched


def attention_backend(cfg, B, T, device, dtype) -> dict:
    """Which SDPA kernel PyTorch picks for the model's shapes, with the boolean mask (packing,
    shared prefix) and with is_causal (no mask): torch._fused_sdp_choice, the dispatcher's own
    choice function; if that private API is missing, the op names one call leaves in the
    profiler."""
    import torch.nn.functional as F
    q = torch.randn(B, cfg.n_heads, T, cfg.head_dim, device=device, dtype=dtype)  # the dtype q
    doc = (torch.arange(T, device=device) // max(1, T // 4)).expand(B, T)        # has in autocast
    mask = attention_mask(doc)
    out = {}
    for label, kw in (("masked", {"attn_mask": mask}), ("causal", {"is_causal": True})):
        try:
            from torch.nn.attention import SDPBackend
            choice = SDPBackend(torch._fused_sdp_choice(q, q, q, **kw)).name.lower()
            out[label] = {"kernel": choice, "how": "torch._fused_sdp_choice"}
        except Exception:  # noqa: BLE001 - private API; fall back to the profiler
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CPU]) as prof, torch.no_grad():
                F.scaled_dot_product_attention(q, q, q, **kw)
            ops = sorted({e.name for e in prof.events() if "attention" in e.name})
            kern = [k for k in ("flash", "efficient", "cudnn", "math") if any(k in o for o in ops)]
            out[label] = {"kernel": "+".join(kern) or "unknown", "how": "profiler", "ops": ops}
    if device.type == "cuda":
        km, kc = out["masked"]["kernel"], out["causal"]["kernel"]
        if km == "math":
            out["note"] = ("masked batches FALL BACK to the math kernel (materialises the T×T "
                           "scores): expect packed/shared-prefix batches to be slow and memory-bound")
        else:
            out["note"] = (f"masked batches run {km}, a fused kernel that takes the boolean mask "
                           f"(FlashAttention does not take one); unmasked causal ones run {kc}")
    else:
        out["note"] = ("CPU: the flash-attention CPU kernel takes the boolean mask as well (no "
                       "fallback to the math kernel); it computes every key block either way")
    return out


# ----------------------------------------------------------------------------------------------
# The sections


def flops_per_token(cfg, n_non_embedding, ctx):
    return 6 * n_non_embedding + 12 * cfg.n_layers * cfg.d_model * ctx


def run_sft(name, data, peak, args, device, dtype, sync) -> dict:
    variants, models = {}, {}
    for mode in sft_modes(device):
        spec = {"kind": "sft", "preset": name, "mode": mode}
        models[mode], variants[mode] = workload(spec, data, args, device, dtype)
    variants["matmul_peak"] = matmul_fn(peak["size"], device, dtype)
    s = compare(variants, args.repeats, args.seconds, sync,
                warmup=4 if args.compile else 1)
    lm = models["packed_masked"].lm
    cfg, n_ne = lm.cfg, lm.num_params(non_embedding=True)
    pk = s["matmul_peak"]
    res = {"params": lm.num_params(), "non_embedding_params": n_ne,
           "layers": cfg.n_layers, "d_model": cfg.d_model, "vocab": cfg.vocab_size,
           "interleaved_peak": rate_summary(pk, "gflops", 1), "modes": {}}
    for mode, what in sft_modes(device).items():
        batches = data["padded"] if mode == "padded" else data["packed"]
        T = int(batches[0].idx.shape[1])
        tokens = sum(b.tokens for b in batches)
        targets = sum(int((b.targets != IGNORE).sum()) for b in batches)
        slots = sum(b.idx.numel() for b in batches)
        f_tok = flops_per_token(cfg, n_ne, T)
        f_logit = 6 * cfg.d_model * cfg.vocab_size * targets / tokens  # per real token
        same_round = [r * f_tok / (p * 1e9) for r, p in zip(s[mode]["rounds"], pk["rounds"])]
        res["modes"][mode] = {
            "what": what, **rate_summary(s[mode], "tokens_per_s", 1),
            "rows": int(batches[0].idx.shape[0]), "row_len": T,
            "real_token_fraction": round(tokens / slots, 3),
            "target_fraction": round(targets / tokens, 3),
            "flops_per_token": f_tok, "logit_flops_per_token": round(f_logit),
            "mfu_same_round_median": round(med(same_round), 4)}
    sp = speedup(s["packed_masked"], s["packed_causal"])
    res["mask_cost"] = round(1 - sp["median"], 4)
    res["mask_cost_rounds_range"] = [round(1 - sp["rounds_range"][1], 4),
                                     round(1 - sp["rounds_range"][0], 4)]
    res["packed_vs_padded"] = speedup(s["packed_masked"], s["padded"])
    if "packed_flex" in s:  # > 1: the block mask beats the dense one; vs causal: its mask cost
        res["flex_vs_dense_mask"] = speedup(s["packed_flex"], s["packed_masked"])
        res["flex_vs_causal"] = speedup(s["packed_flex"], s["packed_causal"])
    peak["best"] = max(peak["best"], best(pk))
    return res


def finish_mfu(sft: dict, peak_gflops: float):
    """MFU of the fastest step against the best matmul rate of the whole run."""
    for r in sft.values():
        for m in r["modes"].values():
            rate = m["tokens_per_s"]
            m["mfu"] = round(rate * m["flops_per_token"] / (peak_gflops * 1e9), 4)
            m["mfu_incl_logits"] = round(rate * (m["flops_per_token"] + m["logit_flops_per_token"])
                                         / (peak_gflops * 1e9), 4)


def run_pairs(kind, name, data, args, device, dtype, sync, dpo=None) -> dict:
    variants = {}
    for layout in ("shared", "padded"):
        spec = {"kind": kind, "preset": name, "layout": layout}
        if kind == "dph":
            spec["dpo"] = dpo
        variants[layout] = workload(spec, data, args, device, dtype)[1]
    # twice the rounds: these ratios sit close to their targets and each round is short
    s = compare(variants, 2 * args.repeats, args.seconds, sync,
                warmup=4 if args.compile else 1)
    unit = "pairs_per_s" if kind == "dph" else "candidates_per_s"
    return {**{k: rate_summary(v, unit) for k, v in s.items()},
            "speedup": speedup(s["shared"], s["padded"])}


def layout_shapes(items, per_batch, pad, cfg, n_ne, kind):
    """Rows, token slots and the FLOPs of one batch in each layout, and their ratio: the speedup
    a layout change can give at most when time follows FLOPs. Forward FLOPs = 2·N_ne per real
    token + 4·d·L per (query, key) pair the mask allows (QKᵀ and PV; a causal row of n tokens
    has n(n+1)/2 pairs) + 2·d·V per logit position; a training step (forward + backward) is 3×
    that; DPH with cDPO adds the reference model's forward."""
    out, raw = {}, {}
    for layout in ("shared", "padded"):
        b = collate_choices(items[:per_batch], layout, pad, end_id=items[0].branches[0][-1])
        real = b.doc >= 0
        pairs = int((attention_mask(b.doc, b.branch)[:, 0] & real[:, :, None]).sum())
        trunk = 2 * n_ne * int(real.sum()) + 4 * cfg.d_model * cfg.n_layers * pairs
        logits = 2 * cfg.d_model * cfg.vocab_size * int(b.logits_at.sum())
        if kind == "dph":  # head only: no logits; with cDPO: + the reference's forward
            flops = {"head": 3 * trunk, "head+dpo": 4 * (trunk + logits)}
        else:
            flops = {"eval": trunk + logits}
        raw[layout] = flops
        out[layout] = {"rows": int(b.idx.shape[0]), "row_len": int(b.idx.shape[1]),
                       "slots": int(b.idx.numel()), "real_tokens": int(real.sum()),
                       "attention_pairs": pairs, "logit_positions": int(b.logits_at.sum()),
                       "gflop": {k: round(v / 1e9, 2) for k, v in flops.items()}}
    out["flop_ratio"] = {k: round(raw["padded"][k] / raw["shared"][k], 3) for k in raw["shared"]}
    return out


def collate_rate(items, per_batch, pad, seconds):
    res = {}
    for layout in ("shared", "padded"):
        def fn():
            collate_choices(items[:per_batch], layout, pad, end_id=items[0].branches[0][-1])
            return per_batch
        res[layout] = round(timed(fn, min(seconds, 0.5), lambda: None), 1)
    return res


def run_generate(name, data, args, device, dtype, sync) -> dict:
    variants = {}
    for cache in (True, False):
        spec = {"kind": "generate", "preset": name, "cache": cache}
        variants["cache" if cache else "no_cache"] = workload(spec, data, args, device, dtype)[1]
    # an uncached call takes many seconds on a CPU: one call of each per round, at most 3 rounds
    s = compare(variants, min(3, args.repeats), 0.0, sync, warmup=1)  # (not compiled)
    return {**{k: rate_summary(v, "tokens_per_s", 1) for k, v in s.items()},
            "speedup": speedup(s["cache"], s["no_cache"]),
            "prompt_tokens": len(data["gen_prompt"]), "new_tokens": args.gen_tokens,
            "samples_per_call": args.gen_samples}


def run_frozen(name, data, tok, args, device, dtype, sync) -> dict:
    """Head-only DPH training with a frozen backbone, as train_dph.py --freeze-backbone runs it:
    (a) the backbone's forward on every step, gradients through the head only; (b) the head on
    cached <|im_end|> states (frozen.StateCache, filled once before timing). Each step is the
    DPH loss, backward and an AdamW step of the head. The fill rate is reported separately: one
    no-grad backbone forward per example, once; every later visit of the example costs the head
    alone."""
    from types import SimpleNamespace

    from plumbing.frozen import StateCache, cached_pair_loss
    cfg = SimpleNamespace(loss="contrastive", contrast="softmax", label_smoothing=0.1,
                          dph_weight=1.0, reward_penalty=0.0)
    items = data["dph_items"]
    models = {}
    for v in ("backbone", "cache"):
        m = build_model(name, args, device, head=True)
        m.freeze_backbone()
        m.lm.eval()  # a frozen backbone runs without dropout, as in train_dph.py
        models[v] = m
    batches = choice_batches(items, args.dph_batch, "shared", tok.pad, device)
    opts = {v: torch.optim.AdamW(m.head.parameters(), lr=1e-3) for v, m in models.items()}
    cache = StateCache(models["cache"], tok, 10 ** 9, device, dtype, batch_size=args.dph_batch)
    t0 = time.perf_counter()
    cache.fill(items)
    sync()
    fill_s = time.perf_counter() - t0
    state = {"backbone": 0, "cache": 0}

    def step_backbone():
        i = state["backbone"] % len(batches)
        state["backbone"] += 1
        b = batches[i]
        with plumbing.autocast(device, dtype):
            r = score_choices(models["backbone"], b, rewards=True, logps=False)["rewards"]
        loss, _ = dph_loss(r.float().view(-1, 2)[:, 0], r.float().view(-1, 2)[:, 1],
                           "contrastive", 0.1)
        loss.backward()
        opts["backbone"].step()
        opts["backbone"].zero_grad(set_to_none=True)
        return len(b.n_branches)

    def step_cache():
        i = state["cache"] % len(batches)
        state["cache"] += 1
        chunk = items[i * args.dph_batch:(i + 1) * args.dph_batch]
        loss, _ = cached_pair_loss(models["cache"].head, cache, chunk, cfg)
        loss.backward()
        opts["cache"].step()
        opts["cache"].zero_grad(set_to_none=True)
        return len(chunk)

    variants = {"backbone": step_backbone, "cache": step_cache}
    s = compare(variants, args.repeats, args.seconds, sync)
    res = {k: rate_summary(v, "pairs_per_s") for k, v in s.items()}
    fill_pairs_s = len(items) / fill_s
    return {**res, "speedup": speedup(s["cache"], s["backbone"]),
            "fill_pairs_per_s": round(fill_pairs_s, 2), "pairs": len(items),
            "batch": args.dph_batch, "prompt_len": args.prompt_len,
            "answer_len": args.answer_len}


# ----------------------------------------------------------------------------------------------
# Targets and the printed table


def check_targets(R, args) -> list:
    out = []

    def add(name, key, value, detail=""):
        op, thr = TARGETS[key]
        ok = value >= thr if op == ">=" else value <= thr
        out.append({"name": name, "value": round(value, 4), "op": op, "threshold": thr,
                    "pass": bool(ok), "detail": detail})
    pk = R.get("packing", {})
    for which in ("builtin", "real"):
        if "efficiency" in pk.get(which, {}):
            add(f"packing efficiency ({which} mixture)", "packing efficiency",
                pk[which]["efficiency"])
    if "eval" in R:
        e = R["eval"]["speedup"]
        add("shared-prefix evaluation ≥ 3× padded (candidates/s)", "eval shared/padded",
            e["median"], f"rounds {e['rounds_range'][0]:.2f}-{e['rounds_range'][1]:.2f}×; "
                         f"FLOP ratio "
                       f"{R['eval']['shapes']['flop_ratio']['eval']:.2f}×")
    for v, r in R.get("dph", {}).get("variants", {}).items():
        add(f"shared-prefix DPH training ≥ 1.8× padded (pairs/s, {v})", "DPH shared/padded",
            r["speedup"]["median"], f"rounds {r['speedup']['rounds_range'][0]:.2f}-"
                                    f"{r['speedup']['rounds_range'][1]:.2f}×; FLOP "
                                  f"ratio {R['dph']['shapes']['flop_ratio'][v]:.2f}×")
    if "generate" in R:
        g = R["generate"]["speedup"]
        add(f"KV-cache generation ≥ 5× ({R['generate']['new_tokens']} new tokens)",
            "KV-cache speedup", g["median"],
            f"rounds {g['rounds_range'][0]:.2f}-{g['rounds_range'][1]:.2f}×")
    sft = R.get("sft", {})
    if sft:
        big = "base" if "base" in sft else list(sft)[-1]
        m = sft[big]["modes"]["packed_masked"]
        add(f"SFT MFU at {big} ≥ 50% of the {R['peak']['dtype']} matmul peak", "SFT MFU",
            m["mfu"], f"{m['mfu_incl_logits']:.1%} counting the logits; median of rounds against "
                      f"the same round's peak {m['mfu_same_round_median']:.1%}")
        for name, r in sft.items():
            add(f"document masking costs ≤ 15% of unmasked packed throughput ({name})",
                "doc-mask cost", r["mask_cost"],
                f"rounds {r['mask_cost_rounds_range'][0]:.1%} to "
                f"{r['mask_cost_rounds_range'][1]:.1%}")
    for name, w in R.get("peers", {}).get("work", {}).items():
        kind, shape = name.split()
        key = next((k for k in (f"peers {kind} {shape}", f"peers {kind}") if k in TARGETS
                    and shape != "tiny"), None)  # --quick's tiny shapes have no target
        if key is None:
            continue
        sp = w["speedup"]
        add(f"{PEER_WORK[kind]} ({shape}) ≥ {TARGETS[key][1]}× Hugging Face", key, sp["median"],
            f"rounds {sp['rounds_range'][0]:.2f}-{sp['rounds_range'][1]:.2f}×")
    return out


def fmt_table(R) -> str:
    L = []
    mc = R["machine"]
    L.append(f"machine: {mc['nproc']} × {mc['cpu']}, torch {mc['torch']}, "
             f"{mc['threads']} threads, OMP_WAIT_POLICY {mc['OMP_WAIT_POLICY']}, "
             f"malloc {mc['malloc'].split(' ')[0]}, "
             f"device {mc['device']}, {mc['dtype']}, "
             f"load {mc.get('load_start')} -> {mc.get('load_end')}")
    if "peak" in R:
        p = R["peak"]
        L.append(f"matmul peak ({p['dtype']}): {p['best']:.1f} GFLOP/s best of the run "
                 f"(sizes {p['by_size']})")
    mem = R.get("memory", {}).get("items", {})

    def memcol(key):
        m = mem.get(key, {})
        if "peak_mib" not in m:
            return f"{'-':>8} {'-':>8}"
        return f"{m['peak_mib']:8.0f} {m['step_mib']:8.0f}"
    if "sft" in R:
        L.append("")
        L.append(f"{'SFT step (fwd+bwd+AdamW)':44s} {'tok/s':>8} {'best':>8} {'MFU':>6} "
                 f"{'+logits':>7} {'peakMiB':>8} {'stepMiB':>8}")
        for name, r in R["sft"].items():
            for mode, m in r["modes"].items():
                L.append(f"{name + ' ' + m['what']:44s} {m['tokens_per_s']:8.1f} "
                         f"{m['tokens_per_s_best']:8.1f} {m['mfu']:6.1%} "
                         f"{m['mfu_incl_logits']:7.1%} {memcol('/'.join(('sft', name, mode)))}")
            L.append(f"{'':4s}{name}: document masks cost {r['mask_cost']:.1%}; packed/padded "
                     f"{r['packed_vs_padded']['median']:.2f}×; "
                     f"{r['non_embedding_params'] / 1e6:.2f}M "
                     f"non-embedding params; interleaved matmul "
                     f"{r['interleaved_peak']['gflops']:.0f} GFLOP/s")
            if "flex_vs_dense_mask" in r:
                L.append(f"{'':4s}{name}: FlexAttention block mask / dense mask "
                         f"{r['flex_vs_dense_mask']['median']:.2f}×, / plain causal "
                         f"{r['flex_vs_causal']['median']:.2f}×")
    if "packing" in R:
        for which, r in R["packing"].items():
            L.append(f"packing efficiency ({which}): " + (
                f"{r['efficiency']:.1%} over {r['rows']} rows of {r['seq_len']} "
                f"({r['tokens_per_doc']} tokens/conversation)" if "efficiency" in r
                else r.get("skipped", "")))
    def layout_rows(kind, preset, label, r, unit, flop_ratio):
        """shared and padded rates (median round, best call), then their ratio."""
        name = label + " " if label else ""
        for lay in ("shared", "padded"):
            key = "/".join((kind, preset) + ((label,) if label else ()) + (lay,))
            L.append(f"  {name + lay:17s} {r[lay][unit]:9.2f} {r[lay][unit + '_best']:9.2f} "
                     f"{memcol(key)}")
        L.append(f"  {name}shared/padded {r['speedup']['median']:.2f}× (FLOP ratio "
                 f"{flop_ratio:.2f}×)")

    if "dph" in R:
        d = R["dph"]
        L.append("")
        L.append(f"DPH training, {d['preset']}, prompt {d['prompt_len']} + 2×{d['answer_len']} "
                 f"tokens, {d['batch']} pairs/step: pairs/s (median round, best call)")
        for v, r in d["variants"].items():
            layout_rows("dph", d["preset"], v, r, "pairs_per_s", d["shapes"]["flop_ratio"][v])
    if "eval" in R:
        e = R["eval"]
        L.append(f"evaluation, {e['preset']}, {e['candidates']} candidates/item: "
                 f"candidates/s (median, best)")
        layout_rows("eval", e["preset"], "", e, "candidates_per_s", e["shapes"]["flop_ratio"]["eval"])
    if "generate" in R:
        g = R["generate"]
        L.append(f"generation, {g['preset']}, {g['samples_per_call']} samples × {g['new_tokens']} "
                 f"new tokens after {g['prompt_tokens']}: tokens/s (median, best)")
        for k in ("cache", "no_cache"):
            key = "/".join(("generate", g["preset"], k))
            L.append(f"  {k:17s} {g[k]['tokens_per_s']:9.1f} {g[k]['tokens_per_s_best']:9.1f} "
                     f"{memcol(key)}")
        L.append(f"  KV cache speedup {g['speedup']['median']:.1f}×")
    if "frozen" in R:
        f = R["frozen"]
        L.append(f"head-only training, frozen {f['preset']} backbone, prompt {f['prompt_len']} + "
                 f"2×{f['answer_len']} tokens, {f['batch']} pairs/step: pairs/s (median, best)")
        for k in ("backbone", "cache"):
            L.append(f"  {k:17s} {f[k]['pairs_per_s']:9.2f} {f[k]['pairs_per_s_best']:9.2f}")
        L.append(f"  cached/backbone {f['speedup']['median']:.1f}×; filling the cache: "
                 f"{f['fill_pairs_per_s']:.1f} pairs/s, once")
    if "attention_backend" in R:
        a = R["attention_backend"]
        L.append(f"SDPA kernel: masked -> {a['masked']['kernel']}, causal -> "
                 f"{a['causal']['kernel']} ({a['note']})")
    if "memory" in R and "method" in R["memory"]:
        L.append(f"memory: {R['memory']['method']}")
    if "peers" in R:
        from tools import peers
        L += [""] + peers.fmt(R["peers"])
    L.append("")
    if R["config"]["quick"]:
        L.append("(--quick: tiny shapes, one short round; the targets are meant for the full run)")
    for t in R.get("targets", []):
        L.append(f"{'PASS' if t['pass'] else 'MISS'}  {t['name']}: {t['value']:.4g} "
                 f"(target {t['op']} {t['threshold']}){'; ' + t['detail'] if t['detail'] else ''}")
    return "\n".join(L)


# ----------------------------------------------------------------------------------------------


MALLOC_STATE = "default"


def main(argv=None):
    global MALLOC_STATE
    args = parse_args(argv)
    if args.memory_child:  # the default allocator: it gives memory back, so peaks are per step
        return memory_child(args.memory_child)
    if args.malloc == "tuned":
        MALLOC_STATE = plumbing.tune_malloc()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = plumbing.resolve_device(args.device)
    dtype = plumbing.resolve_dtype(args.dtype, device)
    sync = make_sync(device)
    t_start = time.time()
    R = {"config": {k: v for k, v in vars(args).items() if k != "memory_child"},
         "command": "python -m tools.bench " + " ".join((
             sys.argv[1:] if argv is None else list(argv))),
         "machine": machine_info(device, dtype),
         "mfu_formula": "MFU = (6·N_non-embedding + 12·L·d·ctx)·tokens/s ÷ peak, tokens = real "
                        "(non-pad) tokens, ctx = row length; mfu_incl_logits adds 6·d·V per "
                        "target token (logits are computed only at target positions); peak = "
                        "matmul GFLOP/s measured in the same round"}
    secs = set(args.sections)

    def log(msg):
        print(f"[{time.time() - t_start:6.1f}s] {msg}", flush=True)

    if "peers" in secs:  # fail before anything runs when transformers is missing
        from tools import peers
        peers.require_transformers()
    tok, train = builtin_data(args)
    log(f"built-in suite: {sum(map(len, train.values()))} conversations, tokenizer vocabulary "
        f"{len(tok)} (model vocabulary {args.vocab_size or 'of the preset, else 8192'})")
    data = {"pad": tok.pad}
    if "packing" in secs:
        R["packing"] = {"builtin": packing_efficiency(tok, train, args), "real": real_packing(args)}
        log(f"packing: {json.dumps(R['packing'])}")
    need_peak = "peak" in secs or "sft" in secs
    if need_peak:
        R["peak"] = measure_peak(args, device, dtype, sync)
        R["peak"]["best"] = R["peak"]["gflops"]
        log(f"peak: {R['peak']['by_size']} GFLOP/s")
    specs = []
    if "sft" in secs:
        data["packed"], data["padded"] = sft_batches(tok, train, args)
        R["sft"] = {}
        for name in args.presets:
            R["sft"][name] = run_sft(name, data, R["peak"], args, device, dtype, sync)
            log(f"sft {name}: " + ", ".join(f"{k} {m['tokens_per_s']:.0f} tok/s"
                                            for k, m in R["sft"][name]["modes"].items()))
            specs += [{"kind": "sft", "preset": name, "mode": m} for m in sft_modes(device)]
        R["peak"]["gflops"] = R["peak"]["best"]
        finish_mfu(R["sft"], R["peak"]["gflops"])
    cp = args.choice_preset
    lo = 4  # ids 0..3 are the special tokens
    if "dph" in secs or "eval" in secs:
        vocab_hi = len(tok)
        data["dph_items"] = race_items(4 * args.dph_batch, args.prompt_len, args.answer_len, 2,
                                       lo, vocab_hi, tok, args.seed)
        data["eval_items"] = race_items(2 * args.eval_batch, args.prompt_len, args.answer_len,
                                        args.candidates, lo, vocab_hi, tok, args.seed + 1)
        lm = build_model(cp, args, torch.device("cpu")).lm
        cfg_ne = (lm.cfg, lm.num_params(non_embedding=True))
        del lm
    if "dph" in secs:
        d = {"preset": cp, "prompt_len": args.prompt_len, "answer_len": args.answer_len,
             "batch": args.dph_batch, "optimizer_step": False,
             "shapes": layout_shapes(data["dph_items"], args.dph_batch, tok.pad, *cfg_ne,
                                     "dph"),
             "collate_pairs_per_s": collate_rate(data["dph_items"], args.dph_batch, tok.pad,
                                                 args.seconds), "variants": {}}
        for v, dpo in (("head", False), ("head+dpo", True)):
            d["variants"][v] = run_pairs("dph", cp, data, args, device, dtype, sync, dpo)
            specs += [{"kind": "dph", "preset": cp, "layout": lay, "dpo": dpo}
                      for lay in ("shared", "padded")]
            log(f"dph {v}: {json.dumps(d['variants'][v])}")
        R["dph"] = d
    if "eval" in secs:
        e = {"preset": cp, "prompt_len": args.prompt_len, "answer_len": args.answer_len,
             "candidates": args.candidates, "batch_items": args.eval_batch,
             "shapes": layout_shapes(data["eval_items"], args.eval_batch, tok.pad, *cfg_ne,
                                     "eval")}
        e.update(run_pairs("eval", cp, data, args, device, dtype, sync))
        R["eval"] = e
        specs += [{"kind": "eval", "preset": cp, "layout": lay} for lay in ("shared", "padded")]
        log(f"eval: shared/padded {e['speedup']}")
    if "generate" in secs:
        g = random.Random(args.seed + 2)
        data["gen_prompt"] = [tok.bos] + [g.randrange(lo, len(tok))
                                          for _ in range(args.gen_prompt - 1)]
        R["generate"] = {"preset": cp, **run_generate(cp, data, args, device, dtype, sync)}
        specs += [{"kind": "generate", "preset": cp, "cache": c} for c in (True, False)]
        log(f"generate: KV cache {R['generate']['speedup']}")
    if "frozen" in secs:
        if "dph_items" not in data:
            data["dph_items"] = race_items(4 * args.dph_batch, args.prompt_len, args.answer_len,
                                           2, lo, len(tok), tok, args.seed)
        R["frozen"] = {"preset": cp, **run_frozen(cp, data, tok, args, device, dtype, sync)}
        log(f"frozen: cached/backbone {R['frozen']['speedup']}")
    if "peers" in secs:
        R["peers"] = peers.run(args, device, dtype, sync, compare, speedup, rate_summary, log)
    name0 = args.presets[0] if args.presets else cp
    m0 = build_model(name0, args, torch.device("cpu"))
    R["attention_backend"] = attention_backend(m0.cfg, args.sft_batch, args.seq_len, device, dtype)
    del m0
    if "memory" in secs and specs:
        R["memory"] = measure_memory(specs, data, args, device, dtype)
        log("memory: done")
    if hasattr(os, "getloadavg"):
        R["machine"]["load_end"] = [round(x, 2) for x in os.getloadavg()]
    R["seconds"] = round(time.time() - t_start, 1)
    R["targets"] = check_targets(R, args)
    print()
    print(fmt_table(R))
    if args.out:
        d = os.path.dirname(os.path.abspath(args.out))
        os.makedirs(d, exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(R, f, indent=1)
            f.write("\n")
        print(f"\nwrote {args.out} ({R['seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    os.environ["DPH_MALLOC"] = "default"  # run_main leaves the allocator to --malloc
    plumbing.run_main(main)
