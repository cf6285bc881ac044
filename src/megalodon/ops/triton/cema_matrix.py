"""The CEMA's per-chunk runs (phases 1 and 3 of ops/triton/cema.py) as small matrix products, on tensor cores.

The step kernels (cema_kernels) run a chunk's CHUNK steps one after another on CUDA cores: about 7 multiply-adds
a step, component and channel, 16 components. Over a sub-block of SUB = 16 steps entered with state S, the same
recurrence of cema_kernels (in processing order p: time start + p, or with REVERSE start + CHUNK - 1 - p)

    y_p = Re(sum_n c_out s_p) + kappa x_p,        s_{p+1} = a s_p + c_in x_p

is three products per channel, with K[0] = kappa and K[m] = Re(sum_n c_out c_in a**(m - 1)):

    y_{p0+u} = sum_{v <= u} K[u - v] x_{p0+v}  +  Re(sum_n c_out a**u S)          (Toeplitz T, and V)
    S'       = a**SUB S  +  sum_v a**(SUB - 1 - v) c_in x_{p0+v}                   (W)

A program takes BLOCK_ROWS chunks (rows over the batch and the chunks) of BLOCK_D channels and runs the chunk's
sub-blocks in turn, each as batched dots over its channels: (rows x SUB) @ T (SUB x SUB), state (rows x N) @ V
(N x SUB), (rows x SUB) @ W (SUB x N): 16 + 2 N multiply-adds a step for the outputs and 2 N for the state, on
tensor cores instead of CUDA cores, in "tf32x3" (three tf32 products: about fp32's accuracy). T, V, W and a**SUB
come from the (N, D) tables the step kernels read, once a program. What stays sequential is SUB-step blocks, not
steps.

Only whole chunks (L a multiple of CHUNK), and restarts only at chunk starts (a block size that CHUNK divides,
the model's chunk_size at every preset): then a restart zeroes the state entering a chunk (forward) or leaving it
(reverse), a factor a row, and the scan's per-chunk flag is the one at the chunk's start. cema.py's `_run` picks
this form when MATRIX_FORM is set and a run qualifies, the step kernels otherwise.
"""

from __future__ import annotations

import triton
import triton.language as tl

from megalodon.ops.triton.casts import cast
from megalodon.ops.triton.cema_kernels import _imaginary, _keep, _power
from megalodon.ops.triton.registers import both

SUB = 16  # steps a sub-block (the kernel's SUB): the smallest dot Triton makes


@triton.jit
def _sub_block_matrices(log_ptr, angle_ptr, cin_re_ptr, cin_im_ptr, cout_re_ptr, cout_im_ptr, kappa_ptr, offs_d,
                        mask_d, D, N, SUB: tl.constexpr, BLOCK_N: tl.constexpr, REAL_IN: tl.constexpr,
                        REAL_OUT: tl.constexpr):
    """For BLOCK_D channels: W (re, im) (BLOCK_D, SUB, BLOCK_N), a**SUB (re, im) (BLOCK_D, 1, BLOCK_N), V (re, im)
    (BLOCK_D, BLOCK_N, SUB) with V_im = -Im so that S_re V_re + S_im V_im = Re(c_out a**u S), and T
    (BLOCK_D, SUB, SUB), T[v, u] = K[u - v] for u >= v. Components past N are zero everywhere."""
    d3 = offs_d[:, None, None]
    mask_d3 = mask_d[:, None, None]
    steps_mid = tl.arange(0, SUB)[None, :, None]
    steps_last = tl.arange(0, SUB)[None, None, :]
    comps_mid = tl.arange(0, BLOCK_N)[None, :, None]
    comps_last = tl.arange(0, BLOCK_N)[None, None, :]

    # components along the last axis: W and a**SUB
    offs = d3 + comps_last * D
    mask = mask_d3 & (comps_last < N)
    cin_re = tl.load(cin_re_ptr + offs, mask=mask, other=0.0)
    cin_im = _imaginary(cin_im_ptr, offs, mask, REAL_IN)
    pw_re, pw_im = _power(log_ptr, angle_ptr, offs, mask, (SUB - 1 - steps_mid).to(tl.float32))
    w_re = pw_re * cin_re - pw_im * cin_im
    w_im = pw_re * cin_im + pw_im * cin_re
    w_re, w_im = tl.where(mask, w_re, 0.0), tl.where(mask, w_im, 0.0)
    a_re, a_im = _power(log_ptr, angle_ptr, offs, mask, SUB * 1.0)

    # components along the middle axis: V, and the Toeplitz coefficients summed over them
    offs = d3 + comps_mid * D
    mask = mask_d3 & (comps_mid < N)
    cout_re = tl.load(cout_re_ptr + offs, mask=mask, other=0.0)
    cout_im = _imaginary(cout_im_ptr, offs, mask, REAL_OUT)
    pv_re, pv_im = _power(log_ptr, angle_ptr, offs, mask, steps_last.to(tl.float32))
    v_re = tl.where(mask, cout_re * pv_re - cout_im * pv_im, 0.0)
    v_im = tl.where(mask, -(cout_re * pv_im + cout_im * pv_re), 0.0)
    cin_re = tl.load(cin_re_ptr + offs, mask=mask, other=0.0)
    cin_im = _imaginary(cin_im_ptr, offs, mask, REAL_IN)
    # Re(c_out a**(m-1) c_in) for m >= 1 is Re(V(m-1) c_in) with V's conjugated sign undone
    pk_re, pk_im = _power(log_ptr, angle_ptr, offs, mask, tl.maximum(steps_last - 1, 0).to(tl.float32))
    ca_re = cout_re * pk_re - cout_im * pk_im
    ca_im = cout_re * pk_im + cout_im * pk_re
    kernel = tl.sum(tl.where(mask, ca_re * cin_re - ca_im * cin_im, 0.0), axis=1)  # (BLOCK_D, SUB) over m
    kappa = tl.load(kappa_ptr + offs_d, mask=mask_d, other=0.0)
    steps = tl.arange(0, SUB)[None, :]
    kernel = tl.where(steps == 0, kappa[:, None], kernel)
    lag = steps_last - steps_mid  # u - v
    toeplitz = tl.zeros((offs_d.shape[0], SUB, SUB), tl.float32)
    for m in tl.static_range(SUB):
        k_m = tl.sum(tl.where(steps == m, kernel, 0.0), axis=1)
        toeplitz = tl.where(lag == m, k_m[:, None, None], toeplitz)
    return w_re, w_im, a_re, a_im, v_re, v_im, toeplitz


@triton.jit(do_not_specialize=("D", "stride_xt"))
def chunk_products_kernel(x_ptr, stride_xb, stride_xt, stride_xd, reset_ptr, cin_re_ptr, cin_im_ptr, log_ptr,
                          angle_ptr, cout_re_ptr, cout_im_ptr, kappa_ptr, state_ptr, keep_ptr, y_ptr, L, D, N,
                          num_chunks, num_rows, num_blocks, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_ROWS: tl.constexpr, REVERSE: tl.constexpr,
                          HAS_RESET: tl.constexpr, REAL_IN: tl.constexpr, REAL_OUT: tl.constexpr,
                          OUTPUTS: tl.constexpr, BLOCK_SIZE: tl.constexpr, PRECISION: tl.constexpr,
                          SUB: tl.constexpr):
    """Grid (num_rows / BLOCK_ROWS, D / BLOCK_D), num_rows = B * chunks; every chunk whole. Without OUTPUTS, phase
    1: each chunk's final state entered at zero -> state (B, chunks, 2, N, D), and with HAS_RESET each chunk's keep
    flag (B, chunks) for the scan (first channel block). With OUTPUTS, phase 3: each chunk run from its incoming
    state (state, the same layout) writing y (B, L, D) contiguous. The other arguments as the step kernels'."""
    pid_r, pid_d = tl.program_id(0), tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    w_re, w_im, a_re, a_im, v_re, v_im, toeplitz = _sub_block_matrices(
        log_ptr, angle_ptr, cin_re_ptr, cin_im_ptr, cout_re_ptr, cout_im_ptr, kappa_ptr, offs_d, mask_d, D, N,
        SUB, BLOCK_N, REAL_IN, REAL_OUT)

    rows = pid_r * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)  # over (b, chunk)
    row_ok = rows < num_rows
    b = rows // num_chunks
    c = rows % num_chunks
    start = c * CHUNK
    mask_rows = mask_d[:, None, None] & row_ok[None, :, None]
    comps = tl.arange(0, BLOCK_N)[None, None, :]
    states = ((b.to(tl.int64) * num_chunks + c) * 2 * N * D)[None, :, None] + offs_d[:, None, None] + comps * D
    mask_states = mask_rows & (comps < N)
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
