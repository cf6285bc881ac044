"""The task generators: deterministic per seed, split apart, and well-formed (answers recoverable from the
sequence by an independent reading, lengths, depths and gaps as asked)."""

import re
import statistics

import numpy as np
import pytest

from megalodon.data import ByteTokenizer
from megalodon.tasks import AssociativeRecall, ListOps, Passkey, SelectiveCopy, make_task, parse_option
from megalodon.tasks.listops import token_text
from megalodon.tasks.recall import FIRST_NOISE, SEP

from tasks.task_helpers import TEXTS



def passkey(**options) -> Passkey:
    return Passkey(texts=TEXTS, **options)


@pytest.mark.parametrize("task", [passkey(), AssociativeRecall(gap=(0, 40)), SelectiveCopy(gap=(0, 40)),
                                  ListOps()], ids=lambda t: t.name)
def test_deterministic_and_split_apart(task):
    a, b = task.examples("train", 6, seed=3), task.examples("train", 6, seed=3)
    assert all(np.array_equal(x.tokens, y.tokens) and x.label == y.label for x, y in zip(a, b))
    assert np.array_equal(task.example("train", 4, seed=3).tokens, a[4].tokens)  # one example alone
    other_seed, test = task.examples("train", 6, seed=4), task.examples("test", 6, seed=3)
    for other in (other_seed, test):
        assert sum(np.array_equal(x.tokens, y.tokens) for x, y in zip(a, other)) == 0


@pytest.mark.parametrize("length", [200, 1000, 4096])
@pytest.mark.parametrize("depth", [0.1, 0.5, 0.9])
def test_passkey_length_depth_and_answer(length, depth):
    tok = ByteTokenizer()
    for example in passkey(length=length, depth=depth).examples("test", 4, seed=1):
        assert len(example.tokens) == length
        text = tok.decode(example.tokens.tolist())
        key = example.info["key"]
        assert len(key) == 5 and tok.decode(example.answer_tokens().tolist()) == key
        assert text.endswith(f"What is the pass key? The pass key is {key}")
        needle = text.index(f"The pass key is {key}. Remember it.")  # the needle, read back from the text
        assert text.count(key) == 3  # twice in the needle, once as the answer: nothing else gives it away
        haystack = length - len(tok.encode(f"The pass key is {key}. Remember it. {key} is the pass key.\n")) - \
            len(tok.encode(f"\nWhat is the pass key? The pass key is {key}"))
        assert abs(needle - depth * haystack) <= 80  # snapped to a line break at most 80 tokens away
        assert abs(example.info["depth"] - needle / haystack) < 1e-9
        assert "held-out" in text and "train line" not in text


def test_passkey_train_split_reads_train_texts():
    text = ByteTokenizer().decode(passkey(length=600).example("train", 0).tokens.tolist())
    assert "train line" in text and "held-out" not in text


def test_passkey_refuses_bad_options():
    with pytest.raises(ValueError, match="passkey depth"):
        passkey(depth=1.5)
    with pytest.raises(ValueError, match="passkey length"):
        passkey(length=40)


def test_recall_answers_are_the_values_of_the_queried_keys():
    task = AssociativeRecall(num_pairs=(2, 6), gap=(0, 50), num_keys=8)
    for example in task.examples("train", 30):
        tokens, pairs, gap = example.tokens, example.info["pairs"], example.info["gap"]
        value_of = dict(zip(tokens[0:2 * pairs:2].tolist(), tokens[1:2 * pairs:2].tolist()))
        assert len(value_of) == pairs  # distinct keys
        assert np.all((tokens[2 * pairs:2 * pairs + gap] >= FIRST_NOISE) & (tokens[2 * pairs:2 * pairs + gap] <
                                                                          task.first_key))
        assert tokens[2 * pairs + gap] == SEP
        for position in example.answers:
            assert tokens[position] == value_of[int(tokens[position - 1])]
        assert len(tokens) == 2 * pairs + gap + 1 + 2 * pairs and 0 <= gap <= 50


def test_selective_copy_answers_are_the_marked_tokens_in_order():
    task = SelectiveCopy(num_tokens=5, span=(10, 30), gap=(0, 70))
    for example in task.examples("test", 30):
        tokens = example.tokens
        sep = int(np.flatnonzero(tokens == SEP)[0])
        marked = tokens[:sep][tokens[:sep] >= task.first_data]
        assert np.array_equal(marked, example.answer_tokens())
        assert len(marked) == 5 and sep == example.info["span"] + example.info["gap"]
        last_mark = int(np.flatnonzero(tokens[:sep] >= task.first_data)[-1])
        assert last_mark < example.info["span"]  # the gap after the span is pure noise


def _evaluate_listops(text: str) -> tuple[int, int]:
    """An independent reading of a ListOps expression: parse the text with a regex tokenizer and a recursive
    descent, evaluate with the statistics module. Returns (value, depth)."""
    functions = {"MIN": min, "MAX": max, "MED": statistics.median_high, "SM": lambda v: sum(v) % 10}
    words = re.findall(r"\[\w+|\]|\d", text)
    position = 0

    def node():
        nonlocal position
        word = words[position]
        position += 1
        if word.isdigit():
            return int(word), 0
        args = []
        while words[position] != "]":
            args.append(node())
        position += 1
        return functions[word[1:]]([v for v, _ in args]), 1 + max(d for _, d in args)

    value = node()
    assert position == len(words)
    return value


@pytest.mark.parametrize("max_depth,length,max_args", [(1, (5, 12), 10), (3, (16, 64), 4), (6, (100, 300), 5)])
def test_listops_value_depth_and_length(max_depth, length, max_args):
    task = ListOps(max_depth=max_depth, length=length, max_args=max_args)
    for example in task.examples("train", 40):
        value, depth = _evaluate_listops(" ".join(token_text(int(t)) for t in example.tokens))
        assert example.label == value and example.info["depth"] == depth <= max_depth
        assert length[0] <= len(example.tokens) <= length[1]
    assert len({e.label for e in task.examples("test", 100)}) >= 8  # not a constant


def test_listops_refuses_an_impossible_length():
    with pytest.raises(ValueError, match="could not grow"):
        ListOps(max_depth=1, max_args=2, length=(30, 40)).example("train", 0)


def test_options_parse_and_unknown_options_are_named():
    assert parse_option("gap=0:96") == ("gap", (0, 96))
    assert parse_option("depth=0.5") == ("depth", 0.5)
    assert parse_option("num_queries=none") == ("num_queries", None)
    assert make_task("recall", gap=[3, 9]).gap == (3, 9)  # JSON lists are ranges
    with pytest.raises(ValueError, match="did you mean 'gap'"):
        make_task("recall", gapp=3)
    with pytest.raises(ValueError, match="unknown task 'recal'.*did you mean 'recall'"):
        make_task("recal")
    with pytest.raises(ValueError, match="recall gap"):
        make_task("recall", gap=-1)
