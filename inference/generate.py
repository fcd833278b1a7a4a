"""Sampling from the language model with a KV cache: the first half of the paper's inference-time
alignment procedure (sample N answers, then the head picks one: inference/best_of_n.py).

    KVCache       preallocated keys and values of every layer (Transformer.forward's `cache`)
    sample_next   temperature, top-k and top-p sampling of the next token
    generate      n continuations of one prompt, decoded together
"""
from __future__ import annotations

import contextlib

import torch

from model import DPHModel, ModelConfig

class KVCache:
    """Preallocated keys/values for every layer: (L, B, Hkv, max_len, D), Hkv = the key/value
    heads (fewer than the query heads under grouped-query attention)."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device, dtype):
        shape = (cfg.n_layers, batch, cfg.kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    def update(self, layer, k, v):
        T = k.shape[2]
        end = self.length + T
        if end > self.k.shape[3]:
            raise ValueError(f"KV cache full ({self.k.shape[3]} positions)")
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


def sample_next(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """logits (B, V) -> token ids (B,). temperature 0 = greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the first always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@contextlib.contextmanager
def _intra_op_threads(n: int):
    """torch's intra-op thread count capped at n inside the block (a process-wide setting,
    restored on exit)."""
    old = torch.get_num_threads()
    if n >= old:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@torch.no_grad()
def generate(model, prompt_ids, n=1, max_new_tokens=64, temperature=1.0, top_k=0, top_p=1.0,
             stop_id=None, use_cache=True, generator=None):
    """Sample n continuations of one prompt in a batch. Returns a list of n lists of new token
    ids, each cut before its stop token (the stop token is not included)."""
    lm = model.lm if isinstance(model, DPHModel) else model
    device = lm.embed.weight.device
    prompt = torch.tensor(prompt_ids, device=device).unsqueeze(0).expand(n, -1)
    total = prompt.shape[1] + max_new_tokens
    if total > lm.cfg.max_seq_len:
        raise ValueError(f"prompt ({prompt.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"max_seq_len {lm.cfg.max_seq_len}")
    cache = KVCache(lm.cfg, n, total, device, lm.embed.weight.dtype) if use_cache else None
    seq, step_in = prompt, prompt
    done = torch.zeros(n, dtype=torch.bool, device=device)
    # A cached decoding step multiplies n rows by every weight matrix. On the CPU such small
    # matmuls finish sooner on one thread than by waking a second one (2 cores: 0.09 vs 0.22 ms
    # for 4 rows x 256 -> 768; two threads only pay off from ~64 rows), so those steps run
    # single-threaded; the prompt (prefill) and uncached steps keep every thread.
    few_rows = use_cache and device.type == "cpu" and n <= 16
    for step in range(max_new_tokens):
        x = step_in if use_cache else seq
        last = torch.zeros(x.shape, dtype=torch.bool, device=device)
        last[:, -1] = True
        with _intra_op_threads(1) if few_rows and step > 0 else contextlib.nullcontext():
            logits = lm(x, cache=cache, logits_at=last).logits  # (n, V)
            nxt = sample_next(logits, temperature, top_k, top_p, generator)
        if stop_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, stop_id), nxt)
            done |= nxt == stop_id
        seq = torch.cat([seq, nxt[:, None]], 1)
        step_in = nxt[:, None]
        if stop_id is not None and bool(done.all()):
            break
    out = []
    for row in seq[:, prompt.shape[1]:].tolist():
        if stop_id is not None and stop_id in row:
            row = row[: row.index(stop_id)]
        out.append(row)
    return out
