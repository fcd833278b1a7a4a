"""The task registry: every task name, every mixture, the dynamic task families, and --tasks
resolution.

REGISTRY (task name -> TaskSpec) and MIXTURES (mixture name -> list of task names) are built
here from the plain spec lists of the built-in suite (tasks/suite.py) and of the real-data
readers (tasks/loaders.py); importing those modules registers nothing. DYNAMIC holds the task
families selected with a prefix, "jsonl:path/to/file.jsonl" and "text:corpus.txt": their
factories add a task to REGISTRY the first time it is asked for. ``resolve_tasks("a,b")`` turns
a ``--tasks`` flag into specs.
"""
from __future__ import annotations

from . import loaders, suite
from .types import TaskError, TaskSpec


def _by_name(specs: list) -> dict:
    out = {}
    for spec in specs:
        if spec.name in out:
            raise ValueError(f"task {spec.name!r} registered twice")
        out[spec.name] = spec
    return out


REGISTRY: dict = _by_name(suite.SPECS + loaders.SPECS)  # task name -> TaskSpec
MIXTURES: dict = {**suite.MIXTURES, **loaders.MIXTURES}  # mixture name -> list of task names


def register(spec: TaskSpec) -> TaskSpec:
    """Add a task to REGISTRY (a dynamic task, or one of your own); a name is registered once."""
    if spec.name in REGISTRY:
        raise ValueError(f"task {spec.name!r} registered twice")
    REGISTRY[spec.name] = spec
    return spec


def _registered(prefix: str, make):
    """A DYNAMIC factory: the task "<prefix>:<arg>", built by ``make(arg)`` and registered the
    first time it is asked for, then returned from REGISTRY."""
    def factory(arg: str) -> TaskSpec:
        name = f"{prefix}:{arg}"
        if name not in REGISTRY:
            register(make(arg))
        return REGISTRY[name]
    return factory


# Dynamic task families selected with a prefix, e.g. "jsonl:path/to/file.jsonl" or
# "text:corpus.txt": prefix -> factory(argument) -> a registered TaskSpec.
DYNAMIC: dict = {
    "jsonl": _registered("jsonl", loaders.jsonl_task),
    "text": _registered("text", loaders.text_task),
}


def resolve_tasks(spec: str) -> list:
    """Turn a comma-separated --tasks value (task and mixture names) into TaskSpecs, in order,
    without duplicates. Unknown names raise TaskError listing what exists."""
    out, seen = [], set()
    for name in [s.strip() for s in spec.split(",") if s.strip()]:
        if name in MIXTURES:
            names = MIXTURES[name]
        elif name in REGISTRY:
            names = [name]
        elif ":" in name and name.split(":", 1)[0] in DYNAMIC:
            prefix, arg = name.split(":", 1)
            names = [DYNAMIC[prefix](arg).name]
        else:
            known = ", ".join(sorted(MIXTURES) + sorted(REGISTRY))
            raise TaskError(f"--tasks: unknown task {name!r}; known: {known}")
        for n in names:
            if n not in seen:
                seen.add(n)
                out.append(REGISTRY[n])
    if not out:
        raise TaskError("--tasks: no task given")
    return out
