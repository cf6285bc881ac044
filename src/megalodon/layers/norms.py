"""RMSNorm and LayerNorm in the reference parameterization: weights stored as zeros, applied as (weight + 1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def rms_normalize(x: Tensor, eps: float) -> Tensor:
    """x * rsqrt(mean(x**2) + eps) over the last dim, statistics in fp32; returns fp32 or better."""
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim)) if affine else None

    def forward(self, x: Tensor) -> Tensor:
        out = rms_normalize(x, self.eps)
        if self.weight is not None:
            out = out * (self.weight + 1.0)
        return out.to(x.dtype)


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        compute = torch.promote_types(x.dtype, torch.float32)
        out = F.layer_norm(x.to(compute), x.shape[-1:], (self.weight + 1.0).to(compute), self.bias.to(compute),
                           self.eps)
        return out.to(x.dtype)
