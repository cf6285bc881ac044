"""The CEMA's per-chunk runs (phases 1 and 3 of ops/triton/cema.py), and its backward's gradient pass, as small
matrix products on tensor cores.

The step kernels (cema_kernels) run a chunk's CHUNK steps one after another on CUDA cores: about 7 multiply-adds
a step, component and channel, 16 components. Over a sub-block of SUB = 16 steps entered with state S, the same
recurrence of cema_kernels (in processing order p: time start + p, or with REVERSE start + CHUNK - 1 - p)

    y_p = Re(sum_n c_out s_p) + kappa x_p,        s_{p+1} = a s_p + c_in x_p

is three products per channel, with K[0] = kappa and K[m] = Re(sum_n c_out c_in a**(m - 1)):

    y_{p0+u} = sum_{v <= u} K[u - v] x_{p0+v}  +  Re(sum_n c_out a**u S)          (Toeplitz T, and V)
    S'       = a**SUB S  +  sum_v a**(SUB - 1 - v) c_in x_{p0+v}                   (W)

A program takes ROW_TILES tiles of BLOCK_ROWS chunks (rows over the batch and the chunks) of BLOCK_D channels and
runs each chunk's sub-blocks in turn, each as batched dots over its channels: (rows x SUB) @ T (SUB x SUB), state
(rows x N) @ V (N x SUB), (rows x SUB) @ W (SUB x N): 16 + 2 N multiply-adds a step for the outputs and 2 N for the
state, on tensor cores instead of CUDA cores, in "tf32x3" (three tf32 products: about fp32's accuracy). T, V, W
and a**SUB come from the (N, D) tables the step kernels read, once a program for all its tiles. What stays
sequential is SUB-step blocks, not steps.

Only whole chunks (L a multiple of CHUNK), and restarts only at chunk starts (a block size that CHUNK divides,
the model's chunk_size at every preset): then a restart zeroes the state entering a chunk (forward) or leaving it
(reverse), a factor a row, and the scan's per-chunk flag is the one at the chunk's start. cema.py's `_run` picks
this form when MATRIX_FORM is set and a run qualifies, the step kernels otherwise.

`matrix_grads_kernel` does the backward's work after the adjoint's scan the same way, in one reverse pass over
each chunk's sub-blocks: dL/du and the sums every parameter's gradient needs (its docstring has the algebra), in
place of cema_backward's kernels when MATRIX_BACKWARD is set.
"""

from __future__ import annotations

import triton
import triton.language as tl

from megalodon.ops.triton.casts import cast
from megalodon.ops.triton.cema_kernels import _imaginary, _keep, _power
from megalodon.ops.triton.registers import both

SUB = 16  # steps a sub-block (the kernel's SUB): the smallest dot Triton makes


@triton.jit
def _toeplitz(kernel, lag, SUB: tl.constexpr):
    """(BLOCK_D, SUB, SUB) with K[lag] where 0 <= lag (a (1, SUB, SUB) index), else 0, from K (BLOCK_D, SUB): a
    gather along the last axis (16 selects a lag took 560 more instructions a warp in the sm_90 SASS)."""
    rows = tl.broadcast_to(kernel[:, None, :], (kernel.shape[0], SUB, SUB))
    index = tl.broadcast_to(tl.maximum(lag, 0), (kernel.shape[0], SUB, SUB))
    return tl.where(lag >= 0, tl.gather(rows, index, 2), 0.0)


@triton.jit
def _table_axes(offs_d, mask_d, D, N, SUB: tl.constexpr, BLOCK_N: tl.constexpr):
    """Offsets and masks into an (N, D) table for (BLOCK_D, 1, BLOCK_N) tiles (components last) and
    (BLOCK_D, BLOCK_N, 1) ones (components in the middle), and the steps of a sub-block as (1, SUB, 1) and
    (1, 1, SUB) indices: the axes the products' matrices are laid out on."""
    d3 = offs_d[:, None, None]
    mask_d3 = mask_d[:, None, None]
    comps_mid = tl.arange(0, BLOCK_N)[None, :, None]
    comps_last = tl.arange(0, BLOCK_N)[None, None, :]
    return (d3 + comps_last * D, mask_d3 & (comps_last < N), d3 + comps_mid * D, mask_d3 & (comps_mid < N),
            tl.arange(0, SUB)[None, :, None], tl.arange(0, SUB)[None, None, :])


@triton.jit
def _sub_block_matrices(log_ptr, angle_ptr, cin_re_ptr, cin_im_ptr, cout_re_ptr, cout_im_ptr, kappa_ptr, offs_d,
                        mask_d, D, N, SUB: tl.constexpr, BLOCK_N: tl.constexpr, REAL_IN: tl.constexpr,
                        REAL_OUT: tl.constexpr):
    """For BLOCK_D channels: W (re, im) (BLOCK_D, SUB, BLOCK_N), a**SUB (re, im) (BLOCK_D, 1, BLOCK_N), V (re, im)
    (BLOCK_D, BLOCK_N, SUB) with V_im = -Im so that S_re V_re + S_im V_im = Re(c_out a**u S), and T
    (BLOCK_D, SUB, SUB), T[v, u] = K[u - v] for u >= v. Components past N are zero everywhere."""
    offs, mask, offs_mid, mask_mid, steps_mid, steps_last = _table_axes(offs_d, mask_d, D, N, SUB, BLOCK_N)

    # components along the last axis: W and a**SUB
    cin_re = tl.load(cin_re_ptr + offs, mask=mask, other=0.0)
    cin_im = _imaginary(cin_im_ptr, offs, mask, REAL_IN)
    pw_re, pw_im = _power(log_ptr, angle_ptr, offs, mask, (SUB - 1 - steps_mid).to(tl.float32))
    w_re = pw_re * cin_re - pw_im * cin_im
    w_im = pw_re * cin_im + pw_im * cin_re
    w_re, w_im = tl.where(mask, w_re, 0.0), tl.where(mask, w_im, 0.0)
    a_re, a_im = _power(log_ptr, angle_ptr, offs, mask, SUB * 1.0)

    # components along the middle axis: V, and the Toeplitz coefficients summed over them
    offs, mask = offs_mid, mask_mid
    cout_re = tl.load(cout_re_ptr + offs, mask=mask, other=0.0)
    cout_im = _imaginary(cout_im_ptr, offs, mask, REAL_OUT)
    pv_re, pv_im = _power(log_ptr, angle_ptr, offs, mask, steps_last.to(tl.float32))
    v_re = tl.where(mask, cout_re * pv_re - cout_im * pv_im, 0.0)
    v_im = tl.where(mask, -(cout_re * pv_im + cout_im * pv_re), 0.0)
    cin_re = tl.load(cin_re_ptr + offs, mask=mask, other=0.0)
    cin_im = _imaginary(cin_im_ptr, offs, mask, REAL_IN)
    # K[m] = Re(sum_n c_in V[m-1]) for m >= 1 (V's imaginary part is stored negated), shifted from V's own sums
    kernel = tl.sum(cin_re * v_re + cin_im * v_im, axis=1)  # (BLOCK_D, SUB): K[m + 1]
    steps = tl.arange(0, SUB)[None, :]
    kernel = tl.gather(kernel, tl.broadcast_to(tl.maximum(steps - 1, 0), kernel.shape), 1)
    kappa = tl.load(kappa_ptr + offs_d, mask=mask_d, other=0.0)
    kernel = tl.where(steps == 0, kappa[:, None], kernel)
    toeplitz = _toeplitz(kernel, steps_last - steps_mid, SUB)  # T[v, u] = K[u - v]
    return w_re, w_im, a_re, a_im, v_re, v_im, toeplitz


@triton.jit
def _row_tile(tile, offs, mask, mask_d, D, N, num_chunks, num_rows, CHUNK: tl.constexpr, BLOCK_ROWS: tl.constexpr):
    """Tile `tile` of BLOCK_ROWS rows over (b, chunk): which rows exist, their b, chunk and first step, the
    (BLOCK_D, rows, 1) mask of their inputs, and the offsets and mask of their (B, chunks, 2, N, D) states from a
    (BLOCK_D, 1, BLOCK_N) table tile's offs and mask (components last)."""
    rows = tile * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = rows < num_rows
    b = rows // num_chunks
    c = rows % num_chunks
    states = ((b.to(tl.int64) * num_chunks + c) * 2 * N * D)[None, :, None] + offs
    return (row_ok, b, c, c * CHUNK, mask_d[:, None, None] & row_ok[None, :, None], states,
            mask & row_ok[None, :, None])


@triton.jit(do_not_specialize=("D", "stride_xt"))
def chunk_products_kernel(x_ptr, stride_xb, stride_xt, stride_xd, reset_ptr, cin_re_ptr, cin_im_ptr, log_ptr,
                          angle_ptr, cout_re_ptr, cout_im_ptr, kappa_ptr, state_ptr, keep_ptr, y_ptr, L, D, N,
                          num_chunks, num_rows, num_blocks, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_ROWS: tl.constexpr, REVERSE: tl.constexpr,
                          HAS_RESET: tl.constexpr, REAL_IN: tl.constexpr, REAL_OUT: tl.constexpr,
                          OUTPUTS: tl.constexpr, BLOCK_SIZE: tl.constexpr, PRECISION: tl.constexpr,
                          SUB: tl.constexpr, ROW_TILES: tl.constexpr):
    """Grid (num_rows / (ROW_TILES * BLOCK_ROWS), D / BLOCK_D), num_rows = B * chunks; every chunk whole. Without
    OUTPUTS, phase 1: each chunk's final state entered at zero -> state (B, chunks, 2, N, D), and with HAS_RESET each
    chunk's keep flag (B, chunks) for the scan (first channel block). With OUTPUTS, phase 3: each chunk run from its
    incoming state (state, the same layout) writing y (B, L, D) contiguous. The other arguments as the step
    kernels'."""
    pid_r, pid_d = tl.program_id(0), tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    w_re, w_im, a_re, a_im, v_re, v_im, toeplitz = _sub_block_matrices(
        log_ptr, angle_ptr, cin_re_ptr, cin_im_ptr, cout_re_ptr, cout_im_ptr, kappa_ptr, offs_d, mask_d, D, N,
        SUB, BLOCK_N, REAL_IN, REAL_OUT)
    offs, mask, _, _, _, _ = _table_axes(offs_d, mask_d, D, N, SUB, BLOCK_N)

    for tile in range(ROW_TILES):  # the matrices above, made once, serve ROW_TILES tiles of rows
        row_ok, b, c, start, mask_rows, states, mask_states = _row_tile(
            pid_r * ROW_TILES + tile, offs, mask, mask_d, D, N, num_chunks, num_rows, CHUNK, BLOCK_ROWS)
        keep_rows = tl.full((BLOCK_ROWS,), 1.0, tl.float32)
        if HAS_RESET:
            keep_rows = _keep(reset_ptr, b, num_blocks, start, row_ok, BLOCK_SIZE)
        keep = keep_rows[None, :, None]
        if OUTPUTS:
            s_re = tl.load(state_ptr + states, mask=mask_states, other=0.0)
            s_im = tl.load(state_ptr + states + N * D, mask=mask_states, other=0.0)
            if not REVERSE:  # the state restarts before the chunk's first step
                s_re, s_im = s_re * keep, s_im * keep
        else:
            s_re = tl.zeros((BLOCK_D, BLOCK_ROWS, BLOCK_N), tl.float32)
            s_im = tl.zeros((BLOCK_D, BLOCK_ROWS, BLOCK_N), tl.float32)

        steps = tl.arange(0, SUB)[None, None, :]
        x_rows = x_ptr + (b.to(tl.int64) * stride_xb)[None, :, None] + (offs_d * stride_xd)[:, None, None]
        y_rows = y_ptr + (b.to(tl.int64) * L * D)[None, :, None] + offs_d[:, None, None]
        for k in tl.static_range(CHUNK // SUB):
            if REVERSE:
                t = start[None, :, None] + (CHUNK - 1 - k * SUB) - steps
            else:
                t = start[None, :, None] + k * SUB + steps
            xs = tl.load(x_rows + t.to(tl.int64) * stride_xt, mask=mask_rows, other=0.0).to(tl.float32)
            if OUTPUTS:
                ys = tl.dot(xs, toeplitz, input_precision=PRECISION)
                ys = tl.dot(s_re, v_re, ys, input_precision=PRECISION)
                ys = tl.dot(s_im, v_im, ys, input_precision=PRECISION)
                tl.store(y_rows + t.to(tl.int64) * D, cast(ys, y_ptr.dtype.element_ty), mask=mask_rows)
            if (not OUTPUTS) or k < CHUNK // SUB - 1:  # the outputs' last sub-block leaves no state anyone reads
                in_re = tl.dot(xs, w_re, input_precision=PRECISION)
                in_im = tl.dot(xs, w_im, input_precision=PRECISION)
                s_re, s_im = a_re * s_re - a_im * s_im + in_re, a_re * s_im + a_im * s_re + in_im
        if not OUTPUTS:
            if REVERSE:  # the adjoint stops flowing after the chunk's first step
                s_re, s_im = s_re * keep, s_im * keep
            tl.store(state_ptr + states, s_re, mask=mask_states)
            tl.store(state_ptr + states + N * D, s_im, mask=mask_states)
            if HAS_RESET:
                tl.store(keep_ptr + b.to(tl.int64) * num_chunks + c, keep_rows, mask=both(row_ok, pid_d == 0))


@triton.jit
def _conj_dot_rows(a_re, a_im, b_re, b_im):
    """sum over rows of conj(a) b, complex, for (BLOCK_D, rows, BLOCK_N) tiles -> (BLOCK_D, BLOCK_N)."""
    return tl.sum(a_re * b_re + a_im * b_im, axis=1), tl.sum(a_re * b_im - a_im * b_re, axis=1)


@triton.jit
def _masked_power(log_ptr, angle_ptr, offs, mask, exponent):
    power_re, power_im = _power(log_ptr, angle_ptr, offs, mask, exponent)
    return tl.where(mask, power_re, 0.0), tl.where(mask, power_im, 0.0)


@triton.jit(do_not_specialize=("D", "stride_ut"))
def matrix_grads_kernel(u_ptr, stride_ub, stride_ut, stride_ud, dy_ptr, reset_ptr, p_ptr, log_ptr, angle_ptr,
                        g_re_ptr, g_im_ptr, kappa_ptr, incoming_ptr, future_ptr, du_ptr, partial_ptr,
                        partial_omega_ptr, L, D, N, num_chunks, num_rows, num_blocks, CHUNK: tl.constexpr,
                        BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                        HAS_RESET: tl.constexpr, BLOCK_SIZE: tl.constexpr, PRECISION: tl.constexpr,
                        SUB: tl.constexpr, ROW_TILES: tl.constexpr):
    """The CEMA's backward after the adjoint's scan, as matrix products: dL/du (B, L, D) and the parameters' sums,
    grid and rows as chunk_products_kernel's. Per program the sums go to its own row of partial
    (programs, 5, N, D) = [dg_re, dg_im, dq_re, dq_im, dp] and partial_omega (programs, D), which gradients_kernel
    adds up. Forward, over a sub-block k: y = X T + Re(V S_k), S_{k+1} = A S_k + p X Q with A = q**SUB,
    Q[v] = q**(SUB - 1 - v), V[u] = g q**(u + 1), T[v, u] = K[u - v], K[m] = Re(sum_n p g q**m) + omega [m = 0].
    The sub-blocks run in reverse with the adjoint G_k = dL/dS_k = conj(g) Z_k + conj(A) G_{k+1}, Z_k = dY_k
    conj(q**(u+1)), entered from the adjoint's scan (future) after the chunk:
        dL/du_k = dY_k T^T + Re(conj(p X Q)^T G_{k+1})      dK[m] = sum over u - v = m of X_k^T dY_k
        sum_k conj(S_k) M_k = conj(S_0) H_0 + sum_j conj(p X_j Q) H_{j+1},  H_j = M_j + conj(A) H_{j+1}
    the last for M = Z_k (dg through V) and M = conj(SUB q**(SUB-1)) G_{k+1} + conj(g) Z'_k, Z'_k = dY_k
    conj((u+1) q**u) (dq through A and V), so that the states S_k are never run forward: S_0 is the chunk's
    incoming state, the rest enters through p X Q."""
    pid_r, pid_d = tl.program_id(0), tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    d3 = offs_d[:, None, None]
    offs, mask, offs_mid, mask_mid, steps_mid, steps_last = _table_axes(offs_d, mask_d, D, N, SUB, BLOCK_N)

    # components last: the coefficients (BLOCK_D, 1, BLOCK_N) and the products' right sides (BLOCK_D, SUB, BLOCK_N)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0)
    g_re = tl.load(g_re_ptr + offs, mask=mask, other=0.0)
    g_im = tl.load(g_im_ptr + offs, mask=mask, other=0.0)
    a_re, a_im = _power(log_ptr, angle_ptr, offs, mask, SUB * 1.0)
    # One matrix of powers, P[w] = q**w, serves the four products over a sub-block's steps, each with its left side
    # arranged to fit: X Q = X' P with X'[w] = x[SUB-1-w], X dQ = X'' P with X''[w] = (w+1) x[SUB-2-w],
    # Z = conj(q (dY P)) and Z' = conj((dY (u+1)) P). Matrices are what the loop holds in registers; left sides
    # are loads.
    pw_re, pw_im = _masked_power(log_ptr, angle_ptr, offs, mask, steps_mid.to(tl.float32))
    q_re, q_im = _power(log_ptr, angle_ptr, offs, mask, 1.0)
    # du's right sides: T^T (u, v) = K[u - v], and p Q transposed (components mid)
    pq_re, pq_im = _masked_power(log_ptr, angle_ptr, offs_mid, mask_mid, (SUB - 1 - steps_last).to(tl.float32))
    p_mid = tl.load(p_ptr + offs_mid, mask=mask_mid, other=0.0)
    pq_re, pq_im = p_mid * pq_re, p_mid * pq_im
    pk_re, pk_im = _masked_power(log_ptr, angle_ptr, offs_mid, mask_mid, steps_last.to(tl.float32))  # q**m
    gm_re = tl.load(g_re_ptr + offs_mid, mask=mask_mid, other=0.0)
    gm_im = tl.load(g_im_ptr + offs_mid, mask=mask_mid, other=0.0)
    kernel = tl.sum(p_mid * (gm_re * pk_re - gm_im * pk_im), axis=1)
    kappa = tl.load(kappa_ptr + offs_d, mask=mask_d, other=0.0)
    steps = tl.arange(0, SUB)[None, :]
    kernel = tl.where(steps == 0, kappa[:, None], kernel)  # K[0] = kappa = omega + sum_n p Re g
    toeplitz_t = _toeplitz(kernel, steps_mid - steps_last, SUB)

    # dq through A and through V pair conj(S_k) with one M_k: conj(SUB q**(SUB-1)) G_{k+1} + conj(g) Z'_k
    e_re, e_im = _power(log_ptr, angle_ptr, offs, mask, SUB - 1.0)
    e_re, e_im = SUB * e_re, SUB * e_im
    acc_p = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    acc_w_re, acc_w_im, acc_q_re, acc_q_im, acc_z_re, acc_z_im = acc_p, acc_p, acc_p, acc_p, acc_p, acc_p
    s_z_re, s_z_im, s_q_re, s_q_im = acc_p, acc_p, acc_p, acc_p  # the pairs with S_0, the chunks' incoming states
    d_toeplitz = tl.zeros((BLOCK_D, SUB, SUB), tl.float32)
    for tile in range(ROW_TILES):  # the matrices above, made once, serve ROW_TILES tiles of rows
        row_ok, b, c, start, mask_rows, states, mask_states = _row_tile(
            pid_r * ROW_TILES + tile, offs, mask, mask_d, D, N, num_chunks, num_rows, CHUNK, BLOCK_ROWS)
        ad_re = tl.load(future_ptr + states, mask=mask_states, other=0.0)  # G after the chunk
        ad_im = tl.load(future_ptr + states + N * D, mask=mask_states, other=0.0)
        zero = tl.zeros((BLOCK_D, BLOCK_ROWS, BLOCK_N), tl.float32)
        hq_re, hq_im, hz_re, hz_im = zero, zero, zero, zero
        u_rows = u_ptr + (b.to(tl.int64) * stride_ub)[None, :, None] + (offs_d * stride_ud)[:, None, None]
        dy_rows = (b.to(tl.int64) * L * D)[None, :, None] + d3
        for kk in range(CHUNK // SUB):  # not unrolled: each sub-block's loads wait for the last one's work
            t = (start[None, :, None] + (CHUNK - SUB - kk * SUB) + steps_last).to(tl.int64)
            t_reversed = (start[None, :, None] + (CHUNK - 1 - kk * SUB) - steps_last).to(tl.int64)
            xs = tl.load(u_rows + t_reversed * stride_ut, mask=mask_rows, other=0.0).to(tl.float32)  # X'
            xs_next = tl.load(u_rows + (t_reversed - 1) * stride_ut, mask=mask_rows & (steps_last < SUB - 1),
                              other=0.0).to(tl.float32) * (steps_last + 1)  # X''
            dys = tl.load(dy_ptr + dy_rows + t * D, mask=mask_rows, other=0.0).to(tl.float32)
            du = tl.dot(dys, toeplitz_t, input_precision=PRECISION)
            du = tl.dot(ad_re, pq_re, du, input_precision=PRECISION)
            du = tl.dot(ad_im, pq_im, du, input_precision=PRECISION)
            tl.store(du_ptr + dy_rows + t * D, cast(du, du_ptr.dtype.element_ty), mask=mask_rows)
            d_toeplitz = tl.dot(tl.permute(xs, (0, 2, 1)), dys, d_toeplitz, input_precision=PRECISION)  # [w, u]
            xq_re = tl.dot(xs, pw_re, input_precision=PRECISION)  # X Q: the sub-block's input to the state, over p
            xq_im = tl.dot(xs, pw_im, input_precision=PRECISION)
            xd_re = tl.dot(xs_next, pw_re, input_precision=PRECISION)  # its derivative in q
            xd_im = tl.dot(xs_next, pw_im, input_precision=PRECISION)
            yp_re = tl.dot(dys, pw_re, input_precision=PRECISION)
            yp_im = tl.dot(dys, pw_im, input_precision=PRECISION)
            zk_re, zk_im = q_re * yp_re - q_im * yp_im, -(q_re * yp_im + q_im * yp_re)
            dys = dys * (steps_last + 1)
            zpk_re = tl.dot(dys, pw_re, input_precision=PRECISION)
            zpk_im = -tl.dot(dys, pw_im, input_precision=PRECISION)
            # through Q (p X Q enters S_{k+1}): dp = Re(G conj(X Q)), dq = p G conj(X dQ)
            acc_p += tl.sum(ad_re * xq_re + ad_im * xq_im, axis=1)
            w_re, w_im = _conj_dot_rows(xd_re, xd_im, ad_re, ad_im)
            acc_w_re, acc_w_im = acc_w_re + w_re, acc_w_im + w_im
            # the Horner pairs conj(X Q) H_{k+1}, then H_k = M_k + conj(A) H_{k+1}
            h_re, h_im = _conj_dot_rows(xq_re, xq_im, hq_re, hq_im)
            acc_q_re, acc_q_im = acc_q_re + h_re, acc_q_im + h_im
            h_re, h_im = _conj_dot_rows(xq_re, xq_im, hz_re, hz_im)
            acc_z_re, acc_z_im = acc_z_re + h_re, acc_z_im + h_im
            m_re = e_re * ad_re + e_im * ad_im + g_re * zpk_re + g_im * zpk_im
            m_im = e_re * ad_im - e_im * ad_re + g_re * zpk_im - g_im * zpk_re
            hq_re, hq_im = m_re + a_re * hq_re + a_im * hq_im, m_im + a_re * hq_im - a_im * hq_re
            hz_re, hz_im = zk_re + a_re * hz_re + a_im * hz_im, zk_im + a_re * hz_im - a_im * hz_re
            ad_re, ad_im = (g_re * zk_re + g_im * zk_im + a_re * ad_re + a_im * ad_im,
                            g_re * zk_im - g_im * zk_re + a_re * ad_im - a_im * ad_re)
        # the states' part entering the chunk: S_0, the incoming state (zero after a restart at the chunk's start)
        s_re = tl.load(incoming_ptr + states, mask=mask_states, other=0.0)
        s_im = tl.load(incoming_ptr + states + N * D, mask=mask_states, other=0.0)
        if HAS_RESET:
            keep = _keep(reset_ptr, b, num_blocks, start, row_ok, BLOCK_SIZE)[None, :, None]
            s_re, s_im = s_re * keep, s_im * keep
        h_re, h_im = _conj_dot_rows(s_re, s_im, hz_re, hz_im)
        s_z_re, s_z_im = s_z_re + h_re, s_z_im + h_im
        h_re, h_im = _conj_dot_rows(s_re, s_im, hq_re, hq_im)
        s_q_re, s_q_im = s_q_re + h_re, s_q_im + h_im
    offs = offs_d[:, None] + tl.arange(0, BLOCK_N)[None, :] * D  # (BLOCK_D, BLOCK_N): the sums' own shape
    mask = mask_d[:, None] & (tl.arange(0, BLOCK_N)[None, :] < N)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0)
    g_re = tl.load(g_re_ptr + offs, mask=mask, other=0.0)
    g_im = tl.load(g_im_ptr + offs, mask=mask, other=0.0)
    dg_re, dg_im = s_z_re + p * acc_z_re, s_z_im + p * acc_z_im  # through V: sum_k conj(S_k) Z_k
    dq_re = s_q_re + p * (acc_q_re + acc_w_re)  # through A and V: sum_k conj(S_k) M_k; through Q: p G conj(X dQ)
    dq_im = s_q_im + p * (acc_q_im + acc_w_im)
    # through T: dK[m], the sum of X^T dY over u - v = m (X' is reversed: v = SUB-1-w); K[m] = Re(sum_n p g q**m)
    # (+ omega at m = 0)
    lag = steps_last + steps_mid - (SUB - 1)
    d_kernel = tl.zeros((BLOCK_D, SUB), tl.float32)
    for m in tl.static_range(SUB):
        d_m = tl.sum(tl.sum(tl.where(lag == m, d_toeplitz, 0.0), axis=2), axis=1)
        d_kernel = tl.where(steps == m, d_m[:, None], d_kernel)
    d_omega = tl.sum(tl.where(steps == 0, d_kernel, 0.0), axis=1)
    d_kernel = d_kernel[:, None, :]  # (BLOCK_D, 1, SUB) against the powers q**m (BLOCK_D, BLOCK_N, SUB)
    # loaded and raised again rather than held through the loop, where registers are short
    pk_re, pk_im = _masked_power(log_ptr, angle_ptr, offs_mid, mask_mid, steps_last.to(tl.float32))
    gm_re = tl.load(g_re_ptr + offs_mid, mask=mask_mid, other=0.0)
    gm_im = tl.load(g_im_ptr + offs_mid, mask=mask_mid, other=0.0)
    dp = acc_p + tl.sum(d_kernel * (gm_re * pk_re - gm_im * pk_im), axis=2)
    dg_re += p * tl.sum(d_kernel * pk_re, axis=2)
    dg_im -= p * tl.sum(d_kernel * pk_im, axis=2)
    pm_re, pm_im = _masked_power(log_ptr, angle_ptr, offs_mid, mask_mid, tl.maximum(steps_last - 1, 0).to(tl.float32))
    w_re = tl.sum(d_kernel * steps_last * pm_re, axis=2)  # sum_m m dK[m] q**(m-1)
    w_im = tl.sum(d_kernel * steps_last * pm_im, axis=2)
    dq_re += p * (g_re * w_re - g_im * w_im)  # p conj(g w)
    dq_im -= p * (g_re * w_im + g_im * w_re)
    out = partial_ptr + pid_r.to(tl.int64) * 5 * D * N + offs
    tl.store(out, dg_re, mask=mask)
    tl.store(out + D * N, dg_im, mask=mask)
    tl.store(out + 2 * D * N, dq_re, mask=mask)
    tl.store(out + 3 * D * N, dq_im, mask=mask)
    tl.store(out + 4 * D * N, dp, mask=mask)
    tl.store(partial_omega_ptr + pid_r.to(tl.int64) * D + offs_d, d_omega, mask=mask_d)
