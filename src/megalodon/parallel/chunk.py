"""Chunk parallelism (spec section 14): the sequence split across the ranks of a process group.

Rank r of P holds tokens [r S, (r+1) S) of every sequence, S a multiple of chunk_size, so attention never needs
another rank's keys. Only the TimestepNorm statistics and the CEMA states couple the segments, and those are
exchanged as summaries by one differentiable all-gather per norm and per CEMA (see combine.py).

`apply_chunk_parallel(model, group)` swaps the class of every layer's `timenorm` and `cema`, and of the final
norm, for the subclasses below. The model, the blocks and the parameters stay as they are: the layers keep their
own math and only learn their incoming state from the other ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from megalodon.layers.cema import CEMA
from megalodon.layers.timestep_norm import TimestepNorm
from megalodon.ops.cema import cema_state_bias
from megalodon.ops.timestep_norm import NormStats
from megalodon.parallel.collectives import gather_summaries
from megalodon.parallel.combine import cema_incoming, cema_summary, norm_incoming, norm_summary, segment_lengths


def _check_segments(summaries: Tensor, block_size: int | None) -> None:
    """Every segment but the last must end on the chunk grid. Checked on the gathered lengths, so that every rank
    raises the same error instead of the others waiting for the one that raised."""
    lengths = segment_lengths(summaries).tolist()
    if block_size is not None and any(n % block_size for n in lengths[:-1]):
        raise ValueError(f"chunk parallel: the segments hold {[int(n) for n in lengths]} tokens; every segment "
                         f"but the last must be a multiple of chunk_size={block_size} (cut the sequence with "
                         "megalodon.parallel.local_segment)")


class ChunkParallelTimestepNorm(TimestepNorm):
    """TimestepNorm over one segment, with the exact incoming statistics merged from the earlier segments."""

    cp_group: dist.ProcessGroup
    cp_check_segments: bool  # on the first layer only: the check reads the lengths on the host, a GPU sync

    def forward(
        self, x: Tensor, state: NormStats | None = None, block_size: int | None = None,
        block_reset: Tensor | None = None, pad_mask: Tensor | None = None, copy_dtype: torch.dtype | None = None,
    ) -> tuple[Tensor, NormStats] | tuple[Tensor, Tensor, NormStats]:
        """As TimestepNorm.forward; `state` enters the first segment, and the returned statistics leave the last
        (the same on every rank)."""
        if pad_mask is not None:
            raise ValueError("chunk parallel: pad_mask is not supported across segments; pack documents with "
                             "doc_start instead")
        rank = dist.get_rank(self.cp_group)
        with torch.autocast(x.device.type, enabled=False):
            initial = self.initial_state(x.shape[0]) if state is None else state
            summaries = gather_summaries(norm_summary(x, self.num_groups, block_size, block_reset), self.cp_group)
            if self.cp_check_segments:
                _check_segments(summaries, block_size)
            # Entering this segment, and leaving the last. Rank 0's incoming state is computed from the gathered
            # tensor too (with zero weights), not taken from `initial`: every rank must join the gather's backward.
            incoming, final = (NormStats(*t) for t in zip(*norm_incoming(initial, self.prior(), summaries,
                                                                         (rank, len(summaries)))))
            *normalized, _ = super().forward(x, incoming, block_size, block_reset, copy_dtype=copy_dtype)
        return *normalized, final


class ChunkParallelCEMA(CEMA):
    """CEMA over one segment entered at zero, corrected by the exact incoming state from the earlier segments."""

    cp_group: dist.ProcessGroup

    def forward(
        self, x: Tensor, h0: Tensor | None = None, block_size: int | None = None,
        block_reset: Tensor | None = None, need_state: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """As CEMA.forward; `h0` enters the first segment, and the returned state leaves the last (the same on
        every rank)."""
        length = x.shape[1]
        rank = dist.get_rank(self.cp_group)
        y_local, h_local = super().forward(x, None, block_size, block_reset, need_state=True)
        with torch.autocast(x.device.type, enabled=False):
            coeffs = self.coefficients()
            summaries = gather_summaries(cema_summary(h_local, length, block_reset), self.cp_group)
            if h0 is None:
                h0 = torch.zeros_like(h_local)
            targets = (rank, len(summaries)) if need_state else (rank,)  # as in the norm
            states = cema_incoming(h0.to(h_local.dtype), coeffs, summaries, targets)
            y = y_local + cema_state_bias(torch.view_as_real(states[0]), coeffs, length, block_size, block_reset)
        return y, states[-1] if need_state else None


_SWAPS = {TimestepNorm: ChunkParallelTimestepNorm, CEMA: ChunkParallelCEMA}


def _swap(module: nn.Module, group, check_segments: bool = False) -> None:
    parallel = _SWAPS.get(type(module))
    if parallel is None:
        raise TypeError(f"apply_chunk_parallel expects plain {' and '.join(c.__name__ for c in _SWAPS)} layers, "
                        f"found {type(module).__name__} (apply it once, before fully_shard or DDP)")
    module.__class__ = parallel  # the same parameters and buffers, a forward that talks to the other segments
    module.cp_group = group
    if isinstance(module, ChunkParallelTimestepNorm):
        module.cp_check_segments = check_segments


def apply_chunk_parallel(model: nn.Module, group: dist.ProcessGroup) -> nn.Module:
    """Make `model` (a Megalodon) compute one segment of each sequence, the segments spread over `group` in rank
    order. Call before `apply_fsdp`/`apply_ddp` and before building the optimizer. Returns the model."""
    for i, block in enumerate(model.layers):
        _swap(block.mega.timenorm, group, check_segments=i == 0)
        _swap(block.mega.cema, group)
    _swap(model.output.final_norm, group)
    return model


def local_segment(tensor: Tensor, group: dist.ProcessGroup, chunk_size: int, dim: int = 1) -> Tensor:
    """This rank's segment of a full-length tensor (input ids, labels, doc_start): equal parts along `dim`,
    each a multiple of chunk_size."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    length = tensor.shape[dim]
    if length % (size * chunk_size):
        raise ValueError(f"chunk parallel over {size} ranks needs a sequence length that is a multiple of "
                         f"{size} x chunk_size = {size * chunk_size}, got {length}")
    return tensor.narrow(dim, rank * (length // size), length // size)
