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
    use_attention, block_mask SDPA with the dense mask, or FlexAttention skipping hidden tiles
    PreferenceHead            pooler f (identity | affine | swiglu) then r = wᵀ f(h), no bias (the paper's poolers)
    DPHModel                  backbone + head; freeze_backbone(); the reward path never touches the
                              LM head, so LM outputs are unchanged by head training

Sampling with a KV cache is in inference/generate.py; checkpoint files in plumbing/checkpoint.py.

Shapes: B batch, T query length, S key length, C d_model, H heads, Hkv key/value heads (H unless
grouped-query attention), D head dim, V vocabulary.
"""
from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, fields
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
    dropout: float = 0.0  # on the embeddings and on each residual branch's output
    attn_dropout: float = 0.0  # on the attention weights (on the CPU it takes the attention
    # off its fused kernel: about a fifth of an SFT step, against a few percent for `dropout`)
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
        if "attn_dropout" not in d:  # written before attn_dropout existed: then `dropout` also
            d = {**d, "attn_dropout": d.get("dropout", 0.0)}  # dropped attention weights
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
    """x (B, H, T, D); rot gathered at each token's own position: (B, 1, T, D/2) complex, or
    (B, 1, T, D/2, 2) its (cos, sin) as real numbers, the same rotation
    (a, b) -> (a·cos − b·sin, a·sin + b·cos) of each feature pair. Eager, the complex product is
    one fast kernel (the real form is 2-4x slower on CPU); under torch.compile the real form
    fuses with its neighbours, where Inductor leaves complex ops eager."""
    if rot.is_complex():
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * rot).flatten(-2).type_as(x)
    a, b = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = rot.unbind(-1)
    return torch.stack((a * cos - b * sin, a * sin + b * cos), -1).flatten(-2).type_as(x)


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
        self.dropout = cfg.attn_dropout

    def forward(self, x, rot, mask=None, cache=None, layer=0):
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, self.n_heads + 2 * self.n_kv, self.head_dim).transpose(1, 2)
        q, k, v = qkv.split([self.n_heads, self.n_kv, self.n_kv], dim=1)
        q, k = apply_rope(q, rot), apply_rope(k, rot)  # (B, H, T, D), (B, Hkv, T, D)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, Hkv, S, D), S = cached + T
        drop = self.dropout if self.training else 0.0
        gqa = {"enable_gqa": True} if self.n_kv != self.n_heads else {}
        if is_block_mask(mask):  # Transformer.attention == "flex": skip the blocks it hides
            if drop:
                raise ValueError("flex attention has no attention dropout: set it to 0 "
                                 "(train_sft.py --attn-dropout 0) or use --attention sdpa")
            y = flex(q, k, v, mask, **gqa)
        elif mask is None:  # plain causal (no cache, or an empty one); or one new token after a
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
        self.register_buffer("rope_real", torch.view_as_real(self.rope).clone(), persistent=False)
        self.attention = "sdpa"  # or "flex" (use_attention): the kernel for masked batches
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
        table = self.rope_real if torch.compiler.is_compiling() else self.rope  # apply_rope
        rot = table[pos].unsqueeze(1)  # (B, 1, T, D/2) complex, or (B, 1, T, D/2, 2) real
        if mask is not None and mask.dim() == 3:
            mask = mask.unsqueeze(1)  # broadcast over heads
        if mask is not None and self.attention == "flex" and cache is None:
            mask = block_mask(mask)  # once per call, shared by every layer
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
        """The LM head, (..., C) -> (..., V)."""
        return F.linear(h, self.lm_weight)

    @property
    def lm_weight(self):
        """The LM head's (V, C) matrix: the embedding matrix, or lm.output when untied."""
        return self.embed.weight if self.output is None else self.output.weight

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


ATTENTION_KINDS = ("sdpa", "flex")


def use_attention(model: nn.Module, kind: str) -> nn.Module:
    """Select the kernel every Transformer inside `model` uses for masked batches (packing,
    shared prefixes): "sdpa" hands SDPA the dense boolean mask (the default; every device);
    "flex" turns that mask, once per forward, into a block mask for FlexAttention (PyTorch >= 2.5),
    which skips every block of (query, key) tiles the mask hides entirely. Unmasked calls (plain
    causal, decoding with a KV cache) use SDPA either way. Flex is for CUDA: on the CPU it runs
    unfused (for tests), and it has no attention dropout."""
    if kind not in ATTENTION_KINDS:
        raise ValueError(f"attention kind {kind!r}: expected one of {', '.join(ATTENTION_KINDS)}")
    if kind == "flex" and importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
        raise ValueError(f"flex attention needs PyTorch >= 2.5 (this is {torch.__version__})")
    for m in model.modules():
        if isinstance(m, Transformer):
            m.attention = kind
    return model


def is_block_mask(mask) -> bool:
    return mask is not None and not isinstance(mask, torch.Tensor)


def block_mask(mask, block: int = 128):
    """Dense boolean mask (B, 1, T, S) -> FlexAttention BlockMask of the same pattern. A tile of
    block x block (query, key) pairs that the mask hides entirely is never computed; the rest
    are computed with the dense mask as the mask_mod. For packed rows of several documents most
    tiles above the block diagonal are hidden (as the causal ones are)."""
    from torch.nn.attention.flex_attention import create_block_mask
    B, _, T, S = mask.shape
    dense = mask[:, 0]

    def mask_mod(b, h, q, k):
        return dense[b, q, k]
    return create_block_mask(mask_mod, B, None, T, S, device=mask.device, BLOCK_SIZE=block,
                             _compile=mask.is_cuda)


_compiled_flex = None


def flex(q, k, v, block_mask, **kw):
    """FlexAttention. Outside torch.compile it is compiled on its own on CUDA (eager, it falls
    back to an unfused reference that holds every score); on the CPU it runs eager."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention
    fn = flex_attention
    if q.is_cuda and not torch.compiler.is_compiling():
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention)
        fn = _compiled_flex
    return fn(q, k, v, block_mask=block_mask, **kw)


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
        """h (..., C) -> rewards (...), in the head's own dtype (float32) whatever autocast is
        on. Under bfloat16 autocast a reward rounded to bfloat16 keeps 8 significant bits: close
        candidates tie, and argmax then picks the first (on a GPU the head tied that way on most
        items of three families). The head is a few matmuls on one state per answer: float32
        costs nothing."""
        with torch.autocast(h.device.type, enabled=False):
            h = self.dropout(h.to(self.score.weight.dtype))
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

    @property
    def lm_weight(self):
        return self.lm.lm_weight

    def reward(self, hidden, index):
        if self.head is None:
            raise RuntimeError("this model has no preference head; train one with train_dph.py")
        return self.head.reward(hidden, index)

    def set_dropout(self, p: float, attn: float = 0.0):
        """Backbone dropout, everywhere it lives: p in the nn.Dropout modules (embeddings and
        residual branches), attn on the attention weights (the pooler's dropout is the head's,
        and stays)."""
        self.cfg.dropout, self.cfg.attn_dropout = p, attn
        for m in self.lm.modules():
            if isinstance(m, nn.Dropout):
                m.p = p
            elif isinstance(m, Attention):
                m.dropout = attn

    def freeze_backbone(self, frozen: bool = True):
        for p in self.lm.parameters():
            p.requires_grad_(not frozen)

    def describe(self) -> str:
        n = self.lm.num_params()
        nh = sum(p.numel() for p in self.head.parameters()) if self.head is not None else 0
        return (f"backbone {n / 1e6:.2f}M parameters ({self.lm.num_params(True) / 1e6:.2f}M "
                f"non-embedding), head {nh / 1e6:.2f}M")
