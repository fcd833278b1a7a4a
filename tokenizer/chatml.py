"""The ChatML template: conversations as token ids, with the masks of the trained tokens.

    <|endoftext|> then, per message:  <|im_start|> role \\n content <|im_end|> \\n

    render, render_prompt   ids with per-token masks (trained: assistant content and its
                            <|im_end|>; scored: the last answer's content) and the index of the
                            last answer's <|im_end|>
    answer_branch           an answer's ids ending in <|im_end|>, whose hidden state the head reads
    sft_document            one SFT conversation (a k-shot bundle of one task) as ids + targets,
                            cut from the left of the prompt to fit a row
    text_documents          plain text for pretraining, every token a target

Special tokens are inserted by id and each content string is encoded on its own, so user text
that spells "<|im_end|>" stays plain text and no BPE merge crosses a piece boundary.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from tasks import ChoiceExample, PreferenceExample
from tokenizer.chat import ChatTokenizer

IGNORE = -100  # a target that is not trained


@dataclass
class Rendered:
    ids: list
    train: list  # bool per token: assistant content + its <|im_end|>
    score: list  # bool per token: the last assistant message's content
    last_end: int  # index of the last assistant message's <|im_end|>, -1 if none


def render_message(tok: ChatTokenizer, msg: dict):
    """<|im_start|> role \\n content <|im_end|> \\n -> (ids, train, content, end) where train and
    content are per-token masks and end is the index of <|im_end|> within ids."""
    role, content = msg["role"], msg["content"]
    if role not in ("system", "user", "assistant"):
        raise ValueError(f"unknown role {role!r}")
    head = [tok.im_start] + tok.piece(role + "\n")
    body = tok.encode(content)
    nl = tok.piece("\n")
    ids = head + body + [tok.im_end] + nl
    asst = role == "assistant"
    train = [False] * len(head) + [asst] * (len(body) + 1) + [False] * len(nl)
    is_content = [False] * len(head) + [True] * len(body) + [False] * (1 + len(nl))
    return ids, train, is_content, len(head) + len(body)


def render(tok: ChatTokenizer, messages: list) -> Rendered:
    n = len(tok.prefix)  # <bos>, unless the vocabulary adds none
    ids, train, score, last_end = list(tok.prefix), [False] * n, [False] * n, -1
    for m in messages:
        i, t, c, end = render_message(tok, m)
        if m["role"] == "assistant":  # only the last assistant message is scored
            score = [False] * len(score) + c
            last_end = len(ids) + end
        else:
            score += [False] * len(i)
        ids += i
        train += t
    return Rendered(ids, train, score, last_end)


def render_prompt(tok: ChatTokenizer, messages: list) -> list:
    """Prompt ids ending in the assistant header, ready for an answer branch."""
    return render(tok, messages).ids + [tok.im_start] + tok.piece("assistant\n")


def answer_branch(tok: ChatTokenizer, answer: str) -> list:
    """An answer's content ids followed by <|im_end|> (whose hidden state the head reads)."""
    return tok.encode(answer) + [tok.im_end]


# ----------------------------------------------------------------------------------------------
# SFT documents


@dataclass
class Doc:
    ids: list
    targets: list  # targets[t] = ids[t+1] where that token is trained, else IGNORE


def _targets(ids, train):
    return [ids[t + 1] if train[t + 1] else IGNORE for t in range(len(ids) - 1)] + [IGNORE]


def sft_messages(examples: list) -> list:
    """A k-shot bundle of examples of one task as one conversation: the system prompt once, then
    each example's user turn and gold answer (the paper used k = 5; k distinct examples)."""
    msgs = []
    for ex in examples:
        if isinstance(ex, ChoiceExample):
            answer = ex.candidates[ex.label]
        elif isinstance(ex, PreferenceExample):
            answer = ex.chosen
        else:
            answer = ex.answer
        turns = ex.messages if not msgs else [m for m in ex.messages if m["role"] != "system"]
        msgs += turns + [{"role": "assistant", "content": answer}]
    return msgs


def sft_document(tok: ChatTokenizer, examples: list, seq_len: int) -> Optional[Doc]:
    """Ids and targets of one training conversation, truncated to seq_len from the left of the
    prompt (never inside the last answer or its <|im_end|>). None when it cannot fit."""
    r = render(tok, sft_messages(examples))
    ids, train = r.ids[:-len(tok.piece("\n"))], r.train[:-len(tok.piece("\n"))]  # the final
    # newline is never a target: dropping it saves a token per document and changes no loss
    over = len(ids) - seq_len
    if over > 0:
        # keep <bos>, cut just after it, but keep the last answer's header and content
        header = 1 + len(tok.piece("assistant\n"))
        first_answer_tok = r.score.index(True) if True in r.score else r.last_end
        removable = first_answer_tok - header - 1
        if removable < over:
            return None
        ids, train = ids[:1] + ids[1 + over:], train[:1] + train[1 + over:]
    return Doc(ids, _targets(ids, train))


def text_documents(tok: ChatTokenizer, text: str, seq_len: int) -> list:
    """Plain text for pretraining: <bos> + tokens, every token trained, cut into row-sized
    pieces."""
    ids = tok.encode(text)
    out, step = [], seq_len - 1
    for i in range(0, len(ids), step):
        piece = tok.prefix + ids[i:i + step]  # <bos>, unless the vocabulary adds none
        if len(piece) > 2:
            out.append(Doc(piece, piece[1:] + [IGNORE]))
    return out
