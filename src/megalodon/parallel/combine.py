"""The parallel-prefix combine of chunk parallelism (spec section 14), as pure functions.

Rank r of P holds one segment of every sequence. It summarizes its segment from a zero incoming state; the
summaries of all ranks are gathered into one (P, B, K) tensor; every rank then runs the same short scan over the
P summaries to find its exact incoming state, and corrects its own outputs with it.

TimestepNorm: the summary is the statistics (count, mean, var) of the tokens after the segment's last document
reset, and the combine is the Chan merge:
    s(0) = the stream's incoming statistics (the prior for a fresh stream)
    s(r+1) = merge(prior if segment r restarted else s(r), local(r))
CEMA: the summary is the closed-form final state h_loc(r) of the segment entered at zero, and the combine is the
affine map
    h(0) = the stream's incoming state (zero for a fresh stream)
    h(r+1) = q**S_r * h(r) + h_loc(r)          (the first term is dropped when segment r restarted)
The outputs of a segment entered at h(r) differ from those entered at zero by Re(sum_n g q**(t+1) h(r)) at step t,
up to the segment's first reset (`megalodon.ops.cema.cema_state_bias`).

Only summaries cross ranks: B (2G + 3) float64 for a norm and B (2DN + 2) fp32 for a CEMA, whatever the segment length.
"""

from __future__ import annotations

import torch
from torch import Tensor

from megalodon.ops.cema import CemaCoefficients
from megalodon.ops.timestep_norm import STATS_DTYPE, NormStats, merge_statistics, segment_statistics


def _header(length: int, block_reset: Tensor | None, like: Tensor) -> Tensor:
    """The first two columns of every summary, (B, 2): the segment length and whether a document starts in it."""
    restarted = torch.zeros(like.shape[0], dtype=torch.bool, device=like.device) if block_reset is None \
        else block_reset.any(1)
    return torch.stack([torch.full_like(restarted, length, dtype=like.dtype), restarted.to(like.dtype)], dim=-1)


def segment_lengths(summaries: Tensor) -> Tensor:
    """The length of every segment, (P,), from gathered summaries (P, B, K) of either kind."""
    return summaries[:, 0, 0]


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


def norm_prefix(initial: NormStats, prior: NormStats, summaries: Tensor) -> NormStats:
    """The statistics entering every segment and leaving the last: summaries (P, B, 3 + 2G) from `norm_summary`.
    Returns NormStats with a leading axis of P + 1: entry r enters segment r, entry P leaves the last one."""
    groups = (summaries.shape[-1] - 3) // 2
    batch = summaries.shape[1]
    state = NormStats(initial.count.expand(batch), initial.mean.to(STATS_DTYPE).expand(batch, groups),
                      initial.var.to(STATS_DTYPE).expand(batch, groups))
    prior = NormStats(prior.count.expand(batch), prior.mean.to(STATS_DTYPE).expand(batch, groups),
                      prior.var.to(STATS_DTYPE).expand(batch, groups))
    states = [state]
    for summary in summaries:  # P steps of (B, G) work
        restarted = summary[:, 1] > 0
        start = NormStats(torch.where(restarted, prior.count, state.count),
                          *(torch.where(restarted[:, None], a, b) for a, b in zip(prior[1:], state[1:])))
        local = NormStats(summary[:, 2].round().to(torch.int64), summary[:, 3:3 + groups], summary[:, 3 + groups:])
        state = merge_statistics(start, local)
        states.append(state)
    return NormStats(*(torch.stack(t) for t in zip(*states)))


def cema_summary(h_local: Tensor, length: int, block_reset: Tensor | None = None) -> Tensor:
    """A segment's CEMA summary from its final state entered at zero, h_local (B, D, N) complex:
    (B, 2 + 2DN) real as [length, restarted, Re and Im of h_local]."""
    parts = torch.view_as_real(h_local).flatten(1)
    return torch.cat([_header(length, block_reset, parts), parts], dim=-1)


def cema_prefix(h0: Tensor, coeffs: CemaCoefficients, summaries: Tensor) -> Tensor:
    """The CEMA state entering every segment and leaving the last: h0 (B, D, N) complex, summaries (P, B, K)
    from `cema_summary`. Returns (P + 1, B, D, N): entry r enters segment r, entry P leaves the last one."""
    dim, ndim = coeffs.p.shape
    h = h0
    states = [h]
    for summary in summaries:  # P steps of (B, D, N) work
        length, restarted = summary[0, 0], summary[:, 1] > 0
        h_local = torch.view_as_complex(summary[:, 2:].reshape(-1, dim, ndim, 2).contiguous())
        decay = torch.polar(torch.exp(coeffs.log_mag * length), coeffs.phi * length)  # q**S, D x N
        h = torch.where(restarted[:, None, None], torch.zeros_like(h), decay * h) + h_local
        states.append(h)
    return torch.stack(states)
