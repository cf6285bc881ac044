"""Row norms for inference and the SiLU gate of ops/fused.py, each in one Triton kernel, on CUDA.

Row norms. A decode step normalizes one row per token twice per layer: the CEMA output (RMSNorm, fp32 in, the
linears' dtype out) and the FFN's input (LayerNorm, the model's dtype in and out, statistics in fp32). On torch's
path that is a norm kernel with a cast on one side or both (two launches and three); here one program per row
loads it, takes its statistics in fp32, applies the affine in fp32 (Megalodon's scale = weight + 1 is computed
once per generation) and writes it in the dtype asked for, rounding once as the PyTorch path's final cast does.
Inference only: training keeps the paths that save what their backward needs.

SiLU gate. The gated linear (the MEGA layer's output, the FFN's SwiGLU) multiplies x by silu(gate) before its
GEMM and recomputes that product in backward. Op by op that is two kernels forward (silu, then the product) and
five backward (silu, product, two products for the two gradients, silu's backward): at mega200M and 4K tokens
about 0.7 GB of memory traffic a layer. Here it is one kernel each way: forward reads x and the gate and writes
the product; backward reads x, the gate and the product's gradient and writes the product again (its GEMM needs
it) and both gradients, all in fp32 registers, each output rounded once. Eager mode only: inside a compiled graph
Inductor fuses the same ops itself (and with their neighbours), so ops/fused.py keeps torch's ops there.
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


# ---- the SiLU gate -----------------------------------------------------------------------------------------------
GATE_BLOCK = 1024  # columns per program (4 warps: 8 a thread)


@triton.jit
def silu_gate_kernel(x_ptr, gate_ptr, out_ptr, cols, stride_x, stride_gate, HAS_X: tl.constexpr,
                     BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < cols
    gate = tl.load(gate_ptr + row * stride_gate + offs, mask=inside, other=0.0).to(tl.float32)
    hidden = gate * tl.sigmoid(gate)
    if HAS_X:
        hidden = hidden * tl.load(x_ptr + row * stride_x + offs, mask=inside, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * cols + offs, cast(hidden, out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def silu_gate_bwd_kernel(x_ptr, gate_ptr, grad_ptr, hidden_ptr, dx_ptr, dgate_ptr, cols, stride_x, stride_gate,
                         stride_grad, HAS_X: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < cols
    gate = tl.load(gate_ptr + row * stride_gate + offs, mask=inside, other=0.0).to(tl.float32)
    grad = tl.load(grad_ptr + row * stride_grad + offs, mask=inside, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    act = gate * sig
    out = row * cols + offs
    if HAS_X:
        x = tl.load(x_ptr + row * stride_x + offs, mask=inside, other=0.0).to(tl.float32)
        tl.store(hidden_ptr + out, cast(x * act, hidden_ptr.dtype.element_ty), mask=inside)
        tl.store(dx_ptr + out, cast(grad * act, dx_ptr.dtype.element_ty), mask=inside)
        grad = grad * x
    else:
        tl.store(hidden_ptr + out, cast(act, hidden_ptr.dtype.element_ty), mask=inside)
    # d silu(g) / dg = s (1 + g (1 - s))
    tl.store(dgate_ptr + out, cast(grad * sig * (1.0 + gate * (1.0 - sig)), dgate_ptr.dtype.element_ty),
             mask=inside)


def _rows(t: Tensor, cols: int) -> tuple[Tensor, int]:
    """t (..., cols) as rows of `cols` with a row stride: a column slice of a wider tensor (the gate, cut from the
    joined projection) is read in place, anything else that is not row-contiguous is copied."""
    rows = t.reshape(-1, cols) if t.dim() != 2 else t
    if rows.stride(-1) != 1 or (rows.shape[0] > 1 and rows.stride(0) < cols):
        rows = rows.contiguous()
    return rows, rows.stride(0)


@on_input_device
def silu_gate(gate: Tensor, x: Optional[Tensor]) -> Tensor:
    """x * silu(gate) (silu(gate) when x is None) in gate's dtype, computed in fp32: one launch. x, if given, has
    gate's shape; the result is contiguous. (The gate comes first: the launch runs on its GPU.)"""
    cols = gate.shape[-1]
    gate_rows, stride_gate = _rows(gate, cols)
    x_rows, stride_x = (gate_rows, 0) if x is None else _rows(x, cols)
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if out.numel():
        grid = (gate_rows.shape[0], triton.cdiv(cols, GATE_BLOCK))
        silu_gate_kernel[grid](x_rows, gate_rows, out, cols, stride_x, stride_gate, HAS_X=x is not None,
                               BLOCK=GATE_BLOCK, num_warps=4)
    return out


@on_input_device
def silu_gate_backward(gate: Tensor, x: Optional[Tensor], grad: Tensor
                       ) -> tuple[Tensor, Optional[Tensor], Tensor]:
    """For hidden = x * silu(gate) and the gradient `grad` of hidden: (hidden, dL/dx or None, dL/dgate), in
    gate's, x's and gate's dtypes, one launch. hidden is made again here for the GEMM's weight gradient."""
    cols = gate.shape[-1]
    gate_rows, stride_gate = _rows(gate, cols)
    grad_rows, stride_grad = _rows(grad, cols)
    x_rows, stride_x = (gate_rows, 0) if x is None else _rows(x, cols)
    hidden = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    dx = None if x is None else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dgate = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if hidden.numel():
        grid = (gate_rows.shape[0], triton.cdiv(cols, GATE_BLOCK))
        silu_gate_bwd_kernel[grid](x_rows, gate_rows, grad_rows, hidden, hidden if dx is None else dx, dgate, cols,
                                   stride_x, stride_gate, stride_grad, HAS_X=x is not None, BLOCK=GATE_BLOCK,
                                   num_warps=4)
    return hidden, dx, dgate
