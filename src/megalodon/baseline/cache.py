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


@dataclass
class StaticKVCache:
    """The decode form of the cache (gpt-fast style): buffers of a fixed max_length written in place, so that a
    single-token step has static shapes and no host sync (Llama.decode_step_; a CUDA graph can replay it).

    Slot s holds the key of stream position s; a query at position p sees slots doc_begin..p, masked, whatever
    the later slots hold. A step costs O(max_length), so size the cache for the stream at hand.
    """

    keys: list[Tensor]  # per layer: B x max_length x H x head_dim, rotary applied
    values: list[Tensor]  # per layer: B x max_length x H x head_dim
    doc_begin: Tensor  # B int64: where each row's current document begins
    position: Tensor  # B int64: the stream position (and slot) of each row's next token

    @property
    def batch_size(self) -> int:
        return self.position.shape[0]

    @property
    def max_length(self) -> int:
        return self.keys[0].shape[1]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.keys, *self.values, self.doc_begin, self.position])

    @classmethod
    def allocate(cls, num_layers: int, batch_size: int, max_length: int, num_heads: int, head_dim: int,
                 device=None, dtype: torch.dtype = torch.float32) -> "StaticKVCache":
        """An empty cache: every row at position 0."""
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be a positive integer, got {max_length!r}")
        shape = (batch_size, max_length, num_heads, head_dim)
        zeros = torch.zeros(batch_size, dtype=torch.int64, device=device)
        return cls([torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)],
                   [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)], zeros, zeros.clone())

    @classmethod
    def from_cache(cls, cache: KVCache, max_length: int) -> "StaticKVCache":
        """Static buffers holding a copy of `cache` (from a prefill without a window), with room up to
        max_length positions."""
        if not isinstance(cache, KVCache):
            raise TypeError(f"from_cache needs a KVCache, got {type(cache).__name__}")
        if cache.window is not None:
            raise ValueError("a sliding-window cache has dropped the keys that slot = position needs; prefill "
                             "without a window to decode with a static cache")
        if max_length <= cache.position:
            raise ValueError(f"max_length={max_length} leaves no room after the cache's {cache.position} "
                             "positions: give the prompt length plus the tokens to generate")
        batch, heads, length, head_dim = cache.keys[0].shape
        out = cls.allocate(len(cache.keys), batch, max_length, heads, head_dim, cache.keys[0].device,
                           cache.keys[0].dtype)
        for buffer, source in zip(out.keys + out.values, cache.keys + cache.values):
            buffer[:, :length] = source.transpose(1, 2)
        out.doc_begin.copy_(cache.doc_begin)
        out.position.fill_(cache.position)
        return out


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
