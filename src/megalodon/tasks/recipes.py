"""A recipe per task: the task's training settings and a training config that trains a tiny model on it in
minutes on 2 CPU cores. Any part can be overridden; the experiments in benchmarks/long_context/ start here."""

from __future__ import annotations

from dataclasses import dataclass, field

from megalodon.tasks.base import Task
from megalodon.tasks.registry import make_task
from megalodon.training.config import TrainConfig, apply_overrides

# Shared by every recipe: the tiny preset, fp32 (bf16 buys nothing at this size), a short warmup.
COMMON = dict(preset="tiny", dtype="fp32", warmup_steps=50, lr=3e-3, weight_decay=0.0, log_every=25,
              eval_every=0, eval_batch_size=16)


@dataclass(frozen=True)
class Recipe:
    task: dict  # task options for training (ranges draw a fresh value per example)
    train: dict  # TrainConfig fields on top of COMMON
    note: str = ""
    test: dict = field(default_factory=dict)  # task options for the recipe's own test set, on top of `task`


RECIPES: dict[str, Recipe] = {
    "passkey": Recipe(
        task=dict(length=256, depth=(0.0, 1.0)),
        train=dict(model={"chunk_size": 64}, seq_len=256, batch_size=16, max_steps=400),
        note="256-token haystacks of Shakespeare, bytes; four attention chunks of 64"),
    "recall": Recipe(
        task=dict(num_pairs=4, gap=(0, 96), num_keys=16, num_values=16),
        train=dict(model={"chunk_size": 32}, seq_len=256, batch_size=32, max_steps=400),
        note="4 pairs, gaps up to three 32-token attention chunks", test=dict(gap=64)),
    "copy": Recipe(
        task=dict(num_tokens=4, span=32, gap=(0, 96)),
        train=dict(model={"chunk_size": 32}, seq_len=256, batch_size=32, max_steps=400),
        note="4 tokens in a 32-token span, gaps up to three 32-token attention chunks", test=dict(gap=64)),
    "listops": Recipe(
        task=dict(max_depth=3, length=(16, 64), max_args=4),
        train=dict(model={"chunk_size": 32}, seq_len=64, batch_size=32, max_steps=400),
        note="depth <= 3, 16-64 tokens, two 32-token chunks at most"),
}


def recipe(name: str, task_options: dict | None = None, cli_overrides: list[str] = (),
           **train_overrides) -> tuple[Task, TrainConfig]:
    """The task and training config of recipe `name`, with task options and TrainConfig fields overridden
    (keyword arguments, then `--field value` strings as the command line gives them)."""
    make_task(name)  # an unknown name is refused with the list of tasks
    found = RECIPES[name]
    task = make_task(name, **{**found.task, **(task_options or {})})
    values = apply_overrides({**COMMON, **found.train, **train_overrides}, list(cli_overrides))
    return task, TrainConfig.from_dict(values)


def held_out_task(name: str, task_options: dict | None = None) -> Task:
    """The recipe's test setting: its training options, its `test` options, then `task_options`."""
    found = RECIPES[name]
    return make_task(name, **{**found.task, **found.test, **(task_options or {})})
