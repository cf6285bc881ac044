"""Triton kernels of the blocked TimestepNorm's carries (ops/triton/timestep_norm.py, steps 3 and 9): one warp
per (row, BLOCK_G groups) walks the row's segments, in order for the forward's Chan merges and in reverse for the
backward's sums, between the scans' two parallel passes (timestep_norm_kernels.py).

A segment's stores may alias the next segment's loads as far as the compiler knows, so a load after them waited
for memory every segment; the sums of SEGS segments are loaded at once instead, before any of their stores.
"""

from __future__ import annotations

import triton
import triton.language as tl

from megalodon.ops.triton.registers import both, column
from megalodon.ops.triton.timestep_norm_kernels import absorb, segment_tokens


@triton.jit
def _segments_ahead(ptr, b, num_segments, seg0, gs, gmask, G, cols):
    """The (BLOCK_G, SEGS) sums of segments seg0 .. seg0 + SEGS - 1 (0 past the last), loaded at once: the carry
    kernels' loads would otherwise follow each segment's stores, which they may alias, one memory latency each."""
    segs = seg0 + cols
    live = (segs >= 0) & (segs < num_segments)
    return tl.load(ptr + (b * num_segments + segs[None, :]) * G + gs[:, None], mask=gmask[:, None] & live[None, :],
                   other=0.0)


@triton.jit
def _resets_ahead(reset_ptr, b, num_blocks, segs_per_block, num_segments, seg0, cols):
    """Whether each of segments seg0 .. seg0 + SEGS - 1 begins a block that restarts at the prior (SEGS,)."""
    segs = seg0 + cols
    live = (segs >= 0) & (segs < num_segments)
    first = live & (segs % segs_per_block == 0)
    safe = tl.where(live, segs, 0) // segs_per_block
    return tl.where(first, tl.load(reset_ptr + b * num_blocks + safe, mask=live, other=0) != 0, False)


@triton.jit
def _flag(flags, cols, k: tl.constexpr):
    """Element k of a (SEGS,) bool vector, as a scalar."""
    return tl.sum(tl.where(cols == k, flags.to(tl.int32), 0), axis=0) != 0


@triton.jit
def carry_fwd_kernel(seg_mean_ptr, seg_var_ptr, count_ptr, mean0_ptr, var0_ptr, pcount_ptr, pmean_ptr, pvar_ptr,
                     reset_ptr, in_mean_ptr, in_var_ptr, bcount_ptr, fcount_ptr, fmean_ptr, fvar_ptr,
                     L, G, block, num_blocks, segs_per_block, seg_tiles,
                     HAS_RESET: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_G: tl.constexpr, SEGS: tl.constexpr):
    """Grid (B, G / BLOCK_G): the scan over a row's segments, from the incoming state (count, mean, var), restarting
    at the prior where block_reset says so. Writes the mean and var entering every segment (in_mean, in_var),
    the count entering every block (bcount (B, num_blocks); a segment's follows from it) and the final state.
    SEGS segments' sums are loaded at a time (_segments_ahead)."""
    b = tl.program_id(0).to(tl.int64)
    pid_g = tl.program_id(1)
    gs = pid_g * BLOCK_G + tl.arange(0, BLOCK_G)
    gmask = gs < G
    cols = tl.arange(0, SEGS)
    n0 = tl.load(count_ptr + b)  # the carry: int64 count, float64 mean and var
    m0 = tl.load(mean0_ptr + b * G + gs, mask=gmask, other=0.0)
    v0 = tl.load(var0_ptr + b * G + gs, mask=gmask, other=0.0)
    pn = tl.load(pcount_ptr + b)
    pm = tl.load(pmean_ptr + b * G + gs, mask=gmask, other=0.0)
    pv = tl.load(pvar_ptr + b * G + gs, mask=gmask, other=0.0)
    num_segments = num_blocks * segs_per_block
    for seg0 in range(0, num_segments, SEGS):
        means = _segments_ahead(seg_mean_ptr, b, num_segments, seg0, gs, gmask, G, cols)
        variances = _segments_ahead(seg_var_ptr, b, num_segments, seg0, gs, gmask, G, cols)
        if HAS_RESET:
            resets = _resets_ahead(reset_ptr, b, num_blocks, segs_per_block, num_segments, seg0, cols)
        for k in tl.static_range(SEGS):
            seg = seg0 + k
            valid = seg < num_segments
            c = seg // segs_per_block
            s = seg - c * segs_per_block
            if HAS_RESET:
                reset = _flag(resets, cols, k)
                n0 = tl.where(reset, pn, n0)
                m0 = tl.where(reset, pm, m0)
                v0 = tl.where(reset, pv, v0)
            tl.store(bcount_ptr + b * num_blocks + c, n0, mask=both(both(pid_g == 0, s == 0), valid))
            at = (b * num_segments + seg) * G + gs
            tl.store(in_mean_ptr + at, m0, mask=both(gmask, valid))
            tl.store(in_var_ptr + at, v0, mask=both(gmask, valid))
            k_tokens = tl.where(valid, segment_tokens(c, s * seg_tiles, seg_tiles, block, L, BLOCK_T), 0)
            n0, m0, v0 = absorb(n0, m0, v0, k_tokens.to(tl.int64), column(means, cols, k),
                                 column(variances, cols, k))
    tl.store(fcount_ptr + b, n0, mask=pid_g == 0)
    tl.store(fmean_ptr + b * G + gs, m0, mask=gmask)
    tl.store(fvar_ptr + b * G + gs, v0, mask=gmask)


@triton.jit
def carry_bwd_kernel(seg_a_ptr, seg_c_ptr, seg_e_ptr, seg_shift_ptr, in_a_ptr, in_c_ptr, in_e_ptr, in_shift_ptr,
                     reset_ptr, count_ptr, mean0_ptr, pcount_ptr, pmean_ptr,
                     dmean0_ptr, dvar0_ptr, dpmean_ptr, dpvar_ptr, L, G, block, num_blocks, segs_per_block, seg_tiles,
                     HAS_RESET: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_G: tl.constexpr, SEGS: tl.constexpr):
    """Grid (B, G / BLOCK_G): the reverse scan over a row's segments of their sums (scan_bwd_kernel's TOTALS pass):
    writes the sums after every segment (in_a, in_c, in_e relative to in_shift), hands what reaches a reset to
    the prior's gradient and clears it there, and what reaches the start to the incoming state's gradient.
    SEGS segments' sums are loaded at a time (_segments_ahead), the last SEGS first."""
    b = tl.program_id(0).to(tl.int64)
    gs = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    gmask = gs < G
    cols = tl.arange(0, SEGS)
    acc_a = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc_c = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc_e = tl.zeros([BLOCK_G], dtype=tl.float32)
    c_e = tl.zeros([BLOCK_G], dtype=tl.float32)
    d_prior_mean = tl.zeros([BLOCK_G], dtype=tl.float32)
    d_prior_var = tl.zeros([BLOCK_G], dtype=tl.float32)
    pn = tl.load(pcount_ptr + b).to(tl.float32)
    pm = tl.load(pmean_ptr + b * G + gs, mask=gmask, other=0.0).to(tl.float32)
    num_segments = num_blocks * segs_per_block
    for done in range(0, num_segments, SEGS):
        seg0 = num_segments - done - SEGS  # this group's segments, seg0 .. seg0 + SEGS - 1, walked from the last
        a_sums = _segments_ahead(seg_a_ptr, b, num_segments, seg0, gs, gmask, G, cols)
        c_sums = _segments_ahead(seg_c_ptr, b, num_segments, seg0, gs, gmask, G, cols)
        e_sums = _segments_ahead(seg_e_ptr, b, num_segments, seg0, gs, gmask, G, cols)
        shifts = _segments_ahead(seg_shift_ptr, b, num_segments, seg0, gs, gmask, G, cols)
        if HAS_RESET:
            resets = _resets_ahead(reset_ptr, b, num_blocks, segs_per_block, num_segments, seg0, cols)
        for k in tl.static_range(SEGS - 1, -1, -1):
            seg = seg0 + k
            valid = seg >= 0
            c = tl.where(valid, seg, 0) // segs_per_block
            s = tl.where(valid, seg, 0) - c * segs_per_block
            at = (b * num_segments + seg) * G + gs
            tl.store(in_a_ptr + at, acc_a, mask=both(gmask, valid))
            tl.store(in_c_ptr + at, acc_c, mask=both(gmask, valid))
            tl.store(in_e_ptr + at, acc_e, mask=both(gmask, valid))
            tl.store(in_shift_ptr + at, c_e, mask=both(gmask, valid))
            tokens = tl.where(valid, segment_tokens(c, s * seg_tiles, seg_tiles, block, L, BLOCK_T), 0)
            shift = tl.where(tokens > 0, column(shifts, cols, k), c_e)
            acc_e = acc_e + (c_e - shift) * acc_c + column(e_sums, cols, k)
            c_e = shift
            acc_a += column(a_sums, cols, k)
            acc_c += column(c_sums, cols, k)
            if HAS_RESET:  # after the block's first segment: what reaches its start
                reset = _flag(resets, cols, k)
                d_prior_mean += tl.where(reset, pn * (acc_a + 2.0 * (pm - c_e) * acc_c - 2.0 * acc_e), 0.0)
                d_prior_var += tl.where(reset, pn * acc_c, 0.0)
                acc_a = tl.where(reset, 0.0, acc_a)
                acc_c = tl.where(reset, 0.0, acc_c)
                acc_e = tl.where(reset, 0.0, acc_e)
    n_in = tl.load(count_ptr + b).to(tl.float32)
    m_in = tl.load(mean0_ptr + b * G + gs, mask=gmask, other=0.0).to(tl.float32)
    # in the state's dtype (float64): no conversion afterwards
    d_mean0 = n_in * (acc_a + 2.0 * (m_in - c_e) * acc_c - 2.0 * acc_e)
    tl.store(dmean0_ptr + b * G + gs, d_mean0.to(dmean0_ptr.dtype.element_ty), mask=gmask)
    tl.store(dvar0_ptr + b * G + gs, (n_in * acc_c).to(dvar0_ptr.dtype.element_ty), mask=gmask)
    tl.store(dpmean_ptr + b * G + gs, d_prior_mean.to(dpmean_ptr.dtype.element_ty), mask=gmask)
    tl.store(dpvar_ptr + b * G + gs, d_prior_var.to(dpvar_ptr.dtype.element_ty), mask=gmask)
