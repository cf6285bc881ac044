"""The normalized feed-forward network (spec section 10): LayerNorm, SwiGLU or SiLU, bias-free linears."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megalodon.config import MegalodonConfig
from megalodon.layers.linears import gated_projection, gated_projection_into_
from megalodon.layers.norms import LayerNorm, compute_dtype


class NormalizedFFN(nn.Module):
    def __init__(self, config: MegalodonConfig, layer_index: int):
        super().__init__()
        self.config = config
        dim, hidden = config.model_dim, config.ffn_hidden_dim
        self.norm = LayerNorm(dim, config.norm_eps, affine=config.norm_affine)
        self.fc1 = nn.Linear(dim, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, dim, bias=False)
        self.fc3 = nn.Linear(dim, hidden, bias=False) if config.swiglu else None
        self.layer_index = layer_index
        if config.rescale_nffn:
            self.alpha = nn.Parameter(torch.full((dim,), self.alpha_init(layer_index)))
        else:
            self.alpha = None

    @staticmethod
    def alpha_init(layer_index: int) -> float:
        return 0.1 * 0.5 ** layer_index

    def forward(self, y: Tensor, residual: Tensor,
                norm_affine: tuple[Tensor | None, Tensor | None] | None = None) -> Tensor:
        """y: the MEGA output; residual: the block input, which the second hop adds back. norm_affine: the norm's
        affine() in fp32, when a decode step computed it once for every token."""
        cfg = self.config
        u = self.norm(y, compute_dtype(y), norm_affine)
        # fc2(dropout(silu(fc1 u) [* fc3 u])), with the SiLU and the product recomputed in backward
        up = None if self.fc3 is None else self.fc3(u)
        out = gated_projection(self.fc2, up, self.fc1(u), cfg.hidden_dropout, self.training)
        out = F.dropout(out, cfg.dropout if self.training else 0.0, self.training)
        if self.alpha is not None:
            out = out * self.alpha
        return out + residual

    @torch.no_grad()
    def decode_step_(self, y: Tensor, residual: Tensor,
                     norm_affine: tuple[Tensor | None, Tensor | None] | None = None) -> Tensor:
        """forward() for a decode step, adding into `residual` in place (the step's own hidden state, which the
        caller gives up): the last GEMM adds its product into it, where forward's sum is a kernel of its own."""
        if self.training or self.alpha is not None:
            return self.forward(y, residual, norm_affine)
        u = self.norm(y, compute_dtype(y), norm_affine)
        up = None if self.fc3 is None else self.fc3(u)
        return gated_projection_into_(residual, self.fc2, up, self.fc1(u))
