"""Attention of one new token per row over a static key/value buffer: the decode step of both models.

A buffer (B, S, H, d) has a slot for every position a row may attend to: a chunk for Megalodon (S = chunk_size,
slot = position mod chunk), the whole stream for the Llama baseline (slot = position). The new token's key and
value are written at its row's slot, in place, and it attends to the slots first[b]..slot[b]; the others are
masked, whatever they hold (an earlier chunk's keys, or nothing yet). Shapes are the buffer's whatever the fill,
and nothing asks the GPU a question, so a CUDA graph or torch.compile can hold these steps.

The reference is attention over the valid prefix alone (tests/ops/test_static_kv.py, and each model's forward).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from megalodon.ops.attention import attend_visible, attention_path
from megalodon.ops.triton import use_triton


class SlotStep(NamedTuple):
    """Where one decode step writes and what it sees, the same in every layer: made once per step (slot_step)."""

    rows: Tensor  # (B,) 0..B-1
    slot: Tensor  # (B,) int64: the slot each row writes
    visible: Tensor  # (B, 1, 1, S) bool: the slots each row attends to, SDPA's mask layout


def slot_table(size: int, device: torch.device | str | None = None) -> Tensor:
    """(size, size) bool: row s marks the slots 0..s, which a row writing slot s attends to (first: 0)."""
    slots = torch.arange(size, device=device)
    return slots <= slots[:, None]


def slot_step(slot: Tensor, size: int, first: Tensor | None = None, table: Tensor | None = None) -> SlotStep:
    """Row b writes slot[b] of a (B, size, ...) buffer and attends to slots first[b]..slot[b] (first: 0).
    table: slot_table(size), made once by a decoder (a gather per step where the comparison costs two ops)."""
    if table is not None and first is None:
        visible = table[slot]  # B x S
    else:
        slots = torch.arange(size, device=slot.device)
        visible = slots <= slot[:, None]
        if first is not None:
            visible = visible & (slots >= first[:, None])
    return SlotStep(torch.arange(slot.shape[0], device=slot.device), slot, visible[:, None, None, :])


def write_slot_(buffer: Tensor, step: SlotStep, value: Tensor) -> None:
    """buffer[b, step.slot[b]] = value[b] for every row: buffer (B, S, H, d), value (B, H, d)."""
    buffer.index_put_((step.rows, step.slot), value.to(buffer.dtype))


def write_and_attend(q: Tensor, k: Tensor, v: Tensor, keys: Tensor, values: Tensor, step: SlotStep,
                     scale: float | None = None, silu_values: bool = False, gate: Tensor | None = None) -> Tensor:
    """write_slot_ of the new token's key k (B, 1, H, dk) and value v (B, 1, H, dv) (silu(v) if silu_values),
    then attend_slots: the whole of a decode step's attention, (B, 1, H, dv) in q's dtype; times silu(gate) if a
    gate (B, 1, H * dv) is given. On CUDA, where the head dims differ (Megalodon), two Triton kernels do all of
    it (ops/triton/static_kv.py)."""
    if (attention_path(q, values) == "materialized" and use_triton("static_kv", q, keys, values)
            and keys.is_contiguous() and values.is_contiguous()):
        from megalodon.ops.triton.static_kv import supports_buffers, write_and_attend_triton

        if supports_buffers(q, keys, values, gate):
            return write_and_attend_triton(q, k, v, keys, values, step.slot, step.visible,
                                           q.shape[-1] ** -0.5 if scale is None else scale, silu_values, gate)
    write_slot_(keys, step, k[:, 0])
    write_slot_(values, step, (F.silu(v) if silu_values else v)[:, 0])
    out = attend_slots(q, keys, values, step, scale)
    return out if gate is None else out * F.silu(gate).view(out.shape)


def attend_slots(q: Tensor, keys: Tensor, values: Tensor, step: SlotStep, scale: float | None = None) -> Tensor:
    """softmax(q k^T * scale) v over each row's visible slots (step.visible).

    q (B, 1, H, dk); keys (B, S, H, dk) and values (B, S, H, dv), already holding the new token at step.slot.
    scale None is 1/sqrt(dk). Returns (B, 1, H, dv) in q's dtype."""
    out = attend_visible(q.to(keys.dtype).transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                         step.visible, scale)
    return out.transpose(1, 2).to(q.dtype)
