"""What every task shares: the example, deterministic seeding per (seed, split, index), batching, and scorers.

A sequence task's example is one token sequence whose answer tokens sit at known positions; the model reads the
sequence with teacher forcing and is scored on its argmax at each answer (the loss, too, is taken only there).
With teacher forcing, "every answer token is the argmax" is the same event as "greedy decoding writes the whole
answer", so exact match here is exact match of generation. A classification example is a sequence and a class.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from megalodon.data import IGNORE_INDEX

SPLITS = ("train", "test")
SEQUENCE, CLASSIFICATION = "sequence", "classification"


@dataclass(frozen=True)
class Example:
    tokens: np.ndarray  # (L,) int64: the whole sequence, answers included
    answers: np.ndarray  # (A,) int64 positions in tokens that hold answer tokens, each predicted from the one before
    label: int = -1  # a classification example's class; -1 for sequence tasks
    info: dict = field(default_factory=dict)  # what the generator drew: depth, gap, the key, ...

    def answer_tokens(self) -> np.ndarray:
        return self.tokens[self.answers]


def example_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of example `index` of `split`: each example is reproducible on its own, and the train and
    test streams are independent seeds, never overlapping ranges of one stream."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if min(seed, index) < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    return np.random.default_rng([seed, SPLITS.index(split), index])


class Task(ABC):
    """A seeded generator of examples. Subclasses set name, kind, vocab_size, pad_id (and num_classes)."""

    name: str
    kind: str = SEQUENCE
    vocab_size: int
    pad_id: int
    num_classes: int = 0

    @abstractmethod
    def make(self, rng: np.random.Generator, split: str) -> Example:
        """One example drawn from `rng` (the split matters only to tasks whose raw material is split)."""

    @abstractmethod
    def settings(self) -> dict:
        """The options that shape the examples, for reports and for rebuilding the task."""

    def example(self, split: str, index: int, seed: int = 0) -> Example:
        return self.make(example_rng(seed, split, index), split)

    def examples(self, split: str, count: int, seed: int = 0, start: int = 0) -> list[Example]:
        return [self.example(split, i, seed) for i in range(start, start + count)]


@dataclass
class TaskBatch:
    input_ids: Tensor  # B x L, right-padded with the task's pad id
    labels: Tensor  # sequence: B x L next-token labels, IGNORE_INDEX except at answers; classification: (B,)
    lengths: Tensor  # (B,) real length of each row of input_ids

    def to(self, device) -> "TaskBatch":
        return TaskBatch(self.input_ids.to(device), self.labels.to(device), self.lengths.to(device))


def collate(examples: Sequence[Example], task: Task) -> TaskBatch:
    """Right-pad the examples into one batch. The models are causal, so padding after a row's end changes
    nothing before it; sequence inputs drop the last token (nothing follows it to predict)."""
    classify = task.kind == CLASSIFICATION
    inputs = [e.tokens if classify else e.tokens[:-1] for e in examples]
    lengths = torch.tensor([len(x) for x in inputs], dtype=torch.int64)
    width = int(lengths.max())
    ids = torch.full((len(examples), width), task.pad_id, dtype=torch.int64)
    for row, x in enumerate(inputs):
        ids[row, :len(x)] = torch.from_numpy(x)
    if classify:
        return TaskBatch(ids, torch.tensor([e.label for e in examples], dtype=torch.int64), lengths)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for row, e in enumerate(examples):
        labels[row, torch.from_numpy(e.answers - 1)] = torch.from_numpy(e.answer_tokens())
    return TaskBatch(ids, labels, lengths)


def score_sequences(predicted: Sequence[np.ndarray], examples: Sequence[Example]) -> dict:
    """Token accuracy over all answer tokens and exact match (every answer token right) per example."""
    if len(predicted) != len(examples):
        raise ValueError(f"{len(predicted)} predictions for {len(examples)} examples")
    right = total = exact = 0
    for guess, example in zip(predicted, examples):
        truth = example.answer_tokens()
        guess = np.asarray(guess)
        if guess.shape != truth.shape:
            raise ValueError(f"a prediction has {guess.size} tokens where the answer has {truth.size}")
        hits = int((guess == truth).sum())
        right, total, exact = right + hits, total + truth.size, exact + (hits == truth.size)
    return {"token_accuracy": right / max(total, 1), "exact_match": exact / max(len(examples), 1),
            "examples": len(examples)}


def score_classes(predicted: Sequence[int], examples: Sequence[Example]) -> dict:
    if len(predicted) != len(examples):
        raise ValueError(f"{len(predicted)} predictions for {len(examples)} examples")
    right = sum(int(p) == e.label for p, e in zip(predicted, examples))
    return {"accuracy": right / max(len(examples), 1), "examples": len(examples)}


def score(task: Task, predicted, examples: Sequence[Example]) -> dict:
    return (score_classes if task.kind == CLASSIFICATION else score_sequences)(predicted, examples)


def draw_int(rng: np.random.Generator, value: int | tuple[int, int]) -> int:
    """An option that is a number or an inclusive (low, high) range to draw from."""
    return int(rng.integers(value[0], value[1] + 1)) if isinstance(value, tuple) else int(value)


def draw_float(rng: np.random.Generator, value: float | tuple[float, float]) -> float:
    return float(rng.uniform(value[0], value[1])) if isinstance(value, tuple) else float(value)


def check_range(name: str, value, low: float, high: float | None = None) -> None:
    """A number or a (low, high) pair within [low, high]: the one error message every task option shares."""
    values = value if isinstance(value, tuple) else (value,)
    bad = (len(values) not in (1, 2) or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values)
           or any(v < low or (high is not None and v > high) for v in values)
           or (len(values) == 2 and values[0] > values[1]))
    if bad:
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be a number {bounds} or a range low:high of such numbers, got {value!r}")
