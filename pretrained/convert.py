"""Tensor names and shapes of GGUF and Hugging Face Llama-family checkpoints -> this project's
state dict (model.py).

Both formats are first put in one per-layer form (`Parts`: q, k, v, o, gate, up, down, two norms,
optional q/k/v biases; PyTorch (out, in) matrices), then `state_dict` builds the project's tensors:

    project                         Hugging Face                         GGUF
    lm.embed.weight                 model.embed_tokens.weight            token_embd.weight
    lm.blocks.i.norm1.weight        model.layers.i.input_layernorm       blk.i.attn_norm
    lm.blocks.i.attn.qkv.weight     self_attn.{q,k,v}_proj (rows q|k|v)  blk.i.attn_{q,k,v}
    lm.blocks.i.attn.qkv.bias       self_attn.{q,k,v}_proj.bias (Qwen2)  blk.i.attn_{q,k,v}.bias
    lm.blocks.i.attn.proj.weight    self_attn.o_proj                     blk.i.attn_output
    lm.blocks.i.norm2.weight        post_attention_layernorm             blk.i.ffn_norm
    lm.blocks.i.ffn.w13.weight      mlp.{gate,up}_proj (rows gate|up)    blk.i.ffn_{gate,up}
    lm.blocks.i.ffn.w2.weight       mlp.down_proj                        blk.i.ffn_down
    lm.norm.weight                  model.norm.weight                    output_norm.weight
    lm.output.weight (untied only)  lm_head.weight                       output.weight

RoPE layout. model.py rotates features (2i, 2i+1) of each head together (a complex number per
pair). Hugging Face checkpoints rotate (i, i + D/2) together ("rotate half"), and so do GGUF
files of architectures llama.cpp runs with its NEOX rotation (qwen2); GGUF files of `llama` keep
llama.cpp's adjacent pairs. The rotate-half q/k rows of a head are converted by `unpermute`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from model import ModelConfig


def unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rotate-half rows -> adjacent-pair rows, per head, for a q or k weight (H*D, C) or bias
    (H*D,). Within a head of D rows, rotate-half row j*D/2 + i (j = 0, 1; i < D/2) is the pair
    member that model.py expects at row 2i + j:

        new[h, 2i + j] = old[h, j*D/2 + i]

    i.e. view the head's rows as (2, D/2), transpose to (D/2, 2), flatten."""
    rest = w.shape[1:]
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, d // 2, *rest).transpose(1, 2).reshape(w.shape)


def permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of unpermute: adjacent-pair rows -> rotate-half rows."""
    rest = w.shape[1:]
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, d // 2, 2, *rest).transpose(1, 2).reshape(w.shape)


@dataclass
class Layer:
    norm1: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    norm2: torch.Tensor
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    q_bias: Optional[torch.Tensor] = None
    k_bias: Optional[torch.Tensor] = None
    v_bias: Optional[torch.Tensor] = None


@dataclass
class Parts:
    embed: torch.Tensor
    layers: list
    norm: torch.Tensor
    output: Optional[torch.Tensor] = None  # None: tied to the embedding
    rotate_half: bool = False  # q/k rows in the rotate-half layout (need unpermute)
    used: set = field(default_factory=set)  # source tensor names consumed


def state_dict(cfg: ModelConfig, parts: Parts) -> dict:
    """The project's backbone state dict ("lm." names) from the per-layer form."""
    def qk(w, heads):
        return unpermute(w, heads) if parts.rotate_half else w

    sd = {"lm.embed.weight": parts.embed, "lm.norm.weight": parts.norm}
    if parts.output is not None:
        sd["lm.output.weight"] = parts.output
    H, Hkv = cfg.n_heads, cfg.kv_heads
    for i, L in enumerate(parts.layers):
        p = f"lm.blocks.{i}."
        sd[p + "norm1.weight"] = L.norm1
        sd[p + "attn.qkv.weight"] = torch.cat([qk(L.q, H), qk(L.k, Hkv), L.v], 0)
        if cfg.qkv_bias:
            sd[p + "attn.qkv.bias"] = torch.cat([qk(L.q_bias, H), qk(L.k_bias, Hkv), L.v_bias], 0)
        sd[p + "attn.proj.weight"] = L.o
        sd[p + "norm2.weight"] = L.norm2
        sd[p + "ffn.w13.weight"] = torch.cat([L.gate, L.up], 0)
        sd[p + "ffn.w2.weight"] = L.down
    return {k: v.float().contiguous() for k, v in sd.items()}


class Source:
    """Named tensors with a record of which were used (every tensor must land somewhere)."""

    def __init__(self, get, names, where: str):
        self._get, self.names, self.where, self.used = get, set(names), where, set()

    def __contains__(self, name):
        return name in self.names

    def __call__(self, name, optional=False):
        if name not in self.names:
            if optional:
                return None
            raise ValueError(f"{self.where}: tensor {name} not found")
        self.used.add(name)
        return torch.as_tensor(self._get(name)).float()

    def check_all_used(self, ignore=()):
        left = sorted(n for n in self.names - self.used if not any(s in n for s in ignore))
        if left:
            raise ValueError(f"{self.where}: {len(left)} tensors this loader does not map "
                             f"(another architecture?): {', '.join(left[:6])}")


# ----------------------------------------------------------------------------------------------
# GGUF (llama.cpp)

GGUF_ARCHS = {"llama": False, "qwen2": True}  # architecture -> q/k rows in rotate-half layout


def gguf_config(meta: dict, tensors) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHS:
        raise ValueError(f"GGUF architecture {arch!r} is not supported ({', '.join(GGUF_ARCHS)})")

    def key(name, default=None):
        v = meta.get(f"{arch}.{name}", default)
        if v is None:
            raise ValueError(f"GGUF metadata lacks {arch}.{name}")
        return v
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", None):
        raise ValueError(f"GGUF {arch}.rope.scaling.type {scaling!r}: RoPE scaling is not "
                         f"supported")
    d, heads = int(key("embedding_length")), int(key("attention.head_count"))
    rope_dim = int(meta.get(f"{arch}.rope.dimension_count", d // heads))
    if rope_dim != d // heads:
        raise ValueError(f"partial rotary embeddings ({rope_dim} of {d // heads} features) are "
                         f"not supported")
    vocab = int(meta.get(f"{arch}.vocab_size", len(meta.get("tokenizer.ggml.tokens", []))))
    return ModelConfig(
        vocab_size=vocab, d_model=d, n_layers=int(key("block_count")), n_heads=heads,
        n_kv_heads=int(key("attention.head_count_kv", heads)),
        ffn_dim=int(key("feed_forward_length")), max_seq_len=int(key("context_length")),
        rope_theta=float(key("rope.freq_base", 10000.0)),
        norm_eps=float(key("attention.layer_norm_rms_epsilon")),
        qkv_bias="blk.0.attn_q.bias" in tensors, tie_embeddings="output.weight" not in tensors)


def gguf_parts(cfg: ModelConfig, src: Source, arch: str) -> Parts:
    layers = []
    for i in range(cfg.n_layers):
        p = f"blk.{i}."
        layers.append(Layer(
            norm1=src(p + "attn_norm.weight"), q=src(p + "attn_q.weight"),
            k=src(p + "attn_k.weight"), v=src(p + "attn_v.weight"),
            o=src(p + "attn_output.weight"), norm2=src(p + "ffn_norm.weight"),
            gate=src(p + "ffn_gate.weight"), up=src(p + "ffn_up.weight"),
            down=src(p + "ffn_down.weight"),
            q_bias=src(p + "attn_q.bias", optional=True), k_bias=src(p + "attn_k.bias", True),
            v_bias=src(p + "attn_v.bias", optional=True)))
    return Parts(src("token_embd.weight"), layers, src("output_norm.weight"),
                 src("output.weight", optional=True), rotate_half=GGUF_ARCHS[arch])


# ----------------------------------------------------------------------------------------------
# Hugging Face (config.json + safetensors)

HF_ARCHS = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")


def hf_config(conf: dict, names) -> ModelConfig:
    arch = (conf.get("architectures") or ["?"])[0]
    if arch not in HF_ARCHS:
        raise ValueError(f"config.json: architecture {arch} is not supported "
                         f"({', '.join(HF_ARCHS)})")
    if conf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json: hidden_act {conf['hidden_act']!r} (SwiGLU needs silu)")
    if conf.get("rope_scaling"):
        raise ValueError(f"config.json: rope_scaling {conf['rope_scaling']} is not supported")
    if conf.get("mlp_bias") or "model.layers.0.self_attn.o_proj.bias" in names:
        raise ValueError("config.json: biases on the output or MLP projections are not supported")
    if conf.get("sliding_window") and conf.get("use_sliding_window", True) and \
            conf["sliding_window"] < conf.get("max_position_embeddings", 0):
        raise ValueError("config.json: sliding-window attention is not supported")
    d, heads = conf["hidden_size"], conf["num_attention_heads"]
    if conf.get("head_dim", d // heads) != d // heads:
        raise ValueError(f"config.json: head_dim {conf['head_dim']} != hidden_size / heads")
    tied = conf.get("tie_word_embeddings", "lm_head.weight" not in names) or \
        "lm_head.weight" not in names
    return ModelConfig(
        vocab_size=conf["vocab_size"], d_model=d, n_layers=conf["num_hidden_layers"],
        n_heads=heads, n_kv_heads=conf.get("num_key_value_heads") or heads,
        ffn_dim=conf["intermediate_size"], max_seq_len=conf.get("max_position_embeddings", 2048),
        rope_theta=float(conf.get("rope_theta", 10000.0)),
        norm_eps=float(conf.get("rms_norm_eps", 1e-6)),
        qkv_bias="model.layers.0.self_attn.q_proj.bias" in names, tie_embeddings=tied)


def hf_parts(cfg: ModelConfig, src: Source) -> Parts:
    layers = []
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        a, m = p + "self_attn.", p + "mlp."
        layers.append(Layer(
            norm1=src(p + "input_layernorm.weight"), q=src(a + "q_proj.weight"),
            k=src(a + "k_proj.weight"), v=src(a + "v_proj.weight"), o=src(a + "o_proj.weight"),
            norm2=src(p + "post_attention_layernorm.weight"), gate=src(m + "gate_proj.weight"),
            up=src(m + "up_proj.weight"), down=src(m + "down_proj.weight"),
            q_bias=src(a + "q_proj.bias", optional=True), k_bias=src(a + "k_proj.bias", True),
            v_bias=src(a + "v_proj.bias", optional=True)))
    output = None if cfg.tie_embeddings else src("lm_head.weight")
    if cfg.tie_embeddings and "lm_head.weight" in src:
        src("lm_head.weight")  # a stored copy of the tied embedding
    return Parts(src("model.embed_tokens.weight"), layers, src("model.norm.weight"), output,
                 rotate_half=True)
