"""The norms and the SiLU-gated linear, fused so that they keep less for the backward pass and, on CUDA, run as
one Triton kernel each way.

Autograd, op by op, keeps every intermediate a later gradient needs: the RMSNorm its fp32 input and fp32
output, the gate `x * silu(g)` its input, the SiLU output and the product. These two ops keep only their inputs
(and one scalar per row) and recompute the cheap elementwise part in backward, which cuts the activations of a
MEGA layer and an FFN by about a quarter. Each has a plain autograd reference beside it (`*_reference`, the
obviously right form), the tests compare the two in float64, and one function per op decides which path runs.

On CUDA, in eager mode, both norms and the gate run as one Triton kernel per call each way (ops/triton/fused.py):
a norm's kernel also makes the output's dtype, where torch's path adds a cast on one side or both, and its
backward reads the output's gradient in the output's dtype; the gate's backward makes the product again and both
gradients in one pass. A compiled graph keeps torch's norms, which Inductor fuses with the casts around them, and
holds the gated linear as one node (an OpaqueOp: traced through, the partitioner would keep the product and the
gate both), whose forward runs as eager code, the gate's kernel included, and whose backward formula is traced.

Where the kernels do not run and torch has a fused RMSNorm kernel for the device (CUDA in recent torch: 2.11 has
it), the RMSNorm runs on it: one launch forward and one backward where the composed form takes about eight and
ten, keeping the same input and one scalar per row. The Llama baseline's norm takes the same paths, so that the
comparison stays fair.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from megalodon.ops.triton import opaque_op, runs_eagerly, use_triton


# ---- the row norms on CUDA: one Triton kernel per call each way --------------------------------------------------
def row_norm_kernel(x: Tensor, *params: Tensor | None) -> Callable[..., Tensor] | None:
    """The Triton row-norm for a norm of x with these affine parameters, called as
    kernel(x, scale, shift, eps, center, out_dtype) (RMSNorm, or LayerNorm if center; statistics in fp32): the
    inference kernel where no gradient is wanted, the training kernels where one is and the step runs eagerly (a
    compiled graph keeps torch's norm, which Inductor fuses with the casts around it). None off CUDA and for the
    dtypes and widths the kernels do not take."""
    if not use_triton("norm_rows", x):
        return None
    from megalodon.ops.triton.fused import supports_rows

    if not supports_rows(x, *params):
        return None
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *params))):
        return _row_norm_inference
    return _RowNorm.apply if runs_eagerly(x) else None


def _row_norm_inference(x: Tensor, scale: Tensor | None, shift: Tensor | None, eps: float, center: bool,
                        out_dtype: torch.dtype) -> Tensor:
    from megalodon.ops.triton.fused import norm_rows

    return norm_rows(x, scale, shift, float(eps), center, out_dtype)


class _RowNorm(torch.autograd.Function):
    """The Triton row-norm with its backward: keeps x as given and each row's statistics (as torch's norms do);
    the output comes in out_dtype from the same pass and the output's gradient is read in its own dtype."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor | None, shift: Tensor | None, eps: float, center: bool,
                out_dtype: torch.dtype) -> Tensor:
        from megalodon.ops.triton.fused import norm_rows_training

        out, mean, rstd = norm_rows_training(x, scale, shift, float(eps), center, out_dtype)
        ctx.save_for_backward(x, scale, mean, rstd)
        ctx.shift_dtype = None if shift is None else shift.dtype
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        from megalodon.ops.triton.fused import norm_rows_backward

        x, scale, mean, rstd = ctx.saved_tensors
        wants = ctx.needs_input_grad
        dx, sums = norm_rows_backward(x, grad, scale, mean, rstd, wants[1] or wants[2])
        d_scale = sums[0].to(scale.dtype) if wants[1] else None
        d_shift = sums[1].to(ctx.shift_dtype) if wants[2] else None
        return dx, d_scale, d_shift, None, None, None


# ---- RMSNorm ---------------------------------------------------------------------------------------------------
def _has_fused_rms_norm(device: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("aten::_fused_rms_norm", device.upper())
    except RuntimeError:  # a torch without the op, or a device it does not know
        return False


# Asked once, at import (a compiled graph cannot trace the question): the devices where F.rms_norm is one kernel.
FUSED_RMS_NORM_DEVICES = frozenset(d for d in ("cuda", "xpu", "mps") if _has_fused_rms_norm(d))


def torch_rms_norm(x: Tensor, scale: Tensor | None, eps: float, out_dtype: torch.dtype) -> Tensor:
    """x * rsqrt(mean(x**2) + eps) * scale over the last dim through F.rms_norm, in fp32 or better, cast to
    out_dtype: torch's fused kernel on FUSED_RMS_NORM_DEVICES (the composed form elsewhere)."""
    # The kernel keeps a bf16 input's statistics in fp32 itself: without a scale to apply in fp32 and with a bf16
    # output asked for, x goes in as it is, and backward keeps no fp32 copy of it.
    as_is = scale is None and out_dtype == x.dtype
    compute = x.dtype if as_is else torch.promote_types(x.dtype, torch.float32)
    with torch.autocast(x.device.type, enabled=False):
        out = F.rms_norm(x.to(compute), x.shape[-1:], None if scale is None else scale.to(compute), eps)
    return out.to(out_dtype)


def applied(weight: Tensor | None) -> Tensor | None:
    """weight + 1 in fp32 or better: what a norm in this parameterization multiplies by. A decode step computes it
    once per generation (the parameters do not change while it decodes) rather than once per token."""
    return None if weight is None else weight.to(torch.promote_types(weight.dtype, torch.float32)) + 1.0


def rms_norm_reference(x: Tensor, weight: Tensor | None, eps: float, out_dtype: torch.dtype) -> Tensor:
    """x * rsqrt(mean(x**2) + eps) * (weight + 1) over the last dim, in fp32 or better, cast to out_dtype."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    out = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    if weight is not None:
        out = out * (weight.to(out.dtype) + 1.0)
    return out.to(out_dtype)


class _RMSNorm(torch.autograd.Function):
    """Saves x as given and rstd (one per row); the normalized x is recomputed in backward."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, eps: float, out_dtype: torch.dtype) -> Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        rstd = torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
        out = xf * rstd
        if weight is not None:
            out = out * (weight.to(out.dtype) + 1.0)
        ctx.save_for_backward(x, rstd, weight)
        # No .to() when the dtype already matches: torch.compile in torch 2.11 loses the gradient of a custom
        # Function whose output is such a no-op alias (2.13 does not).
        return out if out.dtype == out_dtype else out.to(out_dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, rstd, weight = ctx.saved_tensors
        normed = x.to(rstd.dtype) * rstd
        grad = grad.to(rstd.dtype)
        grad_weight = None
        if weight is not None:
            grad_weight = (grad * normed).flatten(0, -2).sum(0).to(weight.dtype)
            grad = grad * (weight.to(rstd.dtype) + 1.0)
        grad_x = rstd * (grad - normed * (grad * normed).mean(-1, keepdim=True))
        return grad_x.to(x.dtype), grad_weight, None, None


def rms_norm(x: Tensor, weight: Tensor | None, eps: float, out_dtype: torch.dtype | None = None,
             scale: Tensor | None = None) -> Tensor:
    """RMSNorm over the last dim in the reference parameterization (applied as weight + 1; None: no affine).
    Statistics in fp32 or better; the output in out_dtype (default: fp32 or better).
    scale: the factor weight + 1 in fp32 or better, computed beforehand (decode); weight is then not read."""
    compute = torch.promote_types(x.dtype, torch.float32)
    out_dtype = compute if out_dtype is None else out_dtype
    kernel = row_norm_kernel(x, weight, scale)
    if kernel is not None:
        return kernel(x, applied(weight) if scale is None else scale, None, eps, False, out_dtype)
    if x.device.type in FUSED_RMS_NORM_DEVICES:
        return torch_rms_norm(x, applied(weight) if scale is None else scale, eps, out_dtype)
    if scale is not None:
        return (rms_norm_reference(x, None, eps, compute) * scale).to(out_dtype)
    if torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad)):
        return _RMSNorm.apply(x, weight, eps, out_dtype)
    return rms_norm_reference(x, weight, eps, out_dtype)


# ---- LayerNorm ---------------------------------------------------------------------------------------------------
def layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, out_dtype: torch.dtype) -> Tensor:
    """LayerNorm over the last dim with the weight and bias as given (a norm in the reference parameterization
    passes weight + 1), statistics in fp32 or better, the output in out_dtype."""
    kernel = row_norm_kernel(x, weight, bias)
    if kernel is not None:
        return kernel(x, weight, bias, eps, True, out_dtype)
    compute = torch.promote_types(x.dtype, torch.float32)
    out = F.layer_norm(x.to(compute), x.shape[-1:], None if weight is None else weight.to(compute),
                       None if bias is None else bias.to(compute), eps)
    return out.to(out_dtype)


# ---- a GEMM that adds into its output ---------------------------------------------------------------------------
def add_linear_(out: Tensor, x: Tensor, weight: Tensor) -> Tensor:
    """out += x @ weight^T in place, as one GEMM that reads out as its addend (beta = 1), where an out-of-place
    linear and a sum take two kernels; returns out. For inference steps (no autograd), on an `out` of the step's
    own; its rows may be strided (a slice of a wider projection). Tensors of mixed dtypes (autocast) take the
    product in x's dtype and add it (two kernels). On CUDA, a decode step's few rows take a Triton kernel, where
    cuBLAS's tiles leave most of the GPU idle (ops/triton/fused.py)."""
    if not (out.dtype == x.dtype == weight.dtype):
        return out.add_(F.linear(x, weight.to(x.dtype)))
    rows, x_rows = out.flatten(0, -2), x.flatten(0, -2)
    if use_triton("add_linear", rows, x_rows, weight) and runs_eagerly(rows, x_rows, weight):
        from megalodon.ops.triton.fused import add_linear, add_linear_fits

        if add_linear_fits(rows, x_rows, weight):
            add_linear(rows, x_rows, weight)
            return out
    rows.addmm_(x_rows, weight.t())
    return out


# ---- SiLU-gated linear -------------------------------------------------------------------------------------------
def silu_gated(x: Tensor | None, gate: Tensor) -> Tensor:
    """x * silu(gate) (x None: silu(gate) alone) in torch's ops, with autograd."""
    return F.silu(gate) if x is None else x * F.silu(gate)


def gated_linear_reference(x: Tensor | None, gate: Tensor, weight: Tensor, dropout_p: float = 0.0,
                           training: bool = False) -> Tensor:
    """dropout(x * silu(gate)) @ weight^T (x None: silu(gate) alone), in gate's dtype."""
    return F.linear(F.dropout(silu_gated(x, gate), dropout_p, training), weight.to(gate.dtype))


def silu_gate_kernels(gate: Tensor) -> bool:
    """Whether the gate's elementwise part (x * silu(gate) and its backward) runs as one Triton kernel each way:
    on CUDA, where the code runs eagerly (inside a compiled graph's node too). Traced, it is torch's ops, which
    Inductor fuses itself."""
    return use_triton("silu_gate", gate) and runs_eagerly(gate)


def _silu_gate(x: Tensor | None, gate: Tensor) -> Tensor:
    if silu_gate_kernels(gate):
        from megalodon.ops.triton.fused import silu_gate

        return silu_gate(gate, x)
    return silu_gated(x, gate)


@opaque_op("megalodon::gated_linear", mutates_args=())
def _gated_linear(x: Tensor | None, gate: Tensor, weight: Tensor) -> Tensor:
    """(x * silu(gate)) @ weight^T, every tensor in gate's dtype. Keeps x, gate and the weight for backward, which
    recomputes silu(gate) and the product. An OpaqueOp: traced through, the partitioner would keep the product
    and the gate both."""
    with torch.autocast(gate.device.type, enabled=False):
        return F.linear(_silu_gate(x, gate), weight)


@_gated_linear.register_fake
def _(x, gate, weight):
    return gate.new_empty(*gate.shape[:-1], weight.shape[0])


def _gated_linear_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _gated_linear_backward(ctx, grad: Tensor):
    x, gate, weight = ctx.saved_tensors
    with torch.autocast(gate.device.type, enabled=False):
        grad = grad.to(gate.dtype)
        grad_hidden = grad.matmul(weight)
        if silu_gate_kernels(gate):
            from megalodon.ops.triton.fused import silu_gate_backward

            hidden, grad_x, grad_gate = silu_gate_backward(gate, x, grad_hidden)
        else:
            act = F.silu(gate)
            hidden = act if x is None else x * act
            grad_x = None if x is None else grad_hidden * act
            if x is not None:
                grad_hidden.mul_(x)  # a fresh product: nothing else holds it
            # silu's own backward kernel: one pass over the activations where the written-out derivative
            # s (1 + g (1 - s)) costs six
            grad_gate = torch.ops.aten.silu_backward(grad_hidden, gate)
        grad_weight = grad.flatten(0, -2).t().mm(hidden.flatten(0, -2))
    return grad_x, grad_gate, grad_weight


_gated_linear.register_autograd(_gated_linear_backward, setup_context=_gated_linear_context)


def gated_linear(x: Tensor | None, gate: Tensor, weight: Tensor, dropout_p: float = 0.0,
                 training: bool = False) -> Tensor:
    """dropout(x * silu(gate)) @ weight^T, or silu(gate) @ weight^T when x is None (bias-free), in gate's dtype
    (the weight is cast to it). With dropout the reference path runs (its mask must be kept anyway)."""
    if dropout_p and training:
        return gated_linear_reference(x, gate, weight, dropout_p, training)
    x, weight = None if x is None else x.to(gate.dtype), weight.to(gate.dtype)
    if not torch.is_grad_enabled():
        return F.linear(_silu_gate(x, gate), weight)
    return _gated_linear(x, gate, weight)


def gated_linear_into_(out: Tensor, x: Tensor | None, gate: Tensor, weight: Tensor) -> Tensor:
    """out += (x * silu(gate)) @ weight^T in place (x None: silu(gate)), for inference steps: gated_linear's
    product added by the GEMM into `out`, the step's own tensor (add_linear_)."""
    return add_linear_(out, _silu_gate(None if x is None else x.to(gate.dtype), gate), weight.to(gate.dtype))
