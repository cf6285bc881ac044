"""Triton kernels of the CEMA's chunked scan (the design is in ops/triton/cema.py's docstring).

One linear recurrence serves the forward and the adjoint, per channel d and component n:

    before step t:  s = 0 if reset[t] (forward only)
    output:         y_t = Re(sum_n c_out s) + kappa x_t          (from the state before the step)
    step:           s = a s + c_in x_t
    after step t:   s = 0 if reset[t] (reverse only)

with complex a, c_in, c_out given as real parts. Time runs forward or, with REVERSE, backward. Time is cut into
chunks of CHUNK steps, aligned to the start of the sequence in both directions. Each program owns one chunk of one
row for BLOCK_D channels, and keeps the (BLOCK_D, N) complex state as two fp32 register tiles.

Every loop over time or chunks is unrolled UNROLL steps at a time (`tl.static_range`), and the per-step kernels
load a tile's UNROLL steps as one (BLOCK_D, UNROLL) tile (and store their outputs as one): the compiler cannot move
a load above an earlier store to a pointer that might alias it, so step-by-step loads and stores would wait for
memory once per step. With PREFETCH the tile of the next UNROLL steps is loaded before the current tile's
multiply-adds start, so its memory latency (several hundred cycles) runs under a whole tile of arithmetic; without,
the loads of a tile are issued at its top and the first step waits for them (the sm_90 SASS of
`local_states_kernel`: about 100 instructions between a tile's first load and its first use, of 680 a tile). It
costs registers, a second tile's and more where the compiler schedules around it (cema.py's PREFETCH_* say how
many). The gradient kernels (cema_backward.py: a channel's components over 4 threads) load step by step: a tile
there would be laid out unlike its states, and converting a column costs a shared-memory round trip and a barrier
per step. All loads are masked, all shapes powers of two, all arithmetic fp32; inputs of any float dtype are upcast on
load.

Layout: one thread owns a channel, with its N components and a tile's UNROLL steps in its registers, so that sums
over N and a tile's columns need no other thread. Triton picks that layout only when it cannot prove the (N, D)
tables' rows and the steps' rows 16-byte aligned: with D (or a time stride) known to be a multiple of 16, which
the launcher would specialize for D = 1024, it vectorizes 4 channels a thread and spreads N over 4 threads, which
costs every step shuffles, a shared-memory round trip and a barrier (seen in the sm_90 SASS). Hence
`do_not_specialize` on those arguments.
"""

from __future__ import annotations

import triton
import triton.language as tl

from megalodon.ops.triton.casts import cast
from megalodon.ops.triton.registers import both, column, with_column


@triton.jit
def channel_tile(pid_d, D, N, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
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
def _keep(reset_ptr, b, num_blocks, t, valid, BLOCK_SIZE: tl.constexpr):
    """0.0 where the state restarts before step t, else 1.0: where t starts a block of BLOCK_SIZE steps whose flag
    (B, num_blocks) is set. Read from the per-block flags themselves, so that no per-step tensor is made for the
    kernels (several launches a call); BLOCK_SIZE is a constant, which makes t's remainder a multiply and a shift."""
    first = (t % BLOCK_SIZE) == 0
    flag = tl.load(reset_ptr + b.to(tl.int64) * num_blocks + t // BLOCK_SIZE, mask=both(first, valid), other=0)
    return 1.0 - flag.to(tl.float32)


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
def _steps_mask(mask_d, steps, length, FULL: tl.constexpr):
    """(BLOCK_D, UNROLL): the channel exists and the tile's step exists in a chunk of `length` steps."""
    if FULL:
        return tl.broadcast_to(mask_d[:, None], (mask_d.shape[0], steps.shape[0]))
    else:
        return mask_d[:, None] & (steps[None, :] < length)


@triton.jit
def _first_tile(rows, stride_t, start, length, cols, REVERSE: tl.constexpr):
    """Pointers to a chunk's first UNROLL steps, (BLOCK_D, UNROLL), from the (BLOCK_D, 1) row pointers: in time
    order, or with REVERSE from the chunk's last step back."""
    return rows + _time(start, length, cols, REVERSE).to(tl.int64)[None, :] * stride_t


@triton.jit
def _steps_tile(first, stride_t, length, i0, cols, mask_d, REVERSE: tl.constexpr, FULL: tl.constexpr):
    """Steps i0 .. i0 + UNROLL - 1 of a chunk of `length` steps (`first`: _first_tile's pointers) as one
    (BLOCK_D, UNROLL) fp32 tile; steps past the chunk load as 0. FULL (every chunk whole, so a multiple of UNROLL
    steps): a tile lies all inside the chunk or, prefetched after its last, all past it, which one scalar test
    tells instead of a test per step. The pointers move by one scalar offset, not recomputed per step."""
    offset = tl.cast(i0, tl.int64) * stride_t
    if REVERSE:
        offset = -offset
    mask = _steps_mask(mask_d, i0 + cols, length, FULL)
    if FULL:
        mask = tl.where(i0 < length, mask, False)
    return tl.load(first + offset, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _mul(a_re, a_im, s_re, s_im):
    """a s, complex, as real parts."""
    return a_re * s_re - a_im * s_im, a_re * s_im + a_im * s_re


@triton.jit
def _step(s_re, s_im, a_re, a_im, cin_re, cin_im, x, REAL_IN: tl.constexpr):
    """s <- a s + c_in x, complex, as real parts. REAL_IN: c_in is real (cin_im is not read), which saves a
    multiply-add per component and step (the forward's c_in = p)."""
    new_re, new_im = _mul(a_re, a_im, s_re, s_im)
    if REAL_IN:
        return new_re + cin_re * x, new_im
    else:
        return new_re + cin_re * x, new_im + cin_im * x


@triton.jit
def _imaginary(ptr, offs, mask, REAL: tl.constexpr):
    """The imaginary parts of a coefficient table, or 0.0 for a real coefficient (its table is not read)."""
    if REAL:
        return 0.0
    else:
        return tl.load(ptr + offs, mask=mask, other=0.0)


@triton.jit(do_not_specialize=("D", "stride_xt"))
def local_states_kernel(x_ptr, stride_xb, stride_xt, stride_xd, reset_ptr, cin_re_ptr, cin_im_ptr, log_ptr,
                        angle_ptr, loc_ptr, L, D, N, num_chunks, num_blocks, keep_ptr,
                        CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, UNROLL: tl.constexpr,
                        REVERSE: tl.constexpr, HAS_RESET: tl.constexpr, FULL: tl.constexpr, REAL_IN: tl.constexpr,
                        PREFETCH: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """Phase 1, grid (chunks, D / BLOCK_D, B): each chunk's final state entered at zero -> loc (B, chunks, 2, N, D).
    PREFETCH: each tile of steps is loaded one tile ahead (see the module docstring). With HAS_RESET the programs
    of the first channel block also write keep (B, chunks): 0.0 for a chunk that a restart lies in, which the scan
    reads (the flags of every step of the chunk pass through them anyway)."""
    c, pid_d, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_d, mask_d, offs, mask = channel_tile(pid_d, D, N, BLOCK_D, BLOCK_N)
    a_re, a_im = _power(log_ptr, angle_ptr, offs, mask, 1.0)
    cin_re = tl.load(cin_re_ptr + offs, mask=mask, other=0.0)
    cin_im = _imaginary(cin_im_ptr, offs, mask, REAL_IN)
    s_re = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    s_im = tl.zeros((BLOCK_D, BLOCK_N), tl.float32)
    start = c * CHUNK
    length = tl.minimum(CHUNK, L - start)
    cols = tl.arange(0, UNROLL)
    x_rows = (x_ptr + b.to(tl.int64) * stride_xb + offs_d * stride_xd)[:, None]
    x_first = _first_tile(x_rows, stride_xt, start, length, cols, REVERSE)
    chunk_keep = tl.full((), 1.0, tl.float32)
    if PREFETCH:
        xs_next = _steps_tile(x_first, stride_xt, length, 0, cols, mask_d, REVERSE, FULL)
    for i0 in range(0, length, UNROLL):
        if PREFETCH:
            xs = xs_next
            xs_next = _steps_tile(x_first, stride_xt, length, i0 + UNROLL, cols, mask_d, REVERSE, FULL)
        else:
            xs = _steps_tile(x_first, stride_xt, length, i0, cols, mask_d, REVERSE, FULL)
        for k in tl.static_range(UNROLL):
            valid = _in_chunk(i0 + k, length, FULL)
            t = _time(start, length, i0 + k, REVERSE)
            x = column(xs, cols, k)
            keep = 1.0
            if HAS_RESET:
                keep = _keep(reset_ptr, b, num_blocks, t, valid, BLOCK_SIZE)
                chunk_keep = chunk_keep * keep
            if not REVERSE:  # forward: the state restarts before the step
                s_re, s_im = s_re * keep, s_im * keep
            new_re, new_im = _step(s_re, s_im, a_re, a_im, cin_re, cin_im, x[:, None], REAL_IN)
            if REVERSE:  # reverse: the adjoint stops flowing after it
                new_re, new_im = new_re * keep, new_im * keep
            s_re, s_im = tl.where(valid, new_re, s_re), tl.where(valid, new_im, s_im)
    base = (b.to(tl.int64) * num_chunks + c) * 2 * D * N
    tl.store(loc_ptr + base + offs, s_re, mask=mask)
    tl.store(loc_ptr + base + D * N + offs, s_im, mask=mask)
    if HAS_RESET:
        tl.store(keep_ptr + b.to(tl.int64) * num_chunks + c, chunk_keep, mask=pid_d == 0)


@triton.jit(do_not_specialize=("D",))
def scan_kernel(loc_ptr, keep_ptr, log_ptr, angle_ptr, h0_ptr, incoming_ptr, final_ptr, L, D, N, num_chunks,
                CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, UNROLL: tl.constexpr, REVERSE: tl.constexpr,
                HAS_H0: tl.constexpr, HAS_RESET: tl.constexpr):
    """Phase 2, grid (D / BLOCK_D, N, B): the scan over chunks, s_in(next) = a**len keep s_in + loc, from h0, for
    one component n of BLOCK_D channels (the components are independent: N times the programs of a scan over all
    of them, each a chain of num_chunks dependent steps). Writes the state entering every chunk
    (B, chunks, 2, N, D) and the one leaving the last (B, D, N, 2)."""
    pid_d, n, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    row = n * D + offs_d  # in the (N, D) tables and in each chunk's (2, N, D) states
    tail = L - (num_chunks - 1) * CHUNK
    full_re, full_im = _power(log_ptr, angle_ptr, row, mask_d, CHUNK * 1.0)
    tail_re, tail_im = _power(log_ptr, angle_ptr, row, mask_d, tail * 1.0)
    pairs = b.to(tl.int64) * D * N * 2 + (offs_d * N + n) * 2  # (B, D, N, 2)
    if HAS_H0:
        s_re = tl.load(h0_ptr + pairs, mask=mask_d, other=0.0)
        s_im = tl.load(h0_ptr + pairs + 1, mask=mask_d, other=0.0)
    else:
        s_re = tl.zeros((BLOCK_D,), tl.float32)
        s_im = tl.zeros((BLOCK_D,), tl.float32)
    cols = tl.arange(0, UNROLL)
    for j0 in range(0, num_chunks, UNROLL):
        chunks = _time(0, num_chunks, j0 + cols, REVERSE)
        tile_mask = mask_d[:, None] & (j0 + cols < num_chunks)[None, :]
        at = (b.to(tl.int64) * num_chunks + chunks)[None, :] * 2 * D * N + row[:, None]
        loc_re = tl.load(loc_ptr + at, mask=tile_mask, other=0.0)
        loc_im = tl.load(loc_ptr + at + D * N, mask=tile_mask, other=0.0)
        in_re = tl.zeros((BLOCK_D, UNROLL), tl.float32)
        in_im = tl.zeros((BLOCK_D, UNROLL), tl.float32)
        for k in tl.static_range(UNROLL):
            in_re = with_column(in_re, cols, k, s_re)
            in_im = with_column(in_im, cols, k, s_im)
            c = _time(0, num_chunks, j0 + k, REVERSE)
            valid = j0 + k < num_chunks
            is_tail = c == num_chunks - 1
            a_re = tl.where(is_tail, tail_re, full_re)
            a_im = tl.where(is_tail, tail_im, full_im)
            if HAS_RESET:  # a reset anywhere in the chunk cuts what enters it off from what leaves it
                # a scalar load (no layout): with no store before it in the group, the group's loads go together
                keep = tl.load(keep_ptr + b.to(tl.int64) * num_chunks + c, mask=valid, other=0.0)
                a_re, a_im = a_re * keep, a_im * keep
            new_re, new_im = _mul(a_re, a_im, s_re, s_im)
            s_re = tl.where(valid, new_re + column(loc_re, cols, k), s_re)
            s_im = tl.where(valid, new_im + column(loc_im, cols, k), s_im)
        tl.store(incoming_ptr + at, in_re, mask=tile_mask)
        tl.store(incoming_ptr + at + D * N, in_im, mask=tile_mask)
    tl.store(final_ptr + pairs, s_re, mask=mask_d)
    tl.store(final_ptr + pairs + 1, s_im, mask=mask_d)


@triton.jit(do_not_specialize=("D", "stride_xt"))
def outputs_kernel(x_ptr, stride_xb, stride_xt, stride_xd, reset_ptr, cin_re_ptr, cin_im_ptr, log_ptr, angle_ptr,
                   cout_re_ptr, cout_im_ptr, kappa_ptr, incoming_ptr, y_ptr, L, D, N, num_chunks, num_blocks,
                   CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, UNROLL: tl.constexpr,
                   REVERSE: tl.constexpr, HAS_RESET: tl.constexpr, FULL: tl.constexpr, REAL_IN: tl.constexpr,
                   REAL_OUT: tl.constexpr, PREFETCH: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """Phase 3, grid as phase 1: each chunk rerun from its incoming state, writing y (B, L, D) contiguous.
    REAL_IN, REAL_OUT: c_in, c_out real (their imaginary tables are not read). PREFETCH as in phase 1."""
    c, pid_d, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_d, mask_d, offs, mask = channel_tile(pid_d, D, N, BLOCK_D, BLOCK_N)
    a_re, a_im = _power(log_ptr, angle_ptr, offs, mask, 1.0)
    cin_re = tl.load(cin_re_ptr + offs, mask=mask, other=0.0)
    cin_im = _imaginary(cin_im_ptr, offs, mask, REAL_IN)
    cout_re = tl.load(cout_re_ptr + offs, mask=mask, other=0.0)
    cout_im = _imaginary(cout_im_ptr, offs, mask, REAL_OUT)
    kappa = tl.load(kappa_ptr + offs_d, mask=mask_d, other=0.0)
    base = (b.to(tl.int64) * num_chunks + c) * 2 * D * N
    s_re = tl.load(incoming_ptr + base + offs, mask=mask, other=0.0)
    s_im = tl.load(incoming_ptr + base + D * N + offs, mask=mask, other=0.0)
    start = c * CHUNK
    length = tl.minimum(CHUNK, L - start)
    cols = tl.arange(0, UNROLL)
    x_rows = (x_ptr + b.to(tl.int64) * stride_xb + offs_d * stride_xd)[:, None]
    y_rows = (y_ptr + b.to(tl.int64) * L * D + offs_d)[:, None]
    x_first = _first_tile(x_rows, stride_xt, start, length, cols, REVERSE)
    if PREFETCH:
        xs_next = _steps_tile(x_first, stride_xt, length, 0, cols, mask_d, REVERSE, FULL)
    for i0 in range(0, length, UNROLL):
        ts = _time(start, length, i0 + cols, REVERSE).to(tl.int64)
        tile_mask = _steps_mask(mask_d, i0 + cols, length, FULL)
        if PREFETCH:
            xs = xs_next
            xs_next = _steps_tile(x_first, stride_xt, length, i0 + UNROLL, cols, mask_d, REVERSE, FULL)
        else:
            xs = _steps_tile(x_first, stride_xt, length, i0, cols, mask_d, REVERSE, FULL)
        ys = tl.zeros((BLOCK_D, UNROLL), tl.float32)
        for k in tl.static_range(UNROLL):
            x = column(xs, cols, k)
            valid = _in_chunk(i0 + k, length, FULL)
            keep = 1.0
            if HAS_RESET:  # scalar loads, issued together: no store comes before them in the group
                keep = _keep(reset_ptr, b, num_blocks, _time(start, length, i0 + k, REVERSE), valid, BLOCK_SIZE)
            if not REVERSE:
                s_re, s_im = s_re * keep, s_im * keep
            if REAL_OUT:
                y = tl.sum(cout_re * s_re, axis=1)
            else:
                y = tl.sum(cout_re * s_re - cout_im * s_im, axis=1)
            ys = with_column(ys, cols, k, y + kappa * x)
            new_re, new_im = _step(s_re, s_im, a_re, a_im, cin_re, cin_im, x[:, None], REAL_IN)
            if REVERSE:
                new_re, new_im = new_re * keep, new_im * keep
            s_re, s_im = tl.where(valid, new_re, s_re), tl.where(valid, new_im, s_im)
        tl.store(y_rows + ts[None, :] * D, cast(ys, y_ptr.dtype.element_ty), mask=tile_mask)
