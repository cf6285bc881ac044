"""The layers' linears: read as weights by the fused paths, or called as modules when they are not plain.

The fused paths read an nn.Linear's weight and multiply it themselves: Wz, Wr and Wh1 as one GEMM, the SiLU-gated
product and its GEMM as one op, a decode step's GEMMs that add into their output, the model's head in the blocked
loss of `targets=`. A linear that a library replaced or wrapped (a PEFT LoRA layer, a quantized linear) adds to its
forward what its weight does not hold, and read as a weight it would be silently skipped; such a linear is called
as a module instead, the same math unfused.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from megalodon.ops.fused import add_linear_, gated_linear, gated_linear_into_, silu_gated


def plain(*linears: nn.Module) -> bool:
    """Whether every one of these is an nn.Linear itself, whose weight and bias are all its forward uses."""
    return all(type(linear) is nn.Linear for linear in linears)


def project(linear: nn.Module, x: Tensor) -> Tensor:
    """linear(x) in x's dtype (a plain linear's weight and bias cast to it, as autocast would)."""
    if not plain(linear):
        return linear(x)
    bias = None if linear.bias is None else linear.bias.to(x.dtype)
    return F.linear(x, linear.weight.to(x.dtype), bias)


def project_into_(out: Tensor, linear: nn.Module, x: Tensor) -> Tensor:
    """out += linear(x) in place, for inference steps (add_linear_: one GEMM for a bias-free plain linear)."""
    if plain(linear) and linear.bias is None:
        return add_linear_(out, x, linear.weight.to(x.dtype))
    return out.add_(linear(x))


def gated_projection(linear: nn.Module, x: Tensor | None, gate: Tensor, dropout_p: float = 0.0,
                     training: bool = False) -> Tensor:
    """linear(dropout(x * silu(gate))) (x None: silu(gate) alone): ops/fused.py's gated_linear for a bias-free
    plain linear, which keeps less for backward."""
    if plain(linear) and linear.bias is None:
        return gated_linear(x, gate, linear.weight, dropout_p, training)
    return linear(F.dropout(silu_gated(x, gate), dropout_p, training))


def gated_projection_into_(out: Tensor, linear: nn.Module, x: Tensor | None, gate: Tensor) -> Tensor:
    """out += linear(x * silu(gate)) in place, for inference steps."""
    if plain(linear) and linear.bias is None:
        return gated_linear_into_(out, x, gate, linear.weight)
    return out.add_(linear(silu_gated(x, gate)))
