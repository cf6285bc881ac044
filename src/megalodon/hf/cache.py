"""`MegalodonCache`: what `generate` carries between steps, a MegalodonState behind the cache interface.

transformers' own Cache classes assume per-layer key/value tensors that grow with the sequence. Megalodon's
stream state has a constant size (EMA state, norm statistics, the current partial chunk), so this class keeps
the whole MegalodonState and implements only what generation calls on a cache object.
"""

from __future__ import annotations

from torch import Tensor

from megalodon.state import MegalodonState


class MegalodonCache:
    """The stream state of every row, plus how many columns of the (padded) input it has consumed.

    `seen_tokens` counts columns of the padded batch, the quantity `generate` compares with `input_ids.shape[1]`
    to find the tokens not yet fed. Each row's own token count is `state.position`.
    """

    is_compileable = False  # the state changes shape and the prefill loops over rows: no static cache here
    is_croppable = False  # a recurrent state cannot be rewound to an earlier token

    def __init__(self, state: MegalodonState, seen_tokens: int):
        self.state = state
        self.seen_tokens = seen_tokens

    def __repr__(self) -> str:
        return (f"MegalodonCache(batch_size={self.batch_size}, seen_tokens={self.seen_tokens}, "
                f"nbytes={self.state.nbytes})")

    def __len__(self) -> int:
        return len(self.state.layers)

    # ---- what generation reads -------------------------------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    @property
    def batch_size(self) -> int:
        return self.state.batch_size

    @property
    def is_linear(self) -> list[bool]:
        # transformers' meaning: "recurrent state only". Each Megalodon layer also attends within its chunk.
        return [False] * len(self.state.layers)

    # ---- what generation does to it --------------------------------------------------------------------------
    def advance(self, state: MegalodonState, new_tokens: int) -> None:
        self.state = state
        self.seen_tokens += new_tokens

    def reorder_cache(self, beam_idx: Tensor) -> None:
        """Beam search: new row i is old row beam_idx[i] (every state tensor is batch-first)."""
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: Tensor) -> None:
        self.state = self.state.map(lambda t: t.index_select(0, indices.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.state = self.state.map(lambda t: t.repeat_interleave(repeats, dim=0))

    def crop(self, tokens: int) -> None:
        raise NotImplementedError("MegalodonCache cannot be cropped: the recurrent state keeps no per-token "
                                  "history to roll back to (assisted and speculative decoding need one)")
