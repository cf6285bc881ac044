"""The combine of chunk parallelism (spec section 14), as pure functions.

Rank r of P holds one segment of every sequence. It summarizes its segment from a zero incoming state; the
summaries of all ranks are gathered into one (P, B, K) tensor; every rank then computes its exact incoming state
from the summaries before it, and corrects its own outputs with it.

The recurrences over segments:
    TimestepNorm   s(0) = the stream's incoming statistics (the prior for a fresh stream)
                   s(r+1) = ChanMerge(prior if segment r restarted else s(r), local(r))
    CEMA           h(0) = the stream's incoming state (zero for a fresh stream)
                   h(r+1) = q**S_r h(r) + h_loc(r)          (the first term dropped when segment r restarted)
where local(r) holds the statistics of segment r's tokens after its last document reset, and h_loc(r) its final
state entered at zero. Both unroll into one sum over the segments since the last restart before r, so each rank
evaluates its own entry directly, in a fixed number of tensor ops whatever P is, with no loop over ranks:
    s(r): count-weighted mean and variance of the start state and the segments in the window, in two passes;
    h(r) = sum_s q**(E_r - E_{s+1}) h_loc(s) (+ q**E_r h(0) if no restart), E_k = tokens before segment k.
(The tests check the result against the whole sequence run token by token.)
The outputs of a segment entered at h(r) differ from those entered at zero by Re(sum_n g q**(t+1) h(r)) at step t,
up to the segment's first reset (`megalodon.ops.cema.cema_state_bias`).

Only summaries cross ranks: B (3 + 2G) float64 for a norm and B (2 + 2DN) fp32 for a CEMA, whatever the length.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from megalodon.ops.cema import CemaCoefficients
from megalodon.ops.timestep_norm import STATS_DTYPE, NormStats, segment_statistics


def _header(length: int, block_reset: Tensor | None, like: Tensor) -> Tensor:
    """The first two columns of every summary, (B, 2): the segment length and whether a document starts in it."""
    restarted = torch.zeros(like.shape[0], dtype=torch.bool, device=like.device) if block_reset is None \
        else block_reset.any(1)
    return torch.stack([torch.full_like(restarted, length, dtype=like.dtype), restarted.to(like.dtype)], dim=-1)


def segment_lengths(summaries: Tensor) -> Tensor:
    """The length of every segment, (P,), from gathered summaries (P, B, K) of either kind."""
    return summaries[:, 0, 0]


def _window(summaries: Tensor, target: int) -> tuple[Tensor, Tensor]:
    """Which segments reach the state entering segment `target` (P for the state after the last one): those from
    the last restart before it on. Returns `inside` (P, B) bool and `from_start` (B,) bool, True where no
    segment before the target restarted, so that the stream's incoming state reaches it too."""
    restarted = summaries[:, :, 1] > 0  # P x B
    index = torch.arange(summaries.shape[0], device=summaries.device)[:, None]
    before = index < target
    last = torch.where(restarted & before, index, -1).amax(0)  # B: the last restart before the target, or -1
    return before & (index >= last), last < 0


def norm_summary(x: Tensor, num_groups: int, block_size: int | None = None,
                 block_reset: Tensor | None = None) -> Tensor:
    """The statistics of a segment's tokens after its last reset, from an empty state: x (B, L, D) ->
    (B, 3 + 2G) float64 as [length, restarted, count, mean (G), var (G)]."""
    batch, length, _ = x.shape
    before_reset = None
    if block_reset is not None:  # the tokens before the last reset do not reach the next segment
        blocks = torch.arange(block_reset.shape[1], device=x.device)
        last = torch.where(block_reset, blocks, 0).amax(1)  # B: the last restarted block, or 0
        start = last * (length if block_size is None else block_size)
        before_reset = torch.arange(length, device=x.device) < start[:, None]
    stats = segment_statistics(x, num_groups, before_reset)
    return torch.cat([_header(length, block_reset, stats.mean), stats.count[:, None].to(STATS_DTYPE), stats.mean,
                      stats.var], dim=-1)


def norm_incoming(initial: NormStats, prior: NormStats, summaries: Tensor, targets: Sequence[int]) -> NormStats:
    """The statistics entering each target segment (P = after the last one), stacked along a leading axis.

    initial: the stream's incoming statistics; prior: where a document restarts them; summaries (P, B, 3 + 2G)
    from `norm_summary`."""
    groups = (summaries.shape[-1] - 3) // 2
    batch = summaries.shape[1]
    counts, means, variances = summaries[:, :, 2], summaries[:, :, 3:3 + groups], summaries[:, :, 3 + groups:]
    states = []
    for target in targets:
        inside, from_start = _window(summaries, target)
        start = NormStats(*(torch.where(from_start.view(-1, *[1] * (a.dim() - 1)), a, b) for a, b in
                            zip(_expand(initial, batch, groups), _expand(prior, batch, groups))))
        weights = counts * inside  # P x B
        n0 = start.count.to(STATS_DTYPE)
        total = n0 + weights.sum(0)  # B
        safe = total.clamp(min=1.0)[:, None]
        mean = (n0[:, None] * start.mean + (weights[..., None] * means).sum(0)) / safe
        spread = n0[:, None] * (start.var + (start.mean - mean).square()) \
            + (weights[..., None] * (variances + (means - mean).square())).sum(0)
        empty = (total == 0)[:, None]  # nothing seen yet: the start state as it is
        states.append(NormStats(start.count + weights.sum(0).round().to(torch.int64),
                                torch.where(empty, start.mean, mean), torch.where(empty, start.var, spread / safe)))
    return NormStats(*(torch.stack(t) for t in zip(*states)))


def _expand(stats: NormStats, batch: int, groups: int) -> NormStats:
    return NormStats(stats.count.expand(batch), stats.mean.to(STATS_DTYPE).expand(batch, groups),
                     stats.var.to(STATS_DTYPE).expand(batch, groups))


def cema_summary(h_local: Tensor, length: int, block_reset: Tensor | None = None) -> Tensor:
    """A segment's CEMA summary from its final state entered at zero, h_local (B, D, N) complex:
    (B, 2 + 2DN) real as [length, restarted, Re and Im of h_local]."""
    parts = torch.view_as_real(h_local).flatten(1)
    return torch.cat([_header(length, block_reset, parts), parts], dim=-1)


def _q_power(coeffs: CemaCoefficients, exponent: Tensor) -> Tensor:
    """q**e for exponents e (...,) >= 0: (..., D, N) complex, via exp(e log|q|), which underflows to 0 cleanly.
    In float64, then cast: at e ~ 1e7 tokens an fp32 product e * phi would be off by radians."""
    e = exponent.to(torch.float64)[..., None, None]
    power = torch.polar(torch.exp(coeffs.log_mag.to(torch.float64) * e), coeffs.phi.to(torch.float64) * e)
    return power.to(torch.complex128 if coeffs.phi.dtype == torch.float64 else torch.complex64)


def cema_incoming(h0: Tensor, coeffs: CemaCoefficients, summaries: Tensor, targets: Sequence[int]) -> Tensor:
    """The CEMA state entering each target segment (P = after the last one): (len(targets), B, D, N) complex.

    h0: the stream's incoming state (B, D, N) complex; summaries (P, B, 2 + 2DN) from `cema_summary`."""
    num, batch = summaries.shape[:2]
    dim, ndim = coeffs.p.shape
    lengths = summaries[:, 0, 0].to(torch.float64)
    ends = torch.cumsum(lengths, 0)  # E_{s+1}: tokens up to the end of segment s
    starts = torch.cat([ends.new_zeros(1), ends])  # E_k for k = 0..P
    h_local = torch.view_as_complex(summaries[:, :, 2:].reshape(num, batch, dim, ndim, 2).contiguous())
    states = []
    for target in targets:
        inside, from_start = _window(summaries, target)
        # Segments at or after the target get exponent 0 (not a negative one, which would overflow) and weight 0.
        decay = _q_power(coeffs, (starts[target] - ends).clamp(min=0.0))  # P x D x N
        h = (inside[..., None, None] * decay[:, None] * h_local).sum(0)
        states.append(h + from_start[:, None, None] * _q_power(coeffs, starts[target]) * h0)
    return torch.stack(states)
