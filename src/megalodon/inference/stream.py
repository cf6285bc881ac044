"""Feeding a known sequence through Megalodon in chunk-aligned blocks, and the optional truncate_chunks trick.

Blocks are vectorized calls that end on the chunk grid (a multiple of chunk_size in stream position), so that
activation memory is bounded by the block, not by the sequence; the carried state makes the result identical
to one call (split invariance).

truncate_chunks (spec section 13, off by default). Over a long stream the TimestepNorm statistics become
lifetime averages. With truncate_chunks = T, the model is rerun from an empty state on the last T - 2 chunks
(grid-aligned, plus the current partial chunk) and every layer's norm statistics (count, mean, var), and the
final norm's, are replaced by that rerun's. The CEMA states and the attention cache are kept. This trades
exactness (outputs then depend on where the truncations fell, not on the tokens alone) and the compute of a
(T - 2)-chunk rerun every 2 chunks for statistics that follow the recent text. When it fires:
- after a prefill block that ends on the chunk grid, as in the reference's evaluation loop: once the stream is
  T chunks long, after every such block that adds a whole chunk to the window. The partial chunk at the end
  of a call is its own block, so a call whose whole chunks end on an odd count (a 1-chunk last block) reruns
  before its tail, as the reference does;
- anywhere else (decode, the tail of a call), when the window holds T chunks. The reference's generation never
  truncates while decoding; we do, so that a long generation keeps recent statistics too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import Tensor

from megalodon.model import Megalodon
from megalodon.ops.timestep_norm import NormStats
from megalodon.state import LayerState, MegalodonState

KEPT_CHUNK_SHORTFALL = 2  # the rerun covers truncate_chunks - 2 chunks, as in the reference
Progress = Callable[[int, int], None]  # (tokens fed so far, tokens in all)


def check_truncate_chunks(value: int | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= KEPT_CHUNK_SHORTFALL:
        raise ValueError(f"truncate_chunks must be None (off) or an integer > {KEPT_CHUNK_SHORTFALL} "
                         f"(the rerun keeps truncate_chunks - {KEPT_CHUNK_SHORTFALL} chunks), got {value!r}")


@dataclass
class RecencyWindow:
    """The recent tokens of one stream that a truncate_chunks rerun needs.

    ids are the tokens at stream positions start, start + 1, ...; the window never holds more than
    truncate_chunks chunks plus one block, because every truncation drops its older part.
    """

    truncate_chunks: int
    chunk_size: int
    ids: Tensor  # 1-D int64
    start: int  # stream position of ids[0]

    @classmethod
    def empty(cls, truncate_chunks: int, chunk_size: int, position: int) -> "RecencyWindow":
        check_truncate_chunks(truncate_chunks)
        return cls(truncate_chunks, chunk_size, torch.zeros(0, dtype=torch.int64), position)

    @property
    def end(self) -> int:
        return self.start + self.ids.numel()

    def extend(self, new_ids: Tensor) -> None:
        self.ids = torch.cat([self.ids, new_ids.reshape(-1).to(device="cpu", dtype=torch.int64)])

    def due(self, block_end: bool = False) -> bool:
        """Whether to rerun now. block_end: a prefill block just ended (module docstring)."""
        chunk, limit = self.chunk_size, self.truncate_chunks * self.chunk_size
        if self.ids.numel() >= limit:
            return True
        grown = self.ids.numel() >= (self.truncate_chunks - KEPT_CHUNK_SHORTFALL + 1) * chunk  # a chunk to drop
        return block_end and self.end % chunk == 0 and self.end >= limit and grown

    def rerun_span(self) -> Tensor:
        """The last truncate_chunks - 2 whole chunks plus the current partial one, starting on the grid; the
        window drops everything before them. Call only when due()."""
        kept_chunks = self.truncate_chunks - KEPT_CHUNK_SHORTFALL
        first = (self.end // self.chunk_size - kept_chunks) * self.chunk_size  # >= start when due()
        self.ids, self.start = self.ids[first - self.start:], first
        return self.ids


PREFILL_TOKENS = 4096  # per call: large enough that per-call overhead vanishes, small enough for activations
# A prefill on a GPU (the last logits kept, no activations kept for backward): a call of 4K tokens there is bound
# by the host's launches (an H100 prefilled 1M tokens of mega200M at 67K tokens/s in 4K calls), so its calls are
# this long, a few GB of transient activations at mega1.3B's widths
PREFILL_TOKENS_CUDA = 32768


def default_block_tokens(chunk_size: int, truncating: bool = False,
                         prefill_device: torch.device | str | None = None) -> int:
    """Whole chunks adding up to about PREFILL_TOKENS (at least one chunk), or PREFILL_TOKENS_CUDA for a prefill
    (only the last logits kept) on prefill_device CUDA. A truncate_chunks window fires after blocks, so with one
    the blocks are as short as its period (2 chunks), as in the reference."""
    if truncating:
        return KEPT_CHUNK_SHORTFALL * chunk_size
    gpu_prefill = prefill_device is not None and torch.device(prefill_device).type == "cuda"
    tokens = PREFILL_TOKENS_CUDA if gpu_prefill else PREFILL_TOKENS
    return chunk_size * max(1, -(-tokens // chunk_size))


def chunk_aligned_blocks(position: int, length: int, block_tokens: int, tail_chunk: int | None = None,
                         ) -> Iterator[tuple[int, int]]:
    """(begin, end) offsets into a sequence of `length` tokens that starts at stream `position`, cut wherever
    the stream position is a multiple of block_tokens. With tail_chunk (a chunk size), the partial chunk at
    the end is a block of its own."""
    whole_end = length if tail_chunk is None else (position + length) // tail_chunk * tail_chunk - position
    begin = 0
    while begin < length:
        room = block_tokens - (position + begin) % block_tokens
        end = min(length, begin + room)
        if begin < whole_end < end:
            end = whole_end
        yield begin, end
        begin = end


def stream_blocks(
    model: Megalodon, ids: Tensor, state: MegalodonState | None = None, block_tokens: int | None = None,
    window: RecencyWindow | None = None, logits_to_keep: int = 0, progress: Progress | None = None,
) -> Iterator[tuple[int, Tensor, MegalodonState]]:
    """Feed ids (1-D, one stream) block by block; yield (offset of the block in ids, its logits (1, L, V) or
    the last `logits_to_keep` of them, the state after it). With a window, truncate_chunks runs after the
    blocks where it is due (module docstring). progress(tokens fed, tokens in all) follows each block."""
    chunk = model.config.chunk_size
    if block_tokens is None:
        block_tokens = default_block_tokens(chunk, truncating=window is not None,
                                            prefill_device=ids.device if logits_to_keep else None)
    if block_tokens < 1 or block_tokens % chunk:
        raise ValueError(f"block_tokens must be a positive multiple of chunk_size={chunk}, got {block_tokens}")
    if state is not None and state.batch_size != 1:
        raise ValueError(f"stream_blocks feeds one stream; the state has {state.batch_size} rows (use state[i])")
    position = 0 if state is None else int(state.position[0])
    ids = ids.reshape(1, -1)
    tail_chunk = None if window is None else chunk
    for begin, end in chunk_aligned_blocks(position, ids.shape[1], block_tokens, tail_chunk):
        logits, state = model(ids[:, begin:end], state=state, return_state=True, logits_to_keep=logits_to_keep)
        if window is not None:
            window.extend(ids[0, begin:end])
            if window.due(block_end=True):
                state = truncate_norm_stats(model, state, [(0, window.rerun_span())], block_tokens)
        if progress is not None:
            progress(end, ids.shape[1])
        yield begin, logits, state


def final_logits_and_state(
    model: Megalodon, ids: Tensor, state: MegalodonState | None = None, window: RecencyWindow | None = None,
    block_tokens: int | None = None, progress: Progress | None = None,
) -> tuple[Tensor, MegalodonState]:
    """Prefill: the logits (V,) after the last of ids, and the state; only the last block's logits are kept."""
    last = None
    for _, logits, state in stream_blocks(model, ids, state, block_tokens, window, 1, progress):
        last = logits[0, -1]
    if last is None:
        raise ValueError("nothing to feed: the token sequence is empty")
    return last, state


def truncate_norm_stats(
    model: Megalodon, state: MegalodonState, rows: list[tuple[int, Tensor]], block_tokens: int | None = None,
) -> MegalodonState:
    """Replace the norm statistics of the given rows by those of a fresh run on their recent ids.

    rows: (row index in the state, ids of that row's rerun span). CEMA states and attention caches stay.
    block_tokens: the rerun's call size (default chunk_size), which bounds its memory.
    """
    # Copies, so that the caller's state is not modified in place.
    layers = [([t.clone() for t in layer.norm], layer) for layer in state.layers]
    final = [t.clone() for t in state.final_norm]
    for row, span in rows:
        _, fresh = final_logits_and_state(model, span.to(state.device), block_tokens=block_tokens)
        for (stats, _), fresh_layer in zip(layers, fresh.layers):
            for target, source in zip(stats, fresh_layer.norm):
                target[row] = source[0].to(target.dtype)
        for target, source in zip(final, fresh.final_norm):
            target[row] = source[0].to(target.dtype)
    new_layers = [LayerState(layer.cema_h, NormStats(*stats), layer.k_cache, layer.v_cache)
                  for stats, layer in layers]
    return MegalodonState(new_layers, NormStats(*final), state.position)
