"""pretrained/: GGUF and safetensors readers, tensor mapping, RoPE layouts, grouped-query
attention, the tokenizer built from a GGUF vocabulary, and --init with a pretrained model.

The files are written here by small writers that follow the format descriptions (not the
readers' code), and an independent rotate-half Llama forward (the Hugging Face convention) is the
reference for the logits. Tests on the real SmolLM2-135M file need DPH_MODELS (the folder that
holds it; .ci/run sets it when ../shared/models exists):

    DPH_MODELS=/work/shared/models python -m pytest -q tests/test_pretrained.py
"""
import json
import math
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import plumbing
import pretrained
from tokenizer.chat import ChatTokenizer
from tokenizer.chatml import render_prompt
from inference.generate import KVCache, generate
from model import DPHModel, ModelConfig
from pretrained import gguf as G
from pretrained.convert import permute, unpermute

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ----------------------------------------------------------------------------------------------
# Writers and references, from the format descriptions


def quantize_ref(x: np.ndarray, kind: str) -> bytes:
    """Blocks of 32 values. Q8_0: f16 d = max|x|/127, int8 q = round(x/d). Q4_0: d = (value of
    largest magnitude)/-8, q = round(x/d) + 8 in 0..15. Q4_1: d = (max-min)/15, m = min,
    q = round((x-m)/d). 4-bit codes: byte j = element j (low nibble) | element j+16 (high)."""
    out = bytearray()
    for b in np.asarray(x, np.float32).reshape(-1, 32):
        if kind == "Q8_0":
            d = float(np.abs(b).max()) / 127
            q = [0 if d == 0 else int(np.clip(round(v / d), -127, 127)) for v in b]
            out += struct.pack("<e", d) + struct.pack("<32b", *q)
            continue
        if kind == "Q4_0":
            big = float(b[np.abs(b).argmax()])
            d, m, lo = big / -8, None, -8
            q = [0 if d == 0 else int(np.clip(round(v / d) + 8, 0, 15)) for v in b]
        else:  # Q4_1
            m = float(b.min())
            d = (float(b.max()) - m) / 15
            q = [0 if d == 0 else int(np.clip(round((v - m) / d), 0, 15)) for v in b]
        out += struct.pack("<e", d) + (struct.pack("<e", m) if kind == "Q4_1" else b"")
        out += bytes(q[j] | (q[j + 16] << 4) for j in range(16))
    return bytes(out)


def dequantize_ref(raw: bytes, kind: str) -> np.ndarray:
    """Element by element, straight from the block description."""
    size = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}[kind]
    vals = []
    for o in range(0, len(raw), size):
        blk = raw[o:o + size]
        d = struct.unpack("<e", blk[:2])[0]
        if kind == "Q8_0":
            vals += [d * q for q in struct.unpack("<32b", blk[2:])]
            continue
        m = struct.unpack("<e", blk[2:4])[0] if kind == "Q4_1" else 0.0
        qs = blk[4:] if kind == "Q4_1" else blk[2:]
        codes = [qs[j] & 15 for j in range(16)] + [qs[j] >> 4 for j in range(16)]
        vals += [d * q + m if kind == "Q4_1" else d * (q - 8) for q in codes]
    return np.array(vals, dtype=np.float32)


GGML = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 8}


def gguf_bytes(metadata: dict, tensors: dict, align: int = 32) -> bytes:
    """GGUF v3: magic, version, counts, key/values (string key, uint32 type, value), tensor
    infos (name, n_dims, dims fastest first, type, offset), padding, aligned data.
    tensors: {name: (kind, float32 array)}."""
    def s(x):
        b = x.encode()
        return struct.pack("<Q", len(b)) + b

    def val(v):
        if isinstance(v, bool):
            return 7, struct.pack("<?", v)
        if isinstance(v, int):
            return 4, struct.pack("<I", v)  # uint32
        if isinstance(v, float):
            return 6, struct.pack("<f", v)
        if isinstance(v, str):
            return 8, s(v)
        t = val(v[0])[0]
        return 9, struct.pack("<IQ", t, len(v)) + b"".join(val(x)[1] for x in v)

    meta = {**metadata, "general.alignment": align}
    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(meta))
    for k, v in meta.items():
        t, b = val(v)
        out += s(k) + struct.pack("<I", t) + b
    blobs, off = [], 0
    for name, (kind, arr) in tensors.items():
        raw = arr.astype("<f4").tobytes() if kind == "F32" else \
            arr.astype("<f2").tobytes() if kind == "F16" else quantize_ref(arr, kind)
        dims = list(reversed(arr.shape))
        out += s(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        out += struct.pack("<IQ", GGML[kind], off)
        blobs.append(raw + b"\0" * (-len(raw) % align))
        off += len(blobs[-1])
    return out + b"\0" * (-len(out) % align) + b"".join(blobs)


def safetensors_bytes(tensors: dict) -> bytes:
    """8-byte little-endian header length, JSON header {name: dtype, shape, data_offsets}, data."""
    header, data = {"__metadata__": {"format": "pt"}}, b""
    for name, arr in tensors.items():
        raw = np.ascontiguousarray(arr, dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(arr.shape),
                        "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


def hf_rotate_half(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Adjacent-pair q/k rows -> Hugging Face's rotate-half rows: per head, the pair (2i, 2i+1)
    goes to rows (i, i + D/2)."""
    D = w.shape[0] // n_heads
    out = np.empty_like(w)
    for h in range(n_heads):
        for i in range(D // 2):
            out[h * D + i] = w[h * D + 2 * i]
            out[h * D + i + D // 2] = w[h * D + 2 * i + 1]
    return out


def reference_forward(W: dict, conf: dict, ids: torch.Tensor) -> torch.Tensor:
    """A Llama forward in the Hugging Face convention: rotate-half RoPE, repeated KV heads,
    RMSNorm, SwiGLU, optional q/k/v biases and untied lm_head. W holds HF-named arrays."""
    t = {k: torch.tensor(v, dtype=torch.float64) for k, v in W.items()}
    H, Hkv, d = conf["num_attention_heads"], conf["num_key_value_heads"], conf["hidden_size"]
    D, T, eps = d // H, ids.shape[1], conf["rms_norm_eps"]
    inv = 1.0 / conf["rope_theta"] ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = torch.outer(torch.arange(T, dtype=torch.float64), inv)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    def rot(x):  # (B, h, T, D)
        x1, x2 = x[..., :D // 2], x[..., D // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    def lin(x, name):
        y = x @ t[name + ".weight"].T
        return y + t[name + ".bias"] if name + ".bias" in t else y

    x = t["model.embed_tokens.weight"][ids]
    for i in range(conf["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = rms(x, t[p + "input_layernorm.weight"])
        q = lin(h, p + "self_attn.q_proj").view(1, T, H, D).transpose(1, 2)
        k = lin(h, p + "self_attn.k_proj").view(1, T, Hkv, D).transpose(1, 2)
        v = lin(h, p + "self_attn.v_proj").view(1, T, Hkv, D).transpose(1, 2)
        q, k = rot(q), rot(k)
        k, v = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(D)
        att = att.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
        y = (att.softmax(-1) @ v).transpose(1, 2).reshape(1, T, d)
        x = x + lin(y, p + "self_attn.o_proj")
        h = rms(x, t[p + "post_attention_layernorm.weight"])
        x = x + lin(F.silu(lin(h, p + "mlp.gate_proj")) * lin(h, p + "mlp.up_proj"),
                    p + "mlp.down_proj")
    x = rms(x, t["model.norm.weight"])
    out = t["lm_head.weight"] if "lm_head.weight" in t else t["model.embed_tokens.weight"]
    return (x @ out.T)[0]


# ----------------------------------------------------------------------------------------------
# A tiny Llama-family model, written as GGUF and as a Hugging Face directory

TEXT = ["The capital of France is Paris.", "What is the capital of France?",
        "In 2024 the price was 12345 dollars.", "You are a helpful assistant.",
        "Answer: positive", "Answer: negative", "the quick brown fox jumps over the lazy dog"]


@pytest.fixture(scope="module")
def vocab_tok():
    """A byte-level BPE with SmolLM2's pre-tokenizer (digits one by one) and ChatML tokens at
    ids 0-2, no pad token: the kind of vocabulary a GGUF file carries."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>",
                                                                   "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    t.train_from_iterator(TEXT * 5 + ["system\n", "user\n", "assistant\n"], trainer)
    return t


def gguf_vocab_meta(t) -> dict:
    model = json.loads(t.to_str())["model"]
    tokens = [None] * t.get_vocab_size()
    for s, i in model["vocab"].items():
        tokens[i] = s
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm",
            "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.token_type": [3 if i < 3 else 1 for i in range(len(tokens))],
            "tokenizer.ggml.padding_token_id": 2,  # <|im_end|>, as SmolLM2 states: not used
            "tokenizer.ggml.add_bos_token": False}


def tiny_weights(vocab: int, seed=0, bias=False, untied=False) -> tuple:
    """One set of weights in Hugging Face naming, q/k rows in the ADJACENT-PAIR layout (as GGUF
    stores them), with grouped-query attention (4 query heads, 2 KV heads of 8)."""
    g = np.random.default_rng(seed)
    conf = {"architectures": ["Qwen2ForCausalLM" if bias else "LlamaForCausalLM"],
            "model_type": "qwen2" if bias else "llama", "hidden_size": 32,
            "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "max_position_embeddings": 128, "vocab_size": vocab, "hidden_act": "silu",
            "tie_word_embeddings": not untied}
    d, f, kv = 32, 48, 16

    def w(*shape, scale=None):
        return g.normal(0, scale or shape[-1] ** -0.5, shape).astype(np.float32)
    W = {"model.embed_tokens.weight": w(vocab, d, scale=1.0),
         "model.norm.weight": 1 + 0.1 * w(d, scale=1.0)}
    if untied:
        W["lm_head.weight"] = w(vocab, d)
    for i in range(2):
        p = f"model.layers.{i}."
        W.update({p + "input_layernorm.weight": 1 + 0.1 * w(d, scale=1.0),
                  p + "post_attention_layernorm.weight": 1 + 0.1 * w(d, scale=1.0),
                  p + "self_attn.q_proj.weight": w(d, d), p + "self_attn.k_proj.weight": w(kv, d),
                  p + "self_attn.v_proj.weight": w(kv, d), p + "self_attn.o_proj.weight": w(d, d),
                  p + "mlp.gate_proj.weight": w(f, d), p + "mlp.up_proj.weight": w(f, d),
                  p + "mlp.down_proj.weight": w(d, f)})
        if bias:
            W.update({p + "self_attn.q_proj.bias": w(d, scale=0.3),
                      p + "self_attn.k_proj.bias": w(kv, scale=0.3),
                      p + "self_attn.v_proj.bias": w(kv, scale=0.3)})
    return W, conf


GGUF_NAMES = {"input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj": "attn_q",
              "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "post_attention_layernorm.weight":
              "ffn_norm.weight", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}


def to_gguf_tensors(W: dict, kinds=None) -> dict:
    kinds = kinds or {}
    out = {}
    for name, arr in W.items():
        if name == "model.embed_tokens.weight":
            g = "token_embd.weight"
        elif name == "model.norm.weight":
            g = "output_norm.weight"
        elif name == "lm_head.weight":
            g = "output.weight"
        else:
            i, rest = name.split(".")[2], ".".join(name.split(".")[3:])
            key = next(k for k in GGUF_NAMES if rest.startswith(k))
            g = f"blk.{i}." + rest.replace(key, GGUF_NAMES[key])
        kind = "F32" if arr.ndim == 1 else kinds.get(g, kinds.get("*", "F32"))
        out[g] = (kind, arr)
    return out


def llama_meta(conf: dict, arch="llama") -> dict:
    return {"general.architecture": arch, "general.name": "tiny test model",
            f"{arch}.block_count": conf["num_hidden_layers"],
            f"{arch}.context_length": conf["max_position_embeddings"],
            f"{arch}.embedding_length": conf["hidden_size"],
            f"{arch}.feed_forward_length": conf["intermediate_size"],
            f"{arch}.attention.head_count": conf["num_attention_heads"],
            f"{arch}.attention.head_count_kv": conf["num_key_value_heads"],
            f"{arch}.rope.freq_base": conf["rope_theta"],
            f"{arch}.attention.layer_norm_rms_epsilon": conf["rms_norm_eps"]}


def write_gguf(path, W, conf, vocab_tok, kinds=None, arch="llama"):
    if arch == "qwen2":  # llama.cpp keeps Hugging Face's rotate-half rows for qwen2
        W = to_hf_layout(W, conf)
    with open(path, "wb") as f:
        f.write(gguf_bytes({**llama_meta(conf, arch), **gguf_vocab_meta(vocab_tok)},
                           to_gguf_tensors(W, kinds)))
    return str(path)


def to_hf_layout(W: dict, conf: dict) -> dict:
    out = dict(W)
    for name in W:
        if "q_proj" in name or "k_proj" in name:
            heads = conf["num_attention_heads" if "q_proj" in name else "num_key_value_heads"]
            out[name] = hf_rotate_half(W[name], heads)
    return out


def write_hf(d, W, conf, vocab_tok, shards=1):
    os.makedirs(d, exist_ok=True)
    H = to_hf_layout(W, conf)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(conf, f)
    vocab_tok.save(os.path.join(d, "tokenizer.json"))
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump({"pad_token": "<|im_end|>"}, f)
    names = list(H)
    if shards == 1:
        with open(os.path.join(d, "model.safetensors"), "wb") as f:
            f.write(safetensors_bytes(H))
        return str(d)
    weight_map = {}
    for s in range(shards):
        part = names[s::shards]
        fn = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        with open(os.path.join(d, fn), "wb") as f:
            f.write(safetensors_bytes({n: H[n] for n in part}))
        weight_map.update({n: fn for n in part})
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return str(d)


def logits(model, ids):
    with torch.no_grad():
        return model(ids, logits_at=torch.ones_like(ids, dtype=torch.bool)).logits.double()


IDS = torch.tensor([[1, 5, 9, 40, 41, 77, 2, 100, 13, 250, 3, 7]])


# ----------------------------------------------------------------------------------------------
# Block formats


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_1"])
def test_block_decoding_matches_the_format_description(kind):
    g = np.random.default_rng(1)
    x = g.normal(0, 1, 32 * 12).astype(np.float32)
    x[:32] = 0.0  # an all-zero block (scale 0)
    x[32:64] = np.linspace(-3, 5, 32)
    raw = quantize_ref(x, kind)
    got = G.dequantize(np.frombuffer(raw, np.uint8), GGML[kind], x.size)
    np.testing.assert_array_equal(got, dequantize_ref(raw, kind))
    # round trip: within half a quantisation step of each block (plus f16 rounding of d, m);
    # Q4_0's codes reach -8 steps one way and +7 the other, so the far end may lose a whole step
    step = {"Q8_0": np.abs(x.reshape(-1, 32)).max(1) / 127 / 2,
            "Q4_0": np.abs(x.reshape(-1, 32)).max(1) / 8,
            "Q4_1": np.ptp(x.reshape(-1, 32), 1) / 15 / 2}[kind]
    err = np.abs(got - x).reshape(-1, 32).max(1)
    assert np.all(err <= step + 2e-3 * np.abs(x.reshape(-1, 32)).max(1) + 1e-6)
    assert np.all(got[:32] == 0)


def test_float_types_and_layout(tmp_path):
    a = np.arange(6 * 64, dtype=np.float32).reshape(6, 64) / 7
    p = tmp_path / "t.gguf"
    p.write_bytes(gguf_bytes({"general.architecture": "llama", "x.list": [1, 2, 3]},
                             {"a": ("F32", a), "b": ("F16", a), "c": ("Q8_0", a)}))
    f = G.GGUFFile(str(p))
    assert f.version == 3 and f.metadata["x.list"] == [1, 2, 3]
    assert f.tensors["a"].shape == (6, 64)  # dims are stored fastest first: [64, 6]
    np.testing.assert_array_equal(f.tensor("a"), a)
    np.testing.assert_allclose(f.tensor("b"), a, rtol=1e-3)
    assert f.data_start % 32 == 0 and all(t.offset % 32 == 0 for t in f.tensors.values())
    np.testing.assert_array_equal(f.tensor("c"), dequantize_ref(quantize_ref(a, "Q8_0"), "Q8_0")
                                  .reshape(6, 64))


def test_bad_gguf_is_a_clean_error(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + b"\x05")
    with pytest.raises(G.GGUFError, match="truncated"):
        G.GGUFFile(str(p))
    with pytest.raises(Exception, match="cannot be loaded as a pretrained model"):
        pretrained.load_pretrained(str(p))


def test_permutation_is_the_inverse_of_rotate_half():
    w = torch.arange(16 * 3, dtype=torch.float32).view(16, 3)  # 2 heads of 8
    hf = torch.from_numpy(hf_rotate_half(w.numpy(), 2))
    assert torch.equal(unpermute(hf, 2), w) and torch.equal(permute(w, 2), hf)
    assert torch.equal(unpermute(hf[:, 0], 2), w[:, 0])  # biases too


# ----------------------------------------------------------------------------------------------
# Tensors land in the right place; both layouts give the reference logits


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory, vocab_tok):
    d = tmp_path_factory.mktemp("pre")
    W, conf = tiny_weights(vocab_tok.get_vocab_size())
    return W, conf, write_gguf(d / "tiny.gguf", W, conf, vocab_tok), \
        write_hf(d / "hf", W, conf, vocab_tok)


def test_gguf_tensors_land_in_place(tiny_files):
    W, conf, gpath, _ = tiny_files
    model, info, tok = pretrained.load_pretrained(gpath)
    c = model.cfg
    assert (c.n_heads, c.kv_heads, c.d_model, c.ffn_dim, c.n_layers) == (4, 2, 32, 48, 2)
    assert c.tie_embeddings and not c.qkv_bias and model.lm.output is None
    assert info["format"] == "gguf" and info["architecture"] == "llama"
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    eq = np.testing.assert_array_equal
    eq(sd["lm.embed.weight"], W["model.embed_tokens.weight"])
    eq(sd["lm.norm.weight"], W["model.norm.weight"])
    for i in range(2):
        p, b = f"model.layers.{i}.", f"lm.blocks.{i}."
        qkv = sd[b + "attn.qkv.weight"]
        assert qkv.shape == (32 + 2 * 16, 32)
        eq(qkv[:32], W[p + "self_attn.q_proj.weight"])  # GGUF llama rows are adjacent pairs
        eq(qkv[32:48], W[p + "self_attn.k_proj.weight"])
        eq(qkv[48:], W[p + "self_attn.v_proj.weight"])
        eq(sd[b + "attn.proj.weight"], W[p + "self_attn.o_proj.weight"])
        eq(sd[b + "ffn.w13.weight"][:48], W[p + "mlp.gate_proj.weight"])
        eq(sd[b + "ffn.w13.weight"][48:], W[p + "mlp.up_proj.weight"])
        eq(sd[b + "ffn.w2.weight"], W[p + "mlp.down_proj.weight"])
        eq(sd[b + "norm1.weight"], W[p + "input_layernorm.weight"])
        eq(sd[b + "norm2.weight"], W[p + "post_attention_layernorm.weight"])


def test_hf_and_gguf_layouts_give_the_reference_logits(tiny_files):
    W, conf, gpath, hpath = tiny_files
    mg, _, _ = pretrained.load_pretrained(gpath)
    mh, info, _ = pretrained.load_pretrained(hpath)
    assert info["format"] == "hf"
    for k, v in mg.state_dict().items():  # one set of weights, whichever layout it came in
        assert torch.equal(v, mh.state_dict()[k]), k
    ref = reference_forward(to_hf_layout(W, conf), conf, IDS)
    torch.testing.assert_close(logits(mh.eval(), IDS), ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits(mg.eval(), IDS), ref, atol=1e-4, rtol=1e-4)


def test_wrong_rope_layout_changes_the_logits(tiny_files):
    """The check above has teeth: HF rows taken as adjacent pairs give other logits."""
    W, conf, _, _ = tiny_files
    ref = reference_forward(to_hf_layout(W, conf), conf, IDS)
    wrong = reference_forward(W, conf, IDS)  # adjacent-pair rows run through rotate-half
    assert (ref - wrong).abs().max() > 1e-2


def test_qwen2_biases_untied_output_and_shards(tmp_path, vocab_tok):
    W, conf = tiny_weights(vocab_tok.get_vocab_size(), seed=3, bias=True, untied=True)
    hpath = write_hf(tmp_path / "hf", W, conf, vocab_tok, shards=3)
    m, _, _ = pretrained.load_pretrained(hpath)
    assert m.cfg.qkv_bias and not m.cfg.tie_embeddings and m.lm.output is not None
    np.testing.assert_array_equal(m.lm.output.weight.detach().numpy(), W["lm_head.weight"])
    ref = reference_forward(to_hf_layout(W, conf), conf, IDS)
    torch.testing.assert_close(logits(m.eval(), IDS), ref, atol=1e-4, rtol=1e-4)
    # the same weights as a qwen2 GGUF (rotate-half rows, as llama.cpp stores that architecture)
    gpath = write_gguf(tmp_path / "q.gguf", W, conf, vocab_tok, arch="qwen2")
    mg, info, _ = pretrained.load_pretrained(gpath)
    assert info["architecture"] == "qwen2"
    torch.testing.assert_close(logits(mg.eval(), IDS), ref, atol=1e-4, rtol=1e-4)


def test_quantised_gguf_loads_the_decoded_values(tmp_path, vocab_tok):
    W, conf = tiny_weights(vocab_tok.get_vocab_size(), seed=5)
    path = write_gguf(tmp_path / "q.gguf", W, conf, vocab_tok,
                      kinds={"token_embd.weight": "Q8_0", "*": "Q4_1",
                             "blk.1.attn_v.weight": "Q4_0",  # rows of 48 are not whole blocks:
                             "blk.0.ffn_down.weight": "F16", "blk.1.ffn_down.weight": "F16"})
    m, info, _ = pretrained.load_pretrained(path)
    assert info["types"] == ["F16", "F32", "Q4_0", "Q4_1", "Q8_0"]
    sd = m.state_dict()
    dq = lambda a, k: dequantize_ref(quantize_ref(a, k), k).reshape(a.shape)  # noqa: E731
    np.testing.assert_array_equal(sd["lm.embed.weight"].numpy(),
                                  dq(W["model.embed_tokens.weight"], "Q8_0"))
    np.testing.assert_array_equal(sd["lm.blocks.0.attn.qkv.weight"][:32].numpy(),
                                  dq(W["model.layers.0.self_attn.q_proj.weight"], "Q4_1"))
    np.testing.assert_array_equal(sd["lm.blocks.1.attn.qkv.weight"][48:].numpy(),
                                  dq(W["model.layers.1.self_attn.v_proj.weight"], "Q4_0"))


def test_unmapped_tensors_are_refused(tmp_path, vocab_tok):
    W, conf = tiny_weights(vocab_tok.get_vocab_size())
    W["model.layers.0.mystery.weight"] = np.zeros((4, 4), np.float32)
    d = write_hf(tmp_path / "hf", W, conf, vocab_tok)
    with pytest.raises(Exception, match="does not map"):
        pretrained.load_pretrained(d)


# ----------------------------------------------------------------------------------------------
# Grouped-query attention in the model


def test_gqa_cache_is_sized_by_kv_heads_and_matches_uncached(tiny_files):
    _, _, gpath, _ = tiny_files
    m, _, _ = pretrained.load_pretrained(gpath)
    m.eval()
    cache = KVCache(m.cfg, 2, 16, "cpu", torch.float32)
    assert cache.k.shape == (2, 2, 2, 16, 8)  # (L, B, Hkv, S, D)
    a = generate(m, [1, 5, 9, 40], n=1, max_new_tokens=8, temperature=0, use_cache=True)
    b = generate(m, [1, 5, 9, 40], n=1, max_new_tokens=8, temperature=0, use_cache=False)
    assert a == b


def test_default_config_is_plain_multi_head():
    c = ModelConfig()
    assert c.kv_heads == c.n_heads and c.tie_embeddings and not c.qkv_bias
    m = DPHModel(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, ffn_dim=32))
    assert m.lm.blocks[0].attn.qkv.weight.shape == (96, 32) and m.lm.output is None
    with pytest.raises(ValueError, match="multiple"):
        ModelConfig(n_heads=4, n_kv_heads=3)


# ----------------------------------------------------------------------------------------------
# Tokenizer


def test_gguf_tokenizer_matches_its_source(tiny_files, vocab_tok):
    _, _, gpath, hpath = tiny_files
    _, _, tok = pretrained.load_pretrained(gpath)
    _, _, tok_hf = pretrained.load_pretrained(hpath)
    for text in TEXT + ["A 2024 review: 99 problems\n\n  spaced   out"]:
        assert tok.encode(text) == vocab_tok.encode(text).ids == tok_hf.encode(text)
        assert tok.decode(tok.encode(text)) == text
    # digits one by one (SmolLM2's pre-tokenizer)
    assert [tok.decode([i]) for i in tok.encode("x 123")][-3:] == ["1", "2", "3"]
    # chat tokens reused, not added; the stated pad (<|im_end|>) refused for <|endoftext|>
    assert (tok.im_start, tok.im_end, tok.pad, tok.bos) == (1, 2, 0, None)
    assert len(tok) == vocab_tok.get_vocab_size() and tok.prefix == []
    # special-token text stays text
    assert 2 not in tok.encode("<|im_end|>")
    # the roles survive a save and reload of tokenizer.json (as a checkpoint stores it)
    from tokenizers import Tokenizer
    again = ChatTokenizer(Tokenizer.from_str(tok.to_json()))
    assert (again.bos, again.pad, again.im_start, again.im_end) == (None, 0, 1, 2)
    prompt = render_prompt(tok, [{"role": "user", "content": "hi"}])
    assert prompt[0] == tok.im_start  # no BOS before the first turn


def test_bos_and_missing_chat_tokens(tmp_path, vocab_tok):
    """A vocabulary that adds a BOS keeps it; one without ChatML tokens gets them (with new
    embedding rows) and a pad that is neither of them."""
    from tokenizers import Tokenizer
    W, conf = tiny_weights(vocab_tok.get_vocab_size())
    meta = {**llama_meta(conf), **gguf_vocab_meta(vocab_tok),
            "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.bos_token_id": 0}
    p = tmp_path / "bos.gguf"
    p.write_bytes(gguf_bytes(meta, to_gguf_tensors(W)))
    _, _, tok = pretrained.load_pretrained(str(p))
    assert tok.bos == 0 and tok.prefix == [0]
    assert render_prompt(tok, [{"role": "user", "content": "hi"}])[:2] == [0, tok.im_start]

    plain = Tokenizer.from_str(vocab_tok.to_str())
    j = json.loads(plain.to_str())
    for a in j["added_tokens"]:  # rename the chat tokens away
        a["content"] = {"<|im_start|>": "<s>", "<|im_end|>": "</s>"}.get(a["content"], a["content"])
    vocab = j["model"]["vocab"]
    vocab["<s>"], vocab["</s>"] = vocab.pop("<|im_start|>"), vocab.pop("<|im_end|>")
    d = tmp_path / "hf"
    write_hf(d, W, conf, vocab_tok)
    with open(d / "tokenizer.json", "w") as f:
        json.dump(j, f)
    m, _, tok = pretrained.load_pretrained(str(d))
    assert tok.im_start >= conf["vocab_size"] and tok.im_end >= conf["vocab_size"]
    assert m.cfg.vocab_size >= len(tok) and tok.pad not in (tok.im_end, tok.im_start)
    out = logits(m.eval(), torch.tensor([[3, 4, tok.im_start]]))
    assert torch.isfinite(out).all()


# ----------------------------------------------------------------------------------------------
# --init / --sft take a pretrained model


def test_load_init_dispatches_on_the_path(tiny_files):
    _, _, gpath, hpath = tiny_files
    for p, fmt in ((gpath, "gguf"), (hpath, "hf")):
        model, conf, tok = plumbing.load_init(p)
        assert conf["pretrained"]["format"] == fmt and model.head is None
        assert isinstance(tok, ChatTokenizer)


def _run(script, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    p = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, f"{script} failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    return p


def test_scripts_take_a_pretrained_init(tiny_files, tmp_path):
    """train_sft.py --init <HF dir> fine-tunes it; train_dph.py --init <gguf> trains a head on
    the frozen backbone; evaluate.py reads the GGUF (its zero-shot LM readout) and both
    results; the checkpoints reload like any other, pretrained tokenizer roles included."""
    _, _, gpath, hpath = tiny_files
    sft, dph, ev = str(tmp_path / "sft"), str(tmp_path / "dph"), str(tmp_path / "ev")
    base = ["--device", "cpu", "--tasks", "synth/sentiment", "--max-examples", "40"]
    _run("train_sft.py", "--init", hpath, "--out", sft, "--max-steps", "2", "--batch-size", "2",
         "--seq-len", "128", "--eval-every", "2", "--eval-batches", "1", *base)
    _run("train_dph.py", "--init", gpath, "--out", dph, "--freeze-backbone", "--dpo-weight",
         "0", "--max-steps", "3", "--batch-size", "4", "--eval-pairs", "8", *base)
    conf = json.loads(open(os.path.join(dph, "config.json")).read())
    assert conf["model"]["n_kv_heads"] == 2 and conf["head"] is not None
    assert conf["pretrained"]["format"] == "gguf"
    p = _run("evaluate.py", "--sft", gpath, "--dph", dph, "--out", ev, *base)
    assert "SFT" in p.stdout and "DPH" in p.stdout
    assert "whose backbone was frozen: not a DPO-aligned LM" in p.stdout  # the DPO row's caveat
    _run("evaluate.py", "--sft", sft, "--dph", "", "--out", ev, *base)
    for path in (sft, dph):
        model, _, tok = plumbing.load_init(path)
        assert tok.pad == 0 and tok.bos is None and model.cfg.kv_heads == 2


# ----------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct file (DPH_MODELS)

MODELS = os.environ.get("DPH_MODELS")
REAL = os.path.join(MODELS or "", "SmolLM2-135M-Instruct.Q4_1.gguf")
DATA = os.environ.get("DPH_DATA") or os.path.join(ROOT, "..", "shared", "data")
needs_model = pytest.mark.skipif(
    not MODELS or not os.path.isfile(REAL),
    reason="DPH_MODELS is not set (e.g. DPH_MODELS=/work/shared/models, the folder holding "
           "SmolLM2-135M-Instruct.Q4_1.gguf): the real-model tests are skipped")


@pytest.fixture(scope="module")
def smollm():
    torch.manual_seed(0)
    model, info, tok = pretrained.load_pretrained(REAL)
    return model.eval(), info, tok


@needs_model
def test_real_model_shape(smollm):
    model, info, tok = smollm
    c = model.cfg
    assert (c.n_layers, c.d_model, c.n_heads, c.kv_heads, c.ffn_dim) == (30, 576, 9, 3, 1536)
    assert (c.vocab_size, c.rope_theta, c.tie_embeddings) == (49152, 100000.0, True)
    assert (tok.bos, tok.pad, tok.im_start, tok.im_end, len(tok)) == (None, 0, 1, 2, 49152)
    assert 130e6 < model.lm.num_params() < 140e6


@needs_model
def test_real_model_greedy_answer(smollm):
    model, _, tok = smollm
    prompt = render_prompt(tok, [
        {"role": "system", "content": "You are a helpful AI assistant named SmolLM, trained by "
                                      "Hugging Face"},
        {"role": "user", "content": "What is the capital of France?"}])
    out = generate(model, prompt, n=1, max_new_tokens=12, temperature=0, stop_id=tok.im_end)
    assert "Paris" in tok.decode(out[0])


# measured: 16.05 on these 1,022 predictions; 19.50 on the first 4,096 tokens in windows of 512;
# about 505 with the q/k rows in the wrong RoPE layout
PPL_TOKENS, PPL_WINDOW, PPL_BOUND = 1024, 512, 17.0


@needs_model
def test_real_model_perplexity(smollm):
    path = os.path.join(DATA, "lm_corpus", "wikitext-2", "valid.txt")
    if not os.path.isfile(path):
        pytest.skip(f"{path} not found (set DPH_DATA to the shared data folder)")
    model, _, tok = smollm
    with open(path, encoding="utf-8") as f:
        ids = tok.encode(f.read(20000))[:PPL_TOKENS]
    nll, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(ids), PPL_WINDOW):
            x = torch.tensor([ids[i:i + PPL_WINDOW]])
            at = torch.ones_like(x, dtype=torch.bool)
            at[0, -1] = False
            lp = model(x, logits_at=at).logits.log_softmax(-1)
            nll -= lp.gather(1, x[0, 1:, None]).sum().item()
            n += x.shape[1] - 1
    ppl = math.exp(nll / n)
    print(f"WikiText-2 valid perplexity {ppl:.2f} over {n} predicted tokens")
    assert ppl < PPL_BOUND


@needs_model
def test_real_weights_in_hf_layout_give_the_same_logits(smollm, tmp_path):
    """The real weights (first two blocks) written as a Hugging Face directory, rotate-half q/k
    rows, load into the same model; logits match the GGUF-loaded model cut to two blocks."""
    model, _, tok = smollm
    sd = model.state_dict()
    c = model.cfg
    H, Hkv, D = c.n_heads, c.kv_heads, c.head_dim
    W = {"model.embed_tokens.weight": sd["lm.embed.weight"].numpy(),
         "model.norm.weight": sd["lm.norm.weight"].numpy()}
    for i in range(2):
        p, b = f"model.layers.{i}.", f"lm.blocks.{i}."
        q, k, v = np.split(sd[b + "attn.qkv.weight"].numpy(), [H * D, (H + Hkv) * D])
        gate, up = np.split(sd[b + "ffn.w13.weight"].numpy(), 2)
        W.update({p + "input_layernorm.weight": sd[b + "norm1.weight"].numpy(),
                  p + "post_attention_layernorm.weight": sd[b + "norm2.weight"].numpy(),
                  p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k,
                  p + "self_attn.v_proj.weight": v,
                  p + "self_attn.o_proj.weight": sd[b + "attn.proj.weight"].numpy(),
                  p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
                  p + "mlp.down_proj.weight": sd[b + "ffn.w2.weight"].numpy()})
    conf = {"architectures": ["LlamaForCausalLM"], "hidden_size": c.d_model,
            "intermediate_size": c.ffn_dim, "num_hidden_layers": 2, "num_attention_heads": H,
            "num_key_value_heads": Hkv, "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta,
            "max_position_embeddings": 512, "vocab_size": c.vocab_size, "hidden_act": "silu",
            "tie_word_embeddings": True}
    d = tmp_path / "hf"
    os.makedirs(d)
    with open(d / "config.json", "w") as f:
        json.dump(conf, f)
    with open(d / "tokenizer.json", "w") as f:
        f.write(tok.to_json())
    with open(d / "model.safetensors", "wb") as f:
        f.write(safetensors_bytes(to_hf_layout(W, conf)))
    mh, _, _ = pretrained.load_pretrained(str(d))
    cut = DPHModel(ModelConfig(**{**mh.cfg.__dict__}))
    cut.load_state_dict({k: v for k, v in sd.items() if not k.startswith("lm.blocks.")
                         or int(k.split(".")[2]) < 2})
    x = torch.tensor([tok.encode("The capital of France is Paris, and the capital of Italy")])
    torch.testing.assert_close(logits(mh.eval(), x), logits(cut.eval(), x), atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------
# The frozen-backbone fast path (frozen.py)


def test_cached_head_loss_equals_the_full_forward(tiny, tok):
    """With a frozen backbone, the head on cached states gives the loss and gradients of the
    full forward (train_dph.pair_loss), and the backbone runs once per example."""
    import copy
    import random
    from types import SimpleNamespace

    from data import collate_choices, make_pairs
    from plumbing.frozen import StateCache, cached_pair_loss, cached_validation
    from tasks import ChoiceExample
    from train_dph import pair_loss, validation_rewards
    model = copy.deepcopy(tiny)
    model.head.requires_grad_(True)  # the backbone stays frozen
    exs = [ChoiceExample("t", [{"role": "system", "content": "Choose."},
                               {"role": "user", "content": f"Question {i}: which colour?"}],
                         ["red", "blue", "green", "no"], i % 4) for i in range(6)]
    cfg = SimpleNamespace(loss="separable", contrast="softmax", label_smoothing=0.1,
                          dph_weight=1.0, reward_penalty=0.0, reward_penalty_kind="squared",
                          batch_size=4, layout="shared")
    cache = StateCache(model, tok, 256, torch.device("cpu"), torch.float32, batch_size=4)
    cache.add_examples(exs)
    assert cache.forwards == 6 and len(cache) == 6 * 4  # every candidate, one pass per example
    cache.add_examples(exs)
    assert cache.forwards == 6  # seen: nothing runs again
    for rejected in ("one", "all"):
        items = make_pairs(tok, exs, random.Random(3), 256, rejected)
        for p in model.head.parameters():
            p.grad = None
        full, fm = pair_loss(model, None, collate_choices(items, "shared", tok.pad,
                                                          end_id=tok.im_end),
                             cfg, torch.device("cpu"), torch.float32, False)
        full.backward()
        g_full = [p.grad.clone() for p in model.head.parameters()]
        for p in model.head.parameters():
            p.grad = None
        fast, cm = cached_pair_loss(model.head, cache, items, cfg)
        fast.backward()
        torch.testing.assert_close(fast, full, atol=1e-5, rtol=1e-5)
        for a, b in zip(g_full, (p.grad for p in model.head.parameters())):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
        assert float(cm["rewards/accuracies"]) == float(fm["rewards/accuracies"])
    assert cache.forwards == 6  # the draws only read the cache
    items = make_pairs(tok, exs, random.Random(4), 256)
    v_full = validation_rewards(model, items, cfg, torch.device("cpu"), torch.float32, tok.im_end)
    v_fast = cached_validation(model.head, cache, items)
    assert v_full["pairs"] == v_fast["pairs"]
    for k in ("rewards/chosen", "rewards/margins", "rewards/accuracies"):
        assert abs(v_full[k] - v_fast[k]) < 1e-5
