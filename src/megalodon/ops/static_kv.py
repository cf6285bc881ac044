"""Attention of one new token per row over a static key/value buffer: the decode step of both models.

A buffer (B, S, H, d) has a slot for every position a row may attend to: a chunk for Megalodon (S = chunk_size,
slot = position mod chunk), the whole stream for the Llama baseline (slot = position). The new token's key and
value are written at its row's slot, in place, and it attends to the slots first[b]..slot[b]; the others are
masked, whatever they hold (an earlier chunk's keys, or nothing yet). Shapes are the buffer's whatever the fill,
and nothing asks the GPU a question, so a CUDA graph or torch.compile can hold these steps.

The reference is attention over the valid prefix alone (tests/ops/test_static_kv.py, and each model's forward).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def write_slot_(buffer: Tensor, slot: Tensor, value: Tensor) -> None:
    """buffer[b, slot[b]] = value[b] for every row: buffer (B, S, H, d), slot (B,) int64, value (B, H, d)."""
    rows = torch.arange(buffer.shape[0], device=buffer.device)
    buffer.index_put_((rows, slot), value.to(buffer.dtype))


def attend_slots(q: Tensor, keys: Tensor, values: Tensor, last: Tensor, first: Tensor | None = None,
                 scale: float | None = None) -> Tensor:
    """softmax(q k^T * scale) v over the slots first[b]..last[b] of each row (first defaults to 0).

    q (B, 1, H, dk); keys (B, S, H, dk) and values (B, S, H, dv), already holding the new token at last[b].
    scale None is 1/sqrt(dk). Runs in the buffers' dtype; returns (B, 1, H, dv) in q's dtype."""
    slots = torch.arange(keys.shape[1], device=keys.device)
    visible = slots <= last[:, None]  # B x S
    if first is not None:
        visible = visible & (slots >= first[:, None])
    out = F.scaled_dot_product_attention(q.to(keys.dtype).transpose(1, 2), keys.transpose(1, 2),
                                         values.transpose(1, 2), attn_mask=visible[:, None, None, :], scale=scale)
    return out.transpose(1, 2).to(q.dtype)
