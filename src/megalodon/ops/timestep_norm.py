"""TimestepNorm (spec section 5): causal group normalization along time, as pure functions.

Every token contributes one observation per group: its group mean mu_t and its within-token variance s2_t.
The running statistics after token t merge all observations up to and including t (Chan/Welford, each token
weighing 1), starting from an incoming state (count, mean, var).

`timestep_norm_sequential` is the per-token merge written out: the slow reference for tests.
`timestep_norm_blocked` is the fast path: shifted cumulative sums inside blocks, a Chan merge of the incoming
statistics into every token, and a scan over blocks (L / block steps), so rounding does not grow with position.
Statistics are computed in fp32 or better whatever the input dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class NormStats(NamedTuple):
    """Running statistics per row: count (B,) int64, mean and var (B, G) float."""

    count: Tensor
    mean: Tensor
    var: Tensor


def token_moments(x: Tensor, num_groups: int) -> tuple[Tensor, Tensor]:
    """Per-token group mean and population variance: x (B, L, D) -> two (B, L, G)."""
    grouped = x.unflatten(-1, (num_groups, -1))
    mean = grouped.mean(-1)
    return mean, (grouped - mean.unsqueeze(-1)).square().mean(-1)


def chan_merge(count_a: Tensor, mean_a: Tensor, var_a: Tensor,
               count_b: Tensor, mean_b: Tensor, var_b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Merge two sets of population statistics. Counts are float and broadcast against the means."""
    count = count_a + count_b
    safe = count.clamp(min=1.0)
    share_b = count_b / safe
    delta = mean_b - mean_a
    mean = mean_a + delta * share_b
    var = (count_a * var_a + count_b * var_b) / safe + delta.square() * (count_a / safe) * share_b
    empty = count == 0
    return count, torch.where(empty, mean_a, mean), torch.where(empty, var_a, var)


def normalize(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """(x - mean[g]) * rsqrt(var[g] + eps) * (weight + 1) + bias, with per-group stats (..., G)."""
    groups = mean.shape[-1]
    grouped = x.unflatten(-1, (groups, -1))
    out = (grouped - mean.unsqueeze(-1)) * torch.rsqrt(var.unsqueeze(-1) + eps)
    return out.flatten(-2) * (weight + 1.0) + bias


def timestep_norm_blocked(
    x: Tensor,
    initial: NormStats,
    weight: Tensor,
    bias: Tensor,
    eps: float,
    block_size: int | None = None,
    block_reset: Tensor | None = None,
    prior: NormStats | None = None,
    pad_mask: Tensor | None = None,
) -> tuple[Tensor, NormStats]:
    """Normalize x (B, L, D) causally along time and return the statistics after the last token.

    initial: incoming state; count (B,), mean/var (B, G).
    block_size: cut time into blocks of this many steps (default: one block).
    block_reset: (B, num_blocks) bool; True restarts the statistics at `prior` at that block's first step.
    pad_mask: (B, L) bool, True = padding: the token does not update the statistics and its output is 0.
    """
    stat_dtype = torch.promote_types(x.dtype, torch.float32)
    x = x.to(stat_dtype)
    batch, length, _ = x.shape
    groups = initial.mean.shape[-1]
    block = length if block_size is None else min(block_size, length)
    num_blocks = -(-length // block)
    pad_len = num_blocks * block - length

    mu, s2 = token_moments(x, groups)  # B x L x G
    valid = torch.ones(batch, length, dtype=stat_dtype, device=x.device)
    if pad_mask is not None:
        valid = valid * (~pad_mask).to(stat_dtype)
    mu, s2 = (torch.nn.functional.pad(t, (0, 0, 0, pad_len)).view(batch, num_blocks, block, groups)
              for t in (mu, s2))
    valid = torch.nn.functional.pad(valid, (0, pad_len)).view(batch, num_blocks, block, 1)

    # Cumulative statistics inside each block, shifted by the block's first token mean so that the
    # sum-of-squares form does not cancel catastrophically. The shift cancels exactly, so it carries no gradient.
    shift = mu[:, :, :1].detach()
    centered = (mu - shift) * valid
    count_local = valid.cumsum(2)
    safe = count_local.clamp(min=1.0)
    first = centered.cumsum(2) / safe
    second = ((s2 + (mu - shift).square()) * valid).cumsum(2) / safe
    mean_local = shift + first
    var_local = (second - first.square()).clamp(min=0.0)

    if prior is None:
        prior = initial
    # Counts stay integers (exact at any stream length); the merge sees them as floats.
    count = initial.count.to(torch.int64).expand(batch)
    mean, var = initial.mean.to(stat_dtype), initial.var.to(stat_dtype)
    prior_count = prior.count.to(torch.int64).expand(batch)
    prior_mean = prior.mean.to(stat_dtype).expand(batch, groups)
    prior_var = prior.var.to(stat_dtype).expand(batch, groups)
    block_counts = count_local[:, :, -1, 0].round().to(torch.int64)  # B x nb
    incoming = []
    for c in range(num_blocks):  # a scan over blocks, not over time
        if block_reset is not None:
            reset = block_reset[:, c]
            count = torch.where(reset, prior_count, count)
            mean = torch.where(reset[:, None], prior_mean, mean)
            var = torch.where(reset[:, None], prior_var, var)
        incoming.append((count.to(stat_dtype)[:, None], mean, var))
        _, mean, var = chan_merge(incoming[-1][0], mean, var, count_local[:, c, -1], mean_local[:, c, -1],
                                  var_local[:, c, -1])
        count = count + block_counts[:, c]
    count_in, mean_in, var_in = (torch.stack(t, dim=1).unsqueeze(2) for t in zip(*incoming))
    _, mean_t, var_t = chan_merge(count_in, mean_in, var_in, count_local, mean_local, var_local)
    mean_t = mean_t.flatten(1, 2)[:, :length]
    var_t = var_t.flatten(1, 2)[:, :length].clamp(min=0.0)

    y = normalize(x, mean_t, var_t, weight.to(stat_dtype), bias.to(stat_dtype), eps)
    if pad_mask is not None:
        y = y.masked_fill(pad_mask.unsqueeze(-1), 0.0)
    final = NormStats(count, mean, var)
    return y, final


def timestep_norm_step(x: Tensor, state: NormStats, weight: Tensor, bias: Tensor,
                       eps: float) -> tuple[Tensor, NormStats]:
    """One token per row, x (B, 1, D): the Welford update of spec section 5, for decoding."""
    stat_dtype = torch.promote_types(x.dtype, torch.float32)
    x = x.to(stat_dtype)
    mu, s2 = token_moments(x[:, 0], state.mean.shape[-1])
    count = state.count + 1
    c2 = (1.0 / count.to(stat_dtype)).unsqueeze(-1)
    c1 = 1.0 - c2
    delta = mu - state.mean
    mean = c1 * state.mean + c2 * mu
    var = c1 * state.var + c2 * s2 + (c1 * delta) * (c2 * delta)
    y = normalize(x[:, 0], mean, var, weight.to(stat_dtype), bias.to(stat_dtype), eps)
    return y.unsqueeze(1), NormStats(count, mean, var)


def timestep_norm_sequential(
    x: Tensor, initial: NormStats, weight: Tensor, bias: Tensor, eps: float, pad_mask: Tensor | None = None,
) -> tuple[Tensor, NormStats]:
    """The per-token Welford merge of spec section 5, one token at a time: the slow reference for tests."""
    groups = initial.mean.shape[-1]
    count = initial.count.to(x.dtype).clone()
    mean, var = initial.mean.clone(), initial.var.clone()
    outputs = []
    for t in range(x.shape[1]):
        mu, s2 = token_moments(x[:, t:t + 1], groups)
        mu, s2 = mu[:, 0], s2[:, 0]
        new_count = count + 1
        c2 = (1.0 / new_count)[:, None]
        c1 = 1.0 - c2
        delta = mu - mean
        new_mean = c1 * mean + c2 * mu
        new_var = c1 * var + c2 * s2 + (c1 * delta) * (c2 * delta)
        y = normalize(x[:, t], new_mean, new_var, weight, bias, eps)
        if pad_mask is not None:
            keep = ~pad_mask[:, t]
            new_count = torch.where(keep, new_count, count)
            new_mean = torch.where(keep[:, None], new_mean, mean)
            new_var = torch.where(keep[:, None], new_var, var)
            y = y * keep[:, None].to(y.dtype)
        count, mean, var = new_count, new_mean, new_var
        outputs.append(y)
    return torch.stack(outputs, dim=1), NormStats(count.round().to(torch.int64), mean, var)
