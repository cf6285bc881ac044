"""Shared fixture: small token stores built from synthetic documents with the byte tokenizer."""

from __future__ import annotations

import numpy as np
import pytest

from megalodon.data import ByteTokenizer, TokenStore, build_token_store


def _synthetic_documents(n_docs: int, seed: int = 0, max_len: int = 60) -> list[str]:
    rng = np.random.default_rng(seed)
    alphabet = list("abcdefgh ijk\nlmnopé✓")
    return [f"{i}:" + "".join(rng.choice(alphabet, size=int(rng.integers(0, max_len)))) for i in range(n_docs)]


@pytest.fixture
def synthetic_documents():
    """synthetic_documents(n_docs, seed=0, max_len=60): distinct documents (each starts with its index)
    of varied lengths, some non-ASCII."""
    return _synthetic_documents


@pytest.fixture
def make_store(tmp_path):
    """make_store(docs, split="train", **build_kwargs) -> TokenStore over a fresh byte-tokenized store."""
    counter = iter(range(1000))

    def make(docs: list[str], split: str = "train", **kwargs) -> TokenStore:
        out = build_token_store(docs, ByteTokenizer(), tmp_path / f"store{next(counter)}", **kwargs)
        return TokenStore(out, split)

    return make
