"""Checks at the boundary shared by both architectures: token ids in, clear errors out."""

from __future__ import annotations

import torch
from torch import Tensor


def check_token_ids(input_ids: Tensor, vocab_size: int) -> tuple[int, int]:
    """(batch, length) of a valid (B, L) tensor of ids in [0, vocab_size); clear errors otherwise."""
    if not isinstance(input_ids, Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor of token ids, got {type(input_ids).__name__}")
    if input_ids.dtype == torch.bool or input_ids.dtype.is_floating_point or input_ids.is_complex():
        raise TypeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape (batch, length), got {tuple(input_ids.shape)}; "
                         "use input_ids.unsqueeze(0) for a single sequence")
    batch, length = input_ids.shape
    if batch == 0 or length == 0:
        raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)}): give at least one token")
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"token id {bad} is out of range for vocab_size={vocab_size}; "
                         "check that the tokenizer matches the model")
    return batch, length
