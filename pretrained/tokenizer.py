"""A pretrained model's tokenizer as a ChatTokenizer: built from a GGUF file's vocabulary and
merges, or read from a Hugging Face tokenizer.json.

    from_gguf_vocab    tokenizer.ggml.{tokens, merges, token_type, pre} -> tokenizers.Tokenizer
    chat_tokenizer     the chat roles on top: reuse <|im_start|>/<|im_end|> when present (else
                       add them), pick a pad token that is not <|im_end|>, BOS on or off
"""
from __future__ import annotations

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from tokenizer.chat import ChatTokenizer

# GGUF token types (llama.cpp): 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte
CONTROL, USER_DEFINED = 3, 4

# The splitting regexes of the byte-level BPE pre-tokenizers llama.cpp names in tokenizer.ggml.pre.
# ByteLevel(use_regex=True) is GPT-2's own pattern:
#   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
               r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def pre_tokenizer(pre: str):
    """The pre-tokenizer of a GGUF byte-level BPE vocabulary, by llama.cpp's name for it."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("default", "gpt2", "gpt-2", ""):
        return byte_level
    if pre == "smollm":  # every digit its own piece, then GPT-2's split: "2024" -> 2 0 2 4
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        byte_level])
    split = {"llama-bpe": LLAMA3_SPLIT, "llama3": LLAMA3_SPLIT, "qwen2": QWEN2_SPLIT}.get(pre)
    if split is None:
        raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported (smollm, gpt2, "
                         f"llama-bpe, qwen2)")
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def from_gguf_vocab(meta: dict) -> Tokenizer:
    """A byte-level BPE tokenizer from GGUF metadata (tokenizer.ggml.model "gpt2"): tokens are
    byte-level strings ("Ġthe"), merges "a b" in priority order, control and user-defined tokens
    become added tokens (control tokens special)."""
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"GGUF tokenizer model {kind!r} is not supported (byte-level BPE "
                         f"'gpt2' only; for a SentencePiece vocabulary use the Hugging Face "
                         f"directory with its tokenizer.json)")
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizer(meta.get("tokenizer.ggml.pre", "default"))
    tok.decoder = decoders.ByteLevel()
    added = [AddedToken(tokens[i], special=types[i] == CONTROL, normalized=False)
             for i in range(len(tokens)) if types[i] in (CONTROL, USER_DEFINED)]
    tok.add_tokens(added)  # already in the vocabulary: ids stay, they are matched whole
    if meta.get("tokenizer.ggml.add_bos_token", False) and "tokenizer.ggml.bos_token_id" in meta:
        set_bos(tok, meta["tokenizer.ggml.bos_token_id"])
    return tok


def set_bos(tok: Tokenizer, bos_id: int):
    """Record that the model wants `bos_id` before every document (the post-processor template
    ChatTokenizer reads)."""
    name = tok.id_to_token(bos_id)
    tok.post_processor = processors.TemplateProcessing(single=f"{name} $A",
                                                       special_tokens=[(name, bos_id)])


PAD_CANDIDATES = ("<|pad|>", "<pad>", "<|endoftext|>", "<unk>", "</s>")


def chat_tokenizer(tok: Tokenizer, stated_pad: str = None) -> tuple:
    """-> (ChatTokenizer, number of tokens added). The ChatML tokens are reused when the
    vocabulary has them, else added (the embedding then needs rows for them). The pad token is
    the first of PAD_CANDIDATES present, else the one the model states (`stated_pad`), never
    <|im_end|> (SmolLM2 names <|im_end|> as its pad: padding with it would put the reward's
    token on every padded position). Padding positions are masked, so any other token will do."""
    before = tok.get_vocab_size(with_added_tokens=True)
    missing = [s for s in ("<|im_start|>", "<|im_end|>") if tok.token_to_id(s) is None]
    if missing:
        tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in missing])
    im_end = tok.token_to_id("<|im_end|>")
    pad = next((s for s in (*PAD_CANDIDATES, stated_pad) if s and tok.token_to_id(s) is not None
                and tok.token_to_id(s) != im_end), None)
    if pad is None:
        tok.add_special_tokens([AddedToken("<|pad|>", special=True, normalized=False)])
        pad = "<|pad|>"
    tok.enable_padding(pad_id=tok.token_to_id(pad), pad_token=pad)  # where ChatTokenizer finds it
    return ChatTokenizer(tok), tok.get_vocab_size(with_added_tokens=True) - before
