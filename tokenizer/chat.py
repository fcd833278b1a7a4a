"""The tokenizer: byte-level BPE plus the chat tokens (ChatML).

    ChatTokenizer    a `tokenizers.Tokenizer` and the ids of <|endoftext|>, <|pad|>, <|im_start|>,
                     <|im_end|>: trained on the task text, loaded from tokenizer.json, or built
                     from GPT-2's encoder.json + vocab.bpe (the paper's vocabulary)
    training_text    the strings a tokenizer is trained on

Special tokens are never produced from text (see ChatTokenizer); data.py inserts them by id.
"""
from __future__ import annotations

import json
import os
from typing import Iterable

from tasks import ChoiceExample, PreferenceExample, TextExample

SPECIALS = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]


class ChatTokenizer:
    """A `tokenizers.Tokenizer` plus the ids of the four special tokens.

    Special tokens are never produced from text: `encode` treats "<|im_end|>" in a string as the
    ten characters it is (tokenizers' `encode_special_tokens` switch).

    A tokenizer of this project has all four tokens; <|endoftext|> opens every document (`bos`).
    A pretrained model's vocabulary (pretrained/) states its pad token in the tokenizer's own
    padding setting, and its BOS, if it adds one, in its TemplateProcessing post-processor
    ("<s> $A"); no such template means no BOS (`bos` None, `prefix` empty). Both settings live
    in tokenizer.json, so a checkpoint keeps them.
    """

    def __init__(self, tok):
        self.tok = tok
        self.tok.encode_special_tokens = True
        ids = {s: tok.token_to_id(s) for s in SPECIALS}
        if tok.padding is not None:  # a pretrained vocabulary
            ids["<|pad|>"] = tok.padding["pad_id"]
            ids["<|endoftext|>"] = template_bos(tok)
            need = ["<|im_start|>", "<|im_end|>"]
        else:
            need = SPECIALS
        missing = [s for s in need if ids[s] is None]
        if missing:
            raise ValueError(f"tokenizer lacks special tokens {missing}")
        self.bos, self.pad, self.im_start, self.im_end = (ids[s] for s in SPECIALS)
        if self.pad == self.im_end:
            raise ValueError("the pad token is <|im_end|>, where the reward is read")
        self.prefix = [] if self.bos is None else [self.bos]  # what opens every document
        self._cache = {}

    # -- construction
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2):
        """Byte-level BPE trained on `texts` (the training text of the selected tasks)."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIALS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(texts, trainer)
        return cls(tok)

    @classmethod
    def from_gpt2(cls, encoder_json: str, vocab_bpe: str):
        """GPT-2's BPE (encoder.json + vocab.bpe, the paper's vocabulary) plus the chat tokens.
        <|endoftext|> keeps GPT-2's id 50256; <|pad|>, <|im_start|>, <|im_end|> get 50257..50259."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers
        tok = Tokenizer(models.BPE.from_file(encoder_json, vocab_bpe))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        return cls.with_chat_tokens(tok)

    @classmethod
    def with_chat_tokens(cls, tok):
        """Add whichever of the special tokens an existing tokenizer lacks."""
        from tokenizers import AddedToken
        missing = [s for s in SPECIALS if tok.token_to_id(s) is None]
        tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in missing])
        return cls(tok)

    @classmethod
    def from_json(cls, text: str):
        from tokenizers import Tokenizer
        return cls(Tokenizer.from_str(text))

    @classmethod
    def from_file(cls, path: str):
        from tokenizers import Tokenizer
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: tokenizer not found")
        return cls(Tokenizer.from_file(path))

    @classmethod
    def from_pretrained_files(cls, spec: str):
        """--tokenizer value: a tokenizer.json, or a folder holding encoder.json + vocab.bpe."""
        if os.path.isdir(spec):
            enc, bpe = os.path.join(spec, "encoder.json"), os.path.join(spec, "vocab.bpe")
            if os.path.isfile(enc) and os.path.isfile(bpe):
                return cls.from_gpt2(enc, bpe)
            spec = os.path.join(spec, "tokenizer.json")
        from tokenizers import Tokenizer
        if not os.path.isfile(spec):
            raise FileNotFoundError(f"{spec}: tokenizer not found")
        return cls.with_chat_tokens(Tokenizer.from_file(spec))

    def to_json(self) -> str:
        return self.tok.to_str()

    def __len__(self):
        return self.tok.get_vocab_size(with_added_tokens=True)

    # -- use
    def encode(self, text: str) -> list:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def piece(self, text: str) -> list:
        """Cached encoding of a short fixed piece ("assistant\\n", "\\n")."""
        if text not in self._cache:
            self._cache[text] = self.encode(text)
        return self._cache[text]


def template_bos(tok):
    """The id a tokenizer's TemplateProcessing post-processor puts before a single sequence
    ("<s> $A"), or None. (The Hugging Face way to say that a model adds a BOS token.)"""
    if tok.post_processor is None:
        return None
    proc = json.loads(tok.post_processor.__getstate__())
    procs = proc.get("processors", [proc]) if proc.get("type") == "Sequence" else [proc]
    for p in procs:
        first = p.get("single", [{}])[0] if p.get("type") == "TemplateProcessing" else {}
        if "SpecialToken" in first:
            return p["special_tokens"][first["SpecialToken"]["id"]]["ids"][0]
    return None


def training_text(examples) -> Iterable[str]:
    """The strings a tokenizer is trained on: every message and answer of the examples."""
    for ex in examples:
        if isinstance(ex, TextExample):
            yield ex.text
            continue
        for m in ex.messages:
            yield m["content"]
        if isinstance(ex, ChoiceExample):
            yield from ex.candidates
        elif isinstance(ex, PreferenceExample):
            yield ex.chosen
            yield ex.rejected
        else:
            yield ex.answer
