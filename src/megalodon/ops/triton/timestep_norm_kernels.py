"""Triton kernels of the blocked TimestepNorm: the design, the math of the backward and the launches are in
ops/triton/timestep_norm.py's docstring, beside the custom ops that launch these.

x is (B, L, D) with D = G * DG; the per-token statistics (B, L, G) fp32; the running state in int64 (count) and
float64 (mean, var). The per-token kernels take (BLOCK_T tokens x one group's features) tiles; the scans take
BLOCK_T tokens x BLOCK_G groups at a time, one program per segment of a block's tiles; the carry kernels that walk
a row's segments in order (forward) or in reverse (backward) are in timestep_norm_carry.py.
"""

from __future__ import annotations

import triton
import triton.language as tl

from megalodon.ops.triton.casts import cast


@triton.jit
def _tile(pid, g, T, D, DG, BLOCK_T: tl.constexpr, BLOCK_DG: tl.constexpr):
    """Token indices, x offsets and masks of one (BLOCK_T tokens x one group's features) tile."""
    toks = pid.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_DG)
    tmask = toks < T
    cmask = cols < DG
    offs = toks[:, None] * D + g * DG + cols[None, :]
    return toks, cols, offs, tmask, cmask, tmask[:, None] & cmask[None, :]


@triton.jit
def moments_kernel(x_ptr, mu_ptr, s2_ptr, T, D, G, DG, BLOCK_T: tl.constexpr, BLOCK_DG: tl.constexpr):
    g = tl.program_id(1)
    toks, cols, offs, tmask, cmask, mask = _tile(tl.program_id(0), g, T, D, DG, BLOCK_T, BLOCK_DG)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    mu = tl.sum(x, axis=1) / DG
    xc = tl.where(mask, x - mu[:, None], 0.0)
    tl.store(mu_ptr + toks * G + g, mu, mask=tmask)
    tl.store(s2_ptr + toks * G + g, tl.sum(xc * xc, axis=1) / DG, mask=tmask)


@triton.jit
def normalize_kernel(x_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, y_ptr, copy_ptr, T, D, G, DG,
                      BLOCK_T: tl.constexpr, BLOCK_DG: tl.constexpr, COPY: tl.constexpr):
    """y in fp32 and, with COPY, y again in copy's dtype (the linears' input, which a cast would make apart)."""
    g = tl.program_id(1)
    toks, cols, offs, tmask, cmask, mask = _tile(tl.program_id(0), g, T, D, DG, BLOCK_T, BLOCK_DG)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + toks * G + g, mask=tmask, other=0.0)
    rstd = tl.load(rstd_ptr + toks * G + g, mask=tmask, other=0.0)
    scale = tl.load(w_ptr + g * DG + cols, mask=cmask, other=0.0).to(tl.float32) + 1.0
    shift = tl.load(b_ptr + g * DG + cols, mask=cmask, other=0.0).to(tl.float32)
    y = (x - mean[:, None]) * rstd[:, None] * scale[None, :] + shift[None, :]
    tl.store(y_ptr + offs, y, mask=mask)
    if COPY:
        tl.store(copy_ptr + offs, cast(y, copy_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _output_grad(dy_ptr, dcopy_ptr, offs, mask, HAS_COPY: tl.constexpr):
    """dL/dy in fp32: y's own gradient plus, with HAS_COPY, the gradient of its low-precision copy (the sum
    autograd would make with a cast and an add)."""
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_COPY:
        dy += tl.load(dcopy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return dy


@triton.jit
def _scan_rows(j, c, b, block, L, G, gs, gmask):
    """The tokens at positions j of block c in row b, for the scans: their time index, whether they exist, and
    the offsets and mask of their (token, group) statistics."""
    t = c * block + j
    valid = (j < block) & (t < L)
    offs = (b * L + t)[:, None] * G + gs[None, :]
    return t, valid, offs, valid[:, None] & gmask[None, :]


@triton.jit
def _segment(seg, segs_per_block, seg_tiles, tiles):
    """Segment seg of a row: its block c and its tiles [first, last) within that block."""
    c = seg // segs_per_block
    first = (seg % segs_per_block) * seg_tiles
    return c, first, tl.minimum(first + seg_tiles, tiles)


@triton.jit
def _segment_program(G, tiles, segs_per_block, seg_tiles, num_segments, BLOCK_T: tl.constexpr,
                     BLOCK_G: tl.constexpr):
    """A segment pass's program (row b, its groups gs, segment): the groups' mask, the rows of a tile, the
    segment's block c and tiles [first, last), and the offsets of its (B, segments, G) sums."""
    b = tl.program_id(0).to(tl.int64)
    gs = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    seg = tl.program_id(2)
    c, first, last = _segment(seg, segs_per_block, seg_tiles, tiles)
    return b, gs, gs < G, tl.arange(0, BLOCK_T), c, first, last, (b * num_segments + seg) * G + gs


@triton.jit
def _tokens_before(c, tile, block, L, BLOCK_T: tl.constexpr):
    """How many of block c's tokens come before its tile `tile` (those of the block that are in the row)."""
    return tl.minimum(tile * BLOCK_T, tl.minimum(block, L - c * block))


@triton.jit
def segment_tokens(c, first, seg_tiles, block, L, BLOCK_T: tl.constexpr):
    """How many tokens the segment of block c's tiles [first, first + seg_tiles) holds."""
    return _tokens_before(c, first + seg_tiles, block, L, BLOCK_T) - _tokens_before(c, first, block, L, BLOCK_T)


@triton.jit
def absorb(n0, m0, v0, k, part_mean, part_var):
    """Chan's merge, in float64, of k tokens of mean part_mean and variance part_var into the carry (count n0,
    mean m0, var v0); nothing where k is 0."""
    kd = k.to(tl.float64)
    n0d = n0.to(tl.float64)
    nd = tl.maximum(n0d + kd, 1.0)
    dd = part_mean - m0
    new_mean = m0 + dd * (kd / nd)
    new_var = (n0d * v0 + kd * part_var) / nd + dd * dd * (n0d / nd) * (kd / nd)
    return n0 + k, tl.where(k > 0, new_mean, m0), tl.where(k > 0, new_var, v0)


@triton.jit
def scan_fwd_kernel(mu_ptr, s2_ptr, mean_ptr, rstd_ptr, seg_mean_ptr, seg_var_ptr, bcount_ptr, in_mean_ptr,
                     in_var_ptr, L, G, block, tiles, segs_per_block, seg_tiles, num_segments, eps,
                     TOTALS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_G: tl.constexpr):
    """Grid (B, G / BLOCK_G, segments): one segment's tiles in order. TOTALS: from an empty carry, the segment's
    mean and var (float64) into seg_mean, seg_var (B, segments, G), nothing per token. Else from the carry that
    enters the segment (carry_fwd_kernel's in_mean and in_var, and its count from the block's, bcount), every
    token's cumulative mean and rstd."""
    b, gs, gmask, rows, c, first, last, at = _segment_program(G, tiles, segs_per_block, seg_tiles, num_segments,
                                                              BLOCK_T, BLOCK_G)
    if TOTALS:
        n0 = tl.full((), 0, tl.int64)
        m0 = tl.zeros([BLOCK_G], dtype=tl.float64)
        v0 = tl.zeros([BLOCK_G], dtype=tl.float64)
    else:
        num_blocks = num_segments // segs_per_block
        n0 = tl.load(bcount_ptr + b * num_blocks + c) + _tokens_before(c, first, block, L, BLOCK_T)
        m0 = tl.load(in_mean_ptr + at, mask=gmask, other=0.0)
        v0 = tl.load(in_var_ptr + at, mask=gmask, other=0.0)
    for tile in range(first, last):
        j = tile * BLOCK_T + rows  # position inside the block
        t, valid, offs, mask = _scan_rows(j, c, b, block, L, G, gs, gmask)
        mu = tl.load(mu_ptr + offs, mask=mask, other=0.0)
        s2 = tl.load(s2_ptr + offs, mask=mask, other=0.0)
        shift = tl.sum(tl.where((rows == 0)[:, None], mu, 0.0), axis=0)  # the tile's first token mean
        # statistics about the first token's mean (no catastrophic cancellation)
        d = tl.where(mask, mu - shift[None, :], 0.0)
        kt = tl.sum(valid.to(tl.int32), axis=0)
        if TOTALS:  # the tile's totals only: sums, not prefix sums
            ktf = tl.maximum(kt, 1).to(tl.float32)
            tile_mean = tl.sum(d, axis=0) / ktf
            tile_var = tl.maximum(tl.sum(tl.where(mask, s2 + d * d, 0.0), axis=0) / ktf - tile_mean * tile_mean,
                                  0.0)
        else:
            k = tl.maximum(tl.cumsum(valid.to(tl.float32), axis=0), 1.0)[:, None]
            local_mean = tl.cumsum(d, axis=0) / k  # relative to shift
            local_var = tl.maximum(tl.cumsum(tl.where(mask, s2 + d * d, 0.0), axis=0) / k
                                   - local_mean * local_mean, 0.0)
            # Chan merge of the carry into every token
            n0f = n0.to(tl.float32)
            share_a = n0f / (n0f + k)
            share_b = k / (n0f + k)
            delta = (shift - m0.to(tl.float32))[None, :] + local_mean
            mean = m0.to(tl.float32)[None, :] + delta * share_b
            var = share_a * v0.to(tl.float32)[None, :] + share_b * local_var + delta * delta * share_a * share_b
            tl.store(mean_ptr + offs, mean, mask=mask)
            tl.store(rstd_ptr + offs, tl.rsqrt(tl.maximum(var, 0.0) + eps), mask=mask)
            last_row = (rows == kt - 1)[:, None]
            tile_mean = tl.sum(tl.where(last_row, local_mean, 0.0), axis=0)
            tile_var = tl.sum(tl.where(last_row, local_var, 0.0), axis=0)
        # the carry absorbs the tile in float64, so that rounding does not grow with position
        n0, m0, v0 = absorb(n0, m0, v0, kt, shift.to(tl.float64) + tile_mean.to(tl.float64),
                             tile_var.to(tl.float64))
    if TOTALS:
        tl.store(seg_mean_ptr + at, m0, mask=gmask)
        tl.store(seg_var_ptr + at, v0, mask=gmask)


@triton.jit
def norm_bwd_kernel(x_ptr, dy_ptr, dcopy_ptr, mean_ptr, rstd_ptr, w_ptr, dm_ptr, dv_ptr, dw_ptr, db_ptr, T, D, G,
                    DG, BLOCK_T: tl.constexpr, BLOCK_DG: tl.constexpr, HAS_COPY: tl.constexpr):
    pid = tl.program_id(0)
    g = tl.program_id(1)
    toks, cols, offs, tmask, cmask, mask = _tile(pid, g, T, D, DG, BLOCK_T, BLOCK_DG)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dy = _output_grad(dy_ptr, dcopy_ptr, offs, mask, HAS_COPY)
    mean = tl.load(mean_ptr + toks * G + g, mask=tmask, other=0.0)
    rstd = tl.load(rstd_ptr + toks * G + g, mask=tmask, other=0.0)
    scale = tl.load(w_ptr + g * DG + cols, mask=cmask, other=0.0).to(tl.float32) + 1.0
    xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
    grad = dy * scale[None, :]
    tl.store(dm_ptr + toks * G + g, -rstd * tl.sum(grad, axis=1), mask=tmask)
    tl.store(dv_ptr + toks * G + g, -0.5 * rstd * rstd * tl.sum(grad * xhat, axis=1), mask=tmask)
    part = pid.to(tl.int64) * D + g * DG + cols
    tl.store(dw_ptr + part, tl.sum(dy * xhat, axis=0), mask=cmask)
    tl.store(db_ptr + part, tl.sum(dy, axis=0), mask=cmask)


@triton.jit
def scan_bwd_kernel(dm_ptr, dv_ptr, mean_ptr, bcount_ptr, dfmean_ptr, dfvar_ptr, p_ptr, c_ptr,
                     acc_a_ptr, acc_c_ptr, acc_e_ptr, shift_ptr,
                     L, G, block, num_blocks, tiles, segs_per_block, seg_tiles, num_segments,
                     TOTALS: tl.constexpr, HAS_FINAL: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_G: tl.constexpr):
    """Grid (B, G / BLOCK_G, segments): one segment's tiles in reverse. TOTALS: the segment's own sums of A, C and
    E (E relative to the shift of its first tile with tokens) into acc_a, acc_c, acc_e and shift (B, segments, G).
    Else, from the sums of everything after the segment up to the next reset (carry_bwd_kernel's, in the same
    four buffers), every token's P and C."""
    b, gs, gmask, rows, c, first, last, at = _segment_program(G, tiles, segs_per_block, seg_tiles, num_segments,
                                                              BLOCK_T, BLOCK_G)
    if HAS_FINAL:  # the state after the last token is that token's statistics: its gradient joins the last token's
        d_final_mean = tl.load(dfmean_ptr + b * G + gs, mask=gmask, other=0.0).to(tl.float32)
        d_final_var = tl.load(dfvar_ptr + b * G + gs, mask=gmask, other=0.0).to(tl.float32)
    # suffix sums after the current tile: A, C, and E relative to the shift c_e
    if TOTALS:
        acc_a = tl.zeros([BLOCK_G], dtype=tl.float32)
        acc_c = tl.zeros([BLOCK_G], dtype=tl.float32)
        acc_e = tl.zeros([BLOCK_G], dtype=tl.float32)
        c_e = tl.zeros([BLOCK_G], dtype=tl.float32)
    else:
        acc_a = tl.load(acc_a_ptr + at, mask=gmask, other=0.0)
        acc_c = tl.load(acc_c_ptr + at, mask=gmask, other=0.0)
        acc_e = tl.load(acc_e_ptr + at, mask=gmask, other=0.0)
        c_e = tl.load(shift_ptr + at, mask=gmask, other=0.0)
    n_block = tl.load(bcount_ptr + b * num_blocks + c).to(tl.float32)
    for ti in range(0, last - first):
        tile = last - 1 - ti
        j = tile * BLOCK_T + (BLOCK_T - 1 - rows)  # descending, so that a forward cumsum gives suffix sums
        t, valid, offs, mask = _scan_rows(j, c, b, block, L, G, gs, gmask)
        dm = tl.load(dm_ptr + offs, mask=mask, other=0.0)
        dv = tl.load(dv_ptr + offs, mask=mask, other=0.0)
        if HAS_FINAL:
            last_token = ((t == L - 1) & valid)[:, None]  # a padded row of another block may also sit at t
            dm += tl.where(last_token, d_final_mean[None, :], 0.0)
            dv += tl.where(last_token, d_final_var[None, :], 0.0)
        m = tl.load(mean_ptr + offs, mask=mask, other=0.0)
        # shift: the tile's first token's mean (last in this order); valid tokens are a prefix in time
        c_t = tl.sum(tl.where((rows == BLOCK_T - 1)[:, None], m, 0.0), axis=0)
        c_t = tl.where(tl.sum(valid.to(tl.int32), axis=0) > 0, c_t, c_e)
        acc_e = acc_e + (c_e - c_t) * acc_c  # rebase E to this tile's shift
        c_e = c_t
        inv_n = 1.0 / (n_block + (j + 1).to(tl.float32))[:, None]
        a = dm * inv_n
        cc = dv * inv_n
        e = dv * (m - c_t[None, :]) * inv_n
        if not TOTALS:
            sum_a = tl.cumsum(a, axis=0) + acc_a[None, :]
            sum_c = tl.cumsum(cc, axis=0) + acc_c[None, :]
            sum_e = tl.cumsum(e, axis=0) + acc_e[None, :]
            tl.store(p_ptr + offs, sum_a - 2.0 * (sum_e + (c_t[None, :] - m) * sum_c), mask=mask)
            tl.store(c_ptr + offs, sum_c, mask=mask)
        acc_a += tl.sum(a, axis=0)
        acc_c += tl.sum(cc, axis=0)
        acc_e += tl.sum(e, axis=0)
    if TOTALS:
        tl.store(acc_a_ptr + at, acc_a, mask=gmask)
        tl.store(acc_c_ptr + at, acc_c, mask=gmask)
        tl.store(acc_e_ptr + at, acc_e, mask=gmask)
        tl.store(shift_ptr + at, c_e, mask=gmask)


@triton.jit
def dx_kernel(x_ptr, dy_ptr, dcopy_ptr, mean_ptr, rstd_ptr, p_ptr, c_ptr, w_ptr, dx_ptr, T, D, G, DG,
              BLOCK_T: tl.constexpr, BLOCK_DG: tl.constexpr, HAS_COPY: tl.constexpr):
    g = tl.program_id(1)
    toks, cols, offs, tmask, cmask, mask = _tile(tl.program_id(0), g, T, D, DG, BLOCK_T, BLOCK_DG)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dy = _output_grad(dy_ptr, dcopy_ptr, offs, mask, HAS_COPY)
    mean = tl.load(mean_ptr + toks * G + g, mask=tmask, other=0.0)
    rstd = tl.load(rstd_ptr + toks * G + g, mask=tmask, other=0.0)
    p = tl.load(p_ptr + toks * G + g, mask=tmask, other=0.0)
    c = tl.load(c_ptr + toks * G + g, mask=tmask, other=0.0)
    scale = tl.load(w_ptr + g * DG + cols, mask=cmask, other=0.0).to(tl.float32) + 1.0
    dx = dy * scale[None, :] * rstd[:, None] + (p[:, None] + 2.0 * c[:, None] * (x - mean[:, None])) / DG
    tl.store(dx_ptr + offs, cast(dx, dx_ptr.dtype.element_ty), mask=mask)
