"""Triton kernels of the blocked TimestepNorm: the design, the math of the backward and the launches are in
ops/triton/timestep_norm.py's docstring, beside the custom ops that launch these.

x is (B, L, D) with D = G * DG; the per-token statistics (B, L, G) fp32; the running state in int64 (count) and
float64 (mean, var). The per-token kernels take (BLOCK_T tokens x one group's features) tiles; the scans walk a
row's blocks in order, BLOCK_T tokens x BLOCK_G groups at a time.
"""

from __future__ import annotations

import triton
import triton.language as tl


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
def normalize_kernel(x_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, y_ptr, T, D, G, DG,
                      BLOCK_T: tl.constexpr, BLOCK_DG: tl.constexpr):
    g = tl.program_id(1)
    toks, cols, offs, tmask, cmask, mask = _tile(tl.program_id(0), g, T, D, DG, BLOCK_T, BLOCK_DG)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + toks * G + g, mask=tmask, other=0.0)
    rstd = tl.load(rstd_ptr + toks * G + g, mask=tmask, other=0.0)
    scale = tl.load(w_ptr + g * DG + cols, mask=cmask, other=0.0).to(tl.float32) + 1.0
    shift = tl.load(b_ptr + g * DG + cols, mask=cmask, other=0.0).to(tl.float32)
    y = (x - mean[:, None]) * rstd[:, None] * scale[None, :] + shift[None, :]
    tl.store(y_ptr + offs, y, mask=mask)


@triton.jit
def _scan_rows(j, c, b, block, L, G, gs, gmask):
    """The tokens at positions j of block c in row b, for the scans: their time index, whether they exist, and
    the offsets and mask of their (token, group) statistics."""
    t = c * block + j
    valid = (j < block) & (t < L)
    offs = (b * L + t)[:, None] * G + gs[None, :]
    return t, valid, offs, valid[:, None] & gmask[None, :]


@triton.jit
def scan_fwd_kernel(mu_ptr, s2_ptr, mean_ptr, rstd_ptr,
                     count_ptr, mean0_ptr, var0_ptr, pcount_ptr, pmean_ptr, pvar_ptr, reset_ptr,
                     bcount_ptr, fcount_ptr, fmean_ptr, fvar_ptr,
                     L, G, block, num_blocks, tiles, eps,
                     HAS_RESET: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_G: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    pid_g = tl.program_id(1)
    gs = pid_g * BLOCK_G + tl.arange(0, BLOCK_G)
    gmask = gs < G
    rows = tl.arange(0, BLOCK_T)
    n0 = tl.load(count_ptr + b)  # the carry: int64 count, float64 mean and var
    m0 = tl.load(mean0_ptr + b * G + gs, mask=gmask, other=0.0)
    v0 = tl.load(var0_ptr + b * G + gs, mask=gmask, other=0.0)
    pn = tl.load(pcount_ptr + b)
    pm = tl.load(pmean_ptr + b * G + gs, mask=gmask, other=0.0)
    pv = tl.load(pvar_ptr + b * G + gs, mask=gmask, other=0.0)
    for c in range(0, num_blocks):
        if HAS_RESET:
            reset = tl.load(reset_ptr + b * num_blocks + c) != 0
            n0 = tl.where(reset, pn, n0)
            m0 = tl.where(reset, pm, m0)
            v0 = tl.where(reset, pv, v0)
        tl.store(bcount_ptr + b * num_blocks + c, n0, mask=pid_g == 0)
        for tile in range(0, tiles):
            j = tile * BLOCK_T + rows  # position inside the block
            t, valid, offs, mask = _scan_rows(j, c, b, block, L, G, gs, gmask)
            mu = tl.load(mu_ptr + offs, mask=mask, other=0.0)
            s2 = tl.load(s2_ptr + offs, mask=mask, other=0.0)
            shift = tl.sum(tl.where((rows == 0)[:, None], mu, 0.0), axis=0)  # the tile's first token mean
            # in-tile prefix statistics about the first token's mean (no catastrophic cancellation)
            d = tl.where(mask, mu - shift[None, :], 0.0)
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
            # the carry absorbs the tile's totals in float64
            kt = tl.sum(valid.to(tl.int32), axis=0)
            last = (rows == kt - 1)[:, None]
            tile_mean = tl.sum(tl.where(last, local_mean, 0.0), axis=0).to(tl.float64)
            tile_var = tl.sum(tl.where(last, local_var, 0.0), axis=0).to(tl.float64)
            ktd = kt.to(tl.float64)
            n0d = n0.to(tl.float64)
            nd = tl.maximum(n0d + ktd, 1.0)
            dd = (shift.to(tl.float64) - m0) + tile_mean
            new_mean = m0 + dd * (ktd / nd)
            new_var = (n0d * v0 + ktd * tile_var) / nd + dd * dd * (n0d / nd) * (ktd / nd)
            m0 = tl.where(kt > 0, new_mean, m0)
            v0 = tl.where(kt > 0, new_var, v0)
            n0 = n0 + kt
    tl.store(fcount_ptr + b, n0, mask=pid_g == 0)
    tl.store(fmean_ptr + b * G + gs, m0, mask=gmask)
    tl.store(fvar_ptr + b * G + gs, v0, mask=gmask)


@triton.jit
def norm_bwd_kernel(x_ptr, dy_ptr, mean_ptr, rstd_ptr, w_ptr, dm_ptr, dv_ptr, dw_ptr, db_ptr, T, D, G, DG,
                     BLOCK_T: tl.constexpr, BLOCK_DG: tl.constexpr):
    pid = tl.program_id(0)
    g = tl.program_id(1)
    toks, cols, offs, tmask, cmask, mask = _tile(pid, g, T, D, DG, BLOCK_T, BLOCK_DG)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
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
def scan_bwd_kernel(dm_ptr, dv_ptr, mean_ptr, bcount_ptr, reset_ptr, count_ptr, mean0_ptr, pcount_ptr, pmean_ptr,
                     dfmean_ptr, dfvar_ptr, p_ptr, c_ptr, dmean0_ptr, dvar0_ptr, dpmean_ptr, dpvar_ptr,
                     L, G, block, num_blocks, tiles,
                     HAS_RESET: tl.constexpr, HAS_FINAL: tl.constexpr, BLOCK_T: tl.constexpr,
                     BLOCK_G: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    gs = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    gmask = gs < G
    rows = tl.arange(0, BLOCK_T)
    if HAS_FINAL:  # the state after the last token is that token's statistics: its gradient joins the last token's
        d_final_mean = tl.load(dfmean_ptr + b * G + gs, mask=gmask, other=0.0).to(tl.float32)
        d_final_var = tl.load(dfvar_ptr + b * G + gs, mask=gmask, other=0.0).to(tl.float32)
    # suffix sums of the segment after the current tile: A, C, and E relative to the shift c_e
    acc_a = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc_c = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc_e = tl.zeros([BLOCK_G], dtype=tl.float32)
    c_e = tl.zeros([BLOCK_G], dtype=tl.float32)
    d_prior_mean = tl.zeros([BLOCK_G], dtype=tl.float32)
    d_prior_var = tl.zeros([BLOCK_G], dtype=tl.float32)
    pn = tl.load(pcount_ptr + b).to(tl.float32)
    pm = tl.load(pmean_ptr + b * G + gs, mask=gmask, other=0.0).to(tl.float32)
    for ci in range(0, num_blocks):
        c = num_blocks - 1 - ci
        n_block = tl.load(bcount_ptr + b * num_blocks + c).to(tl.float32)
        for ti in range(0, tiles):
            tile = tiles - 1 - ti
            j = tile * BLOCK_T + (BLOCK_T - 1 - rows)  # descending, so that a forward cumsum gives suffix sums
            t, valid, offs, mask = _scan_rows(j, c, b, block, L, G, gs, gmask)
            dm = tl.load(dm_ptr + offs, mask=mask, other=0.0)
            dv = tl.load(dv_ptr + offs, mask=mask, other=0.0)
            if HAS_FINAL:
                last = ((t == L - 1) & valid)[:, None]  # a padded row of another block may also sit at t
                dm += tl.where(last, d_final_mean[None, :], 0.0)
                dv += tl.where(last, d_final_var[None, :], 0.0)
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
            sum_a = tl.cumsum(a, axis=0) + acc_a[None, :]
            sum_c = tl.cumsum(cc, axis=0) + acc_c[None, :]
            sum_e = tl.cumsum(e, axis=0) + acc_e[None, :]
            tl.store(p_ptr + offs, sum_a - 2.0 * (sum_e + (c_t[None, :] - m) * sum_c), mask=mask)
            tl.store(c_ptr + offs, sum_c, mask=mask)
            acc_a += tl.sum(a, axis=0)
            acc_c += tl.sum(cc, axis=0)
            acc_e += tl.sum(e, axis=0)
        if HAS_RESET:
            reset = tl.load(reset_ptr + b * num_blocks + c) != 0
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


@triton.jit
def dx_kernel(x_ptr, dy_ptr, mean_ptr, rstd_ptr, p_ptr, c_ptr, w_ptr, dx_ptr, T, D, G, DG,
               BLOCK_T: tl.constexpr, BLOCK_DG: tl.constexpr):
    g = tl.program_id(1)
    toks, cols, offs, tmask, cmask, mask = _tile(tl.program_id(0), g, T, D, DG, BLOCK_T, BLOCK_DG)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + toks * G + g, mask=tmask, other=0.0)
    rstd = tl.load(rstd_ptr + toks * G + g, mask=tmask, other=0.0)
    p = tl.load(p_ptr + toks * G + g, mask=tmask, other=0.0)
    c = tl.load(c_ptr + toks * G + g, mask=tmask, other=0.0)
    scale = tl.load(w_ptr + g * DG + cols, mask=cmask, other=0.0).to(tl.float32) + 1.0
    dx = dy * scale[None, :] * rstd[:, None] + (p[:, None] + 2.0 * c[:, None] * (x - mean[:, None])) / DG
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
