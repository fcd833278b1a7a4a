"""The language model and its Direct Preference Head (the paper's "Direct Preference Heads").

Reading order, as in the paper:

    ModelConfig, PRESETS      backbone shapes ("paper" = the shape of the paper's 551M backbone)
    RMSNorm, rope, Attention  pre-norm decoder block pieces; SDPA with an optional boolean mask;
                              grouped-query attention for pretrained Llama-family backbones
    SwiGLU, Block             feed-forward and the residual block
    Transformer               embeddings tied to the LM head (or a separate output matrix);
                              returns the final normed hidden state and computes LM logits only
                              at the positions asked for
    attention_mask            block-diagonal (packing) and tree-shaped (shared prefix) masks
    PreferenceHead            pooler f (identity | affine | swiglu) then r = wᵀ f(h), no bias (the paper's poolers)
    DPHModel                  backbone + head; freeze_backbone(); the reward path never touches the
                              LM head, so LM outputs are unchanged by head training
    KVCache, generate         batched sampling of N answers for the paper's inference-time alignment
    save_checkpoint, load_checkpoint
                              a directory with weights (tensors only), config.json, tokenizer.json
    save_train_state, load_train_state
                              resume.pt beside them: everything --resume needs, in one file

Shapes: B batch, T query length, S key length, C d_model, H heads, Hkv key/value heads (H unless
grouped-query attention), D head dim, V vocabulary.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, fields
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------
# Configuration


@dataclass
class ModelConfig:
    vocab_size: int = 8192
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    ffn_dim: int = 688  # SwiGLU inner width
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    dropout: float = 0.0
    # Pretrained Llama-family backbones (pretrained/) need these; the defaults are this
    # project's own models.
    n_kv_heads: Optional[int] = None  # grouped-query attention; None = n_heads (plain MHA)
    qkv_bias: bool = False  # biases on the query/key/value projections (Qwen2)
    tie_embeddings: bool = True  # False: a separate output matrix (lm.output)

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError("the head dimension must be even for rotary embeddings")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads "
                             f"{self.n_kv_heads}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**d)


PRESETS = {
    # tests: well under 1M parameters even with an 8192-token vocabulary
    "tiny": dict(d_model=64, n_layers=2, n_heads=2, ffn_dim=172, max_seq_len=256),
    # the CPU default: the quick start trains it in a few minutes on 2 cores
    "small": dict(d_model=256, n_layers=4, n_heads=4, ffn_dim=688, max_seq_len=512),
    # CPU runs on real data (hours)
    "base": dict(d_model=512, n_layers=8, n_heads=8, ffn_dim=1376, max_seq_len=512),
    # the paper's backbone shape (GPU); the GPT-2 BPE + 3 chat tokens, padded to 50,272
    "paper": dict(d_model=1536, n_layers=18, n_heads=24, ffn_dim=4096, max_seq_len=2048,
                  vocab_size=50272),
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})


def padded_vocab(n: int, multiple: int = 16) -> int:
    """Embedding rows for a tokenizer of n tokens (GPT-2's 50,260 -> 50,272, as in the paper)."""
    return (n + multiple - 1) // multiple * multiple


# ----------------------------------------------------------------------------------------------
# Backbone pieces


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_table(head_dim: int, max_len: int, theta: float, device=None):
    """Rotary position embeddings (Su et al., 2021) as unit complex numbers e^{i·pos·θ_k},
    (max_len, D/2): rotating a (query or key) pair of features is one complex multiplication."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_len, device=device, dtype=torch.float32), inv)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x, rot):
    """x (B, H, T, D); rot (B, 1, T, D/2) complex, gathered at each token's own position."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * rot).flatten(-2).type_as(x)


class Attention(nn.Module):
    """Causal self-attention with RoPE. With grouped-query attention (n_kv_heads < n_heads) each
    key/value head serves n_heads / n_kv_heads consecutive query heads. The fused projection
    `qkv` holds the H query heads, then the Hkv key heads, then the Hkv value heads."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, (self.n_heads + 2 * self.n_kv) * self.head_dim,
                             bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.dropout = cfg.dropout

    def forward(self, x, rot, mask=None, cache=None, layer=0):
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, self.n_heads + 2 * self.n_kv, self.head_dim).transpose(1, 2)
        q, k, v = qkv.split([self.n_heads, self.n_kv, self.n_kv], dim=1)
        q, k = apply_rope(q, rot), apply_rope(k, rot)  # (B, H, T, D), (B, Hkv, T, D)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, Hkv, S, D), S = cached + T
        drop = self.dropout if self.training else 0.0
        gqa = {"enable_gqa": True} if self.n_kv != self.n_heads else {}
        if mask is None:  # plain causal (no cache, or an empty one); or one new token after a
            # cache, which sees every cached key: no mask at all. Transformer.forward builds the
            # mask for the remaining case (several new tokens after cached ones) once per call.
            causal = True if cache is None else bool(T > 1)  # (a python bool under compile)
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=causal, **gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop, **gqa)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class SwiGLU(nn.Module):
    """FFN(x) = W2 (silu(W1 x) ⊙ W3 x) (Shazeer, 2020). Also the 'swiglu' pooler's body."""

    def __init__(self, d: int, hidden: int, bias: bool = False):
        super().__init__()
        self.w13 = nn.Linear(d, 2 * hidden, bias=bias)  # W1 and W3 in one matmul
        self.w2 = nn.Linear(hidden, d, bias=bias)

    def forward(self, x):
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.norm2 = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = SwiGLU(cfg.d_model, cfg.ffn_dim)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, rot, mask=None, cache=None, layer=0):
        x = x + self.drop(self.attn(self.norm1(x), rot, mask, cache, layer))
        return x + self.drop(self.ffn(self.norm2(x)))


class ModelOutput(NamedTuple):
    hidden: torch.Tensor  # (B, T, C): final normed hidden states, the input of the LM head
    logits: Optional[torch.Tensor]  # (N, V) at the N positions asked for, else None


class Transformer(nn.Module):
    """Decoder-only LM: token embedding (tied to the output projection), pre-norm blocks, RoPE."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        # the LM head: the embedding matrix itself (tied), or its own matrix
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size,
                                                                bias=False)
        self.register_buffer("rope", rope_table(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta),
                             persistent=False)
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2 style: scale residual projections
            if name.endswith("proj.weight") or name.endswith("w2.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init(m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, idx, pos=None, mask=None, cache=None, logits_at=None) -> ModelOutput:
        """idx (B, T) token ids.
        pos (B, T) explicit positions (packing restarts them; a shared prefix's branches continue
            after the prompt). Default: 0..T-1, offset by the cache length when decoding.
        mask (B, T, S) or (B, 1, T, S) boolean, True = may attend. Default: causal.
        cache a KVCache, filled in place.
        logits_at (B, T) boolean: compute LM logits only there, returned flattened (N, V) in
            row-major order. None: no logits at all. The full (B, T, V) tensor is never built
            unless every position is asked for.
        """
        B, T = idx.shape
        if pos is None:
            start = cache.length if cache is not None else 0
            pos = torch.arange(start, start + T, device=idx.device).expand(B, T)
        # (skipped under torch.compile: int() of a tensor breaks the graph and specialises on the
        # value, so every packed batch with a new longest document would recompile)
        if not torch.compiler.is_compiling() and int(pos.max()) >= self.cfg.max_seq_len:
            raise ValueError(f"position {int(pos.max())} exceeds max_seq_len {self.cfg.max_seq_len}")
        rot = self.rope[pos].unsqueeze(1)  # (B, 1, T, D/2) complex
        if mask is not None and mask.dim() == 3:
            mask = mask.unsqueeze(1)  # broadcast over heads
        if mask is None and cache is not None and 0 < cache.length and T > 1:
            # a chunk after cached tokens: every cached key, causal within the chunk; built once
            # here rather than in every layer
            S = cache.length + T
            mask = torch.ones(T, S, dtype=torch.bool, device=idx.device).tril(S - T)
        x = self.drop(self.embed(idx))
        for i, block in enumerate(self.blocks):
            x = block(x, rot, mask, cache, i)
        if cache is not None:
            cache.length += T
        h = self.norm(x)
        logits = self.lm_logits(h[logits_at]) if logits_at is not None else None
        return ModelOutput(h, logits)

    def lm_logits(self, h):
        """The LM head, (..., C) -> (..., V): the embedding matrix, or lm.output when untied."""
        return F.linear(h, self.embed.weight if self.output is None else self.output.weight)

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if non_embedding else n


def attention_mask(doc_ids, branch_ids=None):
    """Boolean attention mask (B, 1, T, T), True = may attend.

    doc_ids (B, T): packed documents; a token sees only earlier tokens of its own document
        (block-diagonal causal). -1 marks padding, which sees only itself (so no row is empty).
    branch_ids (B, T): shared-prefix trees; 0 = the shared prompt, k > 0 = answer branch k. A token
        sees earlier prompt tokens of its document and earlier tokens of its own branch, never
        another branch.
    """
    B, T = doc_ids.shape
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    m = (doc_ids[:, :, None] == doc_ids[:, None, :]) & causal
    if branch_ids is not None:
        bq, bk = branch_ids[:, :, None], branch_ids[:, None, :]
        m &= (bk == 0) | (bk == bq)
    pad = doc_ids < 0
    eye = torch.eye(T, dtype=torch.bool, device=doc_ids.device)
    m = torch.where(pad[:, :, None], eye, m & ~pad[:, None, :])
    return m.unsqueeze(1)


# ----------------------------------------------------------------------------------------------
# The preference head (the paper's "Direct Preference Heads"): r = wᵀ f(h), f a pooler, no bias on w.


class PreferenceHead(nn.Module):
    """Reward head over any backbone's final hidden states.

    pooler: 'identity' f(h) = h; 'affine' f(h) = tanh(W h + b); 'swiglu' f(h) = tanh(SwiGLU(h)),
    the inverted-bottleneck FFN d -> ffn -> d (the paper's released model matches this one).
    Weights start N(0, 0.02), biases 0.
    """

    POOLERS = ("identity", "affine", "swiglu")

    def __init__(self, d_model: int, pooler: str = "swiglu", dropout: float = 0.0,
                 ffn_dim: Optional[int] = None):
        super().__init__()
        if pooler not in self.POOLERS:
            raise ValueError(f"unknown pooler {pooler!r}; choose from {', '.join(self.POOLERS)}")
        self.pooler_kind = pooler
        if pooler == "affine":
            self.pooler = nn.Linear(d_model, d_model)
        elif pooler == "swiglu":
            self.pooler = SwiGLU(d_model, ffn_dim or 4 * d_model, bias=True)
        else:
            self.pooler = None
        self.dropout = nn.Dropout(dropout)
        self.score = nn.Linear(d_model, 1, bias=False)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, h):
        """h (..., C) -> rewards (...)."""
        h = self.dropout(h)
        if self.pooler is not None:
            h = torch.tanh(self.pooler(h))
        return self.score(h).squeeze(-1)

    def reward(self, hidden, index):
        """Read rewards at explicitly given positions (never inferred from padding).
        hidden (B, T, C); index (B,) one position per row, or (N, 2) (row, position) pairs.
        Returns (B,) or (N,)."""
        if index.dim() == 1:
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            return self(hidden[rows, index])
        return self(hidden[index[:, 0], index[:, 1]])


class DPHModel(nn.Module):
    """The LM backbone plus (optionally) a preference head. The head reads the backbone's final
    hidden states and has no path into the LM logits."""

    def __init__(self, cfg: ModelConfig, head: Optional[dict] = None):
        super().__init__()
        self.cfg = cfg
        self.lm = Transformer(cfg)
        self.head = None
        self.head_cfg = None
        if head is not None:
            self.add_head(**head)

    def add_head(self, pooler: str = "swiglu", dropout: float = 0.0, ffn_dim: Optional[int] = None):
        ffn_dim = ffn_dim or self.cfg.ffn_dim
        self.head_cfg = dict(pooler=pooler, dropout=dropout, ffn_dim=ffn_dim)
        self.head = PreferenceHead(self.cfg.d_model, pooler, dropout, ffn_dim)
        self.head.to(self.lm.embed.weight.device)
        return self.head

    def forward(self, idx, pos=None, mask=None, cache=None, logits_at=None) -> ModelOutput:
        return self.lm(idx, pos, mask, cache, logits_at)

    def reward(self, hidden, index):
        if self.head is None:
            raise RuntimeError("this model has no preference head; train one with train_dph.py")
        return self.head.reward(hidden, index)

    def set_dropout(self, p: float):
        """Backbone dropout, everywhere it lives: the nn.Dropout modules and the attention
        weights' own rate (the pooler's dropout is the head's, and stays)."""
        self.cfg.dropout = p
        for m in self.lm.modules():
            if isinstance(m, nn.Dropout):
                m.p = p
            elif isinstance(m, Attention):
                m.dropout = p

    def freeze_backbone(self, frozen: bool = True):
        for p in self.lm.parameters():
            p.requires_grad_(not frozen)

    def describe(self) -> str:
        n = self.lm.num_params()
        nh = sum(p.numel() for p in self.head.parameters()) if self.head is not None else 0
        return (f"backbone {n / 1e6:.2f}M parameters ({self.lm.num_params(True) / 1e6:.2f}M "
                f"non-embedding), head {nh / 1e6:.2f}M")


# ----------------------------------------------------------------------------------------------
# Generation (inference-time alignment samples N answers, then the head ranks them)


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


# ----------------------------------------------------------------------------------------------
# Checkpoints: a directory with model.pt (tensors only), config.json and tokenizer.json

WEIGHTS, CONFIG, TOKENIZER = "model.pt", "config.json", "tokenizer.json"
RESUME = "resume.pt"  # the training state of a run in progress (train_sft.py / train_dph.py)


def _atomic_write(path, write):
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    try:
        umask = os.umask(0)  # mkstemp makes 0600: give the file the mode open() would (0644)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_checkpoint(path, model: DPHModel, tokenizer_json: Optional[str] = None,
                    extra: Optional[dict] = None):
    """Write model weights (from the uncompiled module), config.json and tokenizer.json into the
    directory `path`, each file atomically (a temporary file, then os.replace). config.json goes
    last: a directory with a config.json holds a complete checkpoint. `extra` (plain JSON) is
    stored in config.json.

    The checkpoint is atomic as a whole too: config.json records the sha256 of the weights (and
    of the tokenizer), and load_checkpoint refuses a model.pt that is not the one its config.json
    was written with (a kill between the renames leaves new weights beside an old config)."""
    os.makedirs(path, exist_ok=True)
    raw = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    raw = getattr(raw, "module", raw)  # DistributedDataParallel wrapper
    state = {k: v.detach().cpu().clone() for k, v in raw.state_dict().items()}
    config = {"model": asdict(raw.cfg), "head": raw.head_cfg, **(extra or {}),
              "weights_sha256": state_digest(state)}
    if tokenizer_json is not None:
        config["tokenizer_sha256"] = hashlib.sha256(tokenizer_json.encode()).hexdigest()
    _atomic_write(os.path.join(path, WEIGHTS), lambda p: torch.save(state, p))
    if tokenizer_json is not None:
        def write_tokenizer(p):
            with open(p, "w") as f:
                f.write(tokenizer_json)
        _atomic_write(os.path.join(path, TOKENIZER), write_tokenizer)

    def write_config(p):
        with open(p, "w") as f:
            json.dump(config, f, indent=2)
            f.write("\n")
    _atomic_write(os.path.join(path, CONFIG), write_config)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file."""


def state_digest(state: dict) -> str:
    """sha256 over the bytes of every tensor of a state dict, in order."""
    h = hashlib.sha256()
    for v in state.values():
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def read_config(path) -> dict:
    f = os.path.join(path, CONFIG)
    if not os.path.isfile(f):
        raise CheckpointError(f"{f}: not found (is {path} a checkpoint directory?)")
    try:
        with open(f) as fh:
            return json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f}: not valid JSON ({e})") from None


def _check_model_config(cfg: "ModelConfig"):
    """Plausible values for every field (by its declared type): positive ints, finite floats,
    real booleans; a shape that cannot be built is refused before anything is allocated."""
    for f in fields(cfg):
        v, kind = getattr(cfg, f.name), str(f.type)
        if kind == "bool" and not isinstance(v, bool):
            raise ValueError(f"{f.name} must be true or false, got {v!r}")
        if kind in ("int", "Optional[int]") and not (v is None and kind != "int") and (
                not isinstance(v, int) or isinstance(v, bool) or v <= 0):
            raise ValueError(f"{f.name} must be a positive integer, got {v!r}")
        if kind == "float" and (not isinstance(v, (int, float)) or isinstance(v, bool)
                                or not math.isfinite(v) or v < 0):
            raise ValueError(f"{f.name} must be a finite number >= 0, got {v!r}")
    if not cfg.dropout < 1 or not cfg.rope_theta > 0:
        raise ValueError(f"dropout {cfg.dropout} must be below 1 and rope_theta "
                         f"{cfg.rope_theta} positive")
    if cfg.max_seq_len > 2**21:  # its RoPE table is built whatever the weights say
        raise ValueError(f"max_seq_len {cfg.max_seq_len} is beyond 2**21 positions")


def _check_head_config(head):
    if head is None:
        return
    if not isinstance(head, dict):
        raise ValueError(f"'head' must be an object like {{\"pooler\": \"swiglu\"}}, got {head!r}")
    p = head.get("dropout", 0.0)
    if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0 <= p < 1:
        raise ValueError(f"head dropout must be in [0, 1), got {p!r}")
    d = head.get("ffn_dim")
    if d is not None and (not isinstance(d, int) or isinstance(d, bool) or d <= 0):
        raise ValueError(f"head ffn_dim must be a positive integer, got {d!r}")


def load_checkpoint(path, device="cpu") -> tuple:
    """Rebuild the exact model saved in `path`. Returns (model, config dict). Weights are read
    with torch.load(weights_only=True): a pickle carrying code is refused. Everything that can
    be wrong with a checkpoint is a CheckpointError naming the file: a config.json that does not
    describe a model (the shapes are tried on the meta device first, so nothing big is allocated
    for a bogus one), weights of another shape, weights that are not the ones config.json was
    saved with (its weights_sha256), or non-finite weights."""
    config = read_config(path)
    cf, f = os.path.join(path, CONFIG), os.path.join(path, WEIGHTS)
    if not isinstance(config, dict):
        raise CheckpointError(f"{cf}: not a checkpoint config (a JSON object)")
    try:
        if not isinstance(config.get("model"), dict):
            raise ValueError("no 'model' object")
        cfg = ModelConfig.from_dict(config["model"])
        _check_model_config(cfg)
        _check_head_config(config.get("head"))
        # a big model's shapes come from the meta device (nothing allocated; ~2 s to set up),
        # a small one is simply built (the common case: a few ms)
        head = config.get("head") or {}
        hffn = head.get("ffn_dim") or cfg.ffn_dim
        numel = (2 * cfg.vocab_size * cfg.d_model + cfg.max_seq_len * cfg.d_model + cfg.n_layers
                 * (4 * cfg.d_model ** 2 + 3 * cfg.d_model * cfg.ffn_dim) + 3 * cfg.d_model * hffn)
        with torch.device("meta") if numel > 2**27 else contextlib.nullcontext():
            built = DPHModel(cfg, head=config.get("head"))
        shapes = {k: v.shape for k, v in built.state_dict().items()}
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{cf}: bad model config ({first})") from None
    if not os.path.isfile(f):
        raise CheckpointError(f"{f}: not found")
    try:
        state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file or a pickle that is not plain tensors
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{f}: cannot be loaded safely ({first})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                              for v in state.values()):
        raise CheckpointError(f"{f}: expected a dict of tensors")
    state = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in state.items()}
    bad = sorted(set(shapes) ^ set(state)) or [k for k in shapes if state[k].shape != shapes[k]]
    if bad:
        k = bad[0]
        what = (f"{k}: {tuple(state[k].shape)} in the file, {tuple(shapes[k])} in {CONFIG}"
                if k in state and k in shapes else f"{k} is only in "
                f"{'the file' if k in state else CONFIG}")
        raise CheckpointError(f"{f}: does not match {CONFIG} ({len(bad)} tensor(s) differ; "
                              f"{what})")
    want = config.get("weights_sha256")
    if want is not None and state_digest(state) != want:
        raise CheckpointError(f"{f}: not the weights {CONFIG} was saved with (a save cut short "
                              f"between the two files?); --resume the run to write them again")
    nonfinite = [k for k, v in state.items() if v.is_floating_point() and
                 not bool(torch.isfinite(v).all())]
    if nonfinite:
        raise CheckpointError(f"{f}: non-finite weights (NaN or inf) in {len(nonfinite)} "
                              f"tensor(s), e.g. {nonfinite[0]}")
    model = built if built.lm.embed.weight.device.type != "meta" else \
        DPHModel(cfg, head=config.get("head"))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{f}: does not match {CONFIG} ({str(e).splitlines()[0]})") from None
    return model.to(device), config


def save_train_state(path, state: dict):
    """Write `state` (tensors and plain Python types only) to path/resume.pt in one atomic
    replace: a kill leaves the previous resume.pt or the new one, never a mix of steps."""
    os.makedirs(path, exist_ok=True)
    _atomic_write(os.path.join(path, RESUME), lambda p: torch.save(state, p))


def load_train_state(f) -> dict:
    """Read a resume.pt with torch.load(weights_only=True): a pickle carrying code is refused."""
    if not os.path.isfile(f):
        raise CheckpointError(f"{f}: not found")
    try:
        state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file or a pickle that is not plain tensors
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{f}: cannot be loaded safely ({first})") from None
    need = ("step", "config", "model", "optimizer")
    if not isinstance(state, dict) or any(k not in state for k in need):
        raise CheckpointError(f"{f}: not a training state (expected keys {', '.join(need)})")
    return state
