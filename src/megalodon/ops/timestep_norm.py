"""TimestepNorm (spec section 5): causal group normalization along time, as pure functions.

Every token contributes one observation per group: its group mean mu_t and its within-token variance s2_t.
The running statistics after token t merge all observations up to and including t (Chan/Welford, each token
weighing 1), starting from an incoming state (count, mean, var).

Paths (`timestep_norm` picks one; the layer never asks which device it is on):
- `timestep_norm_blocked`, PyTorch, any device and dtype, the fallback and the only path with a pad_mask.
  1. Per-token moments (mu, s2): (B, L, D) -> (B, L, G).
  2. `causal_statistics` on the small (B, L, G) tensors: inside each block (the chunk grid), cumulative sums
     shifted by the block's first token mean; across blocks a Python scan that Chan-merges the block totals into a
     float64 carry and restarts at the prior where `block_reset` says so. The scan runs L / block steps, not L.
  3. Normalize with the per-token statistics.
  Steps 1 and 3 touch every activation and have hand-written backward passes (a few fused passes instead of
  autograd's dozens); step 2 is differentiated by autograd on tensors D/G times smaller.
  Every cumulative sum scans at most 32 elements (longer ones are tiled, `_short_cumsum`): Inductor turns longer
  scans with few outputs into split scans, and a split scan over a broadcast input crashes it on CUDA (PyTorch
  issue #180221).
- `megalodon.ops.triton.timestep_norm`: fused Triton kernels, on CUDA for fp32/bf16/fp16 input without a pad_mask.
- `timestep_norm_step` / `timestep_norm_step_`: one token per row, the decode step (in place for CUDA graphs).

Precision: per-token statistics are computed in fp32 (or the input's dtype if wider); the running statistics that
a stream carries (`NormStats.mean`, `.var`) are float64, and every merge into them is done in float64. A fp32
carry cannot follow an unbounded stream: at count n the decode step's increments (mu - m) / n fall below fp32's
resolution and its error grows with position (1.6e-3 relative at 200K tokens).

`timestep_norm_sequential` is the per-token merge written out, in plain tensor code: the slow reference for tests.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from megalodon.ops.triton import use_triton

STATS_DTYPE = torch.float64  # the running mean/var a stream carries
_SCAN = 32  # longest single cumsum; Inductor never splits a scan this short


class NormStats(NamedTuple):
    """Running statistics per row: count (B,) int64, mean and var (B, G) float64 (a population variance)."""

    count: Tensor
    mean: Tensor
    var: Tensor


# ---- per-token pieces over the full activations (B, L, D), with fused backward passes -------------------------

class _TokenMoments(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, groups: int) -> tuple[Tensor, Tensor]:
        grouped = x.to(torch.promote_types(x.dtype, torch.float32)).unflatten(-1, (groups, -1))
        mean = grouped.mean(-1)  # two passes: torch.var_mean is 10x slower over a short last dim on CPU
        var = (grouped - mean.unsqueeze(-1)).square().mean(-1)
        ctx.save_for_backward(x, mean)
        return mean, var

    @staticmethod
    def backward(ctx, d_mean: Tensor, d_var: Tensor) -> tuple[Tensor, None]:
        # d mu/dx_j = 1/n, d s2/dx_j = 2 (x_j - mu) / n
        x, mean = ctx.saved_tensors
        grouped = x.to(mean.dtype).unflatten(-1, (mean.shape[-1], -1))
        n = grouped.shape[-1]
        dx = torch.addcmul((d_mean / n).unsqueeze(-1), grouped - mean.unsqueeze(-1), (d_var * (2.0 / n)).unsqueeze(-1))
        return dx.flatten(-2).to(x.dtype), None


def token_moments(x: Tensor, num_groups: int) -> tuple[Tensor, Tensor]:
    """Per-token group mean and population variance: x (..., D) -> two (..., G), in fp32 or wider."""
    return _TokenMoments.apply(x, num_groups)


class _Normalize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, mean: Tensor, var: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
        rstd = torch.rsqrt(var + eps)
        grouped = x.to(mean.dtype).unflatten(-1, (mean.shape[-1], -1))
        xhat = (grouped - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)
        ctx.save_for_backward(x, mean, rstd, weight)
        return torch.addcmul(bias.to(mean.dtype), xhat.flatten(-2), (weight + 1.0).to(mean.dtype))

    @staticmethod
    def backward(ctx, dy: Tensor):
        # y = xhat * (w + 1) + b with xhat = (x - m) * rstd, rstd = (v + eps)^-1/2:
        # dx = g * rstd, dm = -rstd * sum(g), dv = -rstd^2 / 2 * sum(g * xhat), where g = dy * (w + 1).
        x, mean, rstd, weight = ctx.saved_tensors
        groups = mean.shape[-1]
        grouped = x.to(mean.dtype).unflatten(-1, (groups, -1))
        xhat = (grouped - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)
        dy = dy.unflatten(-1, (groups, -1))
        g = dy * (weight + 1.0).to(mean.dtype).view(groups, -1)
        d_mean = -rstd * g.sum(-1)
        d_var = (-0.5 * rstd.square()) * (g * xhat).sum(-1)
        dx = (g * rstd.unsqueeze(-1)).flatten(-2).to(x.dtype)
        d_weight = (dy * xhat).flatten(-2).flatten(0, -2).sum(0).to(weight.dtype)
        d_bias = dy.flatten(-2).flatten(0, -2).sum(0).to(weight.dtype)
        return dx, d_mean, d_var, d_weight, d_bias, None


def normalize(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """(x - mean[g]) * rsqrt(var[g] + eps) * (weight + 1) + bias, with per-group stats (..., G), in their dtype."""
    return _Normalize.apply(x, mean, var, weight, bias, eps)


# ---- statistics on the small (..., G) tensors ------------------------------------------------------------------

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


def merge_statistics(first: NormStats, second: NormStats) -> NormStats:
    """The statistics of `first`'s tokens followed by `second`'s (spec section 14), in float64. Differentiable."""
    count = first.count + second.count
    _, mean, var = chan_merge(first.count.to(STATS_DTYPE)[..., None], first.mean.to(STATS_DTYPE),
                              first.var.to(STATS_DTYPE), second.count.to(STATS_DTYPE)[..., None],
                              second.mean.to(STATS_DTYPE), second.var.to(STATS_DTYPE))
    return NormStats(count, mean, var)


def segment_statistics(x: Tensor, num_groups: int, pad_mask: Tensor | None = None) -> NormStats:
    """Statistics of a segment x (B, L, D) from an empty state: what the segment alone contributes to a stream.

    Exact two-pass form (spec section 14, step 1); merge with `merge_statistics`. Differentiable."""
    mu, s2 = token_moments(x, num_groups)
    weight = torch.ones_like(mu[..., :1]) if pad_mask is None else (~pad_mask)[..., None].to(mu.dtype)
    count = weight.sum(1)
    mean = (mu * weight).sum(1) / count.clamp(min=1.0)
    var = ((s2 + (mu - mean[:, None]).square()) * weight).sum(1) / count.clamp(min=1.0)
    return NormStats(count[:, 0].round().to(torch.int64), mean.to(STATS_DTYPE), var.to(STATS_DTYPE))


def _short_cumsum(t: Tensor) -> Tensor:
    """cumsum along dim -2 built from scans of at most _SCAN elements: tiles, then a scan over the tile totals."""
    n = t.shape[-2]
    if n <= _SCAN:
        return t.cumsum(-2)
    tiles = -(-n // _SCAN)
    inner = F.pad(t, (0, 0, 0, tiles * _SCAN - n)).unflatten(-2, (tiles, _SCAN)).cumsum(-2)
    before = F.pad(_short_cumsum(inner[..., -1, :])[..., :-1, :], (0, 0, 1, 0))  # exclusive prefix of tile sums
    return (inner + before.unsqueeze(-2)).flatten(-3, -2)[..., :n, :]


def causal_statistics(
    mu: Tensor, s2: Tensor, initial: NormStats, block_size: int | None = None, block_reset: Tensor | None = None,
    prior: NormStats | None = None, valid: Tensor | None = None,
) -> tuple[Tensor, Tensor, NormStats]:
    """Running mean and variance at every token from per-token moments mu, s2 (B, L, G), and the final state.

    Returns mean_t, var_t (B, L, G) in mu's dtype and the float64 statistics after the last token. `valid`
    (B, L), 1 for a token that counts and 0 for padding; block_size/block_reset/prior as in timestep_norm.
    """
    dtype = mu.dtype
    batch, length, groups = mu.shape
    block = length if block_size is None else min(block_size, length)
    num_blocks = -(-length // block)
    pad_len = num_blocks * block - length
    valid = mu.new_ones(batch, length) if valid is None else valid.to(dtype)
    mu, s2 = (F.pad(t, (0, 0, 0, pad_len)).view(batch, num_blocks, block, groups) for t in (mu, s2))
    valid = F.pad(valid, (0, pad_len)).view(batch, num_blocks, block, 1)

    # Inside each block: sums shifted by the block's first token mean, so that the sum-of-squares form does not
    # cancel catastrophically. The shift cancels exactly, so it carries no gradient.
    shift = mu[:, :, :1].detach()
    centered = (mu - shift) * valid
    count_local = _short_cumsum(valid)
    safe = count_local.clamp(min=1.0)
    first = _short_cumsum(centered) / safe
    second = _short_cumsum((s2 + (mu - shift).square()) * valid) / safe
    mean_local = shift + first
    var_local = (second - first.square()).clamp(min=0.0)

    # Across blocks: a float64 carry, so that merging a block into a long stream loses nothing.
    prior = initial if prior is None else prior
    count = initial.count.to(torch.int64).expand(batch)
    mean, var = initial.mean.to(STATS_DTYPE), initial.var.to(STATS_DTYPE)
    prior_count = prior.count.to(torch.int64).expand(batch)
    prior_mean = prior.mean.to(STATS_DTYPE).expand(batch, groups)
    prior_var = prior.var.to(STATS_DTYPE).expand(batch, groups)
    block_counts = count_local[:, :, -1, 0].round().to(torch.int64)  # B x nb
    incoming = []
    for c in range(num_blocks):  # a scan over blocks, not over time
        if block_reset is not None:
            reset = block_reset[:, c]
            count = torch.where(reset, prior_count, count)
            mean = torch.where(reset[:, None], prior_mean, mean)
            var = torch.where(reset[:, None], prior_var, var)
        incoming.append((count.to(STATS_DTYPE)[:, None], mean, var))
        _, mean, var = chan_merge(*incoming[-1], count_local[:, c, -1].to(STATS_DTYPE),
                                  mean_local[:, c, -1].to(STATS_DTYPE), var_local[:, c, -1].to(STATS_DTYPE))
        count = count + block_counts[:, c]
    count_in, mean_in, var_in = (torch.stack(t, dim=1).unsqueeze(2).to(dtype) for t in zip(*incoming))
    _, mean_t, var_t = chan_merge(count_in, mean_in, var_in, count_local, mean_local, var_local)
    mean_t = mean_t.flatten(1, 2)[:, :length]
    var_t = var_t.flatten(1, 2)[:, :length].clamp(min=0.0)
    return mean_t, var_t, NormStats(count, mean, var)


# ---- the op --------------------------------------------------------------------------------------------------

def _check(x: Tensor, initial: NormStats, block_size: int | None, block_reset: Tensor | None) -> None:
    if x.dim() != 3:
        raise ValueError(f"timestep_norm expects x of shape (B, L, D), got {tuple(x.shape)}")
    batch, length, dim = x.shape
    groups = initial.mean.shape[-1]
    if dim % groups:
        raise ValueError(f"timestep_norm: the feature dim {dim} is not a multiple of the {groups} groups of the state")
    if block_size is not None and block_size < 1:
        raise ValueError(f"timestep_norm: block_size must be >= 1, got {block_size}")
    if block_reset is not None and length > 0:
        blocks = -(-length // (length if block_size is None else min(block_size, length)))
        if block_reset.shape != (batch, blocks) or block_reset.dtype != torch.bool:
            raise ValueError(f"timestep_norm: block_reset must be a bool tensor of shape {(batch, blocks)} "
                             f"(one flag per block of {block_size} steps), got {block_reset.dtype} "
                             f"{tuple(block_reset.shape)}")


def timestep_norm(
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
    """Normalize x (B, L, D) causally along time; return y (fp32 or wider) and the statistics after the last token.

    initial: incoming state; count (B,), mean/var (B, G).
    block_size: cut time into blocks of this many steps (the chunk grid; default: one block).
    block_reset: (B, num_blocks) bool; True restarts the statistics at `prior` (default: `initial`) at that
    block's first step.
    pad_mask: (B, L) bool, True = padding: the token does not update the statistics and its output is 0.

    The one place that decides the path: the Triton kernels for CUDA tensors (fp32/bf16/fp16, no pad_mask),
    otherwise the PyTorch path.
    """
    _check(x, initial, block_size, block_reset)
    if x.shape[1] == 0:
        stats_dtype = torch.promote_types(x.dtype, torch.float32)
        return x.to(stats_dtype), NormStats(initial.count.expand(x.shape[0]).clone(),
                                            initial.mean.to(STATS_DTYPE), initial.var.to(STATS_DTYPE))
    if pad_mask is None and x.dtype != torch.float64 and use_triton("timestep_norm", x):
        from megalodon.ops.triton.timestep_norm import timestep_norm_triton

        return timestep_norm_triton(x, initial, weight, bias, eps, block_size, block_reset, prior)
    return timestep_norm_blocked(x, initial, weight, bias, eps, block_size, block_reset, prior, pad_mask)


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
    """The PyTorch path of `timestep_norm` (same arguments)."""
    mu, s2 = token_moments(x, initial.mean.shape[-1])  # B x L x G
    valid = None if pad_mask is None else ~pad_mask
    mean_t, var_t, final = causal_statistics(mu, s2, initial, block_size, block_reset, prior, valid)
    y = normalize(x, mean_t, var_t, weight, bias, eps)
    if pad_mask is not None:
        y = y.masked_fill(pad_mask.unsqueeze(-1), 0.0)
    return y, final


def _welford(mu: Tensor, s2: Tensor, state: NormStats) -> NormStats:
    """Spec section 5's per-token update in float64: (B, G) moments into the running statistics."""
    count = state.count + 1
    c2 = count.to(STATS_DTYPE).reciprocal().unsqueeze(-1)
    c1 = 1.0 - c2
    mean_0, var_0 = state.mean.to(STATS_DTYPE), state.var.to(STATS_DTYPE)
    delta = mu.to(STATS_DTYPE) - mean_0
    mean = c1 * mean_0 + c2 * mu.to(STATS_DTYPE)
    var = c1 * var_0 + c2 * s2.to(STATS_DTYPE) + (c1 * delta) * (c2 * delta)
    return NormStats(count, mean, var)


def timestep_norm_step(x: Tensor, state: NormStats, weight: Tensor, bias: Tensor,
                       eps: float) -> tuple[Tensor, NormStats]:
    """One token per row, x (B, 1, D): the Welford update of spec section 5, for decoding. No host syncs."""
    mu, s2 = token_moments(x[:, 0], state.mean.shape[-1])
    new = _welford(mu, s2, state)
    y = normalize(x[:, 0], new.mean.to(mu.dtype), new.var.to(mu.dtype), weight, bias, eps)
    return y.unsqueeze(1), new


@torch.no_grad()
def timestep_norm_step_(x: Tensor, state: NormStats, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """`timestep_norm_step` that updates `state`'s tensors in place and returns y: for static decode buffers
    (CUDA graphs). The state's mean/var must be float64 (as `initial_state` makes them). Not differentiable."""
    if state.mean.dtype != STATS_DTYPE or state.var.dtype != STATS_DTYPE:
        raise ValueError(f"timestep_norm_step_ updates the state in place and needs float64 mean/var, got "
                         f"{state.mean.dtype}/{state.var.dtype}: convert once with .double() before decoding")
    y, new = timestep_norm_step(x, state, weight, bias, eps)
    state.count.copy_(new.count)
    state.mean.copy_(new.mean)
    state.var.copy_(new.var)
    return y


def timestep_norm_sequential(
    x: Tensor, initial: NormStats, weight: Tensor, bias: Tensor, eps: float, pad_mask: Tensor | None = None,
) -> tuple[Tensor, NormStats]:
    """The per-token Welford merge of spec section 5, one token at a time, in plain tensor code: the slow
    reference for tests (run it in float64)."""
    groups = initial.mean.shape[-1]
    count = initial.count.to(x.dtype).clone()
    mean, var = initial.mean.to(x.dtype).clone(), initial.var.to(x.dtype).clone()
    outputs = []
    for t in range(x.shape[1]):
        grouped = x[:, t].unflatten(-1, (groups, -1))
        mu = grouped.mean(-1)
        s2 = (grouped - mu.unsqueeze(-1)).square().mean(-1)
        new_count = count + 1
        c2 = (1.0 / new_count)[:, None]
        c1 = 1.0 - c2
        delta = mu - mean
        new_mean = c1 * mean + c2 * mu
        new_var = c1 * var + c2 * s2 + (c1 * delta) * (c2 * delta)
        xhat = (grouped - new_mean.unsqueeze(-1)) / torch.sqrt(new_var.unsqueeze(-1) + eps)
        y = xhat.flatten(-2) * (weight + 1.0) + bias
        if pad_mask is not None:
            keep = ~pad_mask[:, t]
            new_count = torch.where(keep, new_count, count)
            new_mean = torch.where(keep[:, None], new_mean, mean)
            new_var = torch.where(keep[:, None], new_var, var)
            y = y * keep[:, None].to(y.dtype)
        count, mean, var = new_count, new_mean, new_var
        outputs.append(y)
    return torch.stack(outputs, dim=1), NormStats(count.round().to(torch.int64), mean, var)
