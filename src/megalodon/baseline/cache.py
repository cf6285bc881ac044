"""The baseline's KV cache and the one rule that says which keys a query may see.

A query at stream position p sees a key at position k when k <= p, both lie in the same document, and, with a
sliding window W, p - k < W. A document is named by the stream position where it begins: unlike a running count
of doc_start it stays valid from one call to the next, and p - begin is the query's rotary position for free.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class KVCache:
    """What a stream carries between calls: the keys and values it may still attend to, per layer."""

    keys: list[Tensor]  # per layer: B x H x S x head_dim, rotary already applied
    values: list[Tensor]  # per layer: B x H x S x head_dim
    key_doc_begin: Tensor  # B x S int64: where the document of each cached key begins
    doc_begin: Tensor  # B int64: where each row's current document begins
    position: int  # tokens seen so far = stream position of the next token; every row advances together
    window: int | None = None  # the sliding window that trimmed this cache; later calls must use the same

    @property
    def batch_size(self) -> int:
        return self.doc_begin.shape[0]

    @property
    def num_cached(self) -> int:
        """S: the cached keys are those at stream positions position - S ... position - 1."""
        return self.key_doc_begin.shape[1]

    @property
    def nbytes(self) -> int:
        tensors = [*self.keys, *self.values, self.key_doc_begin, self.doc_begin]
        return sum(t.numel() * t.element_size() for t in tensors)

    def get_seq_length(self) -> int:
        """Tokens seen so far (the name Hugging Face caches use)."""
        return self.position


def document_begins(doc_start: Tensor | None, positions: Tensor, previous: Tensor) -> Tensor:
    """B x L: the stream position where each token's document begins.

    positions: (L,) stream positions of this call; previous: (B,) the begin of each row's document so far.
    """
    if doc_start is None:
        return previous[:, None].expand(-1, positions.shape[0])
    marks = torch.where(doc_start, positions, -1)  # B x L: a begin where a document starts, -1 elsewhere
    # The latest begin at or before each token; rows with no start yet keep the previous document's.
    return torch.maximum(marks.cummax(dim=1).values, previous[:, None])


def attention_mask(query_pos: Tensor, query_doc: Tensor, key_pos: Tensor, key_doc: Tensor,
                   window: int | None) -> Tensor:
    """B x 1 x L x S bool, True where the query may attend to the key (broadcast over heads).

    query_pos: (L,), key_pos: (S,) stream positions; query_doc: (B, L), key_doc: (B, S) document begins.
    """
    distance = query_pos[:, None] - key_pos[None, :]  # L x S
    visible = distance >= 0
    if window is not None:
        visible = visible & (distance < window)
    same_doc = query_doc[:, :, None] == key_doc[:, None, :]  # B x L x S
    return (visible & same_doc).unsqueeze(1)
