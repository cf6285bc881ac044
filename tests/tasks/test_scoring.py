"""Scorers on known cases, and batching: labels only at the answers, padding never scored."""

import numpy as np
import pytest
import torch

from megalodon.data import IGNORE_INDEX
from megalodon.tasks import AssociativeRecall, Example, ListOps, collate, score_classes, score_sequences


def _example(tokens, answers, label=-1):
    return Example(np.asarray(tokens, dtype=np.int64), np.asarray(answers, dtype=np.int64), label)


def test_sequence_scores_on_known_cases():
    examples = [_example([5, 6, 7, 8], [2, 3]), _example([1, 2, 3], [2])]
    assert score_sequences([np.array([7, 8]), np.array([3])], examples) == \
        {"token_accuracy": 1.0, "exact_match": 1.0, "examples": 2}
    half = score_sequences([np.array([7, 0]), np.array([3])], examples)
    assert half["token_accuracy"] == pytest.approx(2 / 3) and half["exact_match"] == 0.5
    assert score_sequences([np.array([0, 0]), np.array([0])], examples)["token_accuracy"] == 0.0
    with pytest.raises(ValueError, match="answer has 2"):
        score_sequences([np.array([7]), np.array([3])], examples)
    with pytest.raises(ValueError, match="1 predictions for 2"):
        score_sequences([np.array([7, 8])], examples)


def test_class_scores_on_known_cases():
    examples = [_example([1, 2], [], label=3), _example([1], [], label=0), _example([4], [], label=9)]
    assert score_classes([3, 0, 9], examples)["accuracy"] == 1.0
    assert score_classes([3, 1, 1], examples)["accuracy"] == pytest.approx(1 / 3)


def test_collate_puts_labels_only_before_answers():
    task = AssociativeRecall(num_pairs=(1, 4), gap=(0, 9))
    examples = task.examples("train", 5)
    batch = collate(examples, task)
    for row, example in enumerate(examples):
        n = len(example.tokens) - 1
        assert batch.lengths[row] == n
        assert torch.equal(batch.input_ids[row, :n], torch.from_numpy(example.tokens[:-1]))
        assert bool((batch.input_ids[row, n:] == task.pad_id).all())
        scored = (batch.labels[row] != IGNORE_INDEX).nonzero().flatten().numpy()
        assert np.array_equal(scored, example.answers - 1)  # the position before each answer predicts it
        assert np.array_equal(batch.labels[row, scored].numpy(), example.answer_tokens())


def test_collate_classification_keeps_whole_sequences():
    task = ListOps(length=(5, 30))
    examples = task.examples("test", 4)
    batch = collate(examples, task)
    assert batch.labels.tolist() == [e.label for e in examples]
    assert batch.lengths.tolist() == [len(e.tokens) for e in examples]
