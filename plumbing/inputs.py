"""What each stage starts from: its model and tokenizer, its data, checks of both.

    init_lm, sft_model   train_sft.py: the --init checkpoint's model, or a new model of --preset
                         with a byte-level BPE trained on the training text (or --tokenizer)
    continue_head        train_dph.py: a fresh preference head, or the --init's trained one
    dph_data             train_dph.py: the pair tasks, their training examples, fixed validation
                         pairs and a fixed sample of training pairs, after the fit checks
    check_sft_fit        train_sft.py: --seq-len long enough for the answers
    check_kind, note_cut_prompts   evaluate.py: the checkpoints given, prompts cut to fit
"""
from __future__ import annotations

import dataclasses
import random
import sys

import torch

from data import balance_labels, make_pairs
from model import DPHModel, padded_vocab, preset
from plumbing import (UsageError, broadcast_object, check_fit, check_items_fit, explicit_flags,
                      load_init, load_split, trained_only)
from tasks import InstructionExample, TextExample, resolve_tasks
from tasks.noise import apply_label_noise
from tokenizer.chat import ChatTokenizer, training_text
from tokenizer.chatml import render_prompt, sft_document

PAIR_KINDS = ("choice", "preference", "instruction")  # instructions: those with distractors


def continue_head(model, cfg, argv=None):
    """A fresh head on an SFT checkpoint. An --init that has a head (a DPH checkpoint) keeps it
    and trains it further, with a note, unless --new-head; a --pooler that differs from the
    head's is an error then (it cannot apply to a trained head)."""
    if model.head is None or cfg.new_head:
        if model.head is not None:
            print(f"note: --new-head: the trained head of {cfg.init} is replaced by a fresh "
                  f"{cfg.pooler} head", file=sys.stderr)
        model.add_head(cfg.pooler, cfg.pooler_dropout)
        if cfg.head_init == "zero":
            # r = wᵀ f(h) is 0 for every answer, and the DPH loss's gradient into the backbone
            # is ∝ w: it starts at 0 and then grows along what w has learned to read
            torch.nn.init.zeros_(model.head.score.weight)
        return
    kind = model.head_cfg.get("pooler")
    if "pooler" in explicit_flags(argv) and cfg.pooler != kind:
        raise UsageError(f"--pooler {cfg.pooler}: --init {cfg.init} has a trained {kind} head; "
                         f"pass --new-head to replace it")
    model.head.dropout.p = cfg.pooler_dropout
    model.head_cfg["dropout"] = cfg.pooler_dropout
    print(f"note: --init {cfg.init} has a trained {kind} head: training continues from it "
          f"(--new-head starts a fresh one)", file=sys.stderr)


def init_lm(cfg, argv=None):
    """train_sft.py --init: (model, tokenizer) of the checkpoint or pretrained model to continue
    from; its shape and tokenizer come along, and a preference head it has is dropped."""
    model, init_config, tok = load_init(cfg.init)
    inherited = init_config.get("sft", {})
    print(f"continuing from {cfg.init} ({inherited.get('tasks', 'unknown tasks')})")
    ignored = sorted({"preset", "vocab_size"} & explicit_flags(argv))
    if ignored:
        print(f"note: --init: the model's shape and tokenizer come from {cfg.init}; "
              f"{', '.join('--' + n.replace('_', '-') for n in ignored)} not used",
              file=sys.stderr)
    if model.head is not None:  # SFT trains the LM; a stale head must not ride along
        print(f"note: --init {cfg.init} has a preference head; SFT trains the language "
              f"model only, so the head is dropped (train_dph.py adds a new one)",
              file=sys.stderr)
        model.head, model.head_cfg = None, None
    given = explicit_flags(argv)  # the checkpoint's dropout rates stay unless a flag is given
    model.set_dropout(cfg.dropout if "dropout" in given else model.cfg.dropout,
                      cfg.attn_dropout if "attn_dropout" in given else model.cfg.attn_dropout)
    return model, tok


def sft_model(cfg, run, train: dict, argv=None):
    """(model, tokenizer): the resumed run's, the --init checkpoint's, or a new model of --preset
    with a byte-level BPE trained on the training text (or --tokenizer)."""
    dist = run.dist
    if run.state is not None:
        return run.resumed_model()
    if cfg.init:  # continue from a checkpoint: its tokenizer and shape come along
        return init_lm(cfg, argv)
    if cfg.tokenizer:
        tok = ChatTokenizer.from_pretrained_files(cfg.tokenizer)
    else:
        texts = [t for exs in train.values() for t in training_text(exs)] if dist.main else []
        tok = ChatTokenizer.train(texts, cfg.vocab_size) if dist.main else None
        if dist.active:  # trained once, on rank 0, so every rank surely has the same vocabulary
            tok = ChatTokenizer.from_json(broadcast_object(
                tok.to_json() if dist.main else None, dist))
    mcfg = preset(cfg.preset, vocab_size=max(padded_vocab(len(tok)), preset(cfg.preset).vocab_size
                                             if cfg.preset == "paper" else 0),
                  dropout=cfg.dropout, attn_dropout=cfg.attn_dropout)
    if cfg.seq_len > mcfg.max_seq_len:
        print(f"note: --seq-len {cfg.seq_len} is longer than the {cfg.preset} preset's "
              f"context {mcfg.max_seq_len}: the new model's context is {cfg.seq_len}",
              file=sys.stderr)
        mcfg = dataclasses.replace(mcfg, max_seq_len=cfg.seq_len)
    return DPHModel(mcfg), tok


def check_sft_fit(tok, train: dict, seq_len: int):
    """A conversation whose last answer cannot fit in a row (its prompt is cut from the left
    first) is dropped; too many dropped means --seq-len is too small."""
    probes = {n: [ex for ex in exs[:256] if not isinstance(ex, TextExample)]
              for n, exs in train.items()}
    check_fit("--seq-len", seq_len, {n: (sum(sft_document(tok, [ex], seq_len) is None
                                            for ex in p), len(p)) for n, p in probes.items()})


def dph_data(cfg, model, tok, init_config: dict, device):
    """The pair-making tasks (--tasks, or those the SFT checkpoint was trained on), their
    training examples, fixed validation pairs and a fixed sample of training pairs (reward
    accuracy before and after). Returns (specs, train, val_items, train_items, max_len)."""
    tasks = cfg.tasks or ",".join(init_config.get("sft", {}).get("tasks", ["builtin"]))
    specs = [s for s in resolve_tasks(tasks) if s.kind in PAIR_KINDS]
    if not specs:
        raise UsageError(f"--tasks {tasks}: no choice or preference task to make pairs from")
    if cfg.max_len > model.cfg.max_seq_len:
        raise UsageError(f"--max-len {cfg.max_len} exceeds the model's context "
                         f"{model.cfg.max_seq_len}")
    max_len = cfg.max_len or model.cfg.max_seq_len
    train = load_split(specs, "train", cfg.data_dir, cfg.data_seed,
                                limit=cfg.max_examples)
    # instruction data makes pairs only where it knows wrong answers (synth/instruct does)
    plain = [n for n, exs in train.items() if exs and isinstance(exs[0], InstructionExample)
             and not any(ex.distractors for ex in exs)]
    train = {n: exs for n, exs in train.items() if n not in plain}
    specs = [s for s in specs if s.name not in plain]
    if not specs:
        raise UsageError(f"--tasks {tasks}: no choice or preference task to make pairs from")
    if cfg.label_noise:
        train = {k: apply_label_noise(v, cfg.label_noise, cfg.seed) for k, v in train.items()}
    if getattr(cfg, "balance_labels", False):  # on the labels the head will see, noisy or not
        train = {k: balance_labels(v, cfg.seed) for k, v in train.items()}
    # pairs whose answers cannot fit in max_len (after cutting the prompt from the left) are
    # skipped; too many skipped means --max-len is too small. A micro-batch must fit in memory.
    probes = {n: make_pairs(tok, exs[:256], random.Random(0), max_len) for n, exs in train.items()}
    check_fit("--max-len", max_len, {n: (min(256, len(train[n])) - len(p), min(
        256, len(train[n]))) for n, p in probes.items()})
    check_items_fit(model.cfg, [it for p in probes.values() for it in p], cfg.layout,
                             cfg.batch_size, device, f"one micro-batch of --batch-size "
                             f"{cfg.batch_size} pairs", "lower it (--grad-accum keeps the batch)")
    val = trained_only(load_split(specs, "validation", cfg.data_dir,
                                                    cfg.data_seed, required=False), train)
    val_exs = [ex for exs in val.values() for ex in exs]
    random.Random(cfg.seed).shuffle(val_exs)
    val_items = make_pairs(tok, val_exs, random.Random(12345), max_len)[:cfg.eval_pairs]
    train_exs = [ex for exs in train.values() for ex in exs]
    random.Random(cfg.seed + 2).shuffle(train_exs)
    train_items = make_pairs(tok, train_exs[:cfg.eval_pairs], random.Random(54321), max_len)
    return specs, train, val_items, train_items, max_len


def check_kind(key: str, path: str, model):
    """--dph must hold a preference head (its rows are the DPO and DPH rows); --sft given a
    DPH checkpoint is scored by its language model, with a note."""
    if key == "dph" and model.head is None:
        raise UsageError(f"--dph {path}: no preference head (an SFT checkpoint?); pass it as "
                         f"--sft, or train a head on it with train_dph.py")
    if key == "sft" and model.head is not None:
        print(f"note: --sft {path} has a preference head (a DPH checkpoint): the SFT row reads "
              f"its language model", file=sys.stderr)


def note_cut_prompts(tok, examples, items, max_len):
    """A note when prompts had to be cut from the left to fit the model's context (as in
    training: after <bos>, so the oldest tokens go first, see data.truncate_prompt)."""
    cut = [it for it in items if len(it.prompt) + max(map(len, it.branches)) == max_len
           and len(it.prompt) < len(render_prompt(tok, examples[it.ref].messages))]
    if cut:
        print(f"note: {examples[0].task}: {len(cut)} of {len(items)} prompts are longer than the "
              f"model's context {max_len} with their answers and lose their first tokens",
              file=sys.stderr)
