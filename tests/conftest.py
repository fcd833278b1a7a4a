"""Shared fixtures: a tiny byte-level BPE trained on hand-written sentences, and tiny random
DPH models in float32 (CPU). Everything here builds in well under a second."""

import pytest
import torch

# Tiny models gain nothing from intra-op threads, and on a shared 2-core machine the thread
# hand-off made each forward ~50x slower (0.12 s instead of 2 ms).
torch.set_num_threads(1)

from tokenizer.chat import ChatTokenizer  # noqa: E402
from model import DPHModel, padded_vocab, preset  # noqa: E402

# Hand-written text the tokenizer is trained on: chat-ish sentences plus the words the tests use
# ("system", "user", "assistant", "Answer:", "yes"/"no", lettered choices), so that merges exist
# and the pieces we encode are multi-character tokens as well as single bytes.
SENTENCES = [
    "You are a helpful assistant.",
    "Read the question and choose the correct answer.",
    "Classify the sentiment of the sentence as positive or negative.",
    "Decide whether the premise entails the hypothesis.",
    "Sentence: the film was a delight from start to finish",
    "Sentence: a dull and lifeless story that never ends",
    "Premise: a man is playing a guitar on the street",
    "Hypothesis: a person is making music outside",
    "Question: what colour is the sky on a clear day?",
    "Choices:\nA. red\nB. blue\nC. green\nD. yellow\nAnswer:",
    "Answer: yes",
    "Answer: no",
    "positive", "negative", "yes", "no", "True", "False", "Neither",
    "Hello there, how are you today?",
    "I am fine, thank you for asking.",
    "The quick brown fox jumps over the lazy dog.",
    "Please write a short poem about the sea.",
    "The sea is wide and the waves are high, under a grey and quiet sky.",
    "What is the capital of France? The capital of France is Paris.",
    "Name three colours: red, blue and green.",
    "system\n", "user\n", "assistant\n",
    "Tell me a story about a cat who lived in a library.",
    "Once upon a time there was a cat who loved to read books at night.",
    "How many legs does a spider have? A spider has eight legs.",
]


@pytest.fixture(scope="session")
def tok():
    """A trained ChatTokenizer with a vocabulary of a few hundred tokens (256 bytes + 4 specials
    + merges)."""
    return ChatTokenizer.train(SENTENCES * 3, vocab_size=400, min_frequency=2)


@pytest.fixture(scope="session")
def vocab(tok):
    return padded_vocab(len(tok))


@pytest.fixture
def make_model(vocab):
    """make_model(seed=0, pooler="swiglu", **cfg_overrides) -> a fresh random tiny DPHModel with
    a head, float32, eval mode (no dropout anyway), on the CPU."""
    def make(seed=0, pooler="swiglu", head=True, **overrides):
        torch.manual_seed(seed)
        cfg = preset("tiny", vocab_size=vocab, **overrides)
        m = DPHModel(cfg, head=dict(pooler=pooler) if head else None)
        return m.float().eval()
    return make


@pytest.fixture(scope="session")
def tiny(vocab):
    """One shared random tiny DPHModel (swiglu head). Tests must not modify it.

    Every Linear (backbone and head) is re-drawn at unit-variance scale (weights N(0, 1/fan_in),
    biases N(0, 0.1)). At the N(0, 0.02) training init the residual stream is dominated by the
    token embedding, so the tied LM head predicts the current token again (greedy decoding
    repeats one token) and the head's rewards are ~1e-4, too small for a 1e-5 tolerance to
    mean anything. At this scale attention matters, greedy outputs vary and rewards are O(1)."""
    torch.manual_seed(1234)
    m = DPHModel(preset("tiny", vocab_size=vocab), head=dict(pooler="swiglu")).float().eval()
    with torch.no_grad():
        for lin in m.modules():
            if isinstance(lin, torch.nn.Linear):
                lin.weight.normal_(0.0, lin.in_features ** -0.5)
                if lin.bias is not None:
                    lin.bias.normal_(0.0, 0.1)
    for p in m.parameters():
        p.requires_grad_(False)
    return m
