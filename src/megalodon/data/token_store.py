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
from typing import Sequence

import numpy as np

from .tokenizer import Tokenizer

FORMAT = "megalodon-token-store"
VERSION = 1
SPLITS = ("train", "val", "test")
_ENCODE_BATCH_CHARS = 8_000_000  # encode this much text at a time: parallel enough, bounded memory


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


def _enough_documents(documents: list[str], n_splits: int) -> list[str]:
    """With fewer documents than splits, cut each one into pieces so that every split can get one.

    The pieces of one document then land in different splits: val is not independent of train,
    but a single long book still gets a held-out part instead of an error.
    """
    if len(documents) >= n_splits:
        return documents
    per_doc = math.ceil(n_splits / len(documents))
    pieces = [p for d in documents for p in _cut_into_pieces(d, per_doc)]
    if len(pieces) < n_splits:
        raise ValueError(f"need at least {n_splits} documents (or text long enough to cut), got {len(pieces)}")
    return pieces


def split_documents(documents: Sequence[str], split_fractions: Sequence[float] = (0.9, 0.05, 0.05),
                    seed: int = 0) -> dict[str, list[str]]:
    """The seeded split by document that `build_token_store` writes (empty documents dropped), so that a
    tokenizer can be trained on the train split alone before the store is built."""
    if len(split_fractions) != len(SPLITS) or any(f < 0 for f in split_fractions):
        raise ValueError(f"split_fractions must be {len(SPLITS)} non-negative numbers {SPLITS}, got {split_fractions}")
    if abs(sum(split_fractions) - 1.0) > 1e-6 or split_fractions[0] <= 0:
        raise ValueError(f"split_fractions must sum to 1 with a positive train share, got {split_fractions}")
    documents = [d for d in documents if d]
    if not documents:
        raise ValueError("no documents to tokenize")
    documents = _enough_documents(documents, sum(f > 0 for f in split_fractions))
    order = np.random.default_rng(seed).permutation(len(documents))
    bounds = np.cumsum([0] + _split_sizes(len(documents), split_fractions))
    # Sorted: within a split, documents keep corpus order (eval walks them in that order).
    return {split: [documents[i] for i in np.sort(order[lo:hi])]
            for split, lo, hi in zip(SPLITS, bounds[:-1], bounds[1:])}


def build_token_store(
    documents: Sequence[str],
    tokenizer: Tokenizer,
    out_dir: str | Path,
    split_fractions: Sequence[float] = (0.9, 0.05, 0.05),
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Tokenize `documents` (empty ones dropped), split them by document (seeded) into train/val/test,
    and write a store at `out_dir` atomically; returns `out_dir`."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass overwrite=True to replace it")
    splits = split_documents(documents, split_fractions, seed)
    dtype = np.uint16 if tokenizer.vocab_size <= 65535 else np.uint32
    meta = {
        "format": FORMAT, "version": VERSION, "dtype": np.dtype(dtype).name,
        "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
        "tokenizer_fingerprint": tokenizer.fingerprint(), "seed": seed,
        "split_fractions": list(split_fractions), "n_docs": sum(map(len, splits.values())), "splits": {},
    }
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        for split, split_docs in splits.items():
            meta["splits"][split] = _write_split(tmp, split, split_docs, tokenizer, dtype)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _write_split(directory: Path, split: str, docs: list[str], tokenizer: Tokenizer, dtype) -> dict:
    lengths, n_bytes, digest = [], [], hashlib.sha256()
    with open(directory / f"{split}.bin", "wb") as out:
        start = 0
        while start < len(docs):
            end, chars = start, 0
            while end < len(docs) and (end == start or chars < _ENCODE_BATCH_CHARS):
                chars += len(docs[end])
                end += 1
            for text, ids in zip(docs[start:end], tokenizer.encode_batch(docs[start:end])):
                ids = np.asarray(ids + [tokenizer.eos_id], dtype=np.int64)
                if ids.min() < 0 or ids.max() >= tokenizer.vocab_size:
                    raise ValueError(f"tokenizer produced ids outside [0, {tokenizer.vocab_size})")
                data = ids.astype(dtype).tobytes()
                out.write(data)
                digest.update(data)
                lengths.append(len(ids))
                n_bytes.append(len(text.encode("utf-8")))
            start = end
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)
    np.save(directory / f"{split}.offsets.npy", offsets)
    np.save(directory / f"{split}.bytes.npy", np.asarray(n_bytes, dtype=np.int64))
    return {"n_docs": len(docs), "n_tokens": int(offsets[-1]), "n_bytes": int(sum(n_bytes)),
            "sha256": digest.hexdigest()}


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
