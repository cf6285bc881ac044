"""Task names, and task options from the command line (`key=value`, ranges as `low:high`)."""

from __future__ import annotations

import difflib
import inspect

from megalodon.tasks.base import Task
from megalodon.tasks.listops import ListOps
from megalodon.tasks.passkey import Passkey
from megalodon.tasks.recall import AssociativeRecall, SelectiveCopy

TASKS: dict[str, type[Task]] = {"passkey": Passkey, "recall": AssociativeRecall, "copy": SelectiveCopy,
                                "listops": ListOps}


def task_options(name: str) -> list[str]:
    return list(inspect.signature(task_class(name)).parameters)


def task_class(name: str) -> type[Task]:
    if name not in TASKS:
        close = difflib.get_close_matches(name, list(TASKS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown task {name!r}{hint}; the tasks are {sorted(TASKS)}")
    return TASKS[name]


def make_task(name: str, **options) -> Task:
    """The task `name` with `options`; lists (as JSON stores ranges) become (low, high) ranges."""
    known = task_options(name)
    unknown = [k for k in options if k not in known]
    if unknown:
        close = [difflib.get_close_matches(k, known, n=1) for k in unknown]
        hints = [f"{k!r} (did you mean {c[0]!r}?)" if c else repr(k) for k, c in zip(unknown, close)]
        raise ValueError(f"task {name!r} has no option {', '.join(hints)}; its options are {known}")
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
    return task_class(name)(**options)


def _number(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        return float(text)


def parse_option(text: str) -> tuple[str, object]:
    """"gap=128" -> ("gap", 128); "gap=0:256" -> ("gap", (0, 256)); "num_queries=none" -> None; else text."""
    key, eq, raw = text.partition("=")
    if not eq or not key:
        raise ValueError(f"a task option is key=value (a range is key=low:high), got {text!r}")
    if raw.lower() == "none":
        return key, None
    try:
        if ":" in raw:
            low, high = raw.split(":")
            return key, (_number(low), _number(high))
        return key, _number(raw)
    except ValueError:
        return key, raw
