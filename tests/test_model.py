"""Tests for model.py: attention masks for packing and shared prefixes, KV cache,
where the reward is read, head-only training leaving the LM untouched, logits only where asked,
checkpoints under weights_only=True, preset sizes, generation and the preference-head poolers.

All models are tiny, random and float32 on the CPU."""
import dataclasses
import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from losses import separable_dph_loss
from plumbing.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from inference.generate import KVCache, generate, sample_next
from model import DPHModel, ModelConfig, PreferenceHead, attention_mask, padded_vocab, preset

ATOL = 1e-5  # float32: the same maths through different SDPA kernels/shapes agrees to ~1e-6


def rand_ids(n, vocab, seed, low=4):
    """n random non-special token ids (ids 0..3 are the special tokens)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, vocab, (n,), generator=g)


def all_true(idx):
    return torch.ones(idx.shape, dtype=torch.bool)


# ----------------------------------------------------------------------------------------------
# Masks: packing (block-diagonal) and shared prefix (tree)


def test_packed_documents_match_running_each_alone(tiny, vocab):
    lens = [7, 12, 5]
    n_pad = 6
    docs = [rand_ids(n, vocab, seed=s) for s, n in enumerate(lens)]
    # one row: doc0 | doc1 | doc2 | pad*6, T = 7 + 12 + 5 + 6 = 30
    idx = torch.cat(docs + [torch.full((n_pad,), 1)])[None]  # (1, 30)
    pos = torch.cat([torch.arange(n) for n in lens] + [torch.zeros(n_pad, dtype=torch.long)])[None]
    doc = torch.cat([torch.full((n,), d) for d, n in enumerate(lens)] + [torch.full((n_pad,), -1)])[None]
    mask = attention_mask(doc)
    assert mask.shape == (1, 1, 30, 30)
    with torch.no_grad():
        packed = tiny(idx, pos, mask).hidden[0]  # (30, C)
        start = 0
        for d, n in zip(docs, lens):
            alone = tiny(d[None]).hidden[0]  # plain causal, positions 0..n-1
            diff = (packed[start:start + n] - alone).abs().max().item()
            assert diff <= ATOL, f"document at {start} differs by {diff}"
            start += n
        assert torch.isfinite(packed).all()  # padding rows see themselves: no NaN from empty rows
        # The test can fail: without the block mask, doc 1 sees doc 0 and its states change.
        leaky = tiny(idx, pos).hidden[0]
        assert (leaky[7:19] - packed[7:19]).abs().max() > 1e-3


def test_attention_mask_values():
    # doc ids [0 0 1 1 -1]: hand-written block-diagonal causal mask; pad sees only itself
    m = attention_mask(torch.tensor([[0, 0, 1, 1, -1]]))[0, 0].int().tolist()
    assert m == [[1, 0, 0, 0, 0],
                 [1, 1, 0, 0, 0],
                 [0, 0, 1, 0, 0],
                 [0, 0, 1, 1, 0],
                 [0, 0, 0, 0, 1]]
    # tree: prompt (branch 0) of 2, branch 1 of 2, branch 2 of 1
    m = attention_mask(torch.tensor([[0, 0, 0, 0, 0]]), torch.tensor([[0, 0, 1, 1, 2]]))[0, 0]
    assert m.int().tolist() == [[1, 0, 0, 0, 0],
                                [1, 1, 0, 0, 0],
                                [1, 1, 1, 0, 0],
                                [1, 1, 1, 1, 0],
                                [1, 1, 0, 0, 1]]


def test_shared_prefix_tree_matches_prompt_plus_branch(tiny, vocab):
    P, blens, n_pad = 9, [4, 6, 3], 2
    prompt = rand_ids(P, vocab, seed=10)
    branches = [rand_ids(n, vocab, seed=11 + k) for k, n in enumerate(blens)]
    # row: prompt | b1 | b2 | b3 | pad*2 ; each branch's positions continue at P
    idx = torch.cat([prompt] + branches + [torch.full((n_pad,), 1)])[None]
    pos = torch.cat([torch.arange(P)] + [torch.arange(P, P + n) for n in blens]
                    + [torch.zeros(n_pad, dtype=torch.long)])[None]
    br = torch.cat([torch.zeros(P, dtype=torch.long)]
                   + [torch.full((n,), k + 1) for k, n in enumerate(blens)]
                   + [torch.zeros(n_pad, dtype=torch.long)])[None]
    doc = torch.cat([torch.zeros(P + sum(blens), dtype=torch.long), torch.full((n_pad,), -1)])[None]
    with torch.no_grad():
        tree = tiny(idx, pos, attention_mask(doc, br)).hidden[0]
        start = P
        for b, n in zip(branches, blens):
            alone = tiny(torch.cat([prompt, b])[None]).hidden[0]  # (P + n, C)
            assert (tree[:P] - alone[:P]).abs().max() <= ATOL
            assert (tree[start:start + n] - alone[P:]).abs().max() <= ATOL
            start += n
        # can fail: with only the document mask (no branch ids) branch 2 sees branch 1
        leaky = tiny(idx, pos, attention_mask(doc)).hidden[0]
        assert (leaky[P + 4:P + 10] - tree[P + 4:P + 10]).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------
# FlexAttention (--attention flex): the same masks as block masks

flex_available = pytest.mark.skipif(
    __import__("importlib.util").util.find_spec("torch.nn.attention.flex_attention") is None,
    reason="FlexAttention needs PyTorch >= 2.5")


def packed_tree_row(vocab):
    """Two rows, T = 48: row 0 packs three documents and padding; row 1 is a shared-prefix tree
    (prompt of 12, branches of 8, 9 and 7) plus padding. -> idx, pos, doc, branch."""
    T = 48
    idx = torch.stack([rand_ids(T, vocab, seed=60), rand_ids(T, vocab, seed=61)])
    lens = [11, 17, 7]
    doc0 = torch.cat([torch.full((n,), d) for d, n in enumerate(lens)] + [torch.full((13,), -1)])
    pos0 = torch.cat([torch.arange(n) for n in lens] + [torch.zeros(13, dtype=torch.long)])
    blens = [8, 9, 7]
    doc1 = torch.cat([torch.zeros(36, dtype=torch.long), torch.full((12,), -1)])
    br1 = torch.cat([torch.zeros(12, dtype=torch.long)]
                    + [torch.full((n,), k + 1) for k, n in enumerate(blens)]
                    + [torch.zeros(12, dtype=torch.long)])
    pos1 = torch.cat([torch.arange(12)] + [torch.arange(12, 12 + n) for n in blens]
                     + [torch.zeros(12, dtype=torch.long)])
    return idx, torch.stack([pos0, pos1]), torch.stack([doc0, doc1]), \
        torch.stack([torch.zeros(T, dtype=torch.long), br1])


@flex_available
# on the CPU model.flex() runs eagerly, as intended (PyTorch warns that it is unfused)
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("kv_heads", [None, 1])  # plain multi-head and grouped-query attention
def test_flex_attention_matches_sdpa(make_model, vocab, kv_heads):
    """Packed documents and a shared-prefix tree (with padding), through FlexAttention with a
    block mask (tiles of 16, so that some are skipped and some partly masked) and through SDPA
    with the dense mask: the same hidden states, rewards and gradients."""
    from model import block_mask, use_attention
    idx, pos, doc, br = packed_tree_row(vocab)
    mask = attention_mask(doc, br)
    bm = block_mask(mask, block=16)
    # the tiles computed are exactly those the mask shows anything of: fewer than causal's 2 x 6
    tiles = mask[:, 0].unflatten(1, (3, 16)).unflatten(3, (3, 16)).any(dim=(2, 4))
    computed = int(bm.kv_num_blocks.sum()) + int(bm.full_kv_num_blocks.sum())
    assert computed == int(tiles.sum()) < 2 * 6
    # PyTorch has no FlexAttention backward on the CPU: gradients are compared on CUDA only
    device = "cuda" if torch.cuda.is_available() else "cpu"
    grad = device == "cuda"
    outs = {}
    for kind in ("sdpa", "flex"):
        m = make_model(seed=3, n_kv_heads=kv_heads).to(device)
        use_attention(m, kind)
        with torch.set_grad_enabled(grad):
            h = m(idx.to(device), pos.to(device), mask.to(device)).hidden
            r = m.reward(h, torch.tensor([[0, 10], [1, 19], [1, 28]], device=device))
        if grad:
            (h.square().mean() + r.sum()).backward()
        outs[kind] = h.detach().cpu(), r.detach().cpu(), {
            n: p.grad.cpu() for n, p in m.named_parameters() if p.grad is not None}
    (hs, rs, gs), (hf, rf, gf) = outs["sdpa"], outs["flex"]
    assert (hs - hf).abs().max() <= 1e-5 * max(1.0, hs.abs().max().item())
    assert (rs - rf).abs().max() <= 1e-4 * rs.abs().max()
    # the test can fail: without the branch ids branch 2 of row 1 sees branch 1
    leaky = make_model(seed=3, n_kv_heads=kv_heads).eval()
    use_attention(leaky, "flex")
    with torch.no_grad():
        hl = leaky(idx, pos, attention_mask(doc)).hidden
    assert (hl[1] - hs[1]).abs().max() > 1e-4 * hs.abs().max()
    assert gs.keys() == gf.keys() and (len(gs) > 10 or not grad)
    for n in gs:
        scale = gs[n].abs().max().item()
        assert (gs[n] - gf[n]).abs().max().item() <= 1e-3 * scale + 1e-8, n


@flex_available
def test_flex_attention_refuses_dropout_and_unknown_kinds(make_model, vocab):
    from model import use_attention
    idx, pos, doc, br = packed_tree_row(vocab)
    m = make_model(attn_dropout=0.1).train()
    use_attention(m, "flex")
    with pytest.raises(ValueError, match="no attention dropout"), torch.no_grad():
        m(idx, pos, attention_mask(doc, br))
    m.eval()  # no dropout at evaluation: allowed
    with torch.no_grad():
        assert torch.isfinite(m(idx, pos, attention_mask(doc, br)).hidden).all()
    with pytest.raises(ValueError, match="attention kind 'xformers'"):
        use_attention(m, "xformers")


# ----------------------------------------------------------------------------------------------
# KV cache


def test_kv_cache_incremental_equals_full_forward(tiny, vocab):
    B, T = 2, 20
    idx = torch.stack([rand_ids(T, vocab, seed=20), rand_ids(T, vocab, seed=21)])  # (2, 20)
    with torch.no_grad():
        full = tiny(idx, logits_at=all_true(idx))
        full_logits = full.logits.view(B, T, -1)
        cache = KVCache(tiny.cfg, B, T, "cpu", torch.float32)
        # chunks [0:6), [6:11), then one token at a time 11..19
        bounds = [(0, 6), (6, 11)] + [(t, t + 1) for t in range(11, T)]
        hs, ls = [], []
        for a, b in bounds:
            x = idx[:, a:b]
            out = tiny(x, cache=cache, logits_at=all_true(x))
            hs.append(out.hidden)
            ls.append(out.logits.view(B, b - a, -1))
        assert cache.length == T
        assert (torch.cat(hs, 1) - full.hidden).abs().max() <= ATOL
        assert (torch.cat(ls, 1) - full_logits).abs().max() <= ATOL
        with pytest.raises(ValueError, match="KV cache full"):
            tiny(idx[:, :1], cache=cache)


# ----------------------------------------------------------------------------------------------
# Where the reward is read


def test_reward_read_at_given_index_both_forms():
    torch.manual_seed(0)
    head = PreferenceHead(16, "identity")  # r = w·h, so the expected value is computable by hand
    w = head.score.weight[0]
    hidden = torch.randn(2, 8, 16)
    with torch.no_grad():
        r = head.reward(hidden, torch.tensor([3, 7]))  # (B,) form: row b at position index[b]
        assert r.shape == (2,)
        assert torch.allclose(r, torch.stack([hidden[0, 3] @ w, hidden[1, 7] @ w]), atol=1e-6)
        pairs = torch.tensor([[0, 3], [1, 7], [0, 0], [1, 2]])  # (N, 2) form: (row, position)
        r2 = head.reward(hidden, pairs)
        assert r2.shape == (4,)
        expect = torch.stack([hidden[0, 3] @ w, hidden[1, 7] @ w, hidden[0, 0] @ w, hidden[1, 2] @ w])
        assert torch.allclose(r2, expect, atol=1e-6)
        # distinct positions give distinct rewards (so a wrong index would be noticed)
        assert len(set(torch.round(expect, decimals=5).tolist())) == 4


def test_dphmodel_reward_and_padding_invariance(tiny, vocab, tok):
    n = 10
    seq = torch.cat([rand_ids(n - 1, vocab, seed=30), torch.tensor([tok.im_end])])  # ends in im_end
    end = n - 1
    with torch.no_grad():
        h = tiny(seq[None]).hidden
        r_alone = tiny.reward(h, torch.tensor([end]))
        assert torch.equal(r_alone, tiny.head(h[0, end])[None])
        # right padding with 5 <|pad|> tokens: plain causal attention; index unchanged
        right = torch.cat([seq, torch.full((5,), tok.pad)])[None]
        r_right = tiny.reward(tiny(right).hidden, torch.tensor([end]))
        assert (r_right - r_alone).abs().max() <= ATOL
        # left padding with 4 pads: explicit positions (0 on pads, 0..9 on the sequence), doc -1
        # on pads, and the index shifted by 4
        left = torch.cat([torch.full((4,), tok.pad), seq])[None]
        pos = torch.cat([torch.zeros(4, dtype=torch.long), torch.arange(n)])[None]
        doc = torch.cat([torch.full((4,), -1), torch.zeros(n, dtype=torch.long)])[None]
        r_left = tiny.reward(tiny(left, pos, attention_mask(doc)).hidden, torch.tensor([end + 4]))
        assert (r_left - r_alone).abs().max() <= ATOL
        # a batch mixing both, read with the (N, 2) form
        both = torch.cat([torch.cat([right[0, :n], torch.full((4,), tok.pad)])[None], left])
        pos2 = torch.cat([torch.arange(n + 4)[None], pos])
        doc2 = torch.cat([torch.cat([torch.zeros(n, dtype=torch.long), torch.full((4,), -1)])[None], doc])
        r_both = tiny.reward(tiny(both, pos2, attention_mask(doc2)).hidden,
                             torch.tensor([[0, end], [1, end + 4]]))
        assert (r_both - r_alone.expand(2)).abs().max() <= ATOL
        # can fail: reading at the last position of the right-padded row (a pad) is different,
        # and so is left padding without positions and mask
        assert (tiny.reward(tiny(right).hidden, torch.tensor([n + 4])) - r_alone).abs().max() > 1e-4
        r_naive = tiny.reward(tiny(left).hidden, torch.tensor([end + 4]))
        assert (r_naive - r_alone).abs().max() > 1e-4


def test_reward_without_head_raises(make_model):
    m = make_model(head=False)
    with pytest.raises(RuntimeError, match="no preference head"):
        m.reward(torch.zeros(1, 2, m.cfg.d_model), torch.tensor([0]))


# ----------------------------------------------------------------------------------------------
# Head-only training leaves the LM bit-identical


def test_head_training_leaves_lm_logits_bit_identical(make_model, vocab):
    m = make_model(seed=3)
    B, T = 4, 12
    idx = torch.stack([rand_ids(T, vocab, seed=40 + b) for b in range(2 * B)])  # chosen | rejected
    index = torch.full((2 * B,), T - 1)
    with torch.no_grad():
        out0 = m(idx, logits_at=all_true(idx))
        r0 = m.reward(out0.hidden, index)
    backbone0 = {k: v.clone() for k, v in m.lm.state_dict().items()}

    m.freeze_backbone()
    assert not any(p.requires_grad for p in m.lm.parameters())
    assert all(p.requires_grad for p in m.head.parameters())
    m.train()
    # every parameter is handed to AdamW (weight decay too): frozen ones must still not move
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)
    losses = []
    for _ in range(5):
        r = m.reward(m(idx).hidden, index)
        loss, _ = separable_dph_loss(r[:B], r[B:], label_smoothing=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    m.eval()
    with torch.no_grad():
        out1 = m(idx, logits_at=all_true(idx))
        r1 = m.reward(out1.hidden, index)
    assert torch.equal(out1.logits, out0.logits)
    assert torch.equal(out1.hidden, out0.hidden)
    for k, v in m.lm.state_dict().items():
        assert torch.equal(v, backbone0[k]), k
    assert (r1 - r0).abs().max() > 1e-2  # the head did learn
    assert losses[-1] < losses[0]


# ----------------------------------------------------------------------------------------------
# Logits only where asked


def test_logits_only_where_asked(tiny, vocab):
    idx = torch.stack([rand_ids(9, vocab, seed=50), rand_ids(9, vocab, seed=51)])
    at = torch.zeros(2, 9, dtype=torch.bool)
    at[0, [2, 8]] = True
    at[1, [0, 3, 4]] = True
    with torch.no_grad():
        assert tiny(idx).logits is None  # default: no logits at all
        full = tiny(idx, logits_at=all_true(idx)).logits.view(2, 9, -1)  # (B, T, V)
        some = tiny(idx, logits_at=at).logits
    assert some.shape == (5, vocab)  # (mask.sum(), V), row-major order
    expect = torch.stack([full[0, 2], full[0, 8], full[1, 0], full[1, 3], full[1, 4]])
    assert torch.allclose(some, expect, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Checkpoints


class Payload:
    """Unpickling this runs `touch <path>`: the classic malicious checkpoint."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _perturbed(make_model, **kw):
    m = make_model(seed=5, **kw)
    with torch.no_grad():  # move every tensor (biases included) away from its init value
        g = torch.Generator().manual_seed(6)
        for p in m.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    return m


def test_checkpoint_round_trip_exact(tmp_path, make_model, vocab, tok):
    m = _perturbed(make_model, pooler="affine")
    ck = tmp_path / "ck"
    save_checkpoint(str(ck), m, tokenizer_json=tok.to_json(), extra={"stage": "dph"})
    assert sorted(os.listdir(ck)) == ["config.json", "model.pt", "model.safetensors",
                                      "tokenizer.json"]  # no temp files

    text = (ck / "config.json").read_text()
    assert "\n  " in text  # indented, one key per line: human-readable
    config = json.loads(text)
    assert config["model"]["d_model"] == 64 and config["model"]["vocab_size"] == vocab
    assert config["head"] == {"pooler": "affine", "dropout": 0.0, "ffn_dim": m.cfg.ffn_dim}
    assert config["stage"] == "dph"

    state = torch.load(ck / "model.pt", weights_only=True)
    assert isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())
    assert set(state) == set(m.state_dict())

    m2, config2 = load_checkpoint(str(ck))
    assert config2 == config
    assert m2.head.pooler_kind == "affine" and m2.head_cfg == m.head_cfg
    m2.eval()
    idx = torch.stack([rand_ids(11, vocab, seed=60), rand_ids(11, vocab, seed=61)])
    with torch.no_grad():
        a, b = m(idx, logits_at=all_true(idx)), m2(idx, logits_at=all_true(idx))
        index = torch.tensor([10, 4])
        assert torch.equal(a.hidden, b.hidden)
        assert torch.equal(a.logits, b.logits)
        assert torch.equal(m.reward(a.hidden, index), m2.reward(b.hidden, index))

    from tokenizer.chat import ChatTokenizer
    tok2 = ChatTokenizer.from_file(str(ck / "tokenizer.json"))
    s = "Hello there, <|im_end|> how are you?"
    assert tok2.encode(s) == tok.encode(s)


def test_checkpoint_compiled_prefix_is_stripped(tmp_path, make_model, vocab):
    m = _perturbed(make_model)
    ck = tmp_path / "ck"
    save_checkpoint(str(ck), m)
    # a state dict saved from a torch.compile'd module carries "_orig_mod." on every key
    state = torch.load(ck / "model.pt", weights_only=True)
    torch.save({"_orig_mod." + k: v for k, v in state.items()}, ck / "model.pt")
    m2, _ = load_checkpoint(str(ck))
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k


def test_checkpoint_code_payload_refused(tmp_path, make_model):
    ck = tmp_path / "ck"
    save_checkpoint(str(ck), make_model())  # a valid config.json, so only model.pt is bad
    pwned = tmp_path / "pwned"
    torch.save({"lm.embed.weight": Payload(str(pwned))}, ck / "model.pt")
    with pytest.raises(CheckpointError, match="model.pt"):
        load_checkpoint(str(ck))
    assert not pwned.exists(), "the payload ran"
    # the payload is live: an unsafe load would have run it (harmless here: touch in tmp_path)
    torch.load(ck / "model.pt", weights_only=False)
    assert pwned.exists()


def test_checkpoint_corrupt_and_wrong_shape(tmp_path, make_model, vocab):
    ck = tmp_path / "ck"
    save_checkpoint(str(ck), make_model())
    good = (ck / "model.pt").read_bytes()

    (ck / "model.pt").write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(CheckpointError, match="model.pt"):
        load_checkpoint(str(ck))
    (ck / "model.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError):
        load_checkpoint(str(ck))

    # weights of a d_model 32 model under a config that says d_model 64
    other = tmp_path / "other"
    save_checkpoint(str(other), make_model(d_model=32, ffn_dim=86))
    shutil.copy(other / "model.pt", ck / "model.pt")
    assert json.loads((ck / "config.json").read_text())["model"]["d_model"] == 64
    with pytest.raises(CheckpointError, match="does not match"):
        load_checkpoint(str(ck))

    (ck / "model.pt").unlink()
    (ck / "model.safetensors").unlink()  # (with it, the checkpoint loads: see test_safetensors)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(str(ck))
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(str(tmp_path / "nowhere"))


# ----------------------------------------------------------------------------------------------
# Preset sizes


def test_paper_preset_parameter_count_on_meta():
    # Derivation, d = 1536, L = 18, ffn = 4096, V = 50272, no biases anywhere in the backbone:
    #   embedding (tied with the LM head, counted once)  V·d       = 50272·1536      = 77,217,792
    #   per layer: qkv 3d² + proj d²                      4d²       = 4·2,359,296     =  9,437,184
    #              SwiGLU w1, w3 (d→ffn), w2 (ffn→d)      3·d·ffn   = 3·1536·4096     = 18,874,368
    #              two RMSNorms                           2d        =                      3,072
    #              layer total                                                          28,314,624
    #   18 layers                                         18·28,314,624              = 509,663,232
    #   final RMSNorm                                     d                          =       1,536
    #   total                                   77,217,792 + 509,663,232 + 1,536 = 586,882,560
    d, L, ffn, V = 1536, 18, 4096, 50272
    expected = V * d + L * (4 * d * d + 3 * d * ffn + 2 * d) + d
    assert expected == 586_882_560
    with torch.device("meta"):
        m = DPHModel(preset("paper"))
    assert all(p.device.type == "meta" for p in m.parameters())
    n = m.lm.num_params()
    print(f"paper preset: {n:,} parameters (expected {expected:,})")
    assert n == expected
    assert m.lm.num_params(non_embedding=True) == expected - V * d
    assert padded_vocab(50260) == 50272  # GPT-2's 50,257 + 3 chat tokens, padded to 16


def test_tiny_preset_under_a_million():
    # d = 64, L = 2, ffn = 172, V = 8192: 8192·64 + 2·(4·64² + 3·64·172 + 2·64) + 64
    #   = 524,288 + 2·(16,384 + 33,024 + 128) + 64 = 524,288 + 99,072 + 64 = 623,424
    m = DPHModel(preset("tiny", vocab_size=8192))
    assert m.lm.num_params() == 623_424 < 1_000_000


# ----------------------------------------------------------------------------------------------
# Generation


def greedy_by_hand(model, prompt, steps):
    """Full forward over the whole sequence at every step; argmax of the last position."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            x = torch.tensor([seq])
            logits = model(x, logits_at=all_true(x)).logits  # (T, V)
            seq.append(int(logits[-1].argmax()))
    return seq[len(prompt):]


def test_generate_greedy_cache_and_stop(tiny, vocab):
    prompt = rand_ids(7, vocab, seed=70).tolist()
    steps = 16
    ref = greedy_by_hand(tiny, prompt, steps)
    assert generate(tiny, prompt, n=1, max_new_tokens=steps, temperature=0, use_cache=False) == [ref]
    assert generate(tiny, prompt, n=3, max_new_tokens=steps, temperature=0, use_cache=True) == [ref] * 3
    g = torch.Generator().manual_seed(0)
    assert generate(tiny, prompt, n=2, max_new_tokens=steps, temperature=1.0, top_k=1,
                    generator=g) == [ref] * 2

    # stop token: the first token of the greedy output that first appears at position k >= 2
    k = next(i for i in range(2, steps) if ref[i] not in ref[:i])
    out = generate(tiny, prompt, n=2, max_new_tokens=steps, temperature=0, stop_id=ref[k])
    assert out == [ref[:k]] * 2

    with pytest.raises(ValueError, match="max_seq_len"):
        generate(tiny, prompt, max_new_tokens=tiny.cfg.max_seq_len)


def test_generate_sampling_stops_per_row(tiny, vocab):
    # sampled rows differ; each is cut before its own first stop token and never contains it
    prompt = rand_ids(5, vocab, seed=71).tolist()
    g = torch.Generator().manual_seed(1)
    stop = 7
    out = generate(tiny, prompt, n=8, max_new_tokens=20, temperature=5.0, stop_id=stop, generator=g)
    assert len(out) == 8 and all(stop not in row for row in out)
    assert len({tuple(r) for r in out}) > 1


def test_sample_next_filters():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 50, generator=g)
    argmax = logits.argmax(-1)
    assert torch.equal(sample_next(logits, temperature=0), argmax)
    assert torch.equal(sample_next(logits, temperature=1.0, top_p=1e-3, generator=g), argmax)
    assert torch.equal(sample_next(logits, temperature=1.0, top_k=1, generator=g), argmax)
    top2 = logits.topk(2, -1).indices
    s = sample_next(logits, temperature=1.0, top_k=2, generator=g)
    assert ((s[:, None] == top2).any(-1)).all()
    # can fail: plain sampling at high temperature does not always pick the argmax
    s = sample_next(logits, temperature=3.0, generator=g)
    assert not torch.equal(s, argmax)


# ----------------------------------------------------------------------------------------------
# Preference head poolers


def swiglu_parts(p, h):
    """W1 h + b1 and W3 h + b3 of a SwiGLU module, whether W1/W3 are separate or fused (w13)."""
    if hasattr(p, "w13"):
        return F.linear(h, p.w13.weight, p.w13.bias).chunk(2, dim=-1)
    return F.linear(h, p.w1.weight, p.w1.bias), F.linear(h, p.w3.weight, p.w3.bias)


@pytest.mark.parametrize("pooler", ["identity", "affine", "swiglu"])
def test_preference_head_poolers(pooler):
    torch.manual_seed(0)
    d = 256
    head = PreferenceHead(d, pooler, ffn_dim=512)
    assert head.score.bias is None
    linears = [m for m in head.modules() if isinstance(m, torch.nn.Linear)]
    if pooler != "swiglu":  # (the SwiGLU pooler may keep W1, W3 apart or fused)
        assert len(linears) == {"identity": 1, "affine": 2}[pooler]
    for lin in linears:
        # N(0, 0.02): with ≥ 256 weights the sample std is within ~±0.003 of 0.02 (4.4 % s.e.)
        assert 0.016 < lin.weight.std().item() < 0.024
        assert abs(lin.weight.mean().item()) < 0.005
        if lin.bias is not None:
            assert torch.equal(lin.bias, torch.zeros_like(lin.bias))
    # give the biases values so the formula check below exercises them
    with torch.no_grad():
        for lin in linears:
            if lin.bias is not None:
                lin.bias.normal_(0, 0.1)
    h = torch.randn(3, 5, d)
    w = head.score.weight[0]
    with torch.no_grad():
        r = head(h)
        if pooler == "identity":
            f = h
        elif pooler == "affine":
            f = torch.tanh(F.linear(h, head.pooler.weight, head.pooler.bias))
        else:
            gate, up = swiglu_parts(head.pooler, h)
            assert gate.shape[-1] == up.shape[-1] == 512  # inverted bottleneck d -> ffn -> d
            f = torch.tanh(F.linear(F.silu(gate) * up, head.pooler.w2.weight, head.pooler.w2.bias))
        expect = f @ w
    assert r.shape == (3, 5)
    assert torch.allclose(r, expect, atol=1e-6)


@pytest.mark.parametrize("pooler", ["identity", "affine", "swiglu"])
def test_preference_head_runs_in_float32_under_bf16_autocast(pooler):
    """Under bfloat16 autocast (the GPU default) the head still computes in float32: rewards
    rounded to bfloat16 tie between close candidates, and argmax then picks the first one."""
    torch.manual_seed(0)
    head = PreferenceHead(64, pooler, ffn_dim=128)
    h = torch.randn(64) + 1e-3 * torch.randn(40, 64)  # 40 candidates' states, close together
    with torch.no_grad():
        plain = head(h.float())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            r = head(h)
    assert r.dtype == torch.float32
    torch.testing.assert_close(r, plain, rtol=1e-5, atol=1e-5 * plain.abs().max().item())
    assert len(set(r.tolist())) == 40
    with torch.no_grad():  # the same head computed in bfloat16 ties most of them
        assert len(set(head.to(torch.bfloat16)(h.to(torch.bfloat16)).tolist())) < 20


def test_unknown_pooler_and_default_head_width():
    with pytest.raises(ValueError, match="unknown pooler"):
        PreferenceHead(16, "mlp")
    m = DPHModel(preset("tiny", vocab_size=64), head=dict(pooler="swiglu"))
    assert m.head.pooler.w2.in_features == m.cfg.ffn_dim  # add_head defaults to the model's ffn
    assert m.head_cfg == {"pooler": "swiglu", "dropout": 0.0, "ffn_dim": m.cfg.ffn_dim}


# ----------------------------------------------------------------------------------------------
# RoPE: the complex form (eager) and the real form (torch.compile) are one rotation

def test_rope_real_form_equals_complex_form():
    from model import apply_rope, rope_table
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 7, 8, generator=g)
    pos = torch.randint(0, 16, (2, 7), generator=g)
    table = rope_table(8, 16, 10000.0)
    cplx = apply_rope(x, table[pos].unsqueeze(1))
    real = apply_rope(x, torch.view_as_real(table)[pos].unsqueeze(1))
    torch.testing.assert_close(real, cplx, rtol=1e-6, atol=1e-6)
    # a rotation: each feature pair keeps its length, and position 0 is the identity
    pairs = lambda t: t.unflatten(-1, (-1, 2)).norm(dim=-1)  # noqa: E731
    torch.testing.assert_close(pairs(real), pairs(x), rtol=1e-5, atol=1e-6)
    zero = torch.zeros_like(pos)
    torch.testing.assert_close(apply_rope(x, torch.view_as_real(table)[zero].unsqueeze(1)), x)


def test_compiled_forward_uses_the_real_rope_and_matches_eager(tiny, vocab):
    """Under torch.compile the model takes the real RoPE table (no complex op left for
    Inductor to run eagerly) and gives eager's hidden states. (Traced with the aot_eager
    backend: no C++ compiler needed, the same graph Inductor would get.)"""
    idx = rand_ids(24, vocab, seed=3).view(2, 12)
    doc = torch.tensor([[0] * 5 + [1] * 7, [0] * 12])
    pos = torch.cat([torch.arange(5), torch.arange(7)]).expand(2, 12).clone()
    pos[1] = torch.arange(12)
    mask = attention_mask(doc)
    with torch.no_grad():
        eager = tiny.lm(idx, pos, mask).hidden
        seen = []
        import model as model_module
        real_apply = model_module.apply_rope

        def spy(x, rot):
            seen.append(rot.is_complex())
            return real_apply(x, rot)
        model_module.apply_rope = spy
        try:
            torch._dynamo.reset()
            compiled = torch.compile(tiny.lm, backend="aot_eager")(idx, pos, mask).hidden
        finally:
            model_module.apply_rope = real_apply
            torch._dynamo.reset()
    assert seen and not any(seen)  # traced with the real table only
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_config_from_before_attn_dropout_keeps_its_attention_dropout():
    """A config.json written before `attn_dropout` existed: its `dropout` also dropped the
    attention weights, so loading it keeps that rate there."""
    old = {k: v for k, v in dataclasses.asdict(ModelConfig(dropout=0.1)).items()
           if k != "attn_dropout"}
    assert ModelConfig.from_dict(old).attn_dropout == 0.1
    assert ModelConfig.from_dict({**old, "attn_dropout": 0.0}).attn_dropout == 0.0
