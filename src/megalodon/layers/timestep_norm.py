"""The TimestepNorm layer: affine and prior parameters over the pure functions of ops/timestep_norm.py."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from megalodon.ops.timestep_norm import (STATS_DTYPE, NormStats, timestep_norm, timestep_norm_step, timestep_norm_step_,
                                         with_copy)


class TimestepNorm(nn.Module):
    """Causal group normalization along time (spec section 5); weight applied as (weight + 1).

    The prior (count, mean, log-variance) seeds the statistics of every stream. With the default count of 0
    it has no weight, and the prior mean and log-variance are fixed buffers; with a count > 0 they are learned.
    The running statistics are float64 whatever the model's dtype, and autocast never touches them.
    """

    def __init__(self, dim: int, num_groups: int, eps: float, prior_count: int = 0):
        super().__init__()
        self.num_groups, self.eps = num_groups, eps
        self.register_buffer("prior_count", torch.tensor(prior_count, dtype=torch.int64))
        if prior_count > 0:
            self.prior_mean = nn.Parameter(torch.zeros(num_groups))
            self.prior_logv = nn.Parameter(torch.zeros(num_groups))
        else:
            self.register_buffer("prior_mean", torch.zeros(num_groups))
            self.register_buffer("prior_logv", torch.zeros(num_groups))
        self.weight = nn.Parameter(torch.zeros(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def prior(self) -> NormStats:
        return NormStats(self.prior_count, self.prior_mean.to(STATS_DTYPE), self.prior_logv.to(STATS_DTYPE).exp())

    def initial_state(self, batch_size: int) -> NormStats:
        prior = self.prior()
        return NormStats(prior.count.expand(batch_size).clone(), prior.mean.expand(batch_size, -1).clone(),
                         prior.var.expand(batch_size, -1).clone())

    def forward(
        self, x: Tensor, state: NormStats | None = None, block_size: int | None = None,
        block_reset: Tensor | None = None, pad_mask: Tensor | None = None, copy_dtype: torch.dtype | None = None,
    ) -> tuple[Tensor, NormStats] | tuple[Tensor, Tensor, NormStats]:
        """x: (B, L, D) -> normalized x (fp32) and the statistics after the last token; with copy_dtype (the
        linears' dtype) the normalized x in that dtype too, between them, made in the same pass."""
        with torch.autocast(x.device.type, enabled=False):
            if x.shape[1] == 1 and block_reset is None and pad_mask is None:
                initial = self.initial_state(x.shape[0]) if state is None else state
                return with_copy(*timestep_norm_step(x, initial, self.weight, self.bias, self.eps), copy_dtype)
            # A fresh stream starts at the prior itself, which the op expands over the rows (no copies); resets
            # restart at `initial` when no prior is given, and that is the prior here too.
            prior = self.prior()
            initial, restart = (prior, None) if state is None else (state, prior)
            return timestep_norm(x, initial, self.weight, self.bias, self.eps, block_size, block_reset, restart,
                                 pad_mask, copy_dtype)

    def step_(self, x: Tensor, state: NormStats,
              copy_dtype: torch.dtype | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """Decode one token per row, x (B, 1, D), updating `state` in place (static buffers, CUDA graphs); returns
        the normalized x (fp32), and with copy_dtype (the linears' dtype) that too, made by the same kernel.
        Inference only."""
        with torch.autocast(x.device.type, enabled=False):
            return timestep_norm_step_(x, state, self.weight, self.bias, self.eps, copy_dtype)
