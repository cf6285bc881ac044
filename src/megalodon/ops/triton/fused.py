"""The RMSNorm and the LayerNorm (ops/fused.py) in one Triton kernel for inference, on CUDA.

A decode step normalizes one row per token twice per layer: the CEMA output (RMSNorm, fp32 in, the linears'
dtype out) and the FFN's input (LayerNorm, the model's dtype in and out, statistics in fp32). On torch's path
that is a norm kernel with a cast on one side or both (two launches and three); here one program per row loads
it, takes its statistics in fp32, applies the affine in fp32 (Megalodon's scale = weight + 1 is computed once
per generation) and writes it in the dtype asked for, rounding once as the PyTorch path's final cast does.
Inference only: training keeps the paths that save what their backward needs.
"""

# No `from __future__ import annotations`: torch < 2.5 cannot read string annotations of a custom op.

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from megalodon.ops.triton import on_input_device
from megalodon.ops.triton.casts import cast

MAX_FEATURES = 16384  # a row is held whole by one program


@triton.jit
def norm_rows_kernel(x_ptr, scale_ptr, shift_ptr, out_ptr, features, eps,
                     CENTER: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    inside = cols < features
    x = tl.load(x_ptr + row * features + cols, mask=inside, other=0.0).to(tl.float32)
    if CENTER:  # LayerNorm: centred, biased variance
        x = tl.where(inside, x - tl.sum(x, axis=0) / features, 0.0)
    y = x / tl.sqrt(tl.sum(x * x, axis=0) / features + eps)
    if HAS_SCALE:
        y = y * tl.load(scale_ptr + cols, mask=inside, other=0.0).to(tl.float32)
    if HAS_SHIFT:
        y = y + tl.load(shift_ptr + cols, mask=inside, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * features + cols, cast(y, out_ptr.dtype.element_ty), mask=inside)


def supports_rows(x: Tensor, *params: Optional[Tensor]) -> bool:
    """Whether the kernel takes x and its scale and shift (the dtypes a GPU computes in, rows one program
    holds)."""
    floats = (torch.float32, torch.bfloat16, torch.float16)
    return (x.dtype in floats and 0 < x.shape[-1] <= MAX_FEATURES
            and all(p is None or p.dtype in floats for p in params))


@torch.library.custom_op("megalodon::norm_rows", mutates_args=())
@on_input_device
def norm_rows(x: Tensor, scale: Optional[Tensor], shift: Optional[Tensor], eps: float, center: bool,
              out_dtype: torch.dtype) -> Tensor:
    """Each row of x (..., F) normalized (centred first if center: LayerNorm; else RMSNorm) in fp32, times scale
    and plus shift ((F,) each, taken in fp32; either may be None), in out_dtype."""
    features = x.shape[-1]
    x = x.contiguous()
    out = torch.empty_like(x, dtype=out_dtype)
    block = triton.next_power_of_2(features)
    if x.numel():
        norm_rows_kernel[(x.numel() // features,)](
            x, x if scale is None else scale.contiguous(), x if shift is None else shift.contiguous(), out, features,
            eps, CENTER=center, HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None, BLOCK=block,
            num_warps=4 if block <= 2048 else 8 if block <= 8192 else 16)
    return out


@norm_rows.register_fake
def _(x, scale, shift, eps, center, out_dtype):
    return torch.empty_like(x, dtype=out_dtype, memory_format=torch.contiguous_format)
