"""ListOps (Nangia and Bowman 2018, as in Long Range Arena): the value, 0-9, of a nested list expression.

    [MAX 4 3 [MIN 2 3 ] 1 0 [MED 1 5 8 9 2 ] ]   ->   5

MIN, MAX, MED (the median; with an even count, the upper of the two middle values) and SM (sum modulo 10) over
digits and sub-lists. One token per operator, digit and closing bracket. `max_depth` bounds the nesting (a bare
digit has depth 0) and `length` the tokens; trees are grown to a drawn token budget and redrawn until their
length falls in range. A classification task: a head reads the model's state after the last token.
"""

from __future__ import annotations

import numpy as np

from megalodon.tasks.base import CLASSIFICATION, Example, Task, check_range, draw_int

PAD, CLOSE = 0, 1
OPERATORS = ("MIN", "MAX", "MED", "SM")
FIRST_OPERATOR = 2
FIRST_DIGIT = FIRST_OPERATOR + len(OPERATORS)
VOCAB = FIRST_DIGIT + 10
MAX_ATTEMPTS = 1000


def apply(operator: str, values: list[int]) -> int:
    if operator == "MIN":
        return min(values)
    if operator == "MAX":
        return max(values)
    if operator == "MED":
        return sorted(values)[len(values) // 2]
    return sum(values) % 10


def token_text(token: int) -> str:
    if token == CLOSE:
        return "]"
    if FIRST_OPERATOR <= token < FIRST_DIGIT:
        return "[" + OPERATORS[token - FIRST_OPERATOR]
    if FIRST_DIGIT <= token < VOCAB:
        return str(token - FIRST_DIGIT)
    return "<pad>"


class ListOps(Task):
    name = "listops"
    kind = CLASSIFICATION
    num_classes = 10
    vocab_size = VOCAB
    pad_id = PAD

    def __init__(self, max_depth: int = 4, length: int | tuple[int, int] = (32, 128), max_args: int = 5):
        if isinstance(max_depth, bool) or not isinstance(max_depth, int) or max_depth < 1:
            raise ValueError(f"listops max_depth must be an integer >= 1, got {max_depth!r}")
        if isinstance(max_args, bool) or not isinstance(max_args, int) or max_args < 2:
            raise ValueError(f"listops max_args must be an integer >= 2, got {max_args!r}")
        check_range("listops length", length, 5)  # the shortest list: [OP d d ]
        self.max_depth, self.length, self.max_args = max_depth, length, max_args

    def settings(self) -> dict:
        return {"max_depth": self.max_depth, "length": self.length, "max_args": self.max_args}

    def make(self, rng: np.random.Generator, split: str) -> Example:
        low, high = self.length if isinstance(self.length, tuple) else (self.length, self.length)
        for _ in range(MAX_ATTEMPTS):
            tokens: list[int] = []
            value, depth = self._grow(rng, draw_int(rng, self.length) - 1, self.max_depth, tokens, top=True)
            if low <= len(tokens) <= high:
                return Example(np.asarray(tokens, dtype=np.int64), np.zeros(0, dtype=np.int64), label=value,
                               info={"depth": depth, "length": len(tokens)})
        raise ValueError(f"listops could not grow a tree of {low}-{high} tokens with max_depth={self.max_depth} "
                         f"and max_args={self.max_args} in {MAX_ATTEMPTS} tries: widen the length range or allow "
                         "deeper or wider lists")

    def _grow(self, rng, budget: int, depth: int, out: list[int], top: bool = False) -> tuple[int, int]:
        """Append a subtree of about `budget` tokens to `out`; return its value and depth. The top is always a
        list; below it a subtree becomes a digit when its budget or the depth runs out."""
        if not top and (depth == 0 or budget < 4 or rng.random() < 0.1):
            digit = int(rng.integers(10))
            out.append(FIRST_DIGIT + digit)
            return digit, 0
        operator = int(rng.integers(len(OPERATORS)))
        out.append(FIRST_OPERATOR + operator)
        inner = max(budget - 2, 2)  # the operator and the closing bracket
        widest = max(2, min(self.max_args, inner))
        # just above the depth limit every child is a digit: spend the whole budget on them
        count = widest if depth == 1 else int(rng.integers(2, widest + 1))
        cuts = np.sort(rng.choice(np.arange(1, inner), size=count - 1, replace=False)) if inner > count else \
            np.arange(1, count)
        shares = np.diff(np.concatenate([[0], cuts, [max(inner, count)]]))
        values, depths = zip(*(self._grow(rng, int(share), depth - 1, out) for share in shares))
        out.append(CLOSE)
        return apply(OPERATORS[operator], list(values)), 1 + max(depths)
