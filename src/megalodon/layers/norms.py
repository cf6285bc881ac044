"""RMSNorm and LayerNorm in the reference parameterization: weights stored as zeros, applied as (weight + 1).

Statistics run in fp32 (or better, for a float64 model). The output dtype is the caller's choice: the compute
dtype of the linears that read it (bf16 under autocast), so that no fp32 copy is made only to be cast again.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from megalodon.ops.fused import applied, layer_norm, rms_norm


# Asked once, at import: torch.compile cannot trace torch.amp.is_autocast_available before torch 2.13.
_AUTOCAST_DEVICES = frozenset(d for d in ("cpu", "cuda", "xpu", "mps", "hpu") if torch.amp.is_autocast_available(d))


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the linears after a norm run in: autocast's where it is on, else x's."""
    device = x.device.type
    if device in _AUTOCAST_DEVICES and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim)) if affine else None

    def forward(self, x: Tensor, out_dtype: torch.dtype | None = None, scale: Tensor | None = None) -> Tensor:
        """out_dtype: default x's. scale: applied(self.weight), when the caller computed it beforehand (decode;
        no gradient reaches the weight through it)."""
        return rms_norm(x, self.weight, self.eps, x.dtype if out_dtype is None else out_dtype, scale)


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float, affine: bool = True):
        super().__init__()
        self.eps = eps
        # Without affine (the reference's norm_affine=False) there is no weight and no bias at all.
        self.weight = nn.Parameter(torch.zeros(dim)) if affine else None
        self.bias = nn.Parameter(torch.zeros(dim)) if affine else None

    def forward(self, x: Tensor, out_dtype: torch.dtype | None = None,
                affine: tuple[Tensor | None, Tensor | None] | None = None) -> Tensor:
        """out_dtype: default x's. affine: self.affine(), when the caller computed it beforehand (decode)."""
        weight, bias = self.affine(torch.promote_types(x.dtype, torch.float32)) if affine is None else affine
        return layer_norm(x, weight, bias, self.eps, x.dtype if out_dtype is None else out_dtype)

    def affine(self, dtype: torch.dtype | None = None) -> tuple[Tensor | None, Tensor | None]:
        """The weight and bias layer_norm applies, in dtype (default: the parameters'), fp32 or better."""
        if dtype is None:
            dtype = torch.float32 if self.weight is None else self.weight.dtype
        dtype = torch.promote_types(dtype, torch.float32)
        return (None if self.weight is None else applied(self.weight).to(dtype),
                None if self.bias is None else self.bias.to(dtype))
