"""Checks at the boundary shared by both architectures: token ids in, clear errors out.

A check of a value on an accelerator would make the host wait for the device on every call. So values are
checked eagerly on the CPU, where that costs nothing, and on a GPU (or inside a compiled graph) as an asynchronous
device assertion, which stops the stream with the same message when it fails and never waits for it otherwise.
Shapes and dtypes are always checked eagerly: they are known on the host.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def host_reads_free(tensor: Tensor) -> bool:
    """Whether the host can read tensor's values at no cost: on the CPU, outside a compiled graph. Anywhere else a
    read makes the host wait for the device, or breaks the graph. The one rule for every check of values; tests
    turn it off to run the CPU through the GPU's sync-free path (tests/test_host_syncs.py)."""
    return tensor.device.type == "cpu" and not torch.compiler.is_compiling()


def require(condition: Tensor, message: str, host_message: Callable[[], str] | None = None) -> None:
    """Raise ValueError(message) unless the bool tensor `condition` is True, without a host sync off the CPU.

    host_message: a more precise message (which element failed, say), computed only where the check runs on the
    host."""
    if host_reads_free(condition):
        if not bool(condition):
            raise ValueError(message if host_message is None else host_message())
    else:
        torch._assert_async(condition, message)


def check_token_ids(input_ids: Tensor, vocab_size: int) -> tuple[int, int]:
    """(batch, length) of a valid (B, L) tensor of int64 or int32 ids in [0, vocab_size); clear errors otherwise."""
    if not isinstance(input_ids, Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor of token ids, got {type(input_ids).__name__}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids must hold integer token ids as int64 (or int32), got dtype {input_ids.dtype}; "
                        "convert with input_ids.long()")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape (batch, length), got {tuple(input_ids.shape)}; "
                         "use input_ids.unsqueeze(0) for a single sequence")
    batch, length = input_ids.shape
    if batch == 0 or length == 0:
        raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)}): give at least one token")

    advice = "check that the tokenizer matches the model"

    def which() -> str:
        low, high = int(input_ids.min()), int(input_ids.max())
        return f"token id {low if low < 0 else high} is out of range for vocab_size={vocab_size}; {advice}"

    require(((input_ids >= 0) & (input_ids < vocab_size)).all(),
            f"a token id is out of range for vocab_size={vocab_size}; {advice}", which)
    return batch, length


def check_targets(targets: Tensor, batch: int, length: int, num_outputs: int, ignore_index: int) -> None:
    """A (B, L) int64 tensor of next-token ids in [0, num_outputs), or ignore_index where a position has none."""
    if not isinstance(targets, Tensor) or targets.dtype != torch.int64:
        kind = targets.dtype if isinstance(targets, Tensor) else type(targets).__name__
        raise TypeError(f"targets must be an int64 tensor of next-token ids, got {kind}")
    if targets.shape != (batch, length):
        raise ValueError(f"targets must have the input's shape {(batch, length)}: the token after each input "
                         f"position ({ignore_index} where there is none), got {tuple(targets.shape)}")
    require((((targets >= 0) & (targets < num_outputs)) | (targets == ignore_index)).all(),
            f"a target is out of range for {num_outputs} outputs (and not the ignored {ignore_index})")
