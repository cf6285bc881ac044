"""A decode step's attention over a static key/value buffer (ops/static_kv.py::write_and_attend) in two Triton
kernels, on CUDA, where the query/key and value head dims differ (Megalodon's; SDPA serves equal dims).

`slot_scores_kernel` (one program per row, head and block of slots) writes the new token's key and value
(silu(v) where asked) at its row's slot and computes its scores q . k over the block, rounded to the buffer's
dtype as the PyTorch path's product rounds them, -inf where the row does not see a slot (whose key it does not
read). `slot_values_kernel` (one program per row, head and block of value features) takes the softmax of the
row's scores in fp32, rounds the probabilities to the values' dtype (as the PyTorch path does before its
product with v) and sums them into its block of the output, reading the values of the slots up to the last one
the row sees (a step early in a chunk reads little of the buffer), and multiplies it by silu(gate) where a gate
is given (Megalodon's output gate). Unseen slots before that one (a row that sees first..slot with first > 0)
are read and weighted by zero: the buffers hold finite values (zeros until written); the stale slots after a
row's own, whatever they hold, are never read. Together they replace the two
slot writes, the SiLU of the values, both products, the mask, the softmax and its casts, and the gate's SiLU and
product: about ten launches per layer where the PyTorch path takes them one by one.

The slot written by the first kernel is read only by the second, which runs after it: no program reads what
another program of the same launch writes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from megalodon.ops.triton import LAUNCH, cdiv, next_power_of_2, on_input_device, opaque_op
from megalodon.ops.triton.casts import cast

# A step reads each layer's whole key buffer and the seen part of its value buffer (8 MiB at mega200M in bf16):
# both kernels split that over about a program per SM, so that no few programs stream it alone.
SCORE_SLOTS = 16  # slots per program of the score kernel (2,048 slots: 128 programs a row and head)
VALUE_SLOTS = 256  # slots per step of the value kernel's loop (a whole chunk of 2,048: 8 steps)
VALUE_TILE = 4096  # at most this many (slot, feature) partial sums a program of 4 warps (32 registers a thread)
PROGRAMS = 128  # what the value kernel aims at, over rows, heads and blocks of value features
MAX_SLOTS = 16384  # the value kernel holds a row's scores whole


@triton.jit
def slot_scores_kernel(q_ptr, k_ptr, v_ptr, keys_ptr, values_ptr, slot_ptr, visible_ptr, scores_ptr,
                       q_stride, k_stride, heads, slots, dk, dv, scale,
                       SILU_VALUES: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr,
                       BLOCK_V: tl.constexpr):
    bh = tl.program_id(0)
    block = tl.program_id(1)
    b = bh // heads
    h = bh % heads
    j = block * BLOCK_S + tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_K)
    slot = tl.load(slot_ptr + b)
    q = tl.load(q_ptr + b * q_stride + h * dk + d, mask=d < dk, other=0.0).to(tl.float32)
    new_key = cast(tl.load(k_ptr + b * k_stride + h * dk + d, mask=d < dk, other=0.0), keys_ptr.dtype.element_ty)
    rows = ((b * slots + j) * heads + h).to(tl.int64)
    seen = tl.load(visible_ptr + b * slots + j, mask=j < slots, other=0) != 0
    stale = seen & (j != slot)  # the keys to read: neither unseen (early in a chunk, most are) nor the new one
    keys = tl.load(keys_ptr + rows[:, None] * dk + d[None, :], mask=stale[:, None] & (d < dk)[None, :], other=0.0)
    keys = tl.where((j == slot)[:, None], new_key.to(tl.float32)[None, :], keys.to(tl.float32))
    scores = cast(tl.sum(keys * q[None, :], axis=1), keys_ptr.dtype.element_ty).to(tl.float32) * scale
    tl.store(scores_ptr + bh * slots + j, tl.where(seen, scores, float("-inf")), mask=j < slots)
    if (slot >= block * BLOCK_S) & (slot < block * BLOCK_S + BLOCK_S):  # this block holds the row's slot
        at = ((b * slots + slot) * heads + h).to(tl.int64)
        tl.store(keys_ptr + at * dk + d, new_key, mask=d < dk)
        for start in range(0, dv, BLOCK_V):
            e = start + tl.arange(0, BLOCK_V)
            value = tl.load(v_ptr + bh * dv + e, mask=e < dv, other=0.0).to(tl.float32)
            if SILU_VALUES:
                # silu as the PyTorch path computes it from v's dtype: in fp32, rounded once
                value = value * tl.sigmoid(value)
            tl.store(values_ptr + at * dv + e, cast(value, values_ptr.dtype.element_ty), mask=e < dv)


@triton.jit
def slot_values_kernel(scores_ptr, values_ptr, gate_ptr, out_ptr, gate_stride, heads, slots, dv,
                       GATED: tl.constexpr, BLOCK_ALL: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_V: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // heads
    h = bh % heads
    every = tl.arange(0, BLOCK_ALL)
    scores = tl.load(scores_ptr + bh * slots + every, mask=every < slots, other=float("-inf"))
    top = tl.max(scores, axis=0)  # the row's own slot is always seen: finite
    total = tl.sum(tl.exp(scores - top), axis=0)
    # the loop stops after the last seen slot: early in a chunk a step reads one block, not the whole buffer
    seen_end = tl.max(tl.where(scores > float("-inf"), every + 1, 0), axis=0)
    e = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    # one partial sum per (slot lane, feature), summed over the lanes once after the loop: a sum over the slots
    # at every step would cost each step shuffles and barriers between the warps
    acc = tl.zeros([BLOCK_S, BLOCK_V], dtype=tl.float32)
    for start in range(0, seen_end, BLOCK_S):
        j = start + tl.arange(0, BLOCK_S)
        rows = ((b * slots + j) * heads + h).to(tl.int64)
        # the values' loads do not wait for the scores (a mask made of p would make them): issued together, a
        # step waits for memory once
        in_range = (j < seen_end)[:, None] & (e < dv)[None, :]
        values = tl.load(values_ptr + rows[:, None] * dv + e[None, :], mask=in_range, other=0.0)
        s = tl.load(scores_ptr + bh * slots + j, mask=j < seen_end, other=float("-inf"))
        p = cast(tl.exp(s - top) / total, values_ptr.dtype.element_ty).to(tl.float32)  # 0 where unseen
        acc += p[:, None] * values.to(tl.float32)
    out = tl.sum(acc, axis=0)
    out = cast(cast(out, values_ptr.dtype.element_ty).to(tl.float32), out_ptr.dtype.element_ty).to(tl.float32)
    if GATED:  # out * silu(gate), each rounded as the PyTorch path's ops round them
        gate = tl.load(gate_ptr + b * gate_stride + h * dv + e, mask=e < dv, other=0.0).to(tl.float32)
        out = out * cast(gate * tl.sigmoid(gate), gate_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + bh * dv + e, cast(out, out_ptr.dtype.element_ty), mask=e < dv)


def supports_buffers(q: Tensor, keys: Tensor, values: Tensor, gate: Tensor | None = None) -> bool:
    """Whether the kernels take these tensors (the dtypes a GPU computes in, rows of scores a program holds)."""
    floats = (torch.float32, torch.bfloat16, torch.float16)
    return (all(t.dtype in floats for t in (q, keys, values) + (() if gate is None else (gate,)))
            and keys.shape[1] <= MAX_SLOTS)


def _heads_contiguous(t: Tensor) -> Tensor:
    """t (B, H, d) with each row's heads and features packed (any batch stride)."""
    return t if t.stride(2) == 1 and t.stride(1) == t.shape[2] else t.contiguous()


# ---- the custom ops -------------------------------------------------------------------------------------------

@opaque_op("megalodon::slot_scores", mutates_args=("keys", "values"))
@on_input_device
def slot_scores(q: Tensor, k: Tensor, v: Tensor, keys: Tensor, values: Tensor, slot: Tensor, visible: Tensor,
                scale: float, silu_values: bool) -> Tensor:
    """Writes k (B, H, dk) and v (B, H, dv; silu(v) if silu_values) at slot[b] of keys (B, S, H, dk) and values
    (B, S, H, dv), contiguous, and returns the scores (B * H, S) fp32 of q (B, H, dk) over every slot, scaled,
    -inf where visible (B, S) is False. q and k may be strided over the batch (slices of one projection)."""
    batch, slots, heads, dk = keys.shape
    dv = values.shape[-1]
    q, k = (_heads_contiguous(t) for t in (q, k))
    scores = q.new_empty(batch * heads, slots, dtype=torch.float32)
    slot_scores_kernel[(batch * heads, cdiv(slots, SCORE_SLOTS))](
        q, k, v.contiguous(), keys, values, slot, visible.contiguous(), scores, q.stride(0), k.stride(0),
        heads, slots, dk, dv, scale, SILU_VALUES=silu_values, BLOCK_S=SCORE_SLOTS,
        BLOCK_K=next_power_of_2(dk), BLOCK_V=64, **LAUNCH)
    return scores


def _value_block(rows: int, dv: int) -> int:
    """Value features per program of the value kernel: about PROGRAMS programs in all, 16 to 128 features each."""
    return min(128, max(16, next_power_of_2(cdiv(rows * dv, PROGRAMS))))


@slot_scores.register_fake
def _(q, k, v, keys, values, slot, visible, scale, silu_values):
    return q.new_empty(keys.shape[0] * keys.shape[2], keys.shape[1], dtype=torch.float32)


@opaque_op("megalodon::slot_values", mutates_args=())
@on_input_device
def slot_values(scores: Tensor, values: Tensor, gate: Tensor | None, out_dtype: torch.dtype) -> Tensor:
    """softmax(scores) v for each row and head: (B, H, dv) in out_dtype; times silu(gate) if a gate (B, H * dv)
    is given (its rows may be strided: a slice of one projection)."""
    batch, slots, heads, dv = values.shape
    out = values.new_empty(batch, heads, dv, dtype=out_dtype)
    block = _value_block(batch * heads, dv)
    if gate is not None and gate.stride(-1) != 1:
        gate = gate.contiguous()
    slot_values_kernel[(batch * heads, cdiv(dv, block))](
        scores, values, out if gate is None else gate, out, 0 if gate is None else gate.stride(0), heads, slots, dv,
        GATED=gate is not None, BLOCK_ALL=next_power_of_2(slots), BLOCK_S=min(VALUE_SLOTS, VALUE_TILE // block),
        BLOCK_V=block, **LAUNCH)
    return out


@slot_values.register_fake
def _(scores, values, gate, out_dtype):
    return values.new_empty(values.shape[0], values.shape[2], values.shape[3], dtype=out_dtype)


def write_and_attend_triton(q: Tensor, k: Tensor, v: Tensor, keys: Tensor, values: Tensor, slot: Tensor,
                            visible: Tensor, scale: float, silu_values: bool, gate: Tensor | None) -> Tensor:
    """The Triton path of `megalodon.ops.static_kv.write_and_attend`: q, k (B, 1, H, dk), v (B, 1, H, dv), the
    contiguous buffers, slot (B,), visible (B, 1, 1, S) and gate (B, 1, H * dv) or None. Returns (B, 1, H, dv)
    in q's dtype."""
    scores = slot_scores(q[:, 0], k[:, 0], v[:, 0], keys, values, slot, visible.flatten(1), scale, silu_values)
    return slot_values(scores, values, None if gate is None else gate[:, 0], q.dtype).unsqueeze(1)
