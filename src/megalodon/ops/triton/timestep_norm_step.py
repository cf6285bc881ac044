"""The TimestepNorm decode step in one Triton kernel (ops/timestep_norm.py, `timestep_norm_step`), for CUDA.

One program per row b, holding all of that token's D = G * DG features as a (BLOCK_G x BLOCK_DG) tile: the group
moments, spec section 5's Welford update of (count, mean, var) in float64, and y = (x - m) * rsqrt(v + eps) *
(weight + 1) + bias in fp32. The state is read before it is written and no other program touches the row, so the
update can be in place: `megalodon::timestep_norm_step_` mutates count/mean/var, a single launch with no host sync
and no allocation but y, as a CUDA graph of a decode step wants. It can write y a second time in the linears'
dtype (bf16), which the step's next GEMM reads, where a cast would be a launch of its own. Inference only (no
autograd).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from megalodon.ops.triton import LAUNCH, next_power_of_2, on_input_device, opaque_op
from megalodon.ops.triton.casts import cast


@triton.jit
def _step_kernel(x_ptr, count_ptr, mean_ptr, var_ptr, w_ptr, b_ptr, y_ptr, copy_ptr, D, G, DG, eps,
                 COPY: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_DG: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    groups = tl.arange(0, BLOCK_G)
    cols = tl.arange(0, BLOCK_DG)
    gmask = groups < G
    mask = gmask[:, None] & (cols < DG)[None, :]
    feats = groups[:, None] * DG + cols[None, :]
    x = tl.load(x_ptr + row * D + feats, mask=mask, other=0.0).to(tl.float32)
    mu = tl.sum(x, axis=1) / DG
    xc = tl.where(mask, x - mu[:, None], 0.0)
    s2 = tl.sum(xc * xc, axis=1) / DG

    count = tl.load(count_ptr + row) + 1
    mean0 = tl.load(mean_ptr + row * G + groups, mask=gmask, other=0.0)
    var0 = tl.load(var_ptr + row * G + groups, mask=gmask, other=1.0)
    c2 = 1.0 / count.to(tl.float64)
    c1 = 1.0 - c2
    delta = mu.to(tl.float64) - mean0
    mean = c1 * mean0 + c2 * mu.to(tl.float64)
    var = c1 * var0 + c2 * s2.to(tl.float64) + (c1 * delta) * (c2 * delta)

    scale = tl.load(w_ptr + feats, mask=mask, other=0.0).to(tl.float32) + 1.0
    shift = tl.load(b_ptr + feats, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.maximum(var.to(tl.float32), 0.0) + eps)
    y = (x - mean.to(tl.float32)[:, None]) * rstd[:, None] * scale + shift
    tl.store(y_ptr + row * D + feats, y, mask=mask)
    if COPY:  # y again in the linears' dtype, as a cast of y would round it
        tl.store(copy_ptr + row * D + feats, cast(y, copy_ptr.dtype.element_ty), mask=mask)
    tl.store(count_ptr + row, count)
    tl.store(mean_ptr + row * G + groups, mean, mask=gmask)
    tl.store(var_ptr + row * G + groups, var, mask=gmask)


@opaque_op("megalodon::timestep_norm_step_", mutates_args=("count", "mean", "var"))
@on_input_device
def timestep_norm_step_kernel(x: Tensor, count: Tensor, mean: Tensor, var: Tensor, weight: Tensor, bias: Tensor,
                              eps: float, copy_dtype: torch.dtype | None) -> tuple[Tensor, Tensor]:
    """x (B, D) contiguous; count (B,) int64, mean/var (B, G) float64 contiguous, updated in place; returns y
    (B, D) fp32 and y in copy_dtype (an empty tensor where copy_dtype is None)."""
    batch, dim = x.shape
    groups = mean.shape[-1]
    y = torch.empty(batch, dim, dtype=torch.float32, device=x.device)
    copy = y.new_empty((batch, dim) if copy_dtype is not None else (0,), dtype=copy_dtype or torch.float32)
    _step_kernel[(batch,)](x, count, mean, var, weight, bias, y, y if copy_dtype is None else copy, dim, groups,
                           dim // groups, eps, COPY=copy_dtype is not None, BLOCK_G=next_power_of_2(groups),
                           BLOCK_DG=next_power_of_2(dim // groups), **LAUNCH)
    return y, copy


@timestep_norm_step_kernel.register_fake
def _(x, count, mean, var, weight, bias, eps, copy_dtype):
    return (x.new_empty(x.shape, dtype=torch.float32),
            x.new_empty(x.shape if copy_dtype is not None else (0,), dtype=copy_dtype or torch.float32))
