"""Examples, prompt templates, the task spec and the task errors.

Every dataset, built-in or real, is turned into one of three kinds of example:

- ``ChoiceExample``: a prompt (system + user message) and K candidate assistant answers, one of
  which is gold. Classification tasks become choice tasks through their verbaliser
  (e.g. SST-2: 0 -> "negative", 1 -> "positive"); multiple-choice tasks list their options.
  DPH pairs are made from these: chosen = gold, rejected = a wrong candidate drawn uniformly.
- ``PreferenceExample``: a prompt, a chosen answer and a rejected answer (HH-RLHF style data).
- ``InstructionExample``: a prompt and one answer, used for SFT only.

The user message follows one template for all tasks: labelled fields on their own lines
("Sentence:", "Premise:", "Question:", ...), optionally "Choices:" with lettered options, and a
final "Answer:" line. The system prompt is one generic sentence per task type.

A ``TaskSpec`` ties a task name to its loader, its kind, its metrics and the split used for
evaluation; ``TaskError`` and ``MissingSplit`` are the errors meant for the user. The registry of
every task and ``resolve_tasks`` are in tasks/registry.py. This module imports no other task
module.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Union

# ----------------------------------------------------------------------------------------------
# Examples

Message = dict  # {"role": "system"|"user"|"assistant", "content": str}


@dataclass
class ChoiceExample:
    task: str
    messages: list  # prompt messages: system then user
    candidates: list  # K candidate assistant answers (strings)
    label: int  # index of the gold candidate
    value: Optional[float] = None  # graded target (STS-B similarity), when there is one

    @property
    def kind(self) -> str:
        return "choice"


@dataclass
class PreferenceExample:
    task: str
    messages: list  # prompt messages (may hold earlier turns)
    chosen: str
    rejected: str

    @property
    def kind(self) -> str:
        return "preference"


@dataclass
class InstructionExample:
    task: str
    messages: list
    answer: str
    distractors: tuple = ()  # plausible wrong answers, where known: DPH pairs against `answer`

    @property
    def kind(self) -> str:
        return "instruction"


@dataclass
class TextExample:
    """A plain document for language-model pretraining: every token is trained, no template."""
    task: str
    text: str

    @property
    def kind(self) -> str:
        return "text"


Example = Union[ChoiceExample, PreferenceExample, InstructionExample, TextExample]

# ----------------------------------------------------------------------------------------------
# Templates

SYSTEM_PROMPTS = {
    "sentiment": "Classify the sentiment of the sentence as positive or negative.",
    "acceptability": "Decide whether the sentence is grammatically acceptable.",
    "paraphrase": "Decide whether the two sentences mean the same thing.",
    "entailment": "Decide whether the premise entails the hypothesis.",
    "nli3": "Decide whether the hypothesis is true, false or neither, given the premise.",
    "similarity": "Rate how similar the two sentences are on a scale from 0 to 5.",
    "multiple_choice": "Read the question and choose the correct answer.",
    "continuation": "Choose the most plausible continuation.",
    "yes_no": "Read the passage and answer the question with yes or no.",
    "qa_entailment": "Decide whether the sentence contains the answer to the question.",
    "goal": "Choose the better way to achieve the goal.",
    "chat": "You are a helpful assistant.",
}

LETTERS = "ABCDEFGHIJ"


def user_message(fields: list, choices: Optional[list] = None) -> str:
    """Render labelled fields, one per line, then optional lettered choices, then "Answer:".

    >>> user_message([("Sentence", "a fine film")])
    'Sentence: a fine film\\nAnswer:'
    """
    lines = [f"{name}: {text}" for name, text in fields]
    if choices is not None:
        lines.append("Choices:")
        lines += [f"{LETTERS[i]}. {c}" for i, c in enumerate(choices)]
    lines.append("Answer:")
    return "\n".join(lines)


def prompt(system_kind: str, fields: list, choices: Optional[list] = None) -> list:
    """System + user messages for a classification / multiple-choice example."""
    return [
        {"role": "system", "content": SYSTEM_PROMPTS[system_kind]},
        {"role": "user", "content": user_message(fields, choices)},
    ]


def lettered(choices: list) -> list:
    """Verbaliser for lettered multiple choice (RACE/ARC/OBQA): "B. option text"."""
    return [f"{LETTERS[i]}. {c}" for i, c in enumerate(choices)]


# ----------------------------------------------------------------------------------------------
# Task specs and errors

SPLITS = ("train", "validation", "test")


@dataclass
class TaskSpec:
    name: str
    kind: str  # "choice" | "preference" | "instruction" | "text"
    # loader(split, seed=..., data_dir=..., **opts) -> list[Example]
    loader: Callable[..., list]
    metrics: tuple = ("acc",)  # see tasks/metrics.py
    eval_split: str = "test"  # the split evaluate.py reports on by default
    description: str = ""
    group: str = ""  # aggregate the task counts towards ("glue", "gpt4all", "race", ...)
    opts: dict = field(default_factory=dict)  # extra keyword arguments for the loader

    def load(self, split: str, **kw) -> list:
        return self.loader(split, **{**self.opts, **kw})


class TaskError(ValueError):
    """A bad --tasks value or bad task data: the message is meant for the user, one line."""


class MissingSplit(TaskError):
    """The split does not exist for this task, or none of its files is under data_dir."""
