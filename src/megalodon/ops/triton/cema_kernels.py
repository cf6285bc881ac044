"""Triton kernels of the CEMA's chunked scan (the design is in ops/triton/cema.py's docstring).

One linear recurrence serves the forward and the adjoint, per channel d and component n:

    before step t:  s = 0 if reset[t] (forward only)
    output:         y_t = Re(sum_n c_out s) + kappa x_t          (from the state before the step)
    step:           s = a s + c_in x_t
    after step t:   s = 0 if reset[t] (reverse only)

with complex a, c_in, c_out given as real parts. Time runs forward or, with REVERSE, backward. Time is cut into
chunks of CHUNK steps, aligned to the start of the sequence in both directions. Each program owns one chunk of one
row for BLOCK_D channels, and keeps the (BLOCK_D, N) complex state as two fp32 register tiles.

Every loop over time or chunks is unrolled UNROLL steps at a time (`tl.static_range`), so that the loads of the
next steps, which do not depend on the state, are issued together and their latency overlaps the dependent complex
multiply-adds; steps past the end are masked. All loads are masked, all shapes powers of two, all arithmetic fp32;
inputs of any float dtype are upcast on load.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tile(pid_d, D, N, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Channel offsets (BLOCK_D,), their mask, and the (BLOCK_D, BLOCK_N) offsets and mask into an (N, D) table:
    the tables are stored transposed, so that loads run along the channels (see WARPS_STEPS in cema.py)."""
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < D
    mask = mask_d[:, None] & (offs_n[None, :] < N)
    return offs_d, mask_d, offs_d[:, None] + offs_n[None, :] * D, mask


@triton.jit
def _power(log_ptr, angle_ptr, offs, mask, exponent):
    """Re and Im of a**exponent = exp(exponent log|a|) (cos, sin)(exponent arg a)."""
    log_mag = tl.load(log_ptr + offs, mask=mask, other=0.0)
    angle = tl.load(angle_ptr + offs, mask=mask, other=0.0)
    magnitude = tl.exp(log_mag * exponent)
    return magnitude * tl.cos(angle * exponent), magnitude * tl.sin(angle * exponent)


@triton.jit
def _time(start, length, i, REVERSE: tl.constexpr):
    if REVERSE:
        return start + length - 1 - i
    else:
        return start + i


@triton.jit
def _keep(reset_ptr, b, L, t, valid):
    """0.0 where the state restarts before step t, else 1.0."""
    return 1.0 - tl.load(reset_ptr + b.to(tl.int64) * L + t, mask=valid, other=0).to(tl.float32)


@triton.jit
def _in_chunk(i, length, FULL: tl.constexpr):
    """Whether step i of a chunk of `length` steps exists. FULL (every chunk whole: L a multiple of CHUNK) makes
    it a constant True, so that the compiler drops the selects that hold the state past a chunk's end (two per
    state element and step) and the masks on the step's loads and stores."""
    if FULL:
        return True
    else:
        return i < length


@triton.jit
def _both(mask, valid):
    """mask & valid for a scalar valid, as a select: Triton's interpreter turns that & into int32."""
    return tl.where(valid, mask, False)


@triton.jit
def _step(s_re, s_im, a_re, a_im, cin_re, cin_im, x):
    """s <- a s + c_in x, complex, as real parts."""
    return a_re * s_re - a_im * s_im + cin_re * x, a_re * s_im + a_im * s_re + cin_im * x


@triton.jit
def local_states_kernel(x_ptr, stride_xb, stride_xt, stride_xd, reset_ptr, cin_re_ptr, cin_im_ptr, log_ptr,
                        angle_ptr, loc_ptr, L, D, N, num_chunks,
                        CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, UNROLL: tl.constexpr,
                        REVERSE: tl.constexpr, HAS_RESET: tl.constexpr, FULL: tl.constexpr):
    """Phase 1, grid (chunks, D / BLOCK_D, B): each chunk's final state entered at zero -> loc (B, chunks, 2, N, D)."""
    c, pid_d, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_d, mask_d, offs, mask = _tile(pid_d, D, N, BLOCK_D, BLOCK_N)
    a_re, a_im = _power(log_ptr, angle_ptr, offs, mask, 1.0)
    cin_re = tl.load(cin_re_ptr + offs, mask=mask, other=0.0)
    cin_im = tl.load(cin_im_ptr + offs, mask=mask, other=0.0)
    s_re = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    s_im = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    start = c * CHUNK
    length = tl.minimum(CHUNK, L - start)
    x_row = x_ptr + b.to(tl.int64) * stride_xb + offs_d * stride_xd
    for i0 in range(0, length, UNROLL):
        for k in tl.static_range(UNROLL):
            valid = _in_chunk(i0 + k, length, FULL)
            t = _time(start, length, i0 + k, REVERSE)
            x = tl.load(x_row + t.to(tl.int64) * stride_xt, mask=_both(mask_d, valid), other=0.0).to(tl.float32)
            keep = 1.0
            if HAS_RESET:
                keep = _keep(reset_ptr, b, L, t, valid)
            if not REVERSE:  # forward: the state restarts before the step
                s_re, s_im = s_re * keep, s_im * keep
            new_re, new_im = _step(s_re, s_im, a_re, a_im, cin_re, cin_im, x[:, None])
            if REVERSE:  # reverse: the adjoint stops flowing after it
                new_re, new_im = new_re * keep, new_im * keep
            s_re, s_im = tl.where(valid, new_re, s_re), tl.where(valid, new_im, s_im)
    base = (b.to(tl.int64) * num_chunks + c) * 2 * D * N
    tl.store(loc_ptr + base + offs, s_re, mask=mask)
    tl.store(loc_ptr + base + D * N + offs, s_im, mask=mask)


@triton.jit
def scan_kernel(loc_ptr, keep_ptr, log_ptr, angle_ptr, h0_ptr, incoming_ptr, final_ptr, L, D, N, num_chunks,
                CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, UNROLL: tl.constexpr,
                REVERSE: tl.constexpr, HAS_H0: tl.constexpr, HAS_RESET: tl.constexpr):
    """Phase 2, grid (D / BLOCK_D, B): the scan over chunks, s_in(next) = a**len keep s_in + loc, from h0.
    Writes the state entering every chunk (B, chunks, 2, N, D) and the one leaving the last (B, D, N, 2)."""
    pid_d, b = tl.program_id(0), tl.program_id(1)
    offs_d, _, offs, mask = _tile(pid_d, D, N, BLOCK_D, BLOCK_N)
    tail = L - (num_chunks - 1) * CHUNK
    full_re, full_im = _power(log_ptr, angle_ptr, offs, mask, CHUNK * 1.0)
    tail_re, tail_im = _power(log_ptr, angle_ptr, offs, mask, tail * 1.0)
    pairs = b.to(tl.int64) * D * N * 2 + (offs_d[:, None] * N + tl.arange(0, BLOCK_N)[None, :]) * 2  # (B, D, N, 2)
    if HAS_H0:
        s_re = tl.load(h0_ptr + pairs, mask=mask, other=0.0)
        s_im = tl.load(h0_ptr + pairs + 1, mask=mask, other=0.0)
    else:
        s_re = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
        s_im = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    for j0 in range(0, num_chunks, UNROLL):
        for k in tl.static_range(UNROLL):
            valid = j0 + k < num_chunks
            c = _time(0, num_chunks, j0 + k, REVERSE)
            base = (b.to(tl.int64) * num_chunks + c) * 2 * D * N
            tl.store(incoming_ptr + base + offs, s_re, mask=_both(mask, valid))
            tl.store(incoming_ptr + base + D * N + offs, s_im, mask=_both(mask, valid))
            is_tail = c == num_chunks - 1
            a_re = tl.where(is_tail, tail_re, full_re)
            a_im = tl.where(is_tail, tail_im, full_im)
            if HAS_RESET:  # a reset anywhere in the chunk cuts what enters it off from what leaves it
                keep = tl.load(keep_ptr + b.to(tl.int64) * num_chunks + c, mask=valid, other=0.0)
                a_re, a_im = a_re * keep, a_im * keep
            loc_re = tl.load(loc_ptr + base + offs, mask=_both(mask, valid), other=0.0)
            loc_im = tl.load(loc_ptr + base + D * N + offs, mask=_both(mask, valid), other=0.0)
            new_re, new_im = _step(s_re, s_im, a_re, a_im, 1.0, 0.0, 0.0)
            s_re, s_im = tl.where(valid, new_re + loc_re, s_re), tl.where(valid, new_im + loc_im, s_im)
    tl.store(final_ptr + pairs, s_re, mask=mask)
    tl.store(final_ptr + pairs + 1, s_im, mask=mask)


@triton.jit
def outputs_kernel(x_ptr, stride_xb, stride_xt, stride_xd, reset_ptr, cin_re_ptr, cin_im_ptr, log_ptr, angle_ptr,
                   cout_re_ptr, cout_im_ptr, kappa_ptr, incoming_ptr, y_ptr, L, D, N, num_chunks,
                   CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, UNROLL: tl.constexpr,
                   REVERSE: tl.constexpr, HAS_RESET: tl.constexpr, FULL: tl.constexpr):
    """Phase 3, grid as phase 1: each chunk rerun from its incoming state, writing y (B, L, D) contiguous."""
    c, pid_d, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_d, mask_d, offs, mask = _tile(pid_d, D, N, BLOCK_D, BLOCK_N)
    a_re, a_im = _power(log_ptr, angle_ptr, offs, mask, 1.0)
    cin_re = tl.load(cin_re_ptr + offs, mask=mask, other=0.0)
    cin_im = tl.load(cin_im_ptr + offs, mask=mask, other=0.0)
    cout_re = tl.load(cout_re_ptr + offs, mask=mask, other=0.0)
    cout_im = tl.load(cout_im_ptr + offs, mask=mask, other=0.0)
    kappa = tl.load(kappa_ptr + offs_d, mask=mask_d, other=0.0)
    base = (b.to(tl.int64) * num_chunks + c) * 2 * D * N
    s_re = tl.load(incoming_ptr + base + offs, mask=mask, other=0.0)
    s_im = tl.load(incoming_ptr + base + D * N + offs, mask=mask, other=0.0)
    start = c * CHUNK
    length = tl.minimum(CHUNK, L - start)
    x_row = x_ptr + b.to(tl.int64) * stride_xb + offs_d * stride_xd
    y_row = y_ptr + b.to(tl.int64) * L * D + offs_d
    for i0 in range(0, length, UNROLL):
        for k in tl.static_range(UNROLL):
            valid = _in_chunk(i0 + k, length, FULL)
            t = _time(start, length, i0 + k, REVERSE)
            x = tl.load(x_row + t.to(tl.int64) * stride_xt, mask=_both(mask_d, valid), other=0.0).to(tl.float32)
            keep = 1.0
            if HAS_RESET:
                keep = _keep(reset_ptr, b, L, t, valid)
            if not REVERSE:
                s_re, s_im = s_re * keep, s_im * keep
            y = tl.sum(cout_re * s_re - cout_im * s_im, axis=1) + kappa * x
            tl.store(y_row + t.to(tl.int64) * D, y.to(y_ptr.dtype.element_ty), mask=_both(mask_d, valid))
            new_re, new_im = _step(s_re, s_im, a_re, a_im, cin_re, cin_im, x[:, None])
            if REVERSE:
                new_re, new_im = new_re * keep, new_im * keep
            s_re, s_im = tl.where(valid, new_re, s_re), tl.where(valid, new_im, s_im)


@triton.jit
def parameter_grads_kernel(u_ptr, stride_ub, stride_ut, stride_ud, dy_ptr, reset_ptr, p_ptr, log_ptr, angle_ptr,
                           g_re_ptr, g_im_ptr, incoming_ptr, future_ptr, partial_ptr, partial_omega_ptr,
                           L, D, N, num_chunks,
                           CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                           UNROLL: tl.constexpr, HAS_RESET: tl.constexpr, FULL: tl.constexpr):
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
    offs_d, mask_d, offs, mask = _tile(pid_d, D, N, BLOCK_D, BLOCK_N)
    q_re, q_im = _power(log_ptr, angle_ptr, offs, mask, 1.0)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0)
    g_re = tl.load(g_re_ptr + offs, mask=mask, other=0.0)
    g_im = tl.load(g_im_ptr + offs, mask=mask, other=0.0)
    base = (b.to(tl.int64) * num_chunks + c) * 2 * D * N
    h_re = tl.load(incoming_ptr + base + offs, mask=mask, other=0.0)
    h_im = tl.load(incoming_ptr + base + D * N + offs, mask=mask, other=0.0)
    hq_re = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    hq_im = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    w_re = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    w_im = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    dg_re = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    dg_im = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    dq_re = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)  # sum_t dy_t g hq_t, conjugated at the end
    dq_im = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    dp = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
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
            u = tl.load(u_row + t.to(tl.int64) * stride_ut, mask=_both(mask_d, valid), other=0.0).to(tl.float32)
            dy = tl.load(dy_row + t.to(tl.int64) * D, mask=_both(mask_d, valid), other=0.0).to(tl.float32)
            d_omega += dy * u
            u, dy = u[:, None], dy[:, None]
            if HAS_RESET:
                keep = _keep(reset_ptr, b, L, t, valid)
                h_re, h_im = h_re * keep, h_im * keep
                hq_re, hq_im = hq_re * keep, hq_im * keep
                w_re, w_im = w_re * keep, w_im * keep
            new_hq_re, new_hq_im = _step(hq_re, hq_im, q_re, q_im, 1.0, 0.0, 0.0)
            hq_re, hq_im = tl.where(valid, new_hq_re + h_re, hq_re), tl.where(valid, new_hq_im + h_im, hq_im)
            new_w_re, new_w_im = _step(w_re, w_im, q_re, q_im, 1.0, 0.0, u)
            w_re, w_im = tl.where(valid, new_w_re, w_re), tl.where(valid, new_w_im, w_im)
            new_h_re, new_h_im = _step(h_re, h_im, q_re, q_im, p, 0.0, u)
            h_re, h_im = tl.where(valid, new_h_re, h_re), tl.where(valid, new_h_im, h_im)
            dg_re += dy * h_re
            dg_im -= dy * h_im
            dq_re += dy * (g_re * hq_re - g_im * hq_im)
            dq_im += dy * (g_re * hq_im + g_im * hq_re)
            dp += dy * (g_re * w_re - g_im * w_im)
    mu_re = tl.load(future_ptr + base + offs, mask=mask, other=0.0)
    mu_im = tl.load(future_ptr + base + D * N + offs, mask=mask, other=0.0)
    dq_re = dq_re + mu_re * hq_re + mu_im * hq_im
    dq_im = -dq_im + mu_im * hq_re - mu_re * hq_im
    dp = dp + mu_re * w_re + mu_im * w_im
    out = partial_ptr + (b.to(tl.int64) * num_chunks + c) * 5 * D * N + offs
    tl.store(out, dg_re, mask=mask)
    tl.store(out + D * N, dg_im, mask=mask)
    tl.store(out + 2 * D * N, dq_re, mask=mask)
    tl.store(out + 3 * D * N, dq_im, mask=mask)
    tl.store(out + 4 * D * N, dp, mask=mask)
    tl.store(partial_omega_ptr + (b.to(tl.int64) * num_chunks + c) * D + offs_d, d_omega, mask=mask_d)


# ---- the tables every run reads, and the parameter gradients at the end ------------------------------------------
# Rows of the (TABLE_ROWS, N, D) table buffer made by tables_kernel, by name (the kernel writes them in this order).
P, ZERO, LOG_MAG, ANGLE, NEG_ANGLE, QG_RE, QG_IM, NEG_QG_IM, G_RE, G_IM = range(10)
TABLE_ROWS = 10


@triton.jit
def _log1p_neg(x):
    """log(1 - x) for 0 <= x <= 1/2, to a few ulp however small x is: log(u) x / (u - 1) with u = 1 - x rounded
    (the rounding error of u cancels out), and -x where u rounds to 1."""
    u = 1.0 - x
    return tl.where(u == 1.0, -x, tl.log(u) * (-x) / tl.where(u == 1.0, -1.0, u - 1.0))


@triton.jit
def _coefficients(alpha_ptr, delta_ptr, theta_ptr, gamma_ptr, offs_d, mask_d, src, mask, N,
                  BLOCK_N: tl.constexpr):
    """The coefficients of ops/cema.py's cema_coefficients for a (BLOCK_D, BLOCK_N) tile, from the parameters
    alpha, delta (D, N), theta (D,) and gamma (D, N, 2): p = sigmoid(alpha), log|q| as log_decay computes it,
    arg q = (n + 1) sigmoid(theta) 2 pi / N, g = gamma / sqrt(N). Also returns what their gradients reuse."""
    alpha = tl.load(alpha_ptr + src, mask=mask, other=0.0)
    delta = tl.load(delta_ptr + src, mask=mask, other=0.0)
    s_alpha, s_delta = tl.sigmoid(alpha), tl.sigmoid(delta)
    x = s_alpha * s_delta
    # 1 - x as a sum of two positive terms: no cancellation where x nears 1
    rest = tl.sigmoid(-alpha) + s_alpha * tl.sigmoid(-delta)
    log_mag = tl.where(x > 0.5, tl.log(tl.maximum(rest, 1.1754943508222875e-38)), _log1p_neg(tl.minimum(x, 0.5)))
    s_theta = tl.sigmoid(tl.load(theta_ptr + offs_d, mask=mask_d, other=0.0))
    harmonics = (tl.arange(0, BLOCK_N) + 1).to(tl.float32)
    angle = harmonics[None, :] * s_theta[:, None] * (6.283185307179586 / N)
    scale = 1.0 / tl.sqrt(N * 1.0)
    g_re = tl.load(gamma_ptr + 2 * src, mask=mask, other=0.0) * scale
    g_im = tl.load(gamma_ptr + 2 * src + 1, mask=mask, other=0.0) * scale
    return s_alpha, s_delta, x, rest, s_theta, log_mag, angle, g_re, g_im


@triton.jit
def tables_kernel(alpha_ptr, delta_ptr, theta_ptr, gamma_ptr, omega_ptr, tables_ptr, kappa_ptr, D, N,
                  BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (D / BLOCK_D,): from the CEMA's parameters (_coefficients) and omega (D,), every (N, D) table the runs
    read, in one launch (rows named above): the forward reads c_in = (p, 0), a = q and c_out = q g; the adjoint
    c_in = conj(q g), a = conj(q) and c_out = (p, 0); the gradient kernel p, q and g. And
    kappa (D,) = omega + sum_n p Re(g)."""
    pid_d = tl.program_id(0)
    offs_d, mask_d, offs, mask = _tile(pid_d, D, N, BLOCK_D, BLOCK_N)
    src = offs_d[:, None] * N + tl.arange(0, BLOCK_N)[None, :]  # the same elements in the (D, N) parameters
    p, _, _, _, _, log_mag, angle, g_re, g_im = _coefficients(alpha_ptr, delta_ptr, theta_ptr, gamma_ptr, offs_d,
                                                              mask_d, src, mask, N, BLOCK_N)
    magnitude = tl.exp(log_mag)
    q_re, q_im = magnitude * tl.cos(angle), magnitude * tl.sin(angle)
    qg_re, qg_im = q_re * g_re - q_im * g_im, q_re * g_im + q_im * g_re
    size = N * D  # rows in the order P, ZERO, LOG_MAG, ANGLE, NEG_ANGLE, QG_RE, QG_IM, NEG_QG_IM, G_RE, G_IM
    tl.store(tables_ptr + offs, p, mask=mask)
    tl.store(tables_ptr + size + offs, tl.zeros_like(p), mask=mask)
    tl.store(tables_ptr + 2 * size + offs, log_mag, mask=mask)
    tl.store(tables_ptr + 3 * size + offs, angle, mask=mask)
    tl.store(tables_ptr + 4 * size + offs, -angle, mask=mask)
    tl.store(tables_ptr + 5 * size + offs, qg_re, mask=mask)
    tl.store(tables_ptr + 6 * size + offs, qg_im, mask=mask)
    tl.store(tables_ptr + 7 * size + offs, -qg_im, mask=mask)
    tl.store(tables_ptr + 8 * size + offs, g_re, mask=mask)
    tl.store(tables_ptr + 9 * size + offs, g_im, mask=mask)
    kappa = tl.load(omega_ptr + offs_d, mask=mask_d, other=0.0) + tl.sum(tl.where(mask, p * g_re, 0.0), axis=1)
    tl.store(kappa_ptr + offs_d, kappa, mask=mask_d)


@triton.jit
def gradients_kernel(partial_ptr, partial_omega_ptr, alpha_ptr, delta_ptr, theta_ptr, gamma_ptr, d_alpha_ptr,
                     d_delta_ptr, d_theta_ptr, d_gamma_ptr, d_omega_ptr, rows, D, N,
                     BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (D / BLOCK_D,): the parameter gradients from parameter_grads_kernel's per-chunk sums, in one launch.
    Sums `partial` (rows = B * chunks, 5, N, D) and `partial_omega` (rows, D) over the rows, then takes the chain
    rule through the coefficients (_coefficients) to the parameters: d alpha, d delta (D, N), d theta (D,),
    d gamma (D, N, 2) and d omega (D,). With x = sigmoid(alpha) sigmoid(delta), d log|q| = -dx / (1 - x), and
    1 - x as _coefficients sums it; where that sum is clamped (|q| rounds to 0) log|q| is constant, as autograd
    of log_decay has it."""
    pid_d = tl.program_id(0)
    offs_d, mask_d, offs, mask = _tile(pid_d, D, N, BLOCK_D, BLOCK_N)
    dg_re = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    dg_im = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    dq_re = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    dq_im = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    dp = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    d_omega = tl.zeros((BLOCK_D,), tl.float32)
    size = N * D
    row = partial_ptr + offs  # pointers advance row by row: 64-bit, however many rows
    row_omega = partial_omega_ptr + offs_d
    for _ in range(0, rows):
        dg_re += tl.load(row, mask=mask, other=0.0)
        dg_im += tl.load(row + size, mask=mask, other=0.0)
        dq_re += tl.load(row + 2 * size, mask=mask, other=0.0)
        dq_im += tl.load(row + 3 * size, mask=mask, other=0.0)
        dp += tl.load(row + 4 * size, mask=mask, other=0.0)
        d_omega += tl.load(row_omega, mask=mask_d, other=0.0)
        row += 5 * size
        row_omega += D
    src = offs_d[:, None] * N + tl.arange(0, BLOCK_N)[None, :]  # the same elements in the (D, N) parameters
    s_alpha, s_delta, x, rest, s_theta, log_mag, angle, _, _ = _coefficients(
        alpha_ptr, delta_ptr, theta_ptr, gamma_ptr, offs_d, mask_d, src, mask, N, BLOCK_N)
    magnitude = tl.exp(log_mag)
    q_re, q_im = magnitude * tl.cos(angle), magnitude * tl.sin(angle)
    # q = exp(log|q| + i arg q): dL/dlog|q| = Re(conj(dq) q), dL/darg q = Re(conj(dq) i q)
    d_log_mag = dq_re * q_re + dq_im * q_im
    d_angle = dq_im * q_re - dq_re * q_im
    clamped = (x > 0.5) & (rest < 1.1754943508222875e-38)
    d_log_mag = tl.where(clamped, 0.0, d_log_mag) / tl.where(clamped, 1.0, rest)  # dL/dlog|q| / (1 - x)
    s_alpha_prime = s_alpha * tl.sigmoid(-tl.load(alpha_ptr + src, mask=mask, other=0.0))
    s_delta_prime = s_delta * tl.sigmoid(-tl.load(delta_ptr + src, mask=mask, other=0.0))
    tl.store(d_alpha_ptr + src, (dp - d_log_mag * s_delta) * s_alpha_prime, mask=mask)
    tl.store(d_delta_ptr + src, -d_log_mag * s_alpha * s_delta_prime, mask=mask)
    harmonics = (tl.arange(0, BLOCK_N) + 1).to(tl.float32)
    d_s_theta = tl.sum(tl.where(mask, d_angle * harmonics[None, :], 0.0), axis=1) * (6.283185307179586 / N)
    theta = tl.load(theta_ptr + offs_d, mask=mask_d, other=0.0)
    tl.store(d_theta_ptr + offs_d, d_s_theta * s_theta * tl.sigmoid(-theta), mask=mask_d)  # no 1 - s cancellation
    scale = 1.0 / tl.sqrt(N * 1.0)
    tl.store(d_gamma_ptr + 2 * src, dg_re * scale, mask=mask)
    tl.store(d_gamma_ptr + 2 * src + 1, dg_im * scale, mask=mask)
    tl.store(d_omega_ptr + offs_d, d_omega, mask=mask_d)
