"""Export a checkpoint of this project as a Hugging Face model directory, which `transformers`,
llama.cpp's converter and this project's own reader (pretrained/) load:

    python -m pretrained.export CHECKPOINT OUT_DIR

writes into OUT_DIR

    config.json            LlamaForCausalLM (Qwen2ForCausalLM when the model has q/k/v biases):
                           the shape, RoPE base, RMSNorm eps, tied or untied output, the BOS, EOS
                           (<|im_end|>) and pad ids, float32; plus "preference_head_config" when
                           the checkpoint has a preference head
    model.safetensors      the backbone under Hugging Face's names, float32: the fused qkv and w13
                           projections split into q/k/v_proj and gate/up_proj, the q and k rows
                           put back in the rotate-half RoPE layout (convert.permute, the inverse
                           of what the reader undoes); the preference head beside it as
                           preference_head.pooler.* and preference_head.score.weight (tools that
                           only know the LM ignore them)
    tokenizer.json         the checkpoint's tokenizer; a tokenizer trained by this project also
                           gets its BOS as a TemplateProcessing post-processor ("<|endoftext|> $A",
                           as every training document opened with it) and <|pad|> as its padding,
                           which is how Hugging Face tokenizers (and pretrained/) state them
    tokenizer_config.json  the special tokens and the ChatML chat template

The reward of the exported head is the one train_dph.py trained: r = score(tanh(pooler(h))) (no
tanh for the identity pooler), h the final normed hidden state (LlamaModel's last_hidden_state) at
the <|im_end|> closing the answer. config.json is written last; a directory that already holds a
checkpoint of this project (or is the checkpoint itself) is refused.
"""
from __future__ import annotations

import argparse
import json
import os

from .convert import permute

HEAD_PREFIX = "preference_head."

CHAT_TEMPLATE = ("{{ bos_token if bos_token else '' }}{% for message in messages %}"
                 "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
                 "'<|im_end|>' + '\n' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def hf_state_dict(model) -> dict:
    """{Hugging Face name: float32 tensor} for a DPHModel: the backbone (and lm_head.weight when
    the output is untied), then the preference head's tensors under preference_head.*."""
    cfg, sd = model.cfg, {k: v.detach().cpu() for k, v in model.state_dict().items()}
    H, Hkv, D, F = cfg.n_heads, cfg.kv_heads, cfg.head_dim, cfg.ffn_dim
    used, out = set(), {}

    def take(name):
        used.add(name)
        return sd[name]

    out["model.embed_tokens.weight"] = take("lm.embed.weight")
    for i in range(cfg.n_layers):
        p, h = f"lm.blocks.{i}.", f"model.layers.{i}."
        a, m = h + "self_attn.", h + "mlp."
        out[h + "input_layernorm.weight"] = take(p + "norm1.weight")
        q, k, v = take(p + "attn.qkv.weight").split([H * D, Hkv * D, Hkv * D], 0)
        out[a + "q_proj.weight"], out[a + "k_proj.weight"] = permute(q, H), permute(k, Hkv)
        out[a + "v_proj.weight"] = v
        if cfg.qkv_bias:
            qb, kb, vb = take(p + "attn.qkv.bias").split([H * D, Hkv * D, Hkv * D], 0)
            out[a + "q_proj.bias"], out[a + "k_proj.bias"] = permute(qb, H), permute(kb, Hkv)
            out[a + "v_proj.bias"] = vb
        out[a + "o_proj.weight"] = take(p + "attn.proj.weight")
        out[h + "post_attention_layernorm.weight"] = take(p + "norm2.weight")
        gate, up = take(p + "ffn.w13.weight").split([F, F], 0)
        out[m + "gate_proj.weight"], out[m + "up_proj.weight"] = gate, up
        out[m + "down_proj.weight"] = take(p + "ffn.w2.weight")
    out["model.norm.weight"] = take("lm.norm.weight")
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = take("lm.output.weight")
    for name in sd:
        if name.startswith("head."):
            out[HEAD_PREFIX + name.removeprefix("head.")] = take(name)
    left = sorted(set(sd) - used)
    if left:  # model.py grew a tensor this exporter does not know: refuse a partial export
        raise ValueError(f"tensors the exporter does not map: {', '.join(left[:6])}")
    return {k: v.float().contiguous() for k, v in out.items()}


def export_config(model, tok) -> dict:
    """config.json for the exported directory (what pretrained.convert.hf_config reads back)."""
    cfg = model.cfg
    qwen2 = cfg.qkv_bias  # biases on q/k/v only: Qwen2's attention (Llama's would add o_proj's)
    conf = {
        "architectures": ["Qwen2ForCausalLM" if qwen2 else "LlamaForCausalLM"],
        "model_type": "qwen2" if qwen2 else "llama",
        "hidden_size": cfg.d_model, "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "rope_scaling": None, "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": cfg.tie_embeddings, "attention_dropout": 0.0,
        "bos_token_id": tok.bos, "eos_token_id": tok.im_end, "pad_token_id": tok.pad,
        "torch_dtype": "float32", "use_cache": True, "initializer_range": 0.02}
    if qwen2:
        conf["use_sliding_window"] = False
    else:
        conf.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    if model.head is not None:
        conf["preference_head_config"] = {
            **model.head_cfg, "tensors": HEAD_PREFIX + "*",
            "reward": ("score(tanh(pooler(h))) (identity pooler: score(h)), h the final normed "
                       "hidden state at the <|im_end|> closing the answer")}
    return conf


def export_tokenizer(tok) -> tuple:
    """-> (tokenizer.json text, tokenizer_config dict). A tokenizer of this project states no
    padding and no BOS template (ChatTokenizer knows them by name); the exported one states
    both, the way a Hugging Face tokenizer does. A pretrained model's tokenizer (which states
    them already) is written as it is."""
    from tokenizers import Tokenizer

    from .tokenizer import set_bos
    from tokenizer.chat import template_bos
    t = Tokenizer.from_str(tok.to_json())
    if t.padding is None:
        if tok.bos is not None and template_bos(t) is None:
            set_bos(t, tok.bos)
        t.enable_padding(pad_id=tok.pad, pad_token=t.id_to_token(tok.pad))
    name = (lambda i: None if i is None else t.id_to_token(i))
    tconf = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": name(tok.bos),
             "eos_token": name(tok.im_end), "pad_token": name(tok.pad),
             "clean_up_tokenization_spaces": False, "chat_template": CHAT_TEMPLATE}
    return t.to_str(), tconf


def export_hf(checkpoint_dir: str, out_dir: str) -> dict:
    """Write the checkpoint in `checkpoint_dir` as a Hugging Face directory `out_dir` (see the
    module docstring). Returns {"dir", "architecture", "tensors", "head"}. A bad checkpoint is
    a CheckpointError naming the file; `out_dir` may not hold a checkpoint of this project."""
    import plumbing
    from plumbing.checkpoint import CONFIG, CheckpointError, atomic_write

    from . import _is_checkpoint, is_pretrained
    from .safetensors import SINGLE, save_file
    if is_pretrained(checkpoint_dir):
        raise CheckpointError(f"{checkpoint_dir}: already a pretrained model (GGUF or Hugging "
                              f"Face), not a checkpoint of this project")
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or _is_checkpoint(out_dir)):
        raise plumbing.UsageError(f"{out_dir}: " + ("holds a checkpoint of this project; "
                                                    "export into another directory"
                                                    if os.path.isdir(out_dir) else
                                                    "exists and is not a directory"))
    model, _, tok = plumbing.load_init(checkpoint_dir)  # checks weights and tokenizer
    tensors, conf = hf_state_dict(model), export_config(model, tok)
    tok_json, tok_conf = export_tokenizer(tok)
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, SINGLE),
              metadata={"format": "pt", "source": "dph checkpoint"})

    def text(s):
        def write(p):
            with open(p, "w") as f:
                f.write(s)
        return write
    atomic_write(os.path.join(out_dir, "tokenizer.json"), text(tok_json))
    atomic_write(os.path.join(out_dir, "tokenizer_config.json"),
                 text(json.dumps(tok_conf, indent=2) + "\n"))
    atomic_write(os.path.join(out_dir, CONFIG), text(json.dumps(conf, indent=2) + "\n"))
    return {"dir": out_dir, "architecture": conf["architectures"][0], "tensors": len(tensors),
            "head": model.head_cfg}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m pretrained.export",
        description="Export a checkpoint of this project as a Hugging Face Llama directory "
                    "(config.json, model.safetensors with the preference head beside the "
                    "backbone, tokenizer.json).")
    ap.add_argument("checkpoint", help="a checkpoint directory (train_sft.py / train_dph.py --out)")
    ap.add_argument("out_dir", help="the directory to write (created if needed)")
    args = ap.parse_args(argv)
    r = export_hf(args.checkpoint, args.out_dir)
    head = f", preference head ({r['head']['pooler']})" if r["head"] else ", no preference head"
    print(f"wrote {r['dir']}: {r['architecture']}, {r['tensors']} tensors{head}")
    return 0


if __name__ == "__main__":
    import plumbing
    plumbing.run_main(main)
