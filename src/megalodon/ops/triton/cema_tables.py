"""Triton kernels of the CEMA's coefficients (ops/triton/cema.py): the (N, D) tables that the chunked scan's
kernels (ops/triton/cema_kernels.py) read, derived from the parameters in one launch, and the chain rule from the
scan's per-chunk gradient sums back to the parameters, in one launch.
"""

from __future__ import annotations

import triton
import triton.language as tl

from megalodon.ops.triton.cema_kernels import channel_tile

# Rows of the (TABLE_ROWS, N, D) table buffer made by tables_kernel, by name (the kernel writes them in this order).
P, LOG_MAG, ANGLE, NEG_ANGLE, QG_RE, QG_IM, NEG_QG_IM, G_RE, G_IM = range(9)
TABLE_ROWS = 9


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
    read, in one launch (rows named above): the forward reads c_in = p (real), a = q and c_out = q g; the adjoint
    c_in = conj(q g), a = conj(q) and c_out = p (real); the gradient kernel p, q and g. And
    kappa (D,) = omega + sum_n p Re(g)."""
    pid_d = tl.program_id(0)
    offs_d, mask_d, offs, mask = channel_tile(pid_d, D, N, BLOCK_D, BLOCK_N)
    src = offs_d[:, None] * N + tl.arange(0, BLOCK_N)[None, :]  # the same elements in the (D, N) parameters
    p, _, _, _, _, log_mag, angle, g_re, g_im = _coefficients(alpha_ptr, delta_ptr, theta_ptr, gamma_ptr, offs_d,
                                                              mask_d, src, mask, N, BLOCK_N)
    magnitude = tl.exp(log_mag)
    q_re, q_im = magnitude * tl.cos(angle), magnitude * tl.sin(angle)
    qg_re, qg_im = q_re * g_re - q_im * g_im, q_re * g_im + q_im * g_re
    size = N * D  # rows in the order P, LOG_MAG, ANGLE, NEG_ANGLE, QG_RE, QG_IM, NEG_QG_IM, G_RE, G_IM
    tl.store(tables_ptr + offs, p, mask=mask)
    tl.store(tables_ptr + size + offs, log_mag, mask=mask)
    tl.store(tables_ptr + 2 * size + offs, angle, mask=mask)
    tl.store(tables_ptr + 3 * size + offs, -angle, mask=mask)
    tl.store(tables_ptr + 4 * size + offs, qg_re, mask=mask)
    tl.store(tables_ptr + 5 * size + offs, qg_im, mask=mask)
    tl.store(tables_ptr + 6 * size + offs, -qg_im, mask=mask)
    tl.store(tables_ptr + 7 * size + offs, g_re, mask=mask)
    tl.store(tables_ptr + 8 * size + offs, g_im, mask=mask)
    kappa = tl.load(omega_ptr + offs_d, mask=mask_d, other=0.0) + tl.sum(tl.where(mask, p * g_re, 0.0), axis=1)
    tl.store(kappa_ptr + offs_d, kappa, mask=mask_d)


@triton.jit
def _partial_row(row, row_omega, size, mask, mask_d):
    """One row of parameter_grads_kernel's sums: (g re, g im, q re, q im, p) tiles and omega's."""
    return (tl.load(row, mask=mask, other=0.0), tl.load(row + size, mask=mask, other=0.0),
            tl.load(row + 2 * size, mask=mask, other=0.0), tl.load(row + 3 * size, mask=mask, other=0.0),
            tl.load(row + 4 * size, mask=mask, other=0.0), tl.load(row_omega, mask=mask_d, other=0.0))


@triton.jit
def gradients_kernel(partial_ptr, partial_omega_ptr, alpha_ptr, delta_ptr, theta_ptr, gamma_ptr, d_alpha_ptr,
                     d_delta_ptr, d_theta_ptr, d_gamma_ptr, d_omega_ptr, rows, D, N,
                     BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr):
    """Grid (D / BLOCK_D,): the parameter gradients from parameter_grads_kernel's per-chunk sums, in one launch.
    Sums `partial` (rows = B * chunks, 5, N, D) and `partial_omega` (rows, D) over the rows, ROWS rows' loads
    issued together (a row at a time cost a memory latency a row: 42 us a layer at mega200M's 4K in the first H100
    trace), then takes the chain rule through the coefficients (_coefficients) to the parameters: d alpha, d delta
    (D, N), d theta (D,), d gamma (D, N, 2) and d omega (D,). With x = sigmoid(alpha) sigmoid(delta),
    d log|q| = -dx / (1 - x), and 1 - x as _coefficients sums it; where that sum is clamped (|q| rounds to 0)
    log|q| is constant, as autograd of log_decay has it."""
    pid_d = tl.program_id(0)
    offs_d, mask_d, offs, mask = channel_tile(pid_d, D, N, BLOCK_D, BLOCK_N)
    dg_re = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    dg_im = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    dq_re = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    dq_im = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    dp = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    d_omega = tl.zeros((BLOCK_D,), tl.float32)
    size = N * D
    row = partial_ptr + offs  # pointers advance row by row: 64-bit, however many rows
    row_omega = partial_omega_ptr + offs_d
    whole = rows - rows % ROWS
    for _ in range(0, whole, ROWS):
        for r in tl.static_range(ROWS):  # independent loads in the tile's own layout: no exchange between threads
            a, b, c, d, e, f = _partial_row(row + r * 5 * size, row_omega + r * D, size, mask, mask_d)
            dg_re, dg_im, dq_re, dq_im, dp, d_omega = dg_re + a, dg_im + b, dq_re + c, dq_im + d, dp + e, d_omega + f
        row += ROWS * 5 * size
        row_omega += ROWS * D
    for _ in range(whole, rows):  # the last rows % ROWS
        a, b, c, d, e, f = _partial_row(row, row_omega, size, mask, mask_d)
        dg_re, dg_im, dq_re, dq_im, dp, d_omega = dg_re + a, dg_im + b, dq_re + c, dq_im + d, dp + e, d_omega + f
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
