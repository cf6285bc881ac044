"""Tokenized corpora on disk: one flat memmap of token ids per split, with document offsets.

Layout of a store directory:
    meta.json               format, dtype, vocab size, eos id, tokenizer fingerprint, per-split counts and the
                            SHA-256 of each {split}.bin (what a resumed training run checks its data against)
    {split}.bin             all documents of the split back to back, each followed by eos (uint16 or uint32)
    {split}.offsets.npy     int64, n_docs + 1 entries: document i is tokens[offsets[i]:offsets[i+1]]
    {split}.bytes.npy       int64, UTF-8 byte count of each document's text (for bits/byte)
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from megalodon.progress import progress_bar

from .tokenizer import Tokenizer

FORMAT = "megalodon-token-store"
VERSION = 1
SPLITS = ("train", "val", "test")
_ENCODE_BATCH_CHARS = 2_000_000  # text encoded at once: parallel enough; a BPE batch holds ~40 bytes a character
_MIN_PIECES = 20  # what a corpus of fewer documents than splits is cut into, at least


def _split_sizes(n_docs: int, fractions: Sequence[float]) -> list[int]:
    """Documents per split: proportional, but at least one for every split with a positive fraction."""
    wanted = [n_docs * f for f in fractions]
    sizes = [math.floor(w) for w in wanted]
    by_remainder = sorted(range(len(sizes)), key=lambda i: wanted[i] - sizes[i], reverse=True)
    for i in by_remainder[: n_docs - sum(sizes)]:
        sizes[i] += 1
    for i, f in enumerate(fractions):
        if f > 0 and sizes[i] == 0:  # take it from the largest split
            sizes[max(range(len(sizes)), key=sizes.__getitem__)] -= 1
            sizes[i] = 1
    return sizes


def _cut_into_pieces(text: str, n_pieces: int) -> list[str]:
    """Cut `text` into about `n_pieces` parts of similar length, at line breaks where there are any."""
    cuts, start = [], 0
    for k in range(1, n_pieces):
        target = max(start, len(text) * k // n_pieces)
        newline = text.find("\n", target)
        end = newline + 1 if 0 <= newline < len(text) * (k + 1) // n_pieces else target
        cuts.append(text[start:end])
        start = end
    cuts.append(text[start:])
    return [c for c in cuts if c]


def _enough_documents(documents: list[str], split_fractions: Sequence[float]) -> list[str]:
    """With fewer documents than splits, cut each one into pieces, enough of them (20 in all for the default
    fractions) that each split gets its share of the text: a single book splits 90/5/5, not a third each.

    The pieces of one document then land in different splits: val is not independent of train,
    but a single long book still gets a held-out part instead of an error.
    """
    n_splits = sum(f > 0 for f in split_fractions)
    if len(documents) >= n_splits:
        return documents
    wanted = max(n_splits, _MIN_PIECES, math.ceil(1 / min(f for f in split_fractions if f > 0) - 1e-9))
    per_doc = math.ceil(wanted / len(documents))
    pieces = [p for d in documents for p in _cut_into_pieces(d, per_doc)]
    if len(pieces) < n_splits:
        raise ValueError(f"need at least {n_splits} documents (or text long enough to cut), got {len(pieces)}")
    return pieces


def _check_fractions(split_fractions: Sequence[float]) -> None:
    if len(split_fractions) != len(SPLITS) or any(f < 0 for f in split_fractions):
        raise ValueError(f"split_fractions must be {len(SPLITS)} non-negative numbers {SPLITS}, got {split_fractions}")
    if abs(sum(split_fractions) - 1.0) > 1e-6:  # (0, 1, 0): a store of validation documents only
        raise ValueError(f"split_fractions must sum to 1, got {split_fractions}")


class DocumentSplits:
    """The seeded split by document into train/val/test, decided from the number of documents alone, so that a
    corpus read from disk afresh on each pass (data.user_documents.UserDocuments) is split without being held.

    `documents` is iterated once to count and once per later pass (a list, or any object whose iterations give
    the same documents; a one-shot iterator is read into memory first). Empty documents are dropped; fewer
    documents than splits are cut into pieces (_enough_documents)."""

    def __init__(self, documents: Iterable[str], split_fractions: Sequence[float] = (0.9, 0.05, 0.05),
                 seed: int = 0):
        _check_fractions(split_fractions)
        if iter(documents) is documents:
            documents = list(documents)
        count = sum(1 for d in documents if d)
        if count == 0:
            raise ValueError("no documents to tokenize")
        if count < sum(f > 0 for f in split_fractions):
            documents = _enough_documents([d for d in documents if d], split_fractions)
            count = len(documents)
        self.documents = documents
        order = np.random.default_rng(seed).permutation(count)
        bounds = np.cumsum([0] + _split_sizes(count, split_fractions))
        self.split_of = np.empty(count, dtype=np.int8)  # the split index of each non-empty document
        for index, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            self.split_of[order[lo:hi]] = index

    def __iter__(self) -> Iterator[tuple[str, str]]:
        """(split, document) for every document, in corpus order, which each split keeps (eval walks it so)."""
        position, count = 0, len(self.split_of)
        for text in self.documents:
            if not text:
                continue
            if position == count:
                raise RuntimeError(f"the documents changed while they were read: {count} when they were counted, "
                                   "more on a later pass")
            yield SPLITS[self.split_of[position]], text
            position += 1
        if position != count:
            raise RuntimeError(f"the documents changed while they were read: {count} when they were counted, "
                               f"{position} on a later pass")

    def split(self, name: str) -> Iterator[str]:
        """The documents of one split, streamed in corpus order."""
        return (text for split, text in self if split == name)


def split_documents(documents: Iterable[str], split_fractions: Sequence[float] = (0.9, 0.05, 0.05),
                    seed: int = 0) -> dict[str, list[str]]:
    """DocumentSplits' split, in memory: the one `build_token_store` writes, for instance to train a tokenizer on
    the train split alone before the store is built."""
    splits = {name: [] for name in SPLITS}
    for split, text in DocumentSplits(documents, split_fractions, seed):
        splits[split].append(text)
    return splits


def build_token_store(
    documents: Iterable[str],
    tokenizer: Tokenizer,
    out_dir: str | Path,
    split_fractions: Sequence[float] = (0.9, 0.05, 0.05),
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Tokenize `documents` (empty ones dropped), split them by document (seeded, DocumentSplits) into
    train/val/test, and write a store at `out_dir` atomically; returns `out_dir`. The documents are read twice
    and never held together: give a re-iterable source (UserDocuments) for a corpus larger than memory."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass overwrite=True to replace it")
    splits = DocumentSplits(documents, split_fractions, seed)
    dtype = np.uint16 if tokenizer.vocab_size <= 65535 else np.uint32
    meta = {
        "format": FORMAT, "version": VERSION, "dtype": np.dtype(dtype).name,
        "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
        "tokenizer_fingerprint": tokenizer.fingerprint(), "seed": seed,
        "split_fractions": list(split_fractions), "n_docs": len(splits.split_of), "splits": {},
    }
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        writers = {split: _SplitWriter(tmp, split, tokenizer, dtype) for split in SPLITS}
        # a large corpus takes minutes: say how far it got (nothing for one done within seconds)
        bar = progress_bar(total=len(splits.split_of), desc="tokenizing", delay=2.0, unit="doc")
        try:
            for split, text in splits:
                writers[split].add(text)
                bar.update(1)
            for split, writer in writers.items():
                meta["splits"][split] = writer.finish()
        finally:
            bar.close()
            for writer in writers.values():
                writer.close()
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


class _SplitWriter:
    """One split's files: its documents tokenized a batch at a time (parallel enough, bounded memory: a long
    document goes in the parts its tokenizer can cut it into), each followed by eos, appended to {split}.bin;
    offsets and byte counts written at the end."""

    def __init__(self, directory: Path, split: str, tokenizer: Tokenizer, dtype):
        self.directory, self.split, self.tokenizer, self.dtype = directory, split, tokenizer, dtype
        self.out = open(directory / f"{split}.bin", "wb")
        self.pending: list[str | None] = []  # parts of documents, None where a document ends
        self.pending_chars = 0
        self.open_tokens = self.open_bytes = 0  # of the document whose parts are being written
        self.lengths: list[int] = []
        self.n_bytes: list[int] = []
        self.digest = hashlib.sha256()

    def add(self, text: str) -> None:
        for part in self.tokenizer.parts(text, _ENCODE_BATCH_CHARS):
            self.pending.append(part)
            self.pending_chars += len(part)
            if self.pending_chars >= _ENCODE_BATCH_CHARS:
                self._flush()
        self.pending.append(None)

    def _flush(self) -> None:
        tokenizer = self.tokenizer
        parts = [p for p in self.pending if p is not None]
        encoded = iter(tokenizer.encode_batch(parts) if parts else [])
        for part in self.pending:
            if part is None:
                self._write(np.asarray([tokenizer.eos_id], dtype=np.int64))
                self.lengths.append(self.open_tokens)
                self.n_bytes.append(self.open_bytes)
                self.open_tokens = self.open_bytes = 0
                continue
            ids = np.asarray(next(encoded), dtype=np.int64)
            if ids.size and (ids.min() < 0 or ids.max() >= tokenizer.vocab_size):
                raise ValueError(f"tokenizer produced ids outside [0, {tokenizer.vocab_size})")
            self._write(ids)
            self.open_bytes += len(part.encode("utf-8"))
        self.pending, self.pending_chars = [], 0

    def _write(self, ids: np.ndarray) -> None:
        data = ids.astype(self.dtype).tobytes()
        self.out.write(data)
        self.digest.update(data)
        self.open_tokens += len(ids)

    def finish(self) -> dict:
        self._flush()
        self.out.close()
        offsets = np.concatenate([[0], np.cumsum(self.lengths, dtype=np.int64)]).astype(np.int64)
        np.save(self.directory / f"{self.split}.offsets.npy", offsets)
        np.save(self.directory / f"{self.split}.bytes.npy", np.asarray(self.n_bytes, dtype=np.int64))
        return {"n_docs": len(self.lengths), "n_tokens": int(offsets[-1]), "n_bytes": int(sum(self.n_bytes)),
                "sha256": self.digest.hexdigest()}

    def close(self) -> None:
        self.out.close()


class TokenStore:
    """One split of a token store, opened read-only (memory-mapped, so any size is cheap to open)."""

    def __init__(self, directory: str | Path, split: str = "train"):
        self.directory, self.split = Path(directory), split
        meta_path = self.directory / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"{self.directory} is not a token store (no meta.json); build one with build_token_store"
            )
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{meta_path} is corrupt: {err}") from err
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise ValueError(f"{meta_path}: expected format {FORMAT!r} version {VERSION}, "
                             f"found {meta.get('format')!r} version {meta.get('version')}")
        if split not in meta["splits"]:
            raise ValueError(f"split {split!r} not in {self.directory}; it has {sorted(meta['splits'])}")
        self.meta = meta
        info = meta["splits"][split]
        self.vocab_size: int = meta["vocab_size"]
        self.eos_id: int = meta["eos_id"]
        self.tokenizer_fingerprint: str = meta["tokenizer_fingerprint"]
        self.n_tokens: int = info["n_tokens"]
        self.n_docs: int = info["n_docs"]
        self.n_bytes: int = info["n_bytes"]
        dtype = np.dtype(meta["dtype"])

        bin_path = self.directory / f"{split}.bin"
        expected = self.n_tokens * dtype.itemsize
        found = bin_path.stat().st_size if bin_path.is_file() else None
        if found != expected:
            raise ValueError(f"corrupt token store: {bin_path} has {found if found is not None else 'no'} bytes, "
                             f"meta.json says {self.n_tokens} {dtype.name} tokens = {expected} bytes")
        # np.memmap cannot map an empty file; an empty split (fraction 0) is a plain empty array.
        self.tokens = np.memmap(bin_path, dtype=dtype, mode="r") if expected else np.zeros(0, dtype)
        self.offsets = self._load_array("offsets", self.n_docs + 1)
        self.doc_bytes = self._load_array("bytes", self.n_docs)
        if self.offsets[0] != 0 or self.offsets[-1] != self.n_tokens or np.any(np.diff(self.offsets) < 1):
            raise ValueError(f"corrupt token store: {split}.offsets.npy is not increasing from 0 to {self.n_tokens}")

    def _load_array(self, name: str, length: int) -> np.ndarray:
        path = self.directory / f"{self.split}.{name}.npy"
        try:
            array = np.load(path)
        except (OSError, ValueError) as err:
            raise ValueError(f"corrupt token store: cannot read {path}: {err}") from err
        if array.shape != (length,):
            raise ValueError(f"corrupt token store: {path} has shape {array.shape}, expected ({length},)")
        return array.astype(np.int64, copy=False)

    def doc_length(self, i: int) -> int:
        """Tokens in document `i`, its eos included."""
        return int(self.offsets[i + 1] - self.offsets[i])

    def document(self, i: int) -> np.ndarray:
        """Token ids of document `i`, ending with eos (a read-only view into the memmap)."""
        if not 0 <= i < self.n_docs:
            raise IndexError(f"document {i} out of range: split {self.split!r} has {self.n_docs} documents")
        return self.tokens[self.offsets[i]: self.offsets[i + 1]]

    def __repr__(self) -> str:
        return (f"TokenStore({str(self.directory)!r}, split={self.split!r}, "
                f"n_docs={self.n_docs}, n_tokens={self.n_tokens})")
