"""The static decode state: a stream's state in fixed buffers that a single-token step updates in place.

`MegalodonState` (state.py) is what calls exchange: its key cache holds exactly the current partial chunk, so
its shape changes with every token. A decode step that a CUDA graph can replay needs the opposite: buffers
allocated once, written in place, and no shape that depends on data. `DecodeState` is that form of the same
state (spec section 16's batched decode with per-row fill):

- per layer, a (B, C, H, dz) key buffer and a (B, C, H, dv) value buffer (C = chunk_size): row b's current chunk
  fills slots 0..fill_b - 1, fill_b = position_b mod C. A step writes slot fill_b and attends to slots <= fill_b;
  a row whose fill reaches C starts its next chunk empty simply by writing slot 0 again (the rest is masked).
- per layer, the CEMA state as real pairs (B, D, N, 2) and the TimestepNorm statistics (count, mean, var);
- the final norm's statistics, and the positions (B,).

Conversions both ways: prefill produces a MegalodonState, `DecodeState.from_state` continues it, and
`to_state` gives a MegalodonState back (for sessions, or another prefill). `Megalodon.decode_step_` is the step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from megalodon.config import MegalodonConfig
from megalodon.ops.timestep_norm import STATS_DTYPE, NormStats
from megalodon.state import LayerState, MegalodonState
from megalodon.validation import host_reads_free


@dataclass
class DecodeLayerState:
    """One MEGA layer's static buffers."""

    norm: NormStats  # count (B,) int64, mean and var (B, G) float64
    cema_h: Tensor  # B x D x N x 2: the CEMA state as real pairs (fp32; float64 for a float64 model)
    keys: Tensor  # B x C x H x dz: rotated keys of each row's current chunk in slots 0..fill-1
    values: Tensor  # B x C x H x dv

    def tensors(self) -> list[Tensor]:
        return [*self.norm, self.cema_h, self.keys, self.values]

    def map(self, fn: Callable[[Tensor], Tensor]) -> "DecodeLayerState":
        return DecodeLayerState(NormStats(*(fn(t) for t in self.norm)), fn(self.cema_h), fn(self.keys),
                                fn(self.values))


@dataclass
class DecodeState:
    layers: list[DecodeLayerState]
    final_norm: NormStats
    position: Tensor  # B int64: tokens seen by each row

    @property
    def batch_size(self) -> int:
        return self.position.shape[0]

    @property
    def chunk_size(self) -> int:
        return self.layers[0].keys.shape[1]

    @property
    def device(self) -> torch.device:
        return self.position.device

    def tensors(self) -> list[Tensor]:
        return [t for layer in self.layers for t in layer.tensors()] + [*self.final_norm, self.position]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def map(self, fn: Callable[[Tensor], Tensor]) -> "DecodeState":
        return DecodeState([layer.map(fn) for layer in self.layers], NormStats(*(fn(t) for t in self.final_norm)),
                           fn(self.position))

    # ---- conversions -----------------------------------------------------------------------------------------
    @classmethod
    def from_state(cls, state: MegalodonState, config: MegalodonConfig) -> "DecodeState":
        """Static buffers holding a copy of `state` (from prefill, a session, or MegalodonState.stack)."""
        if not isinstance(state, MegalodonState):
            raise TypeError(f"DecodeState.from_state needs a MegalodonState, got {type(state).__name__}")
        if not state.layers:
            raise ValueError("the state has no layers")
        state.check_compatible(config, state.batch_size)
        if bool((state.position < 0).any()):  # once per decode, not per step: the sync is affordable here
            raise ValueError(f"state.position must count tokens seen (>= 0), got {state.position.tolist()}")
        chunk = config.chunk_size

        def buffer(cache: Tensor) -> Tensor:  # B x c x H x d -> B x C x H x d, the first c slots filled
            out = cache.new_zeros(cache.shape[0], chunk, *cache.shape[2:])
            out[:, :cache.shape[1]] = cache
            return out

        def stats(norm: NormStats) -> NormStats:  # the in-place norm step wants int64 / float64, contiguous
            return NormStats(norm.count.to(torch.int64).clone(), norm.mean.to(STATS_DTYPE).clone(),
                             norm.var.to(STATS_DTYPE).clone())

        layers = [DecodeLayerState(stats(layer.norm), torch.view_as_real(layer.cema_h).clone(),
                                   buffer(layer.k_cache), buffer(layer.v_cache)) for layer in state.layers]
        return cls(layers, stats(state.final_norm), state.position.clone())

    def to_state(self) -> MegalodonState:
        """A MegalodonState copy. Rows at different fills share a cache right-padded to the longest (as
        MegalodonState.stack makes them); the entries beyond a row's own fill are never read."""
        keep = int((self.position % self.chunk_size).max())
        layers = [LayerState(torch.view_as_complex(layer.cema_h.clone()), NormStats(*(t.clone() for t in layer.norm)),
                             layer.keys[:, :keep].clone(), layer.values[:, :keep].clone()) for layer in self.layers]
        return MegalodonState(layers, NormStats(*(t.clone() for t in self.final_norm)), self.position.clone())

    # ---- whole-state operations (outside the step) -----------------------------------------------------------
    def clone(self) -> "DecodeState":
        return self.map(torch.clone)

    def copy_(self, other: "DecodeState") -> None:
        """Overwrite these buffers with other's values, in place (the addresses a CUDA graph holds stay)."""
        for mine, theirs in zip(self.tensors(), other.tensors(), strict=True):
            mine.copy_(theirs)

    def select(self, rows: list[int] | Tensor) -> "DecodeState":
        """New buffers holding only the given rows (for dropping finished rows from a batch)."""
        index = torch.as_tensor(rows, dtype=torch.int64, device=self.device)
        if index.dim() != 1 or index.numel() == 0:
            raise ValueError(f"select needs a non-empty 1-D list of rows, got {rows!r}")
        return self.map(lambda t: t.index_select(0, index))

    def reorder_(self, rows: Tensor) -> None:
        """Row i takes old row rows[i]'s values, every row at once and in place (beam search): the buffers,
        which a CUDA graph holds, stay where they are. rows: (B,) int64, repeats allowed."""
        if rows.shape != (self.batch_size,):
            raise ValueError(f"reorder_ needs one source row per row, shape ({self.batch_size},), "
                             f"got {tuple(rows.shape)}; use select() to change the batch size")
        self.copy_(self.select(rows))

    def replace_norm_stats_(self, row: int, source: MegalodonState) -> None:
        """Overwrite row's norm statistics (every layer's and the final norm's) with those of source, a state of
        one row: the truncate_chunks rerun (inference/stream.py). CEMA states and keys stay."""
        targets = [layer.norm for layer in self.layers] + [self.final_norm]
        sources = [layer.norm for layer in source.layers] + [source.final_norm]
        for target, fresh in zip(targets, sources, strict=True):
            for buffer, value in zip(target, fresh):
                buffer[row].copy_(value[0])


def check_decode_ids(input_ids: Tensor, batch_size: int, vocab_size: int) -> None:
    """Shape and dtype of a decode step's input (B,), checked without reading the values on a GPU: that would
    stall the step. Values are checked when the ids are on the CPU; the sampler makes in-range ids."""
    if not isinstance(input_ids, Tensor) or input_ids.dtype != torch.int64 or input_ids.shape != (batch_size,):
        found = (f"{input_ids.dtype} {tuple(input_ids.shape)}" if isinstance(input_ids, Tensor)
                 else type(input_ids).__name__)
        raise ValueError(f"a decode step takes one int64 token id per row, shape ({batch_size},), got {found}")
    if host_reads_free(input_ids) and bool(((input_ids < 0) | (input_ids >= vocab_size)).any()):
        raise ValueError(f"token ids must lie in [0, {vocab_size}), got {input_ids.tolist()}")


__all__ = ["DecodeLayerState", "DecodeState", "check_decode_ids"]
