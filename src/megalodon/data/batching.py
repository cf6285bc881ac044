"""Training and evaluation windows for a chunked, stateful model: chunk-aligned document packing.

Each batch row is an endless *stream*: documents one after another, each starting at a stream position
that is a multiple of `chunk_size` (the gap after a document is padding, masked out of the loss).
Consecutive windows of a row are consecutive pieces of its stream, so the trainer can carry the
model's recurrent state from one window to the next (truncated BPTT) and reset it where `doc_start`
says a document begins. Because every document starts on a chunk boundary, no attention chunk ever
mixes two documents.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from megalodon.ops.loss import IGNORE_INDEX

from .token_store import TokenStore

_STATE_VERSION = 1


@dataclass(frozen=True)
class Batch:
    """One window per row. `labels[b, t]` is the token after `input_ids[b, t]` in the same document, or
    IGNORE_INDEX after a document's last token (its eos) and on padding."""

    input_ids: torch.Tensor  # B x L int64
    labels: torch.Tensor  # B x L int64
    doc_start: torch.Tensor  # B x L bool, True at each document's first token (always t % chunk_size == 0)
    continues: torch.Tensor  # B bool, True if row b's window continues the row's previous window's document

    def to(self, device: torch.device | str) -> "Batch":
        """The same batch on `device`. To a GPU from pinned memory, so that the copy waits in the stream rather
        than holding the host (which then queues the step's kernels while the GPU finishes the last step's)."""
        fields = (self.input_ids, self.labels, self.doc_start, self.continues)
        pin = torch.device(device).type == "cuda"
        return Batch(*((t.pin_memory() if pin and t.device.type == "cpu" else t).to(device, non_blocking=True)
                       for t in fields))


class _RowStream:
    """Cursor over one row's stream; `doc_at(k)` names the row's k-th document (None: the row is done)."""

    def __init__(self, store: TokenStore, doc_at: Callable[[int], int | None], chunk_size: int, pad_id: int):
        self.store, self.doc_at, self.chunk_size, self.pad_id = store, doc_at, chunk_size, pad_id
        self.k = 0  # index of the current document in the row's document sequence
        self.pos = 0  # position inside that document's chunk-aligned span (tokens, then padding)

    def _span(self, length: int) -> int:
        return math.ceil(length / self.chunk_size) * self.chunk_size

    def read(self, n: int, advance: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The next `n` stream positions as (token ids, segment ids, doc starts); moves the cursor by `advance`.

        Segment id is k for a token of the row's k-th document and -1 for padding (also after a finished row).
        """
        tokens = np.full(n, self.pad_id, dtype=np.int64)
        segment = np.full(n, -1, dtype=np.int64)
        start = np.zeros(n, dtype=bool)
        k, pos, filled, moved = self.k, self.pos, 0, None
        while filled < n:
            doc = self.doc_at(k)
            if doc is None:
                break
            length = self.store.doc_length(doc)
            span = self._span(length)
            take = min(span - pos, n - filled)
            real = max(0, min(length, pos + take) - pos)  # document tokens in this piece; the rest is padding
            tokens[filled: filled + real] = self.store.document(doc)[pos: pos + real]
            segment[filled: filled + real] = k
            start[filled] = pos == 0
            if moved is None and filled + take >= advance:
                moved = (k, pos + advance - filled) if pos + advance - filled < span else (k + 1, 0)
            filled += take
            k, pos = k + 1, 0
        self.k, self.pos = moved if moved is not None else (k, 0)
        return tokens, segment, start


def _window_batch(streams: list[_RowStream], seq_len: int) -> tuple[Batch, int]:
    """Read one window from every stream (seq_len + 1 positions: the extra one labels the last position)."""
    rows = [s.read(seq_len + 1, advance=seq_len) for s in streams]
    tokens = np.stack([r[0] for r in rows])  # B x (L+1)
    segment = np.stack([r[1] for r in rows])
    start = np.stack([r[2] for r in rows])[:, :-1]  # B x L
    same_doc = (segment[:, :-1] >= 0) & (segment[:, 1:] == segment[:, :-1])
    labels = np.where(same_doc, tokens[:, 1:], IGNORE_INDEX)
    n_pad = int((segment[:, :-1] < 0).sum())
    batch = Batch(
        input_ids=torch.from_numpy(tokens[:, :-1].copy()),
        labels=torch.from_numpy(labels),
        doc_start=torch.from_numpy(start.copy()),
        continues=torch.from_numpy(~start[:, 0] & (segment[:, 0] >= 0)),  # a finished eval row continues nothing
    )
    return batch, n_pad


def _check_window(seq_len: int, chunk_size: int, pad_id: int, store: TokenStore) -> None:
    if chunk_size < 1 or seq_len < 1 or seq_len % chunk_size:
        raise ValueError(f"seq_len ({seq_len}) must be a positive multiple of chunk_size ({chunk_size})")
    if not 0 <= pad_id < store.vocab_size:
        raise ValueError(f"pad_id {pad_id} is outside the store's vocabulary [0, {store.vocab_size})")
    if store.n_docs == 0:
        raise ValueError(f"split {store.split!r} of {store.directory} has no documents")


class PackedBatcher:
    """Endless shuffled training batches from one split, with exact resume via state_dict().

    Documents are visited as one endless sequence: epoch e is a permutation of all documents, seeded by
    (seed, e), and row b takes items b, b+B, b+2B, ... of the concatenated epochs. So every document
    appears exactly once per epoch, and a split with fewer documents than rows still feeds every row.
    """

    def __init__(self, store: TokenStore, batch_size: int, seq_len: int, chunk_size: int, seed: int, pad_id: int):
        _check_window(seq_len, chunk_size, pad_id, store)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.store, self.batch_size, self.seq_len, self.chunk_size = store, batch_size, seq_len, chunk_size
        self.seed, self.pad_id = seed, pad_id
        self._permutations: dict[int, np.ndarray] = {}
        self._streams = [_RowStream(store, self._doc_for_row(b), chunk_size, pad_id) for b in range(batch_size)]
        self._n_batches = self._n_inputs = self._n_pad = 0

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._permutations:
            oldest = min(s.k * self.batch_size for s in self._streams) // self.store.n_docs
            self._permutations = {e: p for e, p in self._permutations.items() if e >= oldest}
            self._permutations[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.store.n_docs)
        return self._permutations[epoch]

    def _doc_for_row(self, row: int) -> Callable[[int], int]:
        def doc_at(k: int) -> int:
            epoch, index = divmod(row + k * self.batch_size, self.store.n_docs)
            return int(self._permutation(epoch)[index])

        return doc_at

    def next_batch(self) -> Batch:
        """The next window of every row."""
        batch, n_pad = _window_batch(self._streams, self.seq_len)
        self._n_batches += 1
        self._n_inputs += batch.input_ids.numel()
        self._n_pad += n_pad
        return batch

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next_batch()

    @property
    def epoch(self) -> float:
        """Documents begun so far, in epochs (the slowest row's position)."""
        return min(b + s.k * self.batch_size for b, s in enumerate(self._streams)) / self.store.n_docs

    @property
    def padding_fraction(self) -> float:
        """Share of input positions so far that were padding (the price of chunk-aligned packing)."""
        return self._n_pad / self._n_inputs if self._n_inputs else 0.0

    def state_dict(self) -> dict:
        """Everything needed to continue with exactly the same batches (plain ints, JSON-safe)."""
        return {
            "version": _STATE_VERSION,
            "config": self._config(),
            "row_doc": [s.k for s in self._streams],  # row b is on item b + k*B of the endless document order
            "row_pos": [s.pos for s in self._streams],
            "counters": [self._n_batches, self._n_inputs, self._n_pad],
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a cursor saved by `state_dict` from a batcher with the same configuration and split."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"batcher state version {state.get('version')} is not {_STATE_VERSION}")
        if state["config"] != self._config():
            raise ValueError(f"batcher state was saved with {state['config']}, this batcher has {self._config()}")
        for stream, k, pos in zip(self._streams, state["row_doc"], state["row_pos"], strict=True):
            stream.k, stream.pos = int(k), int(pos)
        self._n_batches, self._n_inputs, self._n_pad = (int(c) for c in state["counters"])
        self._permutations = {}

    def _config(self) -> dict:
        return {
            "batch_size": self.batch_size, "seq_len": self.seq_len, "chunk_size": self.chunk_size,
            "seed": self.seed, "pad_id": self.pad_id, "n_docs": self.store.n_docs,
            "n_tokens": self.store.n_tokens, "tokenizer": self.store.tokenizer_fingerprint,
        }


def eval_windows(
    store: TokenStore, seq_len: int, chunk_size: int, pad_id: int, batch_size: int = 1
) -> Iterator[Batch]:
    """Every document of a split exactly once, in store order, as consecutive windows.

    Row b reads documents b, b+B, ...; rows that run out are filled with padding (all labels ignored)
    until the last row is done. Loss summed over labels != IGNORE_INDEX, in nats, gives bits/byte as
    `bits_per_byte(total_nats, store.n_bytes)` (the first token of each document is never predicted,
    each document's eos is).
    """
    _check_window(seq_len, chunk_size, pad_id, store)

    def doc_for_row(row: int) -> Callable[[int], int | None]:
        return lambda k: row + k * batch_size if row + k * batch_size < store.n_docs else None

    streams = [_RowStream(store, doc_for_row(b), chunk_size, pad_id) for b in range(batch_size)]
    while any(s.doc_at(s.k) is not None for s in streams):
        yield _window_batch(streams, seq_len)[0]


def bits_per_byte(total_nats: float, total_bytes: int) -> float:
    """Summed cross-entropy (nats) to bits per UTF-8 byte of text, the tokenizer-independent measure."""
    return total_nats / math.log(2) / total_bytes
