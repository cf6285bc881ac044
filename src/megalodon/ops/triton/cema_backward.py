"""The CEMA's parameter gradients per chunk (ops/triton/cema.py's backward): two kernels, one of which runs.

After the adjoint's scan, the two-pass path runs each chunk twice: `outputs_kernel` (cema_kernels.py) in reverse
time for dL/du, then `parameter_grads_kernel` forward with tangents dh/dq and dh/dp for the parameters' sums. With
cema.py's FUSED_BACKWARD, `adjoint_grads_kernel` does both in one reverse pass. Both write the same per-chunk sums
(`store_partials`), which cema_tables.gradients_kernel adds up.

The one-pass form. Per channel d and
component n, with the forward's h_t = q h_{t-1} + p u_t, y_t = Re(sum_n g h_t) + omega u_t, and the adjoint
lambda_t = dL/dh_t = conj(g) dy_t + conj(q) lambda_{t+1} (the adjoint kernels' state before step t is
S_t = conj(q) lambda_{t+1}, entering the chunk's last step from the adjoint's scan):

    dL/du_t = Re(sum_n p lambda_t) + omega dy_t
    dp      = sum_t Re(lambda_t) u_t
    dq      = sum_t lambda_t conj(h_{t-1})
    dg      = conj(sum_t dy_t h_t)

Inside a chunk that starts at s with incoming state h_in, h_{t-1} = q**(t-s) h_in + sum_{i<t} q**(t-1-i) p u_i, so
with the reverse Horner sums A_t = lambda_t + conj(q) A_{t+1} and G_t = dy_t + q G_{t+1}, both entered at zero
after the chunk's last step:

    dq = conj(h_in) A_s + p sum_i u_i A_{i+1}
    sum_t dy_t h_t = q h_in G_s + p sum_i u_i G_i

Every term is a running sum of the reverse sweep, so no state is run forward. A restart before step t (a document
boundary) cuts what lies before it off from what follows: the adjoint S, A and G are zeroed after step t.
Per step and component that is about 20 multiply-adds where the two separate passes take about 28, one pass over
u and dy fewer, and one launch fewer.

Shape: a program is (chunk, BLOCK_D channels, row), one warp at BLOCK_D = 8 (cema.py's FUSED_BLOCK_D), a
channel's components over 4 threads at N = 16: a thread holding all 16 would need about 250 registers, and with
the components spread across warps (32 channels, 4 warps) each step's sum over them took a shared-memory round trip
and two barriers in the sm_90 SASS; in one warp it is two shuffles. Loads go step by step, as in
parameter_grads_kernel (a tile of steps would be laid out unlike the states). The per-step input gradient is
gathered into a tile of UNROLL steps and stored once a tile, so that no store stands between a tile's loads.
"""

from __future__ import annotations

import triton
import triton.language as tl

from megalodon.ops.triton.casts import cast
from megalodon.ops.triton.cema_kernels import _in_chunk, _keep, _mul, _power, _step, _time, channel_tile
from megalodon.ops.triton.registers import both, with_column


@triton.jit
def gradient_coefficients(p_ptr, log_ptr, angle_ptr, g_re_ptr, g_im_ptr, offs, mask):
    """q (real parts), p and g of a (BLOCK_D, BLOCK_N) tile: the coefficients the gradient sweeps read."""
    q_re, q_im = _power(log_ptr, angle_ptr, offs, mask, 1.0)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0)
    g_re = tl.load(g_re_ptr + offs, mask=mask, other=0.0)
    g_im = tl.load(g_im_ptr + offs, mask=mask, other=0.0)
    return q_re, q_im, p, g_re, g_im


@triton.jit
def store_partials(partial_ptr, partial_omega_ptr, b, c, num_chunks, D, N, offs, mask, offs_d, mask_d, dg_re, dg_im,
                   dq_re, dq_im, dp, d_omega):
    """One chunk's parameter gradient sums into partial (B, chunks, 5, N, D) = [dg_re, dg_im, dq_re, dq_im, dp]
    and partial_omega (B, chunks, D), which gradients_kernel adds up."""
    out = partial_ptr + (b.to(tl.int64) * num_chunks + c) * 5 * D * N + offs
    tl.store(out, dg_re, mask=mask)
    tl.store(out + D * N, dg_im, mask=mask)
    tl.store(out + 2 * D * N, dq_re, mask=mask)
    tl.store(out + 3 * D * N, dq_im, mask=mask)
    tl.store(out + 4 * D * N, dp, mask=mask)
    tl.store(partial_omega_ptr + (b.to(tl.int64) * num_chunks + c) * D + offs_d, d_omega, mask=mask_d)


@triton.jit(do_not_specialize=("D", "stride_ut"))
def parameter_grads_kernel(u_ptr, stride_ub, stride_ut, stride_ud, dy_ptr, reset_ptr, p_ptr, log_ptr, angle_ptr,
                           g_re_ptr, g_im_ptr, incoming_ptr, future_ptr, partial_ptr, partial_omega_ptr,
                           L, D, N, num_chunks, num_blocks,
                           CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                           UNROLL: tl.constexpr, HAS_RESET: tl.constexpr, FULL: tl.constexpr,
                           BLOCK_SIZE: tl.constexpr):
    """Backward, grid as phase 1: per chunk, sums over its steps of the parameter gradients.

    The chunk is rerun forward from its incoming state h_in, with forward-mode tangents entered at zero:
    dh/dq (hq_t = h_{t-1} + q hq_{t-1}) and dh/dp (w_t = u_t + q w_{t-1}). The loss seen from inside the chunk,
    with h_in held fixed, is sum_t dy_t Re(sum_n g h_t) + Re(conj(mu) h_last), where mu = dL/dh_last from later
    chunks (the reverse scan's state entering this chunk). Hence, per (d, n):
        dg = sum_t dy_t conj(h_t)
        dq = sum_t dy_t conj(g hq_t) + mu conj(hq_last)
        dp = sum_t dy_t Re(g w_t) + Re(conj(mu) w_last)
    and d omega[d] = sum_t dy_t u_t. Summed over chunks, these are the full gradients: every use of q and p is a
    step of some chunk. partial (B, chunks, 5, N, D) = [dg_re, dg_im, dq_re, dq_im, dp]; partial_omega (B, chunks, D).
    """
    c, pid_d, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_d, mask_d, offs, mask = channel_tile(pid_d, D, N, BLOCK_D, BLOCK_N)
    q_re, q_im, p, g_re, g_im = gradient_coefficients(p_ptr, log_ptr, angle_ptr, g_re_ptr, g_im_ptr, offs, mask)
    base = (b.to(tl.int64) * num_chunks + c) * 2 * D * N
    h_re = tl.load(incoming_ptr + base + offs, mask=mask, other=0.0)
    h_im = tl.load(incoming_ptr + base + D * N + offs, mask=mask, other=0.0)
    hq_re = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    hq_im = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    w_re = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    w_im = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    # sum_t dy_t h_t, sum_t dy_t hq_t and sum_t dy_t w_t: g multiplies the last two once, at the end
    dg_re = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    dg_im = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    sum_hq_re = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    sum_hq_im = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    sum_w_re = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    sum_w_im = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    d_omega = tl.zeros((BLOCK_D,), tl.float32)
    start = c * CHUNK
    length = tl.minimum(CHUNK, L - start)
    u_row = u_ptr + b.to(tl.int64) * stride_ub + offs_d * stride_ud
    dy_row = dy_ptr + b.to(tl.int64) * L * D + offs_d
    for i0 in range(0, length, UNROLL):
        for k in tl.static_range(UNROLL):
            # Past the chunk's end u and dy load as 0, which adds nothing to the sums, but the states would still
            # move: they are frozen there, because the terms with mu below use the chunk's last states.
            valid = _in_chunk(i0 + k, length, FULL)
            t = start + i0 + k
            u = tl.load(u_row + t.to(tl.int64) * stride_ut, mask=both(mask_d, valid), other=0.0).to(tl.float32)
            dy = tl.load(dy_row + t.to(tl.int64) * D, mask=both(mask_d, valid), other=0.0).to(tl.float32)
            d_omega += dy * u
            u, dy = u[:, None], dy[:, None]
            if HAS_RESET:
                keep = _keep(reset_ptr, b, num_blocks, t, valid, BLOCK_SIZE)
                h_re, h_im = h_re * keep, h_im * keep
                hq_re, hq_im = hq_re * keep, hq_im * keep
                w_re, w_im = w_re * keep, w_im * keep
            new_hq_re, new_hq_im = _mul(q_re, q_im, hq_re, hq_im)
            hq_re, hq_im = tl.where(valid, new_hq_re + h_re, hq_re), tl.where(valid, new_hq_im + h_im, hq_im)
            new_w_re, new_w_im = _step(w_re, w_im, q_re, q_im, 1.0, 0.0, u, True)
            w_re, w_im = tl.where(valid, new_w_re, w_re), tl.where(valid, new_w_im, w_im)
            new_h_re, new_h_im = _step(h_re, h_im, q_re, q_im, p, 0.0, u, True)
            h_re, h_im = tl.where(valid, new_h_re, h_re), tl.where(valid, new_h_im, h_im)
            dg_re += dy * h_re
            dg_im -= dy * h_im
            sum_hq_re += dy * hq_re
            sum_hq_im += dy * hq_im
            sum_w_re += dy * w_re
            sum_w_im += dy * w_im
    mu_re = tl.load(future_ptr + base + offs, mask=mask, other=0.0)
    mu_im = tl.load(future_ptr + base + D * N + offs, mask=mask, other=0.0)
    dq_re, dq_im = _mul(g_re, g_im, sum_hq_re, sum_hq_im)  # sum_t dy_t g hq_t, conjugated below
    dq_re = dq_re + mu_re * hq_re + mu_im * hq_im
    dq_im = -dq_im + mu_im * hq_re - mu_re * hq_im
    dp = g_re * sum_w_re - g_im * sum_w_im + mu_re * w_re + mu_im * w_im
    store_partials(partial_ptr, partial_omega_ptr, b, c, num_chunks, D, N, offs, mask, offs_d, mask_d, dg_re, dg_im,
                   dq_re, dq_im, dp, d_omega)


@triton.jit
def _conj_mul(a_re, a_im, s_re, s_im):
    """conj(a) s, complex, as real parts."""
    return a_re * s_re + a_im * s_im, a_re * s_im - a_im * s_re


@triton.jit(do_not_specialize=("D", "stride_ut"))
def adjoint_grads_kernel(u_ptr, stride_ub, stride_ut, stride_ud, dy_ptr, reset_ptr, p_ptr, log_ptr, angle_ptr,
                         g_re_ptr, g_im_ptr, omega_ptr, incoming_ptr, future_ptr, du_ptr, partial_ptr,
                         partial_omega_ptr, L, D, N, num_chunks, num_blocks,
                         CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, UNROLL: tl.constexpr,
                         TILE: tl.constexpr, HAS_RESET: tl.constexpr, FULL: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """Grid (chunks, D / BLOCK_D, B): du (B, L, D) in du's dtype, and per chunk the parameter gradient sums as
    parameter_grads_kernel writes them: partial (B, chunks, 5, N, D) = [dg_re, dg_im, dq_re, dq_im, dp] and
    partial_omega (B, chunks, D). incoming: the forward's state entering each chunk; future: the adjoint's
    (B, chunks, 2, N, D) each. TILE = max(BLOCK_N, UNROLL): the width of the tile that gathers the input gradient's
    steps, the states' own shape where UNROLL <= BLOCK_N, so that a step's sum lands in it without a layout
    conversion (with a tile of UNROLL columns, each step cost a shared-memory round trip and two barriers)."""
    c, pid_d, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_d, mask_d, offs, mask = channel_tile(pid_d, D, N, BLOCK_D, BLOCK_N)
    q_re, q_im, p, g_re, g_im = gradient_coefficients(p_ptr, log_ptr, angle_ptr, g_re_ptr, g_im_ptr, offs, mask)
    omega = tl.load(omega_ptr + offs_d, mask=mask_d, other=0.0)
    base = (b.to(tl.int64) * num_chunks + c) * 2 * D * N
    s_re = tl.load(future_ptr + base + offs, mask=mask, other=0.0)
    s_im = tl.load(future_ptr + base + D * N + offs, mask=mask, other=0.0)
    zero = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    a_re, a_im, h_re, h_im = zero, zero, zero, zero  # A and G of the docstring
    sum_a_re, sum_a_im, sum_h_re, sum_h_im = zero, zero, zero, zero  # sum_i u_i A_{i+1}, sum_i u_i G_i
    dp = zero
    d_omega = tl.zeros((BLOCK_D,), tl.float32)
    start = c * CHUNK
    length = tl.minimum(CHUNK, L - start)
    cols = tl.arange(0, TILE)
    u_row = u_ptr + b.to(tl.int64) * stride_ub + offs_d * stride_ud
    dy_row = dy_ptr + b.to(tl.int64) * L * D + offs_d
    du_rows = (du_ptr + b.to(tl.int64) * L * D + offs_d)[:, None]
    for i0 in range(0, length, UNROLL):
        dus = tl.zeros((BLOCK_D, TILE), tl.float32)
        for k in tl.static_range(UNROLL):
            # Past the chunk's end (its last chunk only: the sweep starts at the chunk's last step) nothing moves.
            valid = _in_chunk(i0 + k, length, FULL)
            t = _time(start, length, i0 + k, True)
            u = tl.load(u_row + t.to(tl.int64) * stride_ut, mask=both(mask_d, valid), other=0.0).to(tl.float32)
            dy = tl.load(dy_row + t.to(tl.int64) * D, mask=both(mask_d, valid), other=0.0).to(tl.float32)
            d_omega += dy * u
            du = omega * dy
            u, dy = u[:, None], dy[:, None]
            lam_re, lam_im = s_re + g_re * dy, s_im - g_im * dy
            dus = with_column(dus, cols, k, du + tl.sum(p * lam_re, axis=1))
            dp += lam_re * u
            sum_a_re, sum_a_im = sum_a_re + u * a_re, sum_a_im + u * a_im
            new_re, new_im = _conj_mul(q_re, q_im, a_re, a_im)
            a_re, a_im = tl.where(valid, new_re + lam_re, a_re), tl.where(valid, new_im + lam_im, a_im)
            new_re, new_im = _mul(q_re, q_im, h_re, h_im)
            h_re, h_im = tl.where(valid, new_re + dy, h_re), tl.where(valid, new_im, h_im)
            sum_h_re, sum_h_im = sum_h_re + u * h_re, sum_h_im + u * h_im
            new_re, new_im = _conj_mul(q_re, q_im, lam_re, lam_im)
            s_re, s_im = tl.where(valid, new_re, s_re), tl.where(valid, new_im, s_im)
            if HAS_RESET:  # a restart before step t: nothing before it reaches what follows
                keep = _keep(reset_ptr, b, num_blocks, t, valid, BLOCK_SIZE)
                s_re, s_im, a_re, a_im = s_re * keep, s_im * keep, a_re * keep, a_im * keep
                h_re, h_im = h_re * keep, h_im * keep
        ts = _time(start, length, i0 + cols, True).to(tl.int64)
        tile_mask = mask_d[:, None] & ((cols < UNROLL) & (i0 + cols < length))[None, :]
        tl.store(du_rows + ts[None, :] * D, cast(dus, du_ptr.dtype.element_ty), mask=tile_mask)
    in_re = tl.load(incoming_ptr + base + offs, mask=mask, other=0.0)
    in_im = tl.load(incoming_ptr + base + D * N + offs, mask=mask, other=0.0)
    dq_re, dq_im = _conj_mul(in_re, in_im, a_re, a_im)
    dq_re, dq_im = dq_re + p * sum_a_re, dq_im + p * sum_a_im
    hg_re, hg_im = _mul(in_re, in_im, h_re, h_im)
    dyh_re, dyh_im = _mul(q_re, q_im, hg_re, hg_im)  # sum_t dy_t h_t, conjugated for dg
    store_partials(partial_ptr, partial_omega_ptr, b, c, num_chunks, D, N, offs, mask, offs_d, mask_d,
                   dyh_re + p * sum_h_re, -(dyh_im + p * sum_h_im), dq_re, dq_im, dp, d_omega)
