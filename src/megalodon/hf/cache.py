"""`MegalodonCache`: what `generate` carries between steps, a MegalodonState behind the cache interface.

transformers' own Cache classes assume per-layer key/value tensors that grow with the sequence. Megalodon's
stream state has a constant size (EMA state, norm statistics, the current partial chunk), so this class keeps
the whole MegalodonState and implements only what generation calls on a cache object.

generate's one-token steps run on the core's static decode path (inference/decoding.py's StaticDecoder: fixed
buffers written in place, no host sync, a CUDA graph on a GPU), not through forward(): the cache then holds
the state as a DecodeState, and gives it back as a MegalodonState when asked for `.state`.
"""

from __future__ import annotations

from torch import Tensor

from megalodon.decode_state import DecodeState
from megalodon.inference.decoding import StaticDecoder
from megalodon.state import MegalodonState


class MegalodonCache:
    """The stream state of every row, plus how many columns of the (padded) input it has consumed.

    `seen_tokens` counts columns of the padded batch, the quantity `generate` compares with `input_ids.shape[1]`
    to find the tokens not yet fed. Each row's own token count is `state.position`.
    """

    is_compileable = False  # generate must not compile around it: its steps replay their own CUDA graph
    is_croppable = False  # a recurrent state cannot be rewound to an earlier token

    def __init__(self, state: MegalodonState, seen_tokens: int):
        self._state: MegalodonState | None = state
        self._decoder: StaticDecoder | None = None  # while one-token steps run; then it holds the state
        self.seen_tokens = seen_tokens

    def __repr__(self) -> str:
        return (f"MegalodonCache(batch_size={self.batch_size}, seen_tokens={self.seen_tokens}, "
                f"nbytes={self._current.nbytes})")

    def __len__(self) -> int:
        return len(self._current.layers)

    @property
    def state(self) -> MegalodonState:
        """The stream so far. While decoding it lives in static buffers: reading it converts them back (a copy,
        and one host sync), and the next step starts a new decoder."""
        if self._decoder is not None:
            self._state, self._decoder = self._decoder.state.to_state(), None
        return self._state

    @state.setter
    def state(self, state: MegalodonState) -> None:
        self._state, self._decoder = state, None

    @property
    def _current(self) -> MegalodonState | DecodeState:
        return self._state if self._decoder is None else self._decoder.state

    # ---- what generation reads -------------------------------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    @property
    def batch_size(self) -> int:
        return self._current.batch_size

    @property
    def is_linear(self) -> list[bool]:
        # transformers' meaning: "recurrent state only". Each Megalodon layer also attends within its chunk.
        return [False] * len(self)

    # ---- what generation does to it --------------------------------------------------------------------------
    def advance(self, state: MegalodonState, new_tokens: int) -> None:
        self.state = state
        self.seen_tokens += new_tokens

    def decode_step(self, model, input_ids: Tensor) -> Tensor:
        """Feed one token per row, input_ids (B, 1), through the static decode path of `model` (the core, in eval
        mode); returns the logits (B, 1, V), a new tensor. The first step computes what the decode path derives
        from the weights (the CEMA decay, the q/k affine): after changing the weights, read `.state` (which ends
        the static steps) or start a new cache before stepping on."""
        if self._decoder is None or self._decoder.model is not model:
            self._decoder = StaticDecoder(model, DecodeState.from_state(self.state, model.config))
            self._state = None
        logits = self._decoder.step(input_ids[:, 0]).clone()  # a CUDA graph's output buffer is reused
        self.seen_tokens += 1
        return logits.unsqueeze(1)

    def reorder_cache(self, beam_idx: Tensor) -> None:
        """Beam search: new row i is old row beam_idx[i] (every state tensor is batch-first)."""
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: Tensor) -> None:
        if self._decoder is not None and indices.numel() == self.batch_size:
            self._decoder.state.reorder_(indices)  # in place: a CUDA graph keeps its buffers
        else:
            self.state = self.state.map(lambda t: t.index_select(0, indices.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.state = self.state.map(lambda t: t.repeat_interleave(repeats, dim=0))

    def crop(self, tokens: int) -> None:
        raise NotImplementedError("MegalodonCache cannot be cropped: the recurrent state keeps no per-token "
                                  "history to roll back to (assisted and speculative decoding need one)")
