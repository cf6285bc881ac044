"""Passkey retrieval: a number stated once inside a natural-text haystack, asked for at the end.

    <haystack, first part> The pass key is 48213. Remember it. 48213 is the pass key.
    <haystack, rest> What is the pass key? The pass key is 48213
                                                           ^^^^^ answer tokens

The haystack is consecutive lines of real text (Shakespeare by default) from the corpus split that matches the
task split (train plays for training, held-out plays for testing), so the model cannot memorize its way through.
`length` is the whole example in tokens; `depth` places the needle at that fraction of the haystack, snapped to
the nearest line break when one lies within a line's length of it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from megalodon.data import ByteTokenizer, Tokenizer, load_corpus, load_tokenizer, split_documents
from megalodon.tasks.base import Example, Task, check_range, draw_float, draw_int

NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "\nWhat is the pass key? The pass key is "
SNAP_TOKENS = 80  # the farthest a needle moves to sit on a line break


class LinePool:
    """The lines of a split's documents, tokenized once: one flat array and the offset of every line."""

    def __init__(self, texts: Sequence[str], tokenizer: Tokenizer):
        lines = [line for text in texts for line in text.splitlines(keepends=True) if line.strip()]
        if not lines:
            raise ValueError("the haystack texts hold no lines of text")
        ids = tokenizer.encode_batch(lines)
        self.offsets = np.cumsum([0] + [len(x) for x in ids])
        self.tokens = np.fromiter((t for x in ids for t in x), dtype=np.int64, count=int(self.offsets[-1]))

    def window(self, rng: np.random.Generator, length: int) -> tuple[np.ndarray, np.ndarray]:
        """`length` tokens starting at a random line (wrapping round the pool), and where its lines begin."""
        total = len(self.tokens)
        start = int(self.offsets[rng.integers(len(self.offsets) - 1)])
        index = (start + np.arange(length)) % total
        line_starts = np.flatnonzero(np.isin(index, self.offsets[:-1]))
        return self.tokens[index], line_starts


class Passkey(Task):
    name = "passkey"

    def __init__(self, length: int | tuple[int, int] = 256, depth: float | tuple[float, float] = (0.0, 1.0),
                 digits: int = 5, corpus: str = "shakespeare", data_dir: str = "data",
                 tokenizer: str | Tokenizer = "byte", texts: dict[str, Sequence[str]] | None = None):
        """tokenizer: "byte", the path of a tokenizer directory or tokenizer.json, or a Tokenizer.
        texts: {"train": [...], "test": [...]} haystack documents; None reads `corpus` and splits it by document
        as the trainer does (train plays for train, test plays for test)."""
        check_range("passkey depth", depth, 0.0, 1.0)
        if texts is not None and not (isinstance(texts, dict) and all(isinstance(texts.get(s), (list, tuple))
                                                                      for s in ("train", "test"))):
            raise ValueError("passkey texts must be {'train': [documents], 'test': [documents]} (from Python; "
                             "on the command line use corpus=NAME)")
        if isinstance(digits, bool) or not isinstance(digits, int) or not 1 <= digits <= 18:
            raise ValueError(f"passkey digits must be an integer in [1, 18], got {digits!r}")
        self.tokenizer_name = tokenizer if isinstance(tokenizer, str) else type(tokenizer).__name__
        self.tokenizer = (ByteTokenizer() if tokenizer == "byte" else load_tokenizer(tokenizer)
                          if isinstance(tokenizer, str) else tokenizer)
        self.length, self.depth, self.digits = length, depth, digits
        self.corpus, self.data_dir, self.texts = corpus, data_dir, texts
        self.vocab_size = self.tokenizer.vocab_size
        self.pad_id = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else self.tokenizer.eos_id
        longest_fixed = len(self._encode(NEEDLE.format(key="9" * digits) + QUESTION)) + 3 * digits
        check_range("passkey length", length, longest_fixed + 16)
        self._pools: dict[str, LinePool] = {}

    def settings(self) -> dict:
        return {"length": self.length, "depth": self.depth, "digits": self.digits, "corpus": self.corpus,
                "data_dir": self.data_dir, "tokenizer": self.tokenizer_name}

    def _encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tokenizer.encode(text), dtype=np.int64)

    def pool(self, split: str) -> LinePool:
        if split not in self._pools:
            texts = self.texts
            if texts is None:
                documents = load_corpus(self.corpus, Path(self.data_dir) / "corpora")
                texts = split_documents(documents, seed=0)
            self._pools[split] = LinePool(texts[split], self.tokenizer)
        return self._pools[split]

    def make(self, rng: np.random.Generator, split: str) -> Example:
        length, depth = draw_int(rng, self.length), draw_float(rng, self.depth)
        key = str(int(rng.integers(10 ** (self.digits - 1), 10 ** self.digits)))
        needle, question, answer = (self._encode(NEEDLE.format(key=key)), self._encode(QUESTION),
                                    self._encode(key))
        fill = length - len(needle) - len(question) - len(answer)
        if fill < 1:
            raise ValueError(f"passkey length {length} leaves no room for a haystack")
        haystack, line_starts = self.pool(split).window(rng, fill)
        cut = int(round(depth * fill))
        if len(line_starts):
            nearest = int(line_starts[np.argmin(np.abs(line_starts - cut))])
            cut = nearest if abs(nearest - cut) <= SNAP_TOKENS else cut
        tokens = np.concatenate([haystack[:cut], needle, haystack[cut:], question, answer])
        answers = np.arange(len(tokens) - len(answer), len(tokens))
        return Example(tokens, answers, info={"length": length, "depth": cut / fill, "needle_at": cut, "key": key})
