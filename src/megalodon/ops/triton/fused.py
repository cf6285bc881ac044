"""Row norms for inference and the SiLU gate of ops/fused.py, each in one Triton kernel, on CUDA.

Row norms. A layer normalizes each token's row twice: the CEMA output (RMSNorm, fp32 in, the linears' dtype
out) and the FFN's input (LayerNorm, fp32 in training, the model's dtype in decode; statistics in fp32). On
torch's path that is a norm kernel with a cast on one side or both (two launches and three each way in
training); here one program per row loads it, takes its statistics in fp32, applies the affine in fp32
(Megalodon's scale = weight + 1 is computed once per generation in decode) and writes it in the dtype asked for,
rounding once as the PyTorch path's final cast does. For training it also stores each row's mean and 1 / std,
and the backward reads the output's gradient in its own dtype (bf16 under autocast, which torch's kernels take
only after a cast to fp32), writes x's gradient in x's dtype, and sums the affine's gradients per block of rows.

SiLU gate. The gated linear (the MEGA layer's output, the FFN's SwiGLU) multiplies x by silu(gate) before its
GEMM and recomputes that product in backward. Op by op that is two kernels forward (silu, then the product) and
five backward (silu, product, two products for the two gradients, silu's backward): at mega200M and 4K tokens
about 0.7 GB of memory traffic a layer. Here it is one kernel each way: forward reads x and the gate and writes
the product; backward reads x, the gate and the product's gradient and writes the product again (its GEMM needs
it) and both gradients, all in fp32 registers, each output rounded once. Wherever the code runs eagerly: in eager
mode, and in the forward of the gated linear's node of a compiled graph (ops/fused.py); traced, the gate is torch's
ops, which Inductor fuses itself.

A GEMM that adds into its output, for decode steps (ops/fused.py's add_linear_: out += x @ weight^T, a few rows).
On an H200 cuBLAS ran the decode's two such GEMMs a layer (1,024 outputs from 2,048 or 2,560 features) at 13 µs,
about 0.4 TB/s of weights read, a third of a mega200M decode step: with one row, 1,024 outputs make few tiles for
132 SMs. Here a program takes ADD_LINEAR_BLOCK outputs for every row (one: 1,024 programs of 4 warps, about 8 an
SM, to keep enough weight loads in flight), streams their weight rows once in tiles of up to ADD_LINEAR_TILE
features (one 16-byte load a thread a tile), sums in fp32, and adds into out, rounding once as cuBLAS does (beta =
1). In the sm_90 SASS its loop is the two loads and the multiply-adds: no shared memory, no barrier.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from megalodon.ops.triton import LAUNCH, cdiv, next_power_of_2, on_input_device, opaque_op
from megalodon.ops.triton.casts import cast

MAX_FEATURES = 16384  # a row is held whole by one program
# add_linear: outputs a program, features a tile (at most), rows at most (more: cuBLAS, whose tiles then fill the GPU)
ADD_LINEAR_BLOCK, ADD_LINEAR_TILE, ADD_LINEAR_MAX_ROWS = 1, 1024, 8


@triton.jit
def norm_rows_kernel(x_ptr, scale_ptr, shift_ptr, out_ptr, mean_ptr, rstd_ptr, features, eps,
                     CENTER: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
                     SAVE_STATS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    inside = cols < features
    x = tl.load(x_ptr + row * features + cols, mask=inside, other=0.0).to(tl.float32)
    if CENTER:  # LayerNorm: centred, biased variance
        mean = tl.sum(x, axis=0) / features
        x = tl.where(inside, x - mean, 0.0)
        if SAVE_STATS:
            tl.store(mean_ptr + row, mean)
    root = tl.sqrt(tl.sum(x * x, axis=0) / features + eps)
    if SAVE_STATS:
        tl.store(rstd_ptr + row, 1.0 / root)
    y = x / root
    if HAS_SCALE:
        y = y * tl.load(scale_ptr + cols, mask=inside, other=0.0).to(tl.float32)
    if HAS_SHIFT:
        y = y + tl.load(shift_ptr + cols, mask=inside, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * features + cols, cast(y, out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def norm_rows_bwd_kernel(x_ptr, grad_ptr, scale_ptr, mean_ptr, rstd_ptr, dx_ptr, partial_ptr, rows, features,
                         rows_per_program, CENTER: tl.constexpr, HAS_SCALE: tl.constexpr,
                         PARAM_GRADS: tl.constexpr, BLOCK: tl.constexpr):
    """dx for a block of rows, and the block's sums of grad * xhat (the scale's gradient) and of grad (the
    shift's), which the caller adds up over the blocks: no atomics, so the sums do not depend on timing."""
    program = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    inside = cols < features
    scale = 1.0
    if HAS_SCALE:
        scale = tl.load(scale_ptr + cols, mask=inside, other=0.0).to(tl.float32)
    sum_scale = tl.zeros([BLOCK], tl.float32)
    sum_shift = tl.zeros([BLOCK], tl.float32)
    for i in range(rows_per_program):
        row = program.to(tl.int64) * rows_per_program + i
        here = cols < tl.where(row < rows, features, 0)  # nothing of a row past the end
        x = tl.load(x_ptr + row * features + cols, mask=here, other=0.0).to(tl.float32)
        grad = tl.load(grad_ptr + row * features + cols, mask=here, other=0.0).to(tl.float32)
        last = tl.minimum(row, rows - 1)  # a row past the end (the last block's) reads the last row's statistics
        rstd = tl.load(rstd_ptr + last)
        if CENTER:
            x = x - tl.load(mean_ptr + last)
        xhat = tl.where(here, x * rstd, 0.0)
        if PARAM_GRADS:
            sum_scale += grad * xhat
            sum_shift += grad
        g = grad * scale
        # d/dx of xhat * scale: rstd (g - xhat mean(g xhat)), less mean(g) when centred
        dx = g - xhat * (tl.sum(g * xhat, axis=0) / features)
        if CENTER:
            dx = dx - tl.sum(g, axis=0) / features
        tl.store(dx_ptr + row * features + cols, cast(dx * rstd, dx_ptr.dtype.element_ty), mask=here)
    if PARAM_GRADS:
        tl.store(partial_ptr + program * features + cols, sum_scale, mask=inside)
        tl.store(partial_ptr + (tl.num_programs(0) + program) * features + cols, sum_shift, mask=inside)


def supports_rows(x: Tensor, *params: Tensor | None) -> bool:
    """Whether the kernel takes x and its scale and shift (the dtypes a GPU computes in, rows one program
    holds)."""
    floats = (torch.float32, torch.bfloat16, torch.float16)
    return (x.dtype in floats and 0 < x.shape[-1] <= MAX_FEATURES
            and all(p is None or p.dtype in floats for p in params))


@opaque_op("megalodon::norm_rows", mutates_args=())
@on_input_device
def norm_rows(x: Tensor, scale: Tensor | None, shift: Tensor | None, eps: float, center: bool,
              out_dtype: torch.dtype) -> Tensor:
    """Each row of x (..., F) normalized (centred first if center: LayerNorm; else RMSNorm) in fp32, times scale
    and plus shift ((F,) each, taken in fp32; either may be None), in out_dtype."""
    return _normalize(x, scale, shift, eps, center, out_dtype, stats=False)[0]


def _normalize(x: Tensor, scale: Tensor | None, shift: Tensor | None, eps: float, center: bool,
               out_dtype: torch.dtype, stats: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """One launch of norm_rows_kernel: the output, and with stats each row's mean (center only) and 1 / std."""
    features = x.shape[-1]
    x = x.contiguous()
    out = torch.empty_like(x, dtype=out_dtype)
    rstd = x.new_empty(x.shape[:-1], dtype=torch.float32) if stats else None
    mean = x.new_empty(x.shape[:-1], dtype=torch.float32) if stats and center else None
    block = next_power_of_2(features)
    if x.numel():
        norm_rows_kernel[(x.numel() // features,)](
            x, x if scale is None else scale.contiguous(), x if shift is None else shift.contiguous(), out,
            x if mean is None else mean, x if rstd is None else rstd, features, eps, CENTER=center,
            HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None, SAVE_STATS=stats, BLOCK=block,
            num_warps=_warps(block), **LAUNCH)
    return out, mean, rstd


def _warps(block: int) -> int:
    return 4 if block <= 2048 else 8 if block <= 8192 else 16


@norm_rows.register_fake
def _(x, scale, shift, eps, center, out_dtype):
    return torch.empty_like(x, dtype=out_dtype, memory_format=torch.contiguous_format)


# ---- the row norms in training -----------------------------------------------------------------------------------
# The backward's programs: each takes a block of rows and writes its sums for the parameters' gradients, which
# one reduction adds up (at most this many rows of F floats each, twice).
NORM_BWD_PROGRAMS = 512


@on_input_device
def norm_rows_training(x: Tensor, scale: Tensor | None, shift: Tensor | None, eps: float, center: bool,
                       out_dtype: torch.dtype) -> tuple[Tensor, Tensor | None, Tensor]:
    """norm_rows for training: (the output, each row's mean (None unless center), each row's 1 / std), the
    statistics fp32 of shape x.shape[:-1], what norm_rows_backward takes. One launch."""
    return _normalize(x, scale, shift, eps, center, out_dtype, stats=True)


@on_input_device
def norm_rows_backward(x: Tensor, grad: Tensor, scale: Tensor | None, mean: Tensor | None, rstd: Tensor,
                       param_grads: bool) -> tuple[Tensor, Tensor | None]:
    """Gradients of norm_rows_training's output `grad` for x (in x's dtype) and, if param_grads, the sums over
    rows of grad * xhat and of grad (2, F) fp32: the gradients of a scale and of a shift. Two launches with
    param_grads (the kernel and the sum over its row blocks), else one."""
    features = x.shape[-1]
    x, grad = x.contiguous(), grad.contiguous()
    dx = torch.empty_like(x)
    rows = x.numel() // features
    programs = max(1, min(NORM_BWD_PROGRAMS, rows))
    per_program = cdiv(rows, programs)
    programs = cdiv(rows, per_program)
    partial = x.new_empty(2, programs, features, dtype=torch.float32) if param_grads else None
    block = next_power_of_2(features)
    if x.numel():
        norm_rows_bwd_kernel[(programs,)](
            x, grad, x if scale is None else scale.contiguous(), rstd if mean is None else mean, rstd, dx,
            dx if partial is None else partial, rows, features, per_program, CENTER=mean is not None,
            HAS_SCALE=scale is not None, PARAM_GRADS=param_grads, BLOCK=block, num_warps=_warps(block), **LAUNCH)
    return dx, None if partial is None else partial.sum(1)


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
    rows = t.reshape(-1, cols)
    if rows.stride(-1) != 1 or (rows.shape[0] > 1 and rows.stride(0) < cols):
        rows = rows.contiguous()
    return rows, rows.stride(0)


@on_input_device
def silu_gate(gate: Tensor, x: Tensor | None) -> Tensor:
    """x * silu(gate) (silu(gate) when x is None) in gate's dtype, computed in fp32: one launch. x, if given, has
    gate's shape; the result is contiguous. (The gate comes first: the launch runs on its GPU.)"""
    cols = gate.shape[-1]
    gate_rows, stride_gate = _rows(gate, cols)
    x_rows, stride_x = (gate_rows, 0) if x is None else _rows(x, cols)
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if out.numel():
        grid = (gate_rows.shape[0], cdiv(cols, GATE_BLOCK))
        silu_gate_kernel[grid](x_rows, gate_rows, out, cols, stride_x, stride_gate, HAS_X=x is not None,
                               BLOCK=GATE_BLOCK, num_warps=4, **LAUNCH)
    return out


@on_input_device
def silu_gate_backward(gate: Tensor, x: Tensor | None, grad: Tensor
                       ) -> tuple[Tensor, Tensor | None, Tensor]:
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
        grid = (gate_rows.shape[0], cdiv(cols, GATE_BLOCK))
        silu_gate_bwd_kernel[grid](x_rows, gate_rows, grad_rows, hidden, hidden if dx is None else dx, dgate, cols,
                                   stride_x, stride_gate, stride_grad, HAS_X=x is not None, BLOCK=GATE_BLOCK,
                                   num_warps=4, **LAUNCH)
    return hidden, dx, dgate


@triton.jit
def add_linear_kernel(x_ptr, weight_ptr, out_ptr, rows, outputs, features, stride_x, stride_out,
                      ROWS: tl.constexpr, BLOCK: tl.constexpr, TILE: tl.constexpr):
    block = tl.program_id(0)
    n = block * BLOCK + tl.arange(0, BLOCK)
    r = tl.arange(0, ROWS)
    # x and the weight are both loaded whole in the (rows, outputs, features) shape of their product, each
    # repeated along the other's axis (the repeats read L1), so that the product needs no layout conversion through
    # shared memory; the products are summed per feature lane through the loop and across lanes once after it (a
    # sum across the program's threads every tile would cost shuffles and a barrier each time)
    rows_3d, outputs_3d = r[:, None, None], n[None, :, None]
    w_at = weight_ptr + (outputs_3d + 0 * rows_3d).to(tl.int64) * features
    x_at = x_ptr + (rows_3d + 0 * outputs_3d) * stride_x
    w_inside = (outputs_3d < outputs) & (rows_3d >= 0)
    x_inside = (rows_3d < rows) & (outputs_3d >= 0)
    lanes = tl.zeros((ROWS, BLOCK, TILE), dtype=tl.float32)
    for start in range(0, features, TILE):
        k = start + tl.arange(0, TILE)[None, None, :]
        w = tl.load(w_at + k, mask=w_inside & (k < features), other=0.0).to(tl.float32)
        x = tl.load(x_at + k, mask=x_inside & (k < features), other=0.0).to(tl.float32)
        lanes += x * w
    sums = tl.sum(lanes, axis=2)
    inside = (r[:, None] < rows) & (n[None, :] < outputs)
    at = out_ptr + r[:, None] * stride_out + n[None, :]
    total = tl.load(at, mask=inside, other=0.0).to(tl.float32) + sums
    tl.store(at, cast(total, out_ptr.dtype.element_ty), mask=inside)


def add_linear_fits(out: Tensor, x: Tensor, weight: Tensor) -> bool:
    """Whether add_linear takes these (out and x as 2-D rows): few rows, each row's features contiguous, the
    weight contiguous, one dtype."""
    return (out.shape[0] <= ADD_LINEAR_MAX_ROWS and out.stride(-1) == 1 and x.stride(-1) == 1
            and weight.is_contiguous() and out.dtype == x.dtype == weight.dtype)


@on_input_device
def add_linear(out: Tensor, x: Tensor, weight: Tensor) -> Tensor:
    """out += x @ weight^T in place (out (rows, outputs), x (rows, features), weight (outputs, features)), summed
    in fp32, one launch; returns out."""
    rows, outputs = out.shape
    if out.numel():
        held = next_power_of_2(rows)
        # the lanes' sums, ROWS x BLOCK x TILE, at most 32 fp32 registers a thread of the 4 warps
        tile = max(16, min(ADD_LINEAR_TILE, 4096 // (held * ADD_LINEAR_BLOCK)))
        add_linear_kernel[(cdiv(outputs, ADD_LINEAR_BLOCK),)](
            x, weight, out, rows, outputs, x.shape[1], x.stride(0), out.stride(0), ROWS=held,
            BLOCK=ADD_LINEAR_BLOCK, TILE=tile, num_warps=4, **LAUNCH)
    return out
