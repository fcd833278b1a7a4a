"""Tasks: examples, prompt templates, the task registry and --tasks resolution.

The public API; import from here (``from tasks import ChoiceExample, resolve_tasks``):

    tasks/types.py     example types, prompt templates, TaskSpec, TaskError and MissingSplit
    tasks/registry.py  REGISTRY, MIXTURES, DYNAMIC (jsonl:/text:), register, resolve_tasks
    tasks/suite.py     the built-in procedurally generated suite (the default data)
    tasks/loaders.py   real datasets in their official formats, jsonl:/text: tasks
    tasks/download.py  fetches the official archives (`python -m tasks download`)
    tasks/metrics.py   accuracy, F1, MCC, Pearson, Spearman and the benchmark aggregates

The names of tasks/types.py are imported with the package; those of tasks/registry.py (which
reads the suite's and the readers' spec lists) on first use, so that ``from tasks import
ChoiceExample`` stays light and ``python -m tasks.loaders`` runs the module once. Importing any
of these modules registers nothing.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .types import (LETTERS, SPLITS, SYSTEM_PROMPTS, ChoiceExample, Example, InstructionExample,
                    Message, MissingSplit, PreferenceExample, TaskError, TaskSpec, TextExample,
                    lettered, prompt, user_message)

if TYPE_CHECKING:
    from .registry import DYNAMIC, MIXTURES, REGISTRY, register, resolve_tasks

__all__ = ["ChoiceExample", "Example", "InstructionExample", "LETTERS", "Message", "MissingSplit",
           "PreferenceExample", "SPLITS", "SYSTEM_PROMPTS", "TaskError", "TaskSpec", "TextExample",
           "lettered", "prompt", "user_message",
           "REGISTRY", "MIXTURES", "DYNAMIC", "register", "resolve_tasks"]
_REGISTRY_NAMES = frozenset({"REGISTRY", "MIXTURES", "DYNAMIC", "register", "resolve_tasks"})


def __getattr__(name: str):
    if name in _REGISTRY_NAMES:
        from . import registry
        return getattr(registry, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
