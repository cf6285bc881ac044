"""Fused Triton kernels for the queries and keys of a MEGA layer (ops/attention.py::queries_keys), on CUDA.

From z (B, L, H * dz), per head: zn = z * rsqrt(mean(z^2) + eps) (statistics in fp32, zn rounded to z's dtype as
the PyTorch path rounds it), then q = zn * scale[0] + shift[0] and k = zn * scale[1] + shift[1], each rotated by
the rotary tables (x cos + swap(x) sin, swap exchanging the features 2j and 2j + 1), out in z's dtype. The
PyTorch path takes about 7 launches forward and 10 backward for this; these kernels take one each way (and one
sum of the parameter gradients' partials). In a decode step it is one kernel per layer where it was six.

Shapes: z's rows may be strided (z is a slice of the fused Wz/Wr/Wh1 projection): row t at t * row_stride. The
output qk is (B, L, 2H, dz), queries in [:, :, :H] and keys in [:, :, H:], as the PyTorch path returns them.
The tables are (B or 1, L, 1, dz) fp32; scale and shift (2, H * dz) fp32. Saved for backward: z and rstd
(B * L, H) fp32.

Backward, with pre = zn * scale + shift before the rotation out[d] = pre[d] c[d] + pre[d^1] s[d]:
    d pre[d] = d out[d] c[d] + d out[d^1] s[d^1],   d scale = sum_t d pre * zn,   d shift = sum_t d pre,
    d zn = sum over q and k of d pre * scale,   dz = rstd (d zn - n mean(d zn * n)) with n = z * rstd
(zn's rounding passes its gradient straight through, as autograd's cast does).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from megalodon.ops.triton import LAUNCH, cdiv, next_power_of_2, on_input_device, opaque_op
from megalodon.ops.triton.casts import cast


@triton.jit
def _token_rows(pid, tokens, dz, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    mask = (t < tokens)[:, None] & (d < dz)[None, :]
    return t, d, mask


@triton.jit
def qk_fwd_kernel(z_ptr, scale_ptr, shift_ptr, cos_ptr, sin_ptr, qk_ptr, rstd_ptr,
                  tokens, length, row_stride, table_batch_stride, heads, dz, eps,
                  BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    t, d, mask = _token_rows(tl.program_id(0), tokens, dz, BLOCK_T, BLOCK_D)
    h = tl.program_id(1)
    width = heads * dz
    swapped = d ^ 1  # the partner of feature d in its rotated pair
    row = z_ptr + t[:, None].to(tl.int64) * row_stride + h * dz
    x = tl.load(row + d[None, :], mask=mask, other=0.0).to(tl.float32)
    xs = tl.load(row + swapped[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / dz + eps)
    zn = cast(x * rstd[:, None], z_ptr.dtype.element_ty).to(tl.float32)
    zns = cast(xs * rstd[:, None], z_ptr.dtype.element_ty).to(tl.float32)
    table = (t // length).to(tl.int64) * table_batch_stride + (t % length).to(tl.int64) * dz
    c = tl.load(cos_ptr + table[:, None] + d[None, :], mask=mask, other=0.0)
    s = tl.load(sin_ptr + table[:, None] + d[None, :], mask=mask, other=0.0)
    out_row = qk_ptr + t[:, None].to(tl.int64) * (2 * width) + h * dz
    for r in tl.static_range(2):  # 0: queries, 1: keys
        affine = r * width + h * dz
        sc = tl.load(scale_ptr + affine + d, mask=d < dz, other=0.0)
        sc_s = tl.load(scale_ptr + affine + swapped, mask=d < dz, other=0.0)
        sh = tl.load(shift_ptr + affine + d, mask=d < dz, other=0.0)
        sh_s = tl.load(shift_ptr + affine + swapped, mask=d < dz, other=0.0)
        pre = zn * sc[None, :] + sh[None, :]
        pre_s = zns * sc_s[None, :] + sh_s[None, :]
        out = pre * c + pre_s * s
        tl.store(out_row + r * width + d[None, :], cast(out, qk_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + t * heads + h, rstd, mask=t < tokens)


@triton.jit
def qk_bwd_kernel(dqk_ptr, z_ptr, rstd_ptr, scale_ptr, cos_ptr, sin_ptr, dz_ptr, partial_ptr,
                  tokens, length, row_stride, table_batch_stride, heads, dz,
                  BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    t, d, mask = _token_rows(pid, tokens, dz, BLOCK_T, BLOCK_D)
    h = tl.program_id(1)
    width = heads * dz
    swapped = d ^ 1
    x = tl.load(z_ptr + t[:, None].to(tl.int64) * row_stride + h * dz + d[None, :], mask=mask,
                other=0.0).to(tl.float32)
    rstd = tl.load(rstd_ptr + t * heads + h, mask=t < tokens, other=0.0)
    normed = x * rstd[:, None]
    zn = cast(normed, z_ptr.dtype.element_ty).to(tl.float32)
    table = (t // length).to(tl.int64) * table_batch_stride + (t % length).to(tl.int64) * dz
    c = tl.load(cos_ptr + table[:, None] + d[None, :], mask=mask, other=0.0)
    s_s = tl.load(sin_ptr + table[:, None] + swapped[None, :], mask=mask, other=0.0)
    grad_row = dqk_ptr + t[:, None].to(tl.int64) * (2 * width) + h * dz
    d_zn = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for r in tl.static_range(2):
        go = tl.load(grad_row + r * width + d[None, :], mask=mask, other=0.0).to(tl.float32)
        go_s = tl.load(grad_row + r * width + swapped[None, :], mask=mask, other=0.0).to(tl.float32)
        d_pre = go * c + go_s * s_s
        sc = tl.load(scale_ptr + r * width + h * dz + d, mask=d < dz, other=0.0)
        d_zn += d_pre * sc[None, :]
        # per-program partial sums of the scale's and the shift's gradients: rows (scale q, scale k, shift q,
        # shift k) of 4
        partial = partial_ptr + pid.to(tl.int64) * (4 * width) + h * dz + d
        tl.store(partial + r * width, tl.sum(d_pre * zn, axis=0), mask=d < dz)
        tl.store(partial + (2 + r) * width, tl.sum(d_pre, axis=0), mask=d < dz)
    mean = tl.sum(d_zn * normed, axis=1) / dz
    dx = rstd[:, None] * (d_zn - normed * mean[:, None])
    tl.store(dz_ptr + t[:, None].to(tl.int64) * width + h * dz + d[None, :], cast(dx, dz_ptr.dtype.element_ty),
             mask=mask)


def _tiles(dz: int) -> tuple[int, int]:
    """BLOCK_T x BLOCK_D tiles of about 2K elements (a row of dz features per token)."""
    block_d = next_power_of_2(dz)
    return max(1, min(64, 2048 // block_d)), block_d


def _rows(z: Tensor) -> tuple[Tensor, int]:
    """z (B, L, Z) with its tokens at a common row stride and unit feature stride, and that stride."""
    batch, length, _ = z.shape
    if z.stride(2) != 1 or z.stride(0) != length * z.stride(1):
        z = z.contiguous()
    return z, z.stride(1)


def _table_batch_stride(table: Tensor) -> int:
    return 0 if table.shape[0] == 1 else table.stride(0)


# ---- the custom ops -------------------------------------------------------------------------------------------

@opaque_op("megalodon::queries_keys_fwd", mutates_args=())
@on_input_device
def queries_keys_fwd(z: Tensor, scale: Tensor, shift: Tensor, cos: Tensor, sin: Tensor, heads: int,
                     eps: float) -> tuple[Tensor, Tensor]:
    """qk (B, L, 2H, dz) in z's dtype and rstd (B * L, H) fp32. cos, sin: (B or 1, L, 1, dz) fp32, contiguous."""
    batch, length, width = z.shape
    dz = width // heads
    rows, row_stride = _rows(z)
    qk = z.new_empty(batch, length, 2 * heads, dz)
    rstd = z.new_empty(batch * length, heads, dtype=torch.float32)
    block_t, block_d = _tiles(dz)
    tokens = batch * length
    qk_fwd_kernel[(cdiv(tokens, block_t), heads)](
        rows, scale, shift, cos, sin, qk, rstd, tokens, length, row_stride, _table_batch_stride(cos), heads, dz,
        eps, BLOCK_T=block_t, BLOCK_D=block_d, **LAUNCH)
    return qk, rstd


@queries_keys_fwd.register_fake
def _(z, scale, shift, cos, sin, heads, eps):
    batch, length, width = z.shape
    return (z.new_empty(batch, length, 2 * heads, width // heads),
            z.new_empty(batch * length, heads, dtype=torch.float32))


@opaque_op("megalodon::queries_keys_bwd", mutates_args=())
@on_input_device
def queries_keys_bwd(dqk: Tensor, z: Tensor, rstd: Tensor, scale: Tensor, cos: Tensor, sin: Tensor,
                     heads: int) -> tuple[Tensor, Tensor]:
    """Gradients of z (contiguous, z's dtype), and of scale and shift stacked (4, H * dz) fp32: one sum over the
    programs' partials, which backward splits outside the op (a custom op's outputs may not alias each other)."""
    batch, length, width = z.shape
    dz = width // heads
    rows, row_stride = _rows(z)
    block_t, block_d = _tiles(dz)
    tokens = batch * length
    programs = cdiv(tokens, block_t)
    d_z = z.new_empty(batch, length, width)
    partial = z.new_empty(programs, 4, width, dtype=torch.float32)
    qk_bwd_kernel[(programs, heads)](
        dqk.contiguous(), rows, rstd, scale, cos, sin, d_z, partial, tokens, length, row_stride,
        _table_batch_stride(cos), heads, dz, BLOCK_T=block_t, BLOCK_D=block_d, **LAUNCH)
    return d_z, partial.sum(0)


@queries_keys_bwd.register_fake
def _(dqk, z, rstd, scale, cos, sin, heads):
    return torch.empty_like(z), scale.new_empty(4, scale.shape[1])


def _setup_context(ctx, inputs, output) -> None:
    z, scale, _, cos, sin, heads, _ = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # rstd gets no gradient: no zero tensor made for it
    ctx.heads = heads
    ctx.save_for_backward(z, output[1], scale, cos, sin)


def _backward(ctx, dqk, _rstd):
    if dqk is None:
        return None, None, None, None, None, None, None
    z, rstd, scale, cos, sin = ctx.saved_tensors
    d_z, d_affine = queries_keys_bwd(dqk, z, rstd, scale, cos, sin, ctx.heads)
    return d_z, d_affine[:2], d_affine[2:], None, None, None, None


queries_keys_fwd.register_autograd(_backward, setup_context=_setup_context)


def queries_keys_triton(z: Tensor, heads: int, eps: float, scale: Tensor, shift: Tensor, cos: Tensor,
                        sin: Tensor) -> tuple[Tensor, Tensor]:
    """The Triton path of `megalodon.ops.attention.queries_keys` (same arguments, the tables unpacked)."""
    batch, length, _ = z.shape
    cos, sin = (t.expand(-1, length, -1, -1).contiguous() for t in (cos, sin))
    qk, _ = queries_keys_fwd(z, scale.contiguous(), shift.contiguous(), cos, sin, heads, float(eps))
    return qk.unflatten(2, (2, heads)).unbind(2)  # backward stacks dq and dk: one kernel, no zero-filled halves
