"""TimestepNorm (spec section 5): causal group normalization along time, as pure functions.

Every token contributes one observation per group: its group mean mu_t and its within-token variance s2_t.
The running statistics after token t merge all observations up to and including t (Chan/Welford, each token
weighing 1), starting from an incoming state (count, mean, var).

Paths (`timestep_norm` picks one; the layer never asks which device it is on):
- `timestep_norm_blocked`, PyTorch, any device and dtype: the fallback, and the only path with a pad_mask.
  1. Per-token moments (mu, s2): (B, L, D) -> (B, L, G).
  2. The running statistics on the small (B, L, G) tensors, blocked on the chunk grid
     (ops/timestep_norm_stats.py).
  3. y = (x - mean_t) * rstd_t * (weight + 1) + bias.
  One autograd.Function with a hand-written backward: a few passes over the activations (the normalization's
  gradient, then dx = g * rstd + (P + 2 C (x - mean_t)) / (D/G) with g = dy * (weight + 1)) around the reverse scan
  `causal_statistics_backward`, instead of autograd's dozens of passes. It saves x, mean_t, rstd_t and the counts.
- `megalodon.ops.triton.timestep_norm`: fused Triton kernels, on CUDA for fp32/bf16/fp16 input without a pad_mask.
- `timestep_norm_step` / `timestep_norm_step_`: one token per row, the decode step (in place for CUDA graphs).
- For chunk parallelism (spec section 14): `segment_statistics` (a segment's statistics from an empty state),
  `merge_statistics` (Chan), and `timestep_norm_blocked` with the merged incoming state. All differentiable.

Precision: per-token statistics are computed in fp32 (or the input's dtype if wider); the running statistics that
a stream carries (`NormStats.mean`, `.var`) are float64, and every merge into them is done in float64. A fp32
carry cannot follow an unbounded stream: at count n the decode step's increments (mu - m) / n fall below fp32's
resolution and its error grows with position (1.6e-3 relative at 200K tokens).

`timestep_norm_sequential` is the per-token merge written out, in plain tensor code: the slow reference for tests.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from megalodon.ops.timestep_norm_stats import (STATS_DTYPE, NormStats, causal_statistics_backward, chan_merge,
                                               per_row, running_statistics)
from megalodon.ops.triton import use_triton

__all__ = ["STATS_DTYPE", "NormStats", "chan_merge", "merge_statistics", "normalize",
           "segment_statistics", "timestep_norm", "timestep_norm_blocked", "timestep_norm_sequential",
           "timestep_norm_step", "timestep_norm_step_", "token_moments", "with_copy"]


# ---- per-token pieces over the full activations (B, L, D), with fused backward passes -------------------------

def _moments(grouped: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and population variance over the last dim, two-pass. (torch.var_mean is 10x slower over a short last
    dim on CPU; the norm of the centered values saves a pass over squaring then averaging.)"""
    mean = grouped.mean(-1)
    return mean, torch.linalg.vector_norm(grouped - mean.unsqueeze(-1), dim=-1).square() / grouped.shape[-1]


def _group_moments(x: Tensor, groups: int) -> tuple[Tensor, Tensor]:
    return _moments(x.to(torch.promote_types(x.dtype, torch.float32)).unflatten(-1, (groups, -1)))


class _TokenMoments(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, groups: int) -> tuple[Tensor, Tensor]:
        mean, var = _group_moments(x, groups)
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


def _needs_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def token_moments(x: Tensor, num_groups: int) -> tuple[Tensor, Tensor]:
    """Per-token group mean and population variance: x (..., D) -> two (..., G), in fp32 or wider."""
    if not _needs_grad(x):  # e.g. a decode step: the same numbers without the autograd Function's overhead
        return _group_moments(x, num_groups)
    return _TokenMoments.apply(x, num_groups)


def _normalized(grouped: Tensor, mean: Tensor, rstd: Tensor) -> Tensor:
    return (grouped - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)


def _affine_backward(dy: Tensor, xhat: Tensor, rstd: Tensor, weight: Tensor) -> tuple[Tensor, ...]:
    """Through y = xhat * (w + 1) + b, xhat = (x - m) * rstd, rstd = (v + eps)^-1/2, on grouped (..., G, D/G)
    tensors: g = dy * (w + 1), dm = -rstd * sum(g), dv = -rstd^2 / 2 * sum(g * xhat), and the weight and bias
    gradients (D,)."""
    scale = (weight + 1.0).to(xhat.dtype).view(xhat.shape[-2:])
    g = dy * scale
    dy_xhat = dy * xhat
    d_mean = -rstd * g.sum(-1)
    d_var = (-0.5 * rstd.square()) * (dy_xhat * scale).sum(-1)
    d_weight = dy_xhat.flatten(0, -3).sum(0).flatten().to(weight.dtype)
    d_bias = dy.flatten(0, -3).sum(0).flatten().to(weight.dtype)
    return g, d_mean, d_var, d_weight, d_bias


def _normalize(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor, bias: Tensor,
               eps: float) -> tuple[Tensor, Tensor]:
    """normalize()'s output and the rstd it used."""
    rstd = torch.rsqrt(var + eps)
    xhat = _normalized(x.to(mean.dtype).unflatten(-1, (mean.shape[-1], -1)), mean, rstd)
    return torch.addcmul(bias.to(mean.dtype), xhat.flatten(-2), (weight + 1.0).to(mean.dtype)), rstd


class _Normalize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, mean: Tensor, var: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
        y, rstd = _normalize(x, mean, var, weight, bias, eps)
        ctx.save_for_backward(x, mean, rstd, weight)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, mean, rstd, weight = ctx.saved_tensors
        xhat = _normalized(x.to(mean.dtype).unflatten(-1, (mean.shape[-1], -1)), mean, rstd)
        g, d_mean, d_var, d_weight, d_bias = _affine_backward(dy.unflatten(-1, xhat.shape[-2:]), xhat, rstd, weight)
        return (g * rstd.unsqueeze(-1)).flatten(-2).to(x.dtype), d_mean, d_var, d_weight, d_bias, None


def normalize(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """(x - mean[g]) * rsqrt(var[g] + eps) * (weight + 1) + bias, with per-group stats (..., G), in their dtype."""
    if not _needs_grad(x, mean, var, weight, bias):
        return _normalize(x, mean, var, weight, bias, eps)[0]
    return _Normalize.apply(x, mean, var, weight, bias, eps)


# ---- statistics of whole segments (chunk parallelism) -----------------------------------------------------------

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
    copy_dtype: torch.dtype | None = None,
) -> tuple[Tensor, NormStats] | tuple[Tensor, Tensor, NormStats]:
    """Normalize x (B, L, D) causally along time; return y (fp32 or wider) and the statistics after the last token,
    and with copy_dtype (y, y in copy_dtype, statistics).

    initial: incoming state; count (B,), mean/var (B, G).
    block_size: cut time into blocks of this many steps (the chunk grid; default: one block).
    block_reset: (B, num_blocks) bool; True restarts the statistics at `prior` (default: `initial`) at that
    block's first step.
    pad_mask: (B, L) bool, True = padding: the token does not update the statistics and its output is 0.
    copy_dtype: the dtype of the linears that read y (bf16 under autocast): the Triton path writes that copy in
    the same pass as y, and adds the copy's gradient to y's inside its backward (no cast and no add apart). y
    itself where copy_dtype is y's dtype.

    The one place that decides the path: the Triton kernels for CUDA tensors (fp32/bf16/fp16, no pad_mask),
    otherwise the PyTorch path.
    """
    _check(x, initial, block_size, block_reset)
    if x.shape[1] == 0:
        stats_dtype = torch.promote_types(x.dtype, torch.float32)
        rows = per_row(initial, x.shape[0], initial.mean.shape[-1])
        return with_copy(x.to(stats_dtype), NormStats(*(t.clone() for t in rows)), copy_dtype)
    if pad_mask is None and x.dtype != torch.float64 and use_triton("timestep_norm", x):
        from megalodon.ops.triton.timestep_norm import timestep_norm_triton

        return timestep_norm_triton(x, initial, weight, bias, eps, block_size, block_reset, prior, copy_dtype)
    return with_copy(*timestep_norm_blocked(x, initial, weight, bias, eps, block_size, block_reset, prior, pad_mask),
                     copy_dtype)


def with_copy(y: Tensor, stats: NormStats,
              copy_dtype: torch.dtype | None) -> tuple[Tensor, NormStats] | tuple[Tensor, Tensor, NormStats]:
    """(y, stats), or with copy_dtype (y, y in copy_dtype, stats): timestep_norm's returns on a path that casts."""
    if copy_dtype is None:
        return y, stats
    return y, y.to(copy_dtype), stats


class _BlockedTimestepNorm(torch.autograd.Function):
    """The PyTorch path of timestep_norm: forward as in the module docstring, backward by hand."""

    @staticmethod
    def forward(ctx, x: Tensor, count: Tensor, mean: Tensor, var: Tensor, prior_count: Tensor, prior_mean: Tensor,
                prior_var: Tensor, weight: Tensor, bias: Tensor, eps: float, block_size: int | None,
                block_reset: Tensor | None, valid: Tensor | None):
        grouped = x.to(torch.promote_types(x.dtype, torch.float32)).unflatten(-1, (mean.shape[-1], -1))
        mu, s2 = _moments(grouped)
        mean_t, var_t, final, count_t = running_statistics(
            mu, s2, NormStats(count, mean, var), block_size, block_reset, NormStats(prior_count, prior_mean, prior_var),
            valid)
        rstd = torch.rsqrt(var_t + eps)
        y = torch.addcmul(bias.to(mu.dtype), _normalized(grouped, mean_t, rstd).flatten(-2),
                          (weight + 1.0).to(mu.dtype))
        if valid is not None:
            y = y.masked_fill(~valid.unsqueeze(-1), 0.0)
        ctx.save_for_backward(x, mean_t, rstd, count_t, count, mean, prior_count, prior_mean, weight, block_reset,
                              valid)
        ctx.block_size = block_size
        ctx.mark_non_differentiable(final.count)
        return y, final.count, final.mean, final.var

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor, _d_count, d_final_mean: Tensor, d_final_var: Tensor):
        x, mean_t, rstd, count_t, count, mean, prior_count, prior_mean, weight, block_reset, valid = ctx.saved_tensors
        grouped = x.to(mean_t.dtype).unflatten(-1, (mean_t.shape[-1], -1))
        dy = dy.unflatten(-1, grouped.shape[-2:])
        if valid is not None:  # padded outputs are constant zeros
            dy = dy * valid[..., None, None]
        xhat = _normalized(grouped, mean_t, rstd)
        g, d_mean_t, d_var_t, d_weight, d_bias = _affine_backward(dy, xhat, rstd, weight)
        d_mean_t[:, -1] += d_final_mean.to(d_mean_t.dtype)  # the final state is the last token's statistics
        d_var_t[:, -1] += d_final_var.to(d_var_t.dtype)
        p, c, d_mean, d_var, d_prior_mean, d_prior_var = causal_statistics_backward(
            d_mean_t, d_var_t, mean_t, count_t, ctx.block_size, block_reset, (count, mean), (prior_count, prior_mean))
        if valid is not None:  # padding does not enter the statistics
            p, c = p * valid[..., None], c * valid[..., None]
        # dx = g * rstd + (P + 2 C (x - m)) / n, with x - m = xhat / rstd
        n = grouped.shape[-1]
        dx = torch.addcmul((p / n).unsqueeze(-1), xhat, (c * (2.0 / n) / rstd).unsqueeze(-1))
        dx.addcmul_(g, rstd.unsqueeze(-1))
        return (dx.flatten(-2).to(x.dtype), None, d_mean.to(mean.dtype), d_var.to(mean.dtype), None,
                d_prior_mean.to(prior_mean.dtype), d_prior_var.to(prior_mean.dtype), d_weight, d_bias, None, None,
                None, None)


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
    batch, groups = x.shape[0], initial.mean.shape[-1]
    initial_rows = per_row(initial, batch, groups)
    # views of their own even when prior is initial: torch.compile refuses one tensor passed twice to a Function
    prior_rows = per_row(initial if prior is None else prior, batch, groups)
    y, count, mean, var = _BlockedTimestepNorm.apply(x, *initial_rows, *prior_rows, weight, bias, eps, block_size,
                                                     block_reset, None if pad_mask is None else ~pad_mask)
    return y, NormStats(count, mean, var)


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


def _step_kernel_runs(x: Tensor, state: NormStats, weight: Tensor, bias: Tensor) -> bool:
    """The fused step kernel: CUDA, not float64, and no gradient wanted (it is inference-only)."""
    return (not _needs_grad(x, weight, bias, state.mean, state.var) and x.dtype != torch.float64
            and use_triton("timestep_norm_step", x))


def _step_kernel(x: Tensor, state: NormStats, weight: Tensor, bias: Tensor, eps: float,
                 copy_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """y (B, 1, D) fp32, and y in copy_dtype (an empty tensor where None)."""
    from megalodon.ops.triton.timestep_norm_step import timestep_norm_step_kernel

    y, copy = timestep_norm_step_kernel(x[:, 0].contiguous(), state.count, state.mean, state.var,
                                        weight.contiguous(), bias.contiguous(), float(eps), copy_dtype)
    return y.unsqueeze(1), copy.unsqueeze(1)


def timestep_norm_step(x: Tensor, state: NormStats, weight: Tensor, bias: Tensor,
                       eps: float) -> tuple[Tensor, NormStats]:
    """One token per row, x (B, 1, D): the Welford update of spec section 5, for decoding. No host syncs.

    On CUDA without autograd it is one Triton kernel (MEGALODON_DISABLE_TRITON=timestep_norm_step turns it off)."""
    if _step_kernel_runs(x, state, weight, bias):
        new = NormStats(state.count.to(torch.int64).clone(), state.mean.to(STATS_DTYPE).clone(),
                        state.var.to(STATS_DTYPE).clone())
        return _step_kernel(x, new, weight, bias, eps)[0], new
    mu, s2 = token_moments(x[:, 0], state.mean.shape[-1])
    new = _welford(mu, s2, state)
    y = normalize(x[:, 0], new.mean.to(mu.dtype), new.var.to(mu.dtype), weight, bias, eps)
    return y.unsqueeze(1), new


@torch.no_grad()
def timestep_norm_step_(x: Tensor, state: NormStats, weight: Tensor, bias: Tensor, eps: float,
                        copy_dtype: torch.dtype | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """`timestep_norm_step` that updates `state`'s tensors in place and returns y: for static decode buffers
    (CUDA graphs). The state must be contiguous, with int64 count and float64 mean/var (as `initial_state` makes
    them). Not differentiable. copy_dtype: return (y, y in copy_dtype), the step's kernel writing both."""
    if state.count.dtype != torch.int64 or state.mean.dtype != STATS_DTYPE or state.var.dtype != STATS_DTYPE:
        raise ValueError(f"timestep_norm_step_ updates the state in place and needs an int64 count and float64 "
                         f"mean/var, got {state.count.dtype}/{state.mean.dtype}/{state.var.dtype}: convert the "
                         "state once (.double() on mean and var) before decoding")
    if not all(t.is_contiguous() for t in state):
        raise ValueError("timestep_norm_step_ needs contiguous state tensors: .contiguous() them once")
    if _step_kernel_runs(x, state, weight, bias):
        copied = copy_dtype not in (None, torch.float32)  # y itself is fp32
        y, copy = _step_kernel(x, state, weight, bias, eps, copy_dtype if copied else None)
        return y if copy_dtype is None else (y, copy if copied else y)
    y, new = timestep_norm_step(x, state, weight, bias, eps)
    for buffer, value in zip(state, new):
        buffer.copy_(value)
    return y if copy_dtype is None else (y, y.to(copy_dtype))


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
