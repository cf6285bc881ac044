"""The masked softmax of a chunk's materialized attention (ops/attention.py::materialized_attention) in one Triton
kernel each way, on CUDA.

Each row of scores (N, H, Sq, Sk) belongs to query i = row mod Sq, which sees keys 0..i + offset. Forward reads
the visible part of the row (the rest is never read: about half of a chunk's scores), takes the softmax in fp32
and writes the probabilities, zeros where masked, in the values' dtype: one pass where the PyTorch path builds a
mask, fills the scores, upcasts, normalizes and casts back (six launches, three of them over fp32 copies).

Backward recomputes the probabilities from the scores (as the PyTorch path does: nothing of size chunk x chunk is
kept) and takes the scores' gradient from them and from dP = dO V^T:
    dS = P * (dP - rowsum(dP * P)),
writing P (for dV = P^T dO) and dS in one pass where the PyTorch path takes about a dozen launches.

The arithmetic is the PyTorch path's: scores in their dtype, everything after them in fp32, the outputs rounded
once. A row is held whole in registers, so rows longer than MAX_KEYS keys stay on the PyTorch path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from megalodon.ops.triton import LAUNCH, next_power_of_2, on_input_device, opaque_op
from megalodon.ops.triton.casts import cast

MAX_KEYS = 16384  # the longest row a program holds (a chunk's keys; chunks are at most a few thousand tokens)


@triton.jit
def _visible_probabilities(scores_ptr, row, queries, keys, offset, BLOCK: tl.constexpr):
    """The row's keys, which of them its query sees, and its softmax (fp32, zero where masked)."""
    cols = tl.arange(0, BLOCK)
    visible = (cols <= row % queries + offset) & (cols < keys)
    x = tl.load(scores_ptr + row.to(tl.int64) * keys + cols, mask=visible, other=float("-inf")).to(tl.float32)
    e = tl.exp(x - tl.max(x, axis=0))  # key 0 is always visible: the max is finite
    return cols, visible, e / tl.sum(e, axis=0)


@triton.jit
def causal_softmax_fwd_kernel(scores_ptr, probs_ptr, queries, keys, offset, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols, _, probs = _visible_probabilities(scores_ptr, row, queries, keys, offset, BLOCK)
    tl.store(probs_ptr + row.to(tl.int64) * keys + cols, cast(probs, probs_ptr.dtype.element_ty), mask=cols < keys)


@triton.jit
def causal_softmax_bwd_kernel(scores_ptr, grad_probs_ptr, probs_ptr, grad_scores_ptr, queries, keys, offset,
                              BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols, visible, probs = _visible_probabilities(scores_ptr, row, queries, keys, offset, BLOCK)
    at = row.to(tl.int64) * keys + cols
    grad_probs = tl.load(grad_probs_ptr + at, mask=visible, other=0.0).to(tl.float32)
    grad_scores = probs * (grad_probs - tl.sum(grad_probs * probs, axis=0))
    tl.store(probs_ptr + at, cast(probs, probs_ptr.dtype.element_ty), mask=cols < keys)
    tl.store(grad_scores_ptr + at, cast(grad_scores, grad_scores_ptr.dtype.element_ty), mask=cols < keys)


def supports_scores(scores: Tensor) -> bool:
    """Whether the kernels take these scores (the dtypes a GPU computes in, rows that fit a program)."""
    return scores.dtype in (torch.float32, torch.bfloat16, torch.float16) and 0 < scores.shape[-1] <= MAX_KEYS


def _launch(kernel, tensors: list[Tensor], offset: int) -> None:
    """One program per row of tensors[0], the scores (..., Sq, Sk)."""
    *_, queries, keys = tensors[0].shape
    block = next_power_of_2(keys)
    warps = 4 if block <= 1024 else 8 if block <= 4096 else 16
    if tensors[0].numel():
        kernel[(tensors[0].numel() // keys,)](*tensors, queries, keys, offset, BLOCK=block, num_warps=warps, **LAUNCH)


@opaque_op("megalodon::causal_softmax_fwd", mutates_args=())
@on_input_device
def causal_softmax_fwd(scores: Tensor, offset: int, out_dtype: torch.dtype) -> Tensor:
    """softmax(scores + causal mask) over the last dim, in fp32, returned in out_dtype. scores: (..., Sq, Sk);
    query i sees keys 0..i + offset."""
    scores = scores.contiguous()
    probs = torch.empty_like(scores, dtype=out_dtype)
    _launch(causal_softmax_fwd_kernel, [scores, probs], offset)
    return probs


@causal_softmax_fwd.register_fake
def _(scores, offset, out_dtype):
    return torch.empty_like(scores, dtype=out_dtype, memory_format=torch.contiguous_format)


@opaque_op("megalodon::causal_softmax_bwd", mutates_args=())
@on_input_device
def causal_softmax_bwd(scores: Tensor, grad_probs: Tensor, offset: int) -> tuple[Tensor, Tensor]:
    """The probabilities again (in grad_probs' dtype) and the scores' gradient (in their dtype), from the scores
    and the gradient of the probabilities."""
    scores, grad_probs = scores.contiguous(), grad_probs.contiguous()
    probs = torch.empty_like(grad_probs)
    grad_scores = torch.empty_like(scores)
    _launch(causal_softmax_bwd_kernel, [scores, grad_probs, probs, grad_scores], offset)
    return probs, grad_scores


@causal_softmax_bwd.register_fake
def _(scores, grad_probs, offset):
    return (torch.empty_like(grad_probs, memory_format=torch.contiguous_format),
            torch.empty_like(scores, memory_format=torch.contiguous_format))
