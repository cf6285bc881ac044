"""Synthetic memory tasks over small alphabets: multi-query associative recall and selective copying.

Token layout shared by both: 0 is padding, 1 the separator, then a noise alphabet, then the task's alphabets.
A "gap" is a run of noise tokens between what must be remembered and where it is asked for; with a gap longer
than Megalodon's attention chunk, only the CEMA (and the norm statistics) can carry the information across.
"""

from __future__ import annotations

import numpy as np

from megalodon.tasks.base import Example, Task, check_range, draw_int

PAD, SEP, FIRST_NOISE = 0, 1, 2


def _check_alphabet(name: str, value: int, low: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


class AssociativeRecall(Task):
    """Multi-query associative recall (MQAR):

        k1 v1 k2 v2 ... kn vn  <gap noise>  SEP  q1 a1 q2 a2 ... qm am

    Keys are distinct, values random; the queries are m of the n keys in random order and each answer a is the
    value that followed that key. The loss and the score are on the answers only."""

    name = "recall"

    def __init__(self, num_pairs: int | tuple[int, int] = 8, num_queries: int | None = None,
                 gap: int | tuple[int, int] = 0, num_keys: int = 32, num_values: int = 32, noise: int = 8):
        check_range("recall num_pairs", num_pairs, 1, num_keys)
        check_range("recall gap", gap, 0)
        for name, value in (("num_keys", num_keys), ("num_values", num_values), ("noise", noise)):
            _check_alphabet(f"recall {name}", value)
        smallest = num_pairs[0] if isinstance(num_pairs, tuple) else num_pairs
        if num_queries is not None and not (isinstance(num_queries, int) and 1 <= num_queries <= smallest):
            raise ValueError(f"recall num_queries must be an integer in [1, num_pairs={smallest}] or None (query "
                             f"every key), got {num_queries!r}")
        self.num_pairs, self.num_queries, self.gap = num_pairs, num_queries, gap
        self.num_keys, self.num_values, self.noise = num_keys, num_values, noise
        self.first_key = FIRST_NOISE + noise
        self.first_value = self.first_key + num_keys
        self.vocab_size = self.first_value + num_values
        self.pad_id = PAD

    def settings(self) -> dict:
        return {"num_pairs": self.num_pairs, "num_queries": self.num_queries, "gap": self.gap,
                "num_keys": self.num_keys, "num_values": self.num_values, "noise": self.noise}

    def make(self, rng: np.random.Generator, split: str) -> Example:
        pairs, gap = draw_int(rng, self.num_pairs), draw_int(rng, self.gap)
        queries = pairs if self.num_queries is None else self.num_queries
        keys = self.first_key + rng.choice(self.num_keys, size=pairs, replace=False)
        values = self.first_value + rng.integers(0, self.num_values, size=pairs)
        asked = rng.permutation(pairs)[:queries]
        context = np.stack([keys, values], axis=1).reshape(-1)
        filler = FIRST_NOISE + rng.integers(0, self.noise, size=gap)
        questions = np.stack([keys[asked], values[asked]], axis=1).reshape(-1)
        tokens = np.concatenate([context, filler, [SEP], questions]).astype(np.int64)
        answers = len(tokens) - 2 * queries + 1 + 2 * np.arange(queries)
        # distance from each queried pair's value to its answer: what the model must span
        spans = answers - (2 * asked + 1)
        return Example(tokens, answers, info={"pairs": pairs, "gap": gap, "max_span": int(spans.max())})


class SelectiveCopy(Task):
    """Selective copying: data tokens scattered at random positions among noise, then copied in order.

        <span tokens: noise with num_tokens data tokens at random places>  <gap noise>  SEP  d1 d2 ... dk

    The data tokens come from their own alphabet, so what marks them is what they are (as in Gu and Dao's
    selective copying, where the noise is a single blank token). The answers are d1..dk."""

    name = "copy"

    def __init__(self, num_tokens: int = 8, span: int | tuple[int, int] = 64, gap: int | tuple[int, int] = 0,
                 num_data: int = 16, noise: int = 8):
        _check_alphabet("copy num_tokens", num_tokens)
        check_range("copy span", span, num_tokens)
        check_range("copy gap", gap, 0)
        _check_alphabet("copy num_data", num_data)
        _check_alphabet("copy noise", noise)
        self.num_tokens, self.span, self.gap, self.num_data, self.noise = num_tokens, span, gap, num_data, noise
        self.first_data = FIRST_NOISE + noise
        self.vocab_size = self.first_data + num_data
        self.pad_id = PAD

    def settings(self) -> dict:
        return {"num_tokens": self.num_tokens, "span": self.span, "gap": self.gap, "num_data": self.num_data,
                "noise": self.noise}

    def make(self, rng: np.random.Generator, split: str) -> Example:
        span, gap = draw_int(rng, self.span), draw_int(rng, self.gap)
        region = FIRST_NOISE + rng.integers(0, self.noise, size=span + gap)
        places = np.sort(rng.choice(span, size=self.num_tokens, replace=False))
        data = self.first_data + rng.integers(0, self.num_data, size=self.num_tokens)
        region[places] = data
        tokens = np.concatenate([region, [SEP], data]).astype(np.int64)
        answers = np.arange(len(tokens) - self.num_tokens, len(tokens))
        return Example(tokens, answers, info={"span": span, "gap": gap,
                                              "max_distance": int(answers[0] - places[0])})
