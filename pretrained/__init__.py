"""Bring your own model: pretrained Llama-family backbones for --init, read offline.

    is_pretrained(path)      a .gguf file, or a Hugging Face model directory (config.json +
                             model.safetensors or its sharded index) rather than a checkpoint
                             of this project
    load_pretrained(path)    -> (DPHModel without a head, info dict, ChatTokenizer), float32

    gguf.py          the GGUF v3 reader (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, F16, BF16, F32)
    safetensors.py   the safetensors reader (single file or sharded)
    convert.py       tensor names and the RoPE row permutation -> model.py's state dict
    tokenizer.py     the tokenizer from GGUF vocabulary + merges, or tokenizer.json; chat tokens

The model is rebuilt exactly as the checkpoint describes it (grouped-query attention, RoPE base,
RMSNorm eps, tied or untied output, q/k/v biases, BOS or none); the chat format stays this
project's ChatML with the model's own <|im_start|>/<|im_end|> tokens where it has them.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys

import torch

GGUF_MAGIC = b"GGUF"


def is_gguf(path: str) -> bool:
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def is_hf_dir(path: str) -> bool:
    from .safetensors import INDEX, SINGLE
    return (os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))
            and not _is_checkpoint(path)
            and any(os.path.isfile(os.path.join(path, f)) for f in (SINGLE, INDEX)))


def _is_checkpoint(path: str) -> bool:
    """A checkpoint of this project (which holds a model.safetensors too): a model.pt, or a
    config.json with this project's "model" object."""
    if os.path.isfile(os.path.join(path, "model.pt")):
        return True
    try:
        with open(os.path.join(path, "config.json")) as f:
            conf = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(conf, dict) and isinstance(conf.get("model"), dict)


def is_pretrained(path: str) -> bool:
    return is_gguf(path) or is_hf_dir(path)


def _build(cfg, parts, tok, added: int, src, ignore=()):
    """The DPHModel from converted parts; `added` new tokens (chat tokens the vocabulary lacked)
    get embedding rows: the mean of the others, so their logits start ordinary."""
    import dataclasses

    from plumbing.checkpoint import check_vocab
    from model import DPHModel, padded_vocab
    from .convert import state_dict
    src.check_all_used(ignore)
    if parts.embed.shape != (cfg.vocab_size, cfg.d_model):
        raise ValueError(f"{src.where}: embedding {tuple(parts.embed.shape)}, expected "
                         f"{(cfg.vocab_size, cfg.d_model)}")
    sd = state_dict(cfg, parts)
    if len(tok) > cfg.vocab_size:  # rows for the new tokens
        rows = padded_vocab(len(tok)) - cfg.vocab_size
        for name in ("lm.embed.weight", "lm.output.weight"):
            if name in sd:
                w = sd[name]
                sd[name] = torch.cat([w, w.mean(0, keepdim=True).expand(rows, -1)], 0)
        cfg = dataclasses.replace(cfg, vocab_size=cfg.vocab_size + rows)
        print(f"note: {src.where}: added {added} chat token(s) with new embedding rows",
              file=sys.stderr)
    with _no_random_init():  # every parameter is replaced next: skip drawing 100M+ numbers
        model = DPHModel(cfg)
    model.load_state_dict(sd, strict=True, assign=True)
    check_vocab(tok, cfg.vocab_size, src.where)
    return model


@contextlib.contextmanager
def _no_random_init():
    """torch.nn.init's fills as no-ops inside the block (nn.Linear, nn.Embedding and model.py
    look them up at call time), so the parameters stay uninitialised memory."""
    names = ("normal_", "uniform_", "kaiming_uniform_", "zeros_", "ones_")
    saved = {n: getattr(torch.nn.init, n) for n in names}
    for n in names:
        setattr(torch.nn.init, n, lambda t, *a, **k: t)
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.nn.init, n, f)


def load_gguf(path: str):
    from .convert import Source, gguf_config, gguf_parts
    from .gguf import GGUFFile
    from .tokenizer import chat_tokenizer, from_gguf_vocab
    g = GGUFFile(path)
    cfg = gguf_config(g.metadata, g.tensors)
    src = Source(lambda n: torch.from_numpy(g.tensor(n)), g.tensors, path)
    parts = gguf_parts(cfg, src, g.metadata["general.architecture"])
    meta = g.metadata
    stated = meta.get("tokenizer.ggml.padding_token_id")
    tokens = meta.get("tokenizer.ggml.tokens", [])
    tok, added = chat_tokenizer(from_gguf_vocab(meta),
                                tokens[stated] if stated is not None and stated < len(tokens)
                                else None)
    model = _build(cfg, parts, tok, added, src)
    info = {"format": "gguf", "path": os.path.abspath(path),
            "architecture": meta.get("general.architecture"), "name": meta.get("general.name"),
            "types": sorted({g.type_name(n) for n in g.tensors})}
    return model, info, tok


def load_hf(path: str):
    from tokenizers import Tokenizer

    from .convert import Source, hf_config, hf_parts
    from .safetensors import load_dir
    from .tokenizer import chat_tokenizer
    with open(os.path.join(path, "config.json")) as f:
        conf = json.load(f)
    tensors = load_dir(path)
    cfg = hf_config(conf, tensors)
    src = Source(tensors.__getitem__, tensors, path)
    parts = hf_parts(cfg, src)
    tj = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(tj):
        raise FileNotFoundError(f"{tj}: not found (the model directory needs its tokenizer.json)")
    stated = None
    tc = os.path.join(path, "tokenizer_config.json")
    if os.path.isfile(tc):
        with open(tc) as f:
            stated = json.load(f).get("pad_token")
        stated = stated.get("content") if isinstance(stated, dict) else stated
    tok, added = chat_tokenizer(Tokenizer.from_file(tj), stated)
    # (a preference head exported beside the backbone, pretrained/export.py, is not the LM's)
    model = _build(cfg, parts, tok, added, src, ignore=("rotary_emb.inv_freq", "preference_head."))
    info = {"format": "hf", "path": os.path.abspath(path),
            "architecture": (conf.get("architectures") or ["?"])[0],
            "name": conf.get("_name_or_path", os.path.basename(os.path.abspath(path)))}
    return model, info, tok


def load_pretrained(path: str):
    """-> (DPHModel, info, ChatTokenizer). info goes into the config of checkpoints trained
    from it ("pretrained")."""
    from plumbing.checkpoint import CheckpointError
    try:
        if is_gguf(path):
            return load_gguf(path)
        return load_hf(path)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: cannot be loaded as a pretrained model ({e})") from None
