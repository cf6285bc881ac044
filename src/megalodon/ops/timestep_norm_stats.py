"""The TimestepNorm's causal statistics (spec section 5) on the small per-token tensors (B, L, G): the Chan merge,
the blocked scan that gives every token its running mean and variance, and that scan's hand-written backward.

Forward (`running_statistics`): inside each block of the chunk grid, cumulative sums of mu - c and
s2 + (mu - c)^2 shifted by the block's first token mean c (no catastrophic cancellation); across blocks a Python scan
(L / block steps) that Chan-merges each block's totals into a float64 carry and restarts at the prior where
`block_reset` says so; then a Chan merge of each block's incoming carry into its tokens.

Backward (`causal_statistics_backward`). Within a segment (since the last restart) that starts from (n0, m0, v0),
    n_t = n0 + k_t,  m_t = (n0 m0 + sum_{i<=t} mu_i) / n_t,
    v_t = (n0 (v0 + m0^2) + sum_{i<=t} (s2_i + mu_i^2)) / n_t - m_t^2.
With the suffix sums (over t >= i in the segment) A_i = sum dm_t / n_t, C_i = sum dv_t / n_t and
E_i(c) = sum dv_t (m_t - c) / n_t, valid for any shift c since E(c') = E(c) + (c - c') C:
    d mu_i = A_i + 2 (mu_i - c) C_i - 2 E_i(c),  d s2_i = C_i,  d m0 = n0 (A + 2 (m0 - c) C - 2 E(c)),  d v0 = n0 C.
It returns P_i = A_i - 2 E_i(m_i) and C_i, so that d mu_i = P_i + 2 C_i (mu_i - m_i): the caller's chain rule into
x then needs no mu (ops/timestep_norm.py). The Triton kernels (ops/triton/timestep_norm.py) compute the same.

Every cumulative sum here scans at most 32 elements (`_short_cumsum`): Inductor turns longer scans with few outputs
into split scans, and a split scan over a broadcast input crashes it on CUDA (PyTorch issue #180221).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

STATS_DTYPE = torch.float64  # the running mean/var a stream carries
_SCAN = 32  # longest single cumsum; Inductor never splits a scan this short


class NormStats(NamedTuple):
    """Running statistics per row: count (B,) int64, mean and var (B, G) float64 (a population variance)."""

    count: Tensor
    mean: Tensor
    var: Tensor


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


def _short_cumsum(t: Tensor) -> Tensor:
    """cumsum along dim -2 built from scans of at most _SCAN elements: tiles, then a scan over the tile totals."""
    n = t.shape[-2]
    if n <= _SCAN:
        return t.cumsum(-2)
    tiles = -(-n // _SCAN)
    inner = F.pad(t, (0, 0, 0, tiles * _SCAN - n)).unflatten(-2, (tiles, _SCAN)).cumsum(-2)
    before = F.pad(_short_cumsum(inner[..., -1, :])[..., :-1, :], (0, 0, 1, 0))  # exclusive prefix of tile sums
    return (inner + before.unsqueeze(-2)).flatten(-3, -2)[..., :n, :]


def _suffix_sum(t: Tensor) -> Tensor:
    return _short_cumsum(t.flip(-2)).flip(-2)


def _blocks(t: Tensor, block: int) -> Tensor:
    """(B, L, ...) -> (B, num_blocks, block, ...), zero-padded at the end."""
    pad_len = -t.shape[1] % block
    padded = F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad_len))
    return padded.view(t.shape[0], -1, block, *t.shape[2:])


def per_row(stats: NormStats, batch: int, groups: int) -> NormStats:
    """The statistics for each of `batch` rows: count (B,) int64, mean and var (B, G) float64 (expanded views)."""
    return NormStats(stats.count.to(torch.int64).expand(batch), stats.mean.to(STATS_DTYPE).expand(batch, groups),
                     stats.var.to(STATS_DTYPE).expand(batch, groups))


def block_size_of(length: int, block_size: int | None) -> int:
    return length if block_size is None else min(block_size, length)


def running_statistics(
    mu: Tensor, s2: Tensor, initial: NormStats, block_size: int | None = None, block_reset: Tensor | None = None,
    prior: NormStats | None = None, valid: Tensor | None = None,
) -> tuple[Tensor, Tensor, NormStats, Tensor]:
    """Running mean and variance at every token from per-token moments mu, s2 (B, L, G): mean_t, var_t (B, L, G)
    in mu's dtype, the float64 statistics after the last token, and each token's count n_t (B, L) in mu's dtype
    (the backward needs it). `valid` (B, L) bool or float: 1 for a token that counts, 0 for padding;
    block_size/block_reset/prior as in ops.timestep_norm.timestep_norm. The op's gradient is
    `causal_statistics_backward`."""
    dtype = mu.dtype
    batch, length, groups = mu.shape
    block = block_size_of(length, block_size)
    valid = mu.new_ones(batch, length, 1) if valid is None else valid.to(dtype).unsqueeze(-1)
    mu, s2, valid = _blocks(mu, block), _blocks(s2, block), _blocks(valid, block)

    # Inside each block, about its first token mean; the shift cancels exactly, so it carries no gradient.
    shift = mu[:, :, :1].detach()
    centered = (mu - shift) * valid
    count_local = _short_cumsum(valid)
    safe = count_local.clamp(min=1.0)
    first = _short_cumsum(centered) / safe
    second = _short_cumsum((s2 + (mu - shift).square()) * valid) / safe
    mean_local = shift + first
    var_local = (second - first.square()).clamp(min=0.0)

    # Across blocks: a float64 carry, so that merging a block into a long stream loses nothing.
    count, mean, var = per_row(initial, batch, groups)
    prior = per_row(initial if prior is None else prior, batch, groups)
    block_counts = count_local[:, :, -1, 0].round().to(torch.int64)  # B x nb
    incoming = []
    for c in range(mu.shape[1]):  # a scan over blocks, not over time
        if block_reset is not None:
            reset = block_reset[:, c]
            count = torch.where(reset, prior.count, count)
            mean = torch.where(reset[:, None], prior.mean, mean)
            var = torch.where(reset[:, None], prior.var, var)
        incoming.append((count.to(STATS_DTYPE)[:, None], mean, var))
        _, mean, var = chan_merge(*incoming[-1], count_local[:, c, -1].to(STATS_DTYPE),
                                  mean_local[:, c, -1].to(STATS_DTYPE), var_local[:, c, -1].to(STATS_DTYPE))
        count = count + block_counts[:, c]
    count_in, mean_in, var_in = (torch.stack(t, dim=1).unsqueeze(2).to(dtype) for t in zip(*incoming))
    count_t, mean_t, var_t = chan_merge(count_in, mean_in, var_in, count_local, mean_local, var_local)
    mean_t = mean_t.flatten(1, 2)[:, :length]
    var_t = var_t.flatten(1, 2)[:, :length].clamp(min=0.0)
    return mean_t, var_t, NormStats(count, mean, var), count_t.flatten(1, 2)[:, :length, 0]


def causal_statistics_backward(
    d_mean: Tensor, d_var: Tensor, mean_t: Tensor, count_t: Tensor, block_size: int | None,
    block_reset: Tensor | None, initial: tuple[Tensor, Tensor], prior: tuple[Tensor, Tensor],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The reverse scan (module docstring): from the gradients of every token's mean_t and var_t (B, L, G; fold the
    final state's into the last token's), return P and C (B, L, G) and the gradients of the initial and the prior
    mean and var (B, G each), in d_mean's dtype. initial and prior: (count (B,), mean (B, G)) per row."""
    dtype = d_mean.dtype
    batch, length, groups = d_mean.shape
    block = block_size_of(length, block_size)
    mean_b = _blocks(mean_t, block)
    shift = mean_b[:, :, :1]  # per block, for E
    inv_n = 1.0 / _blocks(count_t.unsqueeze(-1), block).clamp(min=1.0)
    d_mean_b, d_var_b = _blocks(d_mean, block), _blocks(d_var, block)
    terms = torch.stack([d_mean_b * inv_n, d_var_b * inv_n, d_var_b * (mean_b - shift) * inv_n])  # A, C, E
    suffix = _suffix_sum(terms)  # 3 x B x nb x blk x G, inside each block

    carry = terms.new_zeros(3, batch, groups)
    carry_shift = terms.new_zeros(batch, groups)
    d_prior_mean = d_prior_var = terms.new_zeros(batch, groups)
    carried = [None] * mean_b.shape[1]
    for c in reversed(range(mean_b.shape[1])):
        a, cc, e = carry
        e = e + (carry_shift - shift[:, c, 0]) * cc  # rebase E to this block's shift
        carried[c] = torch.stack([a, cc, e])
        carry = carried[c] + suffix[:, :, c, 0]
        carry_shift = shift[:, c, 0]
        if block_reset is not None:
            reset = block_reset[:, c, None]
            a, cc, e = carry
            n0 = prior[0].to(dtype)[:, None]
            d_prior_mean = d_prior_mean + torch.where(reset, n0 * (a + 2.0 * (prior[1].to(dtype) - carry_shift) * cc
                                                                   - 2.0 * e), 0.0)
            d_prior_var = d_prior_var + torch.where(reset, n0 * cc, 0.0)
            carry = torch.where(reset, 0.0, carry)
    a, cc, e = carry
    n0 = initial[0].to(dtype)[:, None]
    d_initial_mean = n0 * (a + 2.0 * (initial[1].to(dtype) - carry_shift) * cc - 2.0 * e)
    d_initial_var = n0 * cc

    sums = suffix + torch.stack(carried, dim=2).unsqueeze(3)  # 3 x B x nb x blk x G
    p = sums[0] - 2.0 * (sums[2] + (shift - mean_b) * sums[1])
    p, c = (t.flatten(1, 2)[:, :length] for t in (p, sums[1]))
    return p, c, d_initial_mean, d_initial_var, d_prior_mean, d_prior_var
