"""The DPH stage's own pieces: the head path learns (a regression test: the preference head,
trained through train_dph.pair_loss on a task whose answer is decided by one word of the prompt,
separates chosen from rejected answers on held-out pairs, on the `tiny` preset in seconds), every
wrong candidate as a rejected answer, the reward read only at <|im_end|>, a zero-initialised
head that sends no gradient into the backbone at first, and no dropout left in the alignment
stage."""
import random

import pytest
import torch

from data import collate_choices, make_pairs, score_choices
from losses import pair_index
from model import Attention
from tasks import ChoiceExample, prompt
from train_dph import DPHConfig, pair_loss

FILLER = "the quick brown fox jumps over lazy dog and sea is wide".split()


def _examples(n, seed):
    """Sentences of filler words with one deciding word; gold = its sentiment."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        label = rng.randrange(2)
        words = rng.sample(FILLER, 6)
        words.insert(rng.randrange(7), ("dull", "delight")[label])
        msgs = prompt("sentiment", [("Sentence", " ".join(words))])
        out.append(ChoiceExample("t", msgs, ["negative", "positive"], label))
    return out


def _accuracy(model, tok, items):
    b = collate_choices(items, "shared", tok.pad, end_id=tok.im_end)
    with torch.no_grad():
        r = score_choices(model, b, rewards=True, logps=False)["rewards"]
    w, l = pair_index(b.n_branches, r.device)
    return (r[w] > r[l]).float().mean().item()


@pytest.mark.parametrize("pooler,init", [("swiglu", "normal"), ("identity", "zero")])
def test_head_reaches_high_pair_accuracy(tok, make_model, pooler, init):
    """The authors' SwiGLU pooler at the usual N(0, 0.02) init, and train_dph.py's defaults: the
    identity pooler and --head-init zero (on this task both learn in a switch, from chance to
    ~1.0; the zero head a few dozen steps later, since the backbone hears nothing at first)."""
    model = make_model(seed=0, pooler=pooler).train()
    if init == "zero":
        torch.nn.init.zeros_(model.head.score.weight)
    cfg = DPHConfig(loss="contrastive", label_smoothing=0.1)
    train = make_pairs(tok, _examples(512, seed=1), random.Random(0), 256)
    held_out = make_pairs(tok, _examples(128, seed=2), random.Random(0), 256)
    before = _accuracy(model, tok, held_out)
    # the backbone must learn too: at 1e-3 it barely moves in 200 steps and the head only learns
    # which answer is more often right (accuracy = that answer's share, ~0.5)
    opt = torch.optim.AdamW([{"params": model.head.parameters(), "lr": 3e-3},
                             {"params": model.lm.parameters(), "lr": 3e-3}], weight_decay=0.0)
    rng = random.Random(3)
    for _ in range(300):
        batch = collate_choices(rng.sample(train, 16), "shared", tok.pad, end_id=tok.im_end)
        loss, _ = pair_loss(model, None, batch, cfg, torch.device("cpu"), torch.float32, False)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    after = _accuracy(model.eval(), tok, held_out)
    assert after > 0.9, (before, after)
    # a fresh head is near chance (a zero one ties every pair): the rise is the training's
    assert 0.25 < before < 0.75 if init == "normal" else before == 0.0


@pytest.mark.parametrize("init", ["zero", "normal"])
def test_fresh_head_init(tok, make_model, init):
    """--head-init zero (the default): every reward is 0 at step 0 and the DPH loss sends no
    gradient into the backbone (it is ∝ w) while w itself gets one; normal(0, 0.02) does both."""
    from plumbing.inputs import continue_head
    model = make_model(seed=0, head=False).train()
    continue_head(model, DPHConfig(pooler="identity", head_init=init))
    batch = collate_choices(make_pairs(tok, _examples(8, seed=1), random.Random(0), 256),
                            "shared", tok.pad, end_id=tok.im_end)
    loss, _ = pair_loss(model, None, batch, DPHConfig(), torch.device("cpu"), torch.float32,
                        False)
    loss.backward()
    backbone = torch.cat([p.grad.flatten() for p in model.lm.parameters() if p.grad is not None])
    assert model.head.score.weight.grad.abs().max() > 0
    if init == "zero":
        assert not model.head.score.weight.any()
        assert not backbone.any()
    else:
        assert backbone.abs().max() > 0


def test_all_rejected_pairs_every_wrong_candidate(tok):
    ex = ChoiceExample("t", prompt("multiple_choice", [("Question", "which?")]),
                       ["A. red", "B. blue", "C. green", "D. pink"], 2)
    (it,) = make_pairs(tok, [ex], random.Random(0), 256, rejected="all")
    assert [tok.decode(b[:-1]) for b in it.branches] == ["C. green", "A. red", "B. blue", "D. pink"]
    b = collate_choices([it, it], "shared", tok.pad, end_id=tok.im_end)
    w, l = pair_index(b.n_branches, "cpu")
    assert w.tolist() == [0, 0, 0, 4, 4, 4] and l.tolist() == [1, 2, 3, 5, 6, 7]
    (one,) = make_pairs(tok, [ex], random.Random(0), 256)
    assert len(one.branches) == 2 and one.branches[0] == it.branches[0]


def test_softmax_contrast_is_one_term_per_item(tok, make_model):
    """--contrast softmax: pair_loss is the listwise loss over each item's K candidates (one term
    per item), --contrast pairs the mean over its K−1 pairs; the two agree on 2-candidate items."""
    from losses import contrastive_dph_loss, listwise_dph_loss
    model = make_model(seed=0).eval()
    ex = ChoiceExample("t", prompt("multiple_choice", [("Question", "which?")]),
                       ["A. red", "B. blue", "C. green", "D. pink"], 2)
    two = ChoiceExample("t", prompt("sentiment", [("Sentence", "a delight")]),
                        ["negative", "positive"], 1)
    items = make_pairs(tok, [ex, two], random.Random(0), 256, rejected="all")
    batch = collate_choices(items, "shared", tok.pad, end_id=tok.im_end)
    with torch.no_grad():
        r = score_choices(model, batch, logps=False)["rewards"].float()
        got = {c: pair_loss(model, None, batch, DPHConfig(loss="contrastive", contrast=c),
                            torch.device("cpu"), torch.float32, False)[0].item()
               for c in ("pairs", "softmax")}
    assert batch.n_branches == [4, 2]
    assert got["softmax"] == pytest.approx(listwise_dph_loss(r, [4, 2], 0.1)[0].item(), rel=1e-6)
    assert got["pairs"] == pytest.approx(
        contrastive_dph_loss(r[[0, 0, 0, 4]], r[[1, 2, 3, 5]], 0.1)[0].item(), rel=1e-6)
    assert got["softmax"] != pytest.approx(got["pairs"], rel=1e-3)
    batch2 = collate_choices(items[1:], "shared", tok.pad, end_id=tok.im_end)
    with torch.no_grad():
        a, b = (pair_loss(model, None, batch2, DPHConfig(loss="contrastive", contrast=c),
                          torch.device("cpu"), torch.float32, False)[0].item()
                for c in ("pairs", "softmax"))
    assert a == pytest.approx(b, rel=1e-6)


def test_reward_is_read_only_at_im_end(tok):
    ex = ChoiceExample("t", prompt("sentiment", [("Sentence", "a delight")]),
                       ["negative", "positive"], 1)
    (it,) = make_pairs(tok, [ex], random.Random(0), 256)
    it.branches[1] = it.branches[1][:-1]  # a branch that lost its <|im_end|>
    with pytest.raises(ValueError, match="im_end"):
        collate_choices([it], "shared", tok.pad, end_id=tok.im_end)


def test_set_dropout_reaches_attention(make_model):
    model = make_model(dropout=0.1, attn_dropout=0.2)
    attn = [m for m in model.modules() if isinstance(m, Attention)]
    assert attn and all(a.dropout == 0.2 for a in attn)
    assert all(m.p == 0.1 for m in model.lm.modules() if isinstance(m, torch.nn.Dropout))
    model.set_dropout(0.0)  # what train_dph does: no dropout in the alignment stage
    assert all(a.dropout == 0.0 for a in attn)
    assert model.cfg.dropout == 0.0 and model.cfg.attn_dropout == 0.0
    assert all(m.p == 0.0 for m in model.lm.modules() if isinstance(m, torch.nn.Dropout))
    x = torch.randint(0, 100, (2, 12))
    model.train()
    with torch.no_grad():  # in train mode, without dropout, two passes agree exactly
        assert torch.equal(model(x).hidden, model(x).hidden)


def test_sft_init_keeps_the_checkpoints_dropout_unless_a_flag_is_given(make_model, tok, tmp_path):
    """train_sft.py --init: the checkpoint's dropout rates stay (a pretrained model's are 0),
    whatever the flags' defaults; --dropout / --attn-dropout on the command line override each
    one on its own."""
    from plumbing.checkpoint import save_checkpoint
    from plumbing.inputs import init_lm
    from train_sft import SFTConfig
    m = make_model(dropout=0.05, attn_dropout=0.0)
    m.head, m.head_cfg = None, None
    save_checkpoint(tmp_path / "ck", m, tok.to_json())
    for argv, want in (([], (0.05, 0.0)), (["--attn-dropout", "0.2"], (0.05, 0.2)),
                       (["--dropout", "0"], (0.0, 0.0))):
        cfg = SFTConfig(init=str(tmp_path / "ck"), dropout=0.1, attn_dropout=0.1)
        for flag, v in zip(argv[::2], argv[1::2]):
            setattr(cfg, flag[2:].replace("-", "_"), float(v))
        model, _ = init_lm(cfg, argv)
        assert (model.cfg.dropout, model.cfg.attn_dropout) == want, argv
        assert {a.dropout for a in model.modules() if isinstance(a, Attention)} == {want[1]}
        assert {d.p for d in model.lm.modules() if isinstance(d, torch.nn.Dropout)} == {want[0]}


@pytest.mark.parametrize("balance", [False, True])
def test_balance_labels_reaches_the_training_examples(tok, make_model, balance):
    """--balance-labels: the DPH stage's training examples of a 2:1 yes/no task (the suite's
    acceptability) hold each gold answer equally often; without it, as the task gives them."""
    from collections import Counter
    from plumbing.inputs import dph_data
    cfg = DPHConfig(tasks="synth/acceptability", max_examples=300, balance_labels=balance,
                    eval_pairs=8)
    train = dph_data(cfg, make_model(), tok, {}, torch.device("cpu"))[1]["synth/acceptability"]
    gold = Counter(ex.candidates[ex.label] for ex in train)
    if balance:
        assert gold["yes"] == gold["no"] > 150 and len(train) == 2 * gold["yes"]
    else:
        assert len(train) == 300 and gold["yes"] > 1.5 * gold["no"]
