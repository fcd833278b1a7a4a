"""The safetensors writer (pretrained/safetensors.py), model.safetensors in every checkpoint
(plumbing/checkpoint.py), and the Hugging Face export (pretrained/export.py)."""
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

import plumbing
import pretrained
from model import DPHModel, preset
from plumbing.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from pretrained.export import export_hf
from pretrained.safetensors import (SafetensorsError, load_file, read_header, read_metadata,
                                    save_file)
from test_pretrained import reference_forward

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bits(t: torch.Tensor) -> bytes:
    """A tensor's raw bytes (bit-exact comparisons: NaN payloads, -0.0)."""
    t = t.contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and bits(a) == bits(b)


def every_dtype() -> dict:
    g = torch.Generator().manual_seed(0)
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-40, 3.5])
    return {
        "f32": torch.cat([torch.randn(3, 5, generator=g).reshape(-1), special]).reshape(2, 11),
        "f16": torch.cat([torch.randn(6, generator=g), special]).half().reshape(13, 1),
        "bf16": torch.cat([torch.randn(9, generator=g), special]).bfloat16().reshape(2, 2, 4),
        "f64": torch.randn(4, generator=g, dtype=torch.float64),
        "i64": torch.tensor([[-(2 ** 62), -1, 0, 2 ** 40 + 7]]),
        "i32": torch.tensor([-(2 ** 31), 5, 2 ** 31 - 1], dtype=torch.int32),
        "i16": torch.tensor([-32768, 1, 32767], dtype=torch.int16),
        "i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 200, 255], dtype=torch.uint8),
        "bool": torch.tensor([[True, False], [False, True]]),
        "scalar": torch.tensor(2.5),
        "scalar_i64": torch.tensor(-3),
        "empty": torch.zeros(0, 4),
        "empty_bf16": torch.zeros(3, 0, dtype=torch.bfloat16),
        "strided": torch.arange(12, dtype=torch.float32).reshape(3, 4).t(),  # not contiguous
    }


# ----------------------------------------------------------------------------------------------
# The writer


def test_round_trip_is_bit_exact_for_every_dtype(tmp_path):
    ts = every_dtype()
    f = str(tmp_path / "x.safetensors")
    save_file(ts, f, metadata={"format": "pt", "note": "ünïcode"})
    back = load_file(f, keep_dtype=True)
    assert list(back) == list(ts)  # the given order
    for k, t in ts.items():
        assert same(back[k], t), k
    assert read_metadata(f) == {"format": "pt", "note": "ünïcode"}
    # the default reader (the backbone's): floats become float32, exactly; integers stay
    plain = load_file(f)
    for k, t in ts.items():
        want = t.float() if t.is_floating_point() else t
        assert plain[k].dtype == want.dtype and plain[k].shape == want.shape, k
        torch.testing.assert_close(plain[k], want, rtol=0, atol=0, equal_nan=True)


def test_layout_follows_the_format_description(tmp_path):
    """Decoded here with struct/json/numpy from the description, not with the reader."""
    ts = every_dtype()
    f = tmp_path / "x.safetensors"
    save_file(ts, str(f))
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0 and raw[8:9] == b"{"  # padded header: the data starts 8-byte aligned
    header = json.loads(raw[8:8 + n])  # trailing spaces are JSON whitespace
    assert "__metadata__" not in header and list(header) == list(ts)
    data = raw[8 + n:]
    spans = sorted(tuple(h["data_offsets"]) for h in header.values())
    assert spans[0][0] == 0 and spans[-1][1] == len(data)  # no gap, nothing after
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    np_types = {"F32": "<f4", "F16": "<f2", "BF16": "<u2", "F64": "<f8", "I64": "<i8",
                "I32": "<i4", "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?"}
    names = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.float64: "F64", torch.int64: "I64", torch.int32: "I32", torch.int16: "I16",
             torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
    for k, t in ts.items():
        h = header[k]
        assert h["dtype"] == names[t.dtype] and h["shape"] == list(t.shape), k
        b, e = h["data_offsets"]
        assert b % t.element_size() == 0, k  # every tensor aligned to its element size
        arr = np.frombuffer(data[b:e], dtype=np_types[h["dtype"]]).reshape(t.shape)
        ref = t.contiguous().view(torch.int16 if t.dtype == torch.bfloat16 else t.dtype).numpy()
        assert arr.tobytes() == ref.astype(ref.dtype.newbyteorder("<")).tobytes(), k


def test_the_reference_library_reads_it(tmp_path):
    """Only where the `safetensors` package happens to be installed (not a requirement)."""
    st = pytest.importorskip("safetensors.torch")
    ts = {k: v for k, v in every_dtype().items()}
    f = str(tmp_path / "x.safetensors")
    save_file(ts, f, metadata={"format": "pt"})
    back = st.load_file(f)
    for k, t in ts.items():
        assert same(back[k], t.contiguous()), k


def test_writes_atomically_and_refuses_what_it_cannot_write(tmp_path, monkeypatch):
    f = tmp_path / "x.safetensors"
    save_file({"a": torch.ones(3)}, str(f))
    good = f.read_bytes()
    replace = os.replace

    def killed(a, b):
        raise KeyboardInterrupt  # a kill between the last byte and the rename
    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        save_file({"a": torch.zeros(3), "b": torch.ones(2)}, str(f))
    monkeypatch.setattr(os, "replace", replace)
    assert f.read_bytes() == good and os.listdir(tmp_path) == ["x.safetensors"]

    for bad in ({"c": torch.ones(2, dtype=torch.complex64)}, {"__metadata__": torch.ones(1)},
                {"x": [1.0, 2.0]}):
        with pytest.raises(SafetensorsError):
            save_file(bad, str(f))
    with pytest.raises(SafetensorsError, match="metadata"):
        save_file({"a": torch.ones(1)}, str(f), metadata={"n": 3})
    assert f.read_bytes() == good and os.listdir(tmp_path) == ["x.safetensors"]


@pytest.mark.parametrize("damage", ["half", "short_data", "header_length", "not_json",
                                    "bad_entry", "offsets_past_end", "empty"])
def test_damaged_files_are_a_clean_error(tmp_path, damage):
    f = tmp_path / "x.safetensors"
    save_file({"a": torch.arange(64.0), "b": torch.ones(8, dtype=torch.int64)}, str(f))
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    if damage == "half":
        raw = raw[:len(raw) // 2]
    elif damage == "short_data":
        raw = raw[:-3]
    elif damage == "header_length":
        raw = struct.pack("<Q", len(raw)) + raw[8:]
    elif damage == "not_json":
        raw = raw[:8] + b"[" + raw[9:]
    elif damage in ("bad_entry", "offsets_past_end"):
        header["a"] = ({"dtype": "F32", "shape": "64"} if damage == "bad_entry" else
                       {**header["a"], "data_offsets": [0, 10 ** 6]})
        h = json.dumps(header).encode()
        h += b" " * (-len(h) % 8)
        raw = struct.pack("<Q", len(h)) + h + raw[8 + n:]
    else:
        raw = b""
    f.write_bytes(raw)
    with pytest.raises(SafetensorsError, match="x.safetensors"):
        load_file(str(f), keep_dtype=True)


# ----------------------------------------------------------------------------------------------
# Checkpoints hold model.safetensors


def _weights_of(path) -> dict:
    return torch.load(os.path.join(path, "model.pt"), weights_only=True)


def _assert_loaded(m, model):
    sd = model.state_dict()
    for k, v in m.state_dict().items():
        assert same(sd[k], v), k


def test_checkpoint_writes_model_safetensors_with_the_same_tensors(tmp_path, make_model, tok):
    m = make_model(pooler="affine")
    ck = str(tmp_path / "ck")
    save_checkpoint(ck, m, tok.to_json(), extra={"stage": "dph"})
    pt = _weights_of(ck)
    st = load_file(os.path.join(ck, "model.safetensors"), keep_dtype=True)
    assert list(st) == list(pt) == list(m.state_dict())
    for k in pt:
        assert same(st[k], pt[k]), k
    assert read_metadata(os.path.join(ck, "model.safetensors")) == {"format": "pt"}
    assert read_header(os.path.join(ck, "model.safetensors"))[1] % 8 == 0


def test_loading_reads_model_safetensors(tmp_path, make_model, tok, monkeypatch):
    m = make_model(seed=3)
    ck = str(tmp_path / "ck")
    save_checkpoint(ck, m, tok.to_json())
    import plumbing.checkpoint as C
    read = []
    monkeypatch.setattr(C, "load_file", lambda f, **kw: read.append(f) or load_file(f, **kw))
    model, _ = load_checkpoint(ck)
    assert read == [os.path.join(ck, "model.safetensors")]
    _assert_loaded(m, model)
    # model.pt is not needed: a checkpoint of model.safetensors alone loads, as a checkpoint
    os.remove(os.path.join(ck, "model.pt"))
    model, _ = load_checkpoint(ck)
    _assert_loaded(m, model)
    assert not pretrained.is_pretrained(ck)  # not taken for a Hugging Face directory
    model, config, tok2 = plumbing.load_init(ck)
    assert "pretrained" not in config and tok2.to_json() == tok.to_json()
    _assert_loaded(m, model)


def test_a_checkpoint_with_only_model_pt_still_loads(tmp_path, make_model, tok):
    m = make_model(seed=4, pooler="identity")
    ck = str(tmp_path / "old")
    save_checkpoint(ck, m, tok.to_json())
    os.remove(os.path.join(ck, "model.safetensors"))  # as written before it existed
    model, _ = load_checkpoint(ck)
    _assert_loaded(m, model)
    os.remove(os.path.join(ck, "model.pt"))
    with pytest.raises(CheckpointError, match="model.safetensors: not found"):
        load_checkpoint(ck)


@pytest.mark.parametrize("alone", [False, True], ids=["beside_model_pt", "alone"])
def test_a_corrupt_model_safetensors_is_refused_by_name(tmp_path, make_model, alone):
    ck = tmp_path / "ck"
    save_checkpoint(str(ck), make_model())
    if alone:
        (ck / "model.pt").unlink()
    f = ck / "model.safetensors"
    good = f.read_bytes()
    for damaged in (good[:len(good) // 2], good[:-4], b"\x10\0\0\0\0\0\0\0not json at all!",
                    b"", struct.pack("<Q", 10 ** 9) + good[8:]):
        f.write_bytes(damaged)
        with pytest.raises(CheckpointError, match="model.safetensors: cannot be read"):
            load_checkpoint(str(ck))
    # bytes flipped inside a tensor: the file parses, the digest does not match
    f.write_bytes(good[:-16] + bytes(b ^ 0xFF for b in good[-16:]))
    with pytest.raises(CheckpointError, match="model.safetensors: not the weights config.json"):
        load_checkpoint(str(ck))
    # another model's tensors of the same names and shapes
    other = tmp_path / "other"
    save_checkpoint(str(other), make_model(seed=9))
    f.write_bytes((other / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="model.safetensors: not the weights config.json"):
        load_checkpoint(str(ck))
    # another shape
    save_checkpoint(str(other), make_model(d_model=32, ffn_dim=86))
    f.write_bytes((other / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="model.safetensors: does not match config.json"):
        load_checkpoint(str(ck))
    f.write_bytes(good)
    if not alone:
        load_checkpoint(str(ck))


def test_two_weight_files_that_disagree_are_refused(tmp_path, make_model):
    """Both copies are checked: a replaced model.pt beside a good model.safetensors is not
    silently ignored, and without a recorded digest the two must hold the same tensors."""
    ck, other = tmp_path / "ck", tmp_path / "other"
    save_checkpoint(str(ck), make_model(seed=0))
    save_checkpoint(str(other), make_model(seed=1))
    good_pt = (ck / "model.pt").read_bytes()
    (ck / "model.pt").write_bytes((other / "model.pt").read_bytes())
    with pytest.raises(CheckpointError, match="model.pt: not the weights config.json"):
        load_checkpoint(str(ck))

    config = json.loads((ck / "config.json").read_text())
    del config["weights_sha256"]  # a hand-written config: nothing says which copy is right
    (ck / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="model.safetensors: not the same weights as "
                                              "model.pt"):
        load_checkpoint(str(ck))
    (ck / "model.pt").write_bytes(good_pt)
    load_checkpoint(str(ck))


def test_a_save_killed_between_the_weight_files_is_refused(tmp_path, make_model, tok,
                                                           monkeypatch):
    ck = str(tmp_path / "ck")
    save_checkpoint(ck, make_model(seed=0), tok.to_json())
    replace = os.replace

    def killed(a, b):
        if os.path.basename(b) == "model.safetensors":
            raise KeyboardInterrupt
        replace(a, b)
    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(ck, make_model(seed=1), tok.to_json())
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match="model.pt: not the weights config.json"):
        load_checkpoint(ck)  # new model.pt, old model.safetensors and config.json


def test_bf16_weights_keep_their_bits(tmp_path, make_model):
    m = make_model(seed=5)
    for p in m.parameters():  # (the complex RoPE table stays)
        p.data = p.data.bfloat16()
    ck = str(tmp_path / "ck")
    save_checkpoint(ck, m)
    st = load_file(os.path.join(ck, "model.safetensors"), keep_dtype=True)
    assert all(v.dtype == torch.bfloat16 for v in st.values())
    model, _ = load_checkpoint(ck)  # the digest is over the bf16 bytes: it matches
    for k, v in m.state_dict().items():
        assert torch.equal(model.state_dict()[k], v.float()), k


# ----------------------------------------------------------------------------------------------
# Export to a Hugging Face directory


def _unit_scale(m):
    """Weights at unit-variance scale (as conftest's `tiny`): the logits and rewards are O(1)
    and attention matters, so a wrong row order would show."""
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for lin in m.modules():
            if isinstance(lin, torch.nn.Linear):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g)
                                 * lin.in_features ** -0.5)
                if lin.bias is not None:
                    lin.bias.copy_(0.1 * torch.randn(lin.bias.shape, generator=g))
        for name, p in m.named_parameters():
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or \
                    name == "lm.norm.weight":
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
        m.lm.embed.weight.copy_(torch.randn(m.lm.embed.weight.shape, generator=g))
    return m


def _lm_logits(model, ids):
    with torch.no_grad():
        return model(ids, logits_at=torch.ones_like(ids, dtype=torch.bool)).logits


EXPORTS = {  # name: (model config overrides, pooler)
    "tied_mha": (dict(), "swiglu"),
    "untied_gqa": (dict(n_heads=4, n_kv_heads=2, tie_embeddings=False), "affine"),
    "qwen2_biases_gqa": (dict(n_heads=4, n_kv_heads=1, qkv_bias=True), "identity"),
    "no_head": (dict(n_heads=4, n_kv_heads=2), None),
}


@pytest.mark.parametrize("name", list(EXPORTS))
def test_export_loads_back_with_the_same_logits_and_head(tmp_path, tok, vocab, name):
    overrides, pooler = EXPORTS[name]
    torch.manual_seed(0)
    m = _unit_scale(DPHModel(preset("tiny", vocab_size=vocab, **overrides),
                             head=dict(pooler=pooler) if pooler else None).eval())
    ck, out = str(tmp_path / "ck"), str(tmp_path / "hf")
    save_checkpoint(ck, m, tok.to_json(), extra={"stage": "dph"})
    r = export_hf(ck, out)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "tokenizer.json",
                                       "tokenizer_config.json"]
    conf = json.loads(open(os.path.join(out, "config.json")).read())
    cfg = m.cfg
    qwen2 = cfg.qkv_bias
    assert r["architecture"] == conf["architectures"][0] == \
        ("Qwen2ForCausalLM" if qwen2 else "LlamaForCausalLM")
    assert conf["model_type"] == ("qwen2" if qwen2 else "llama")
    assert (conf["hidden_size"], conf["intermediate_size"], conf["num_hidden_layers"],
            conf["num_attention_heads"], conf["num_key_value_heads"],
            conf["max_position_embeddings"], conf["vocab_size"]) == \
        (cfg.d_model, cfg.ffn_dim, cfg.n_layers, cfg.n_heads, cfg.kv_heads, cfg.max_seq_len,
         cfg.vocab_size)
    assert (conf["rms_norm_eps"], conf["rope_theta"], conf["tie_word_embeddings"]) == \
        (cfg.norm_eps, cfg.rope_theta, cfg.tie_embeddings)
    assert (conf["bos_token_id"], conf["eos_token_id"], conf["pad_token_id"]) == \
        (tok.bos, tok.im_end, tok.pad)
    assert conf["torch_dtype"] == "float32"

    # the LM: this project's Hugging Face reader rebuilds the same model
    lm, info, tok2 = pretrained.load_pretrained(out)
    assert info["format"] == "hf" and lm.head is None
    assert (lm.cfg.kv_heads, lm.cfg.tie_embeddings, lm.cfg.qkv_bias) == \
        (cfg.kv_heads, cfg.tie_embeddings, cfg.qkv_bias)
    ids = torch.randint(0, vocab, (3, 19), generator=torch.Generator().manual_seed(1))
    a, b = _lm_logits(m, ids), _lm_logits(lm.eval(), ids)
    scale = a.abs().max()
    assert scale > 1.0  # O(1) logits: the comparison means something
    assert (a - b).abs().max() <= 1e-5 * scale

    # ... and so does an independent forward in Hugging Face's convention (rotate-half RoPE,
    # repeated KV heads) on the exported tensors: the layout is Hugging Face's, not only ours
    W = {k: v.numpy() for k, v in load_file(os.path.join(out, "model.safetensors")).items()
         if not k.startswith("preference_head.")}
    assert all(k.startswith(("model.", "lm_head.")) for k in W)
    assert ("lm_head.weight" in W) == (not cfg.tie_embeddings)
    assert ("model.layers.0.self_attn.q_proj.bias" in W) == qwen2
    ref = reference_forward(W, conf, ids[:1])
    assert (a[:19].double() - ref).abs().max() <= 1e-5 * scale

    # the head: bit-exact beside the backbone, described in config.json
    st = load_file(os.path.join(out, "model.safetensors"), keep_dtype=True)
    head = {k.removeprefix("preference_head."): v for k, v in st.items()
            if k.startswith("preference_head.")}
    if pooler is None:
        assert head == {} and "preference_head_config" not in conf
    else:
        want = {k.removeprefix("head."): v for k, v in m.state_dict().items()
                if k.startswith("head.")}
        assert list(head) == list(want) and "score.weight" in head
        assert any(k.startswith("pooler.") for k in head) == (pooler != "identity")
        for k in want:
            assert same(head[k], want[k]), k
        hc = conf["preference_head_config"]
        assert hc["pooler"] == pooler and hc["ffn_dim"] == m.head_cfg["ffn_dim"]
        # the head rebuilt from the export gives the original rewards on the exported LM
        h2 = DPHModel(lm.cfg, head=dict(pooler=hc["pooler"], ffn_dim=hc["ffn_dim"])).head
        h2.load_state_dict(head)
        with torch.no_grad():
            hid = lm(ids).hidden
            index = torch.tensor([18, 5, 11])
            torch.testing.assert_close(h2.eval().reward(hid, index),
                                       m.reward(m(ids).hidden, index), rtol=1e-5, atol=1e-6)

    # the tokenizer: the same ids for the chat tokens, BOS and padding, and the same encoding
    assert (tok2.bos, tok2.pad, tok2.im_start, tok2.im_end) == \
        (tok.bos, tok.pad, tok.im_start, tok.im_end)
    s = "Hello there, <|im_end|> how are you today?"
    assert tok2.encode(s) == tok.encode(s)


def test_export_chat_template_renders_the_projects_chatml(tmp_path, make_model, tok):
    jinja2 = pytest.importorskip("jinja2")
    from tokenizer.chatml import render
    ck, out = str(tmp_path / "ck"), str(tmp_path / "hf")
    save_checkpoint(ck, make_model(), tok.to_json())
    export_hf(ck, out)
    tconf = json.loads(open(os.path.join(out, "tokenizer_config.json")).read())
    msgs = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Is the sky blue?"},
            {"role": "assistant", "content": "yes"}]
    text = jinja2.Environment().from_string(tconf["chat_template"]).render(
        messages=msgs, bos_token=tconf["bos_token"], add_generation_prompt=False)
    assert text == tok.decode(render(tok, msgs).ids)
    assert (tconf["bos_token"], tconf["eos_token"], tconf["pad_token"]) == \
        ("<|endoftext|>", "<|im_end|>", "<|pad|>")


def test_export_cli(tmp_path, make_model, tok, capsys):
    ck, out = str(tmp_path / "ck"), str(tmp_path / "out" / "hf")
    save_checkpoint(ck, make_model(), tok.to_json())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "pretrained.export", ck, out], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "LlamaForCausalLM" in p.stdout and "preference head (swiglu)" in p.stdout
    assert pretrained.is_pretrained(out)

    from pretrained.export import main
    for args, message in (([ck, ck], "holds a checkpoint of this project"),
                          ([out, str(tmp_path / "x")], "already a pretrained model"),
                          ([str(tmp_path / "nowhere"), str(tmp_path / "y")], "not found")):
        with pytest.raises(SystemExit) as e:
            plumbing.run_main(lambda: main(args))
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert sorted(os.listdir(ck)) == ["config.json", "model.pt", "model.safetensors",
                                      "tokenizer.json"]  # the checkpoint itself is untouched
