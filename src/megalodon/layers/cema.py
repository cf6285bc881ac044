"""The CEMA layer: parameters with the reference initialization, over the pure functions of ops/cema.py."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from megalodon.ops.cema import CemaCoefficients, cema_coefficients, cema_from_parameters, cema_step


class CEMA(nn.Module):
    """Multi-head complex EMA over time, one EMA of order N per channel (spec section 4)."""

    def __init__(self, dim: int, ndim: int):
        super().__init__()
        self.dim, self.ndim = dim, ndim
        self.alpha = nn.Parameter(torch.empty(dim, ndim, 1))
        self.delta = nn.Parameter(torch.empty(dim, ndim, 1))
        self.theta = nn.Parameter(torch.empty(dim, 1, 1))
        self.gamma = nn.Parameter(torch.empty(dim, ndim, 2))
        self.omega = nn.Parameter(torch.empty(dim, 1))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        self.alpha.normal_(0.0, 0.2, generator=generator)
        self.delta.normal_(0.0, 0.2, generator=generator)
        # Angles spread geometrically over channels; the permutation comes from `generator` so that
        # data-parallel ranks seeded alike agree.
        freqs = torch.exp(-torch.arange(1, self.dim + 1, dtype=torch.float64) * math.log(self.dim) / self.dim)
        freqs = freqs[torch.randperm(self.dim, generator=generator)]
        self.theta.copy_(torch.logit(freqs).view(self.dim, 1, 1))
        self.gamma.zero_()
        self.gamma[..., 0].normal_(0.0, 1.0, generator=generator)
        nn.init.trunc_normal_(self.omega, 0.0, 0.25, -1.0, 1.0, generator=generator)

    def coefficients(self) -> CemaCoefficients:
        """p, q and g from the parameters, recomputed on every call: a (D, N) elementwise computation, so there
        is no cache to go stale (edits through `.data` do not bump a parameter's version)."""
        return cema_coefficients(*self._parameters_in_fp32_or_better())

    def _parameters_in_fp32_or_better(self) -> list[Tensor]:
        """alpha, delta, theta, gamma, upcast from half precision (the coefficients are computed in fp32)."""
        return [t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
                for t in (self.alpha, self.delta, self.theta, self.gamma)]

    def forward(
        self, x: Tensor, h0: Tensor | None = None, block_size: int | None = None,
        block_reset: Tensor | None = None, need_state: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """x: (B, L, D) -> y (B, L, D) fp32 and the final state (B, D, N) complex, or None.

        The state is complex at this boundary (as MegalodonState keeps it) and real pairs inside."""
        with torch.autocast(x.device.type, enabled=False):
            alpha, delta, theta, gamma = self._parameters_in_fp32_or_better()
            omega = self.omega.squeeze(-1).to(alpha.dtype)
            h_in = None if h0 is None else torch.view_as_real(h0.to(_complex(alpha.dtype)))
            if x.shape[1] == 1 and h0 is not None and block_reset is None:
                y, h = cema_step(x[:, 0].to(alpha.dtype), cema_coefficients(alpha, delta, theta, gamma), omega, h_in)
                return y.unsqueeze(1), torch.view_as_complex(h)
            y, h = cema_from_parameters(x, alpha, delta, theta, gamma, omega, h_in, block_size, block_reset,
                                        need_state)
            return y, None if h is None else torch.view_as_complex(h)


def _complex(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype == torch.float64 else torch.complex64
