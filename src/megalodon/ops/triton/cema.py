"""The CEMA (ops/cema.py) on CUDA in Triton: training and prefill, forward and backward, with no (D, N, L) tensor.

Shape of the kernels: a chunked scan with the (BLOCK_D x N) complex state held in registers as two fp32 tiles.
Time is cut into chunks of CHUNK = 64 steps (a multiple of 16, independent of the model's chunk_size; any L).
In the per-step kernels a program is one warp over 32 channels and a thread owns one channel with all its N
components: the sum over N stays in the thread, and the step loops use no shared memory, no shuffle and no barrier
(checked in the sm_90 SASS as the launcher specializes the kernels at mega200M: see cema_kernels on why D is not
specialized). The coefficient tables and chunk states are stored (N, D) for coalesced loads.
Forward, four launches (ops/triton/cema_kernels.py; the tables and the parameters' chain rule in cema_tables.py):
0. per channel block: the coefficients derived from the CEMA's parameters (ops/cema.py's cema_coefficients) and
   every table the runs read (`tables_kernel`): one launch where deriving and laying them out op by op took about
   50 small kernels in eager mode, some 25 of them inside this custom op where a compiled graph cannot fuse them;
1. per (chunk, channel block, row): the chunk's final state entered at zero, by running the recurrence;
2. per (channel block, component, row): the scan over chunks, s_in(c+1) = q**len(c) s_in(c) + s_loc(c), from h0,
   cut where a document restarts inside chunk c; it also gives the final state;
3. per (chunk, channel block, row): the chunk rerun from its incoming state, writing y.
With MATRIX_FORM, phases 1 and 3 (of the adjoint's run too) are small matrix products on tensor cores over
sub-blocks of 16 steps (cema_matrix.py), where every chunk is whole and restarts fall on chunk starts.
Backward, five launches (the forward's tables and its states entering each chunk are saved for it; called
without them, the backward op derives the tables and reruns phases 1-2 on u): the adjoint, the same recurrence
run in reverse time with conj(q) (phases 1-3 on dy give dL/du, the adjoint state entering each chunk, and dL/dh0);
one kernel that reruns every chunk forward with tangents dh/dq and dh/dp to sum the parameter gradients per chunk
(`parameter_grads_kernel`); and one that adds the chunks' sums up and takes the chain rule through the
coefficients to the parameters (`gradients_kernel`). With FUSED_BACKWARD, four: the adjoint's phases 1-2 only,
then one reverse pass over each chunk that gives dL/du and the parameters' per-chunk sums together
(`adjoint_grads_kernel`), then `gradients_kernel`. The gradient kernels are in cema_backward.py. With
MATRIX_BACKWARD, where a run can take the matrix products, that pass is cema_matrix.matrix_grads_kernel: the same
sums from tensor-core products over sub-blocks of 16 steps.

Why this shape and not a fused kernel for k[d, j] = Re(sum_n p g q**j) plus an FFT (the official code's): the work
is O(B L D N) multiply-adds in registers (at mega200M, L = 4096, about 0.5 GFLOP per pass, under a millisecond of
CUDA-core time), u and y are read and written once per pass, coalesced along D in their (B, L, D) layout, so no
transposes; there is no power table at all, no FFT padding to 2 x next_pow2(L), and document resets, the incoming
state and the final state come from the same scan instead of three extra tensors. Parallelism is
B x D / 32 x L / 64 programs (2,048 at mega200M, 4K tokens, batch 1). The cost is sequential latency within a
chunk (64 dependent steps), hidden by running many programs per SM.

Memory: saved for backward are u itself (in its own dtype, bf16 stays bf16), h0, the reset flags and the states
entering each chunk, (B, L / 64, 2, N, D) fp32 = D N / 8 bytes per token (2 KB at D = 1024, N = 16, about 2% of
a mega200M layer's activations), which spares backward the two launches that would compute them again, and the
coefficient tables (9 N D + D floats, 0.6 MB a layer at mega200M whatever the length), which spare it one.
Transient: in backward the adjoint's chunk states (as many bytes again) and the parameter partial sums,
5 D N / 16 bytes per token.

`cema_scan` is an OpaqueOp (ops/triton/__init__.py): a custom op (`megalodon::cema_scan`, backward
`megalodon::cema_scan_backward`) with fake implementations and autograd registered, so a compiled graph holds it as
one node; in eager mode the same implementation and formula run without the dispatcher's custom-op path.
"""

from __future__ import annotations

import torch
from torch import Tensor

from megalodon.ops.triton import LAUNCH, on_input_device, opaque_op

CHUNK = 64  # steps per chunk
BLOCK_D = 32  # channels per program
UNROLL = 8  # steps issued together (see cema_kernels)
# Whether the one-warp step kernels load each tile of UNROLL steps one tile ahead, so that its memory latency runs
# under the last tile's arithmetic (cema_kernels), in the forward's runs and in the adjoint's. On sm_90 (triton
# 3.9's ptxas, fp32 inputs as launched at mega200M) the forward's kernels take few registers more (146 -> 156 and
# 168 -> 168 a thread: 12 programs an SM for both, 13 before for local_states_kernel), the adjoint's many (163 ->
# 188, 168 -> 194: 10 programs an SM instead of 12), hence on and off until a GPU times them: gpu_session.sh's
# sweep (bench_cema.py --prefetch) runs the four settings.
PREFETCH_FORWARD, PREFETCH_REVERSE = True, False
# Registers a thread that the per-step kernels may take (ptxas's .maxnreg; None: what they need). As they compile
# for sm_90 at mega200M they take 149-168, so 12 or 13 one-warp programs share an SM, and 4K tokens' 2,048
# programs take 1.3 waves of an H200's 132 SMs; at 128, 16 fit an SM and the 2,048 one wave, for 22 to 102
# spilled loads and stores a kernel (to L1). Which wins is for a GPU to say: gpu_tuning.py times both.
STEP_REGISTERS: int | None = None
# Whether backward takes the input gradient and the parameters' gradient sums in one reverse pass over each chunk
# (cema_backward.adjoint_grads_kernel: about 20 multiply-adds a step and component where outputs_kernel's reverse
# run and parameter_grads_kernel take about 28, a pass over u and dy and a launch fewer), instead of two. Off until
# a GPU times it: gpu_tuning.py's "CEMA backward" group.
FUSED_BACKWARD = False
# Its programs: FUSED_BLOCK_D channels, one warp, a channel's components over 4 threads at N = 16, so that each step's
# sum over them is two shuffles (at 32 channels and 4 warps they spread across warps: a shared-memory round trip
# and two barriers a step, in the sm_90 SASS). 128 registers a thread, no spill (with restarts: 168).
FUSED_BLOCK_D, WARPS_FUSED = 8, 1
# Whether phases 1 and 3 of each run (forward and adjoint) are small matrix products on tensor cores
# (cema_matrix.chunk_products_kernel: sub-blocks of 16 steps, a Toeplitz product for the outputs and two for the
# state) instead of the step kernels' sequential multiply-adds. Whole chunks and restarts at chunk starts only;
# other runs take the step kernels. Off until a GPU times it: gpu_tuning.py's "CEMA chunk runs" group.
MATRIX_FORM = False
# Its programs: tiles of MATRIX_ROWS chunks of MATRIX_BLOCK_D channels, WARPS_MATRIX warps (on sm_90 at mega200M, 163
# to 244 registers a thread for the four variants, no spill; at 8 channels they spill); its dots' precision ("tf32x3":
# three tf32 products, about fp32's error; "tf32": one, about bf16's relative error on the CEMA's output; on ROCm,
# whose Triton has no "tf32x3", "ieee").
MATRIX_BLOCK_D, MATRIX_ROWS, WARPS_MATRIX, MATRIX_PRECISION = 4, 16, 4, "tf32x3"
# Tiles of MATRIX_ROWS chunks a program of either kernel runs in turn: making its matrices from the tables is most
# of its instructions (in the forward's outputs, 9,600 of 12,000 a warp in the sm_90 SASS), so a program serves
# several tiles with them. 4: 64 chunks, 4K tokens of a row.
MATRIX_ROW_TILES = 4
# Whether backward takes the input gradient and the parameters' gradient sums as matrix products too, in one
# reverse pass over each chunk's sub-blocks (cema_matrix.matrix_grads_kernel), where a run qualifies as above;
# independent of MATRIX_FORM. Off until a GPU times it: gpu_tuning.py's "CEMA backward" group.
MATRIX_BACKWARD = False
# Its programs: MATRIX_GRADS_BLOCK_D channels, WARPS_MATRIX_GRADS warps: the fewest instructions a token and
# channel in its sm_90 SASS (11.7 warp-instructions on triton 3.9, about 20 on 3.6; the two step-kernel passes
# take about 7.4), 255 registers, and beyond libdevice's 32 stack bytes (sine and cosine of huge arguments, a path
# never taken) 64 bytes spilled on 3.9, about 600 on 3.6 (torch 2.11's, the GPU image's). docs/gpu.md has more.
MATRIX_GRADS_BLOCK_D, WARPS_MATRIX_GRADS = 4, 8
# Warps per program. With one warp, each thread owns a channel and all N components, so the sum over N is inside
# the thread and the per-step loads and stores need no layout conversion (no shared memory, no barrier in the
# loop; see cema_kernels on the specialization that would undo it). The scan runs one component per program, one
# warp each. The gradient kernel holds more tiles and would spill with one warp. The two small kernels that
# derive the tables and the parameter gradients take 4 warps: at 1 the second spilled (255 registers and a
# 456-byte stack). Registers are counted by tests/ops/test_cema_triton.py::test_kernels_compile_for_h100's cases.
WARPS_STEPS, WARPS_SCAN, WARPS_GRADS, WARPS_TABLES = 1, 1, 4, 4
# The parameter gradients' reduction over the per-chunk sums: GRADIENTS_ROWS rows' loads issued together, in
# programs of GRADIENTS_BLOCK_D channels (128 programs at D = 1024), where one (8, N) tile is a value a thread at 4
# warps: 48 loads in flight a thread, 96 registers on sm_90, no spill.
GRADIENTS_BLOCK_D, GRADIENTS_ROWS = 8, 8


def _kernels():
    # Imported on first use: the interpreter switch (TRITON_INTERPRET) is read when the kernels are decorated.
    from megalodon.ops.triton import cema_kernels

    return cema_kernels


def _table_kernels():
    from megalodon.ops.triton import cema_tables

    return cema_tables


def _backward_kernels():
    from megalodon.ops.triton import cema_backward

    return cema_backward


def _run(x: Tensor, cin: tuple[Tensor, Tensor | None], decay: tuple[Tensor, Tensor], h0: Tensor | None,
         resets: tuple[Tensor, int] | None, chunk: int, reverse: bool,
         outputs: tuple[tuple[Tensor, Tensor | None], Tensor, torch.dtype] | None
         ) -> tuple[Tensor, Tensor, Tensor | None]:
    """One run of the generic recurrence (see cema_kernels) over x (B, L, D), from state h0 (B, D, N, 2).
    The (complex) coefficients c_in, a (as log|a| and arg a) and c_out come as real parts, each (N, D): rows of
    the table buffer, laid out so that a program's loads are contiguous along its channels; an imaginary part
    None for a real coefficient (the kernels then skip its arithmetic). resets: _block_flags' (flags, block size),
    or None.
    outputs: (c_out parts, kappa (D,), dtype of y), or None to stop after the scan.
    Returns the state entering every chunk (B, chunks, 2, N, D), the final state (B, D, N, 2) and y or None."""
    kernels = _kernels()
    batch, length, dim = x.shape
    ndim = decay[0].shape[0]
    num_chunks = -(-length // chunk)
    flags, block_size = (x, 1) if resets is None else resets  # any pointer will do when unused
    meta = dict(CHUNK=chunk, BLOCK_N=_block_n(ndim), REVERSE=reverse, HAS_RESET=resets is not None,
                BLOCK_SIZE=block_size)
    steps = dict(meta, BLOCK_D=BLOCK_D, UNROLL=UNROLL, FULL=length % chunk == 0,  # FULL: no bounds on the steps
                 PREFETCH=PREFETCH_REVERSE if reverse else PREFETCH_FORWARD, num_warps=WARPS_STEPS, **LAUNCH)
    if STEP_REGISTERS is not None:
        steps["maxnreg"] = STEP_REGISTERS
    grid = (num_chunks, -(-dim // BLOCK_D), batch)
    local = x.new_empty(batch, num_chunks, 2, ndim, dim, dtype=torch.float32)
    keep = local if resets is None else x.new_empty(batch, num_chunks, dtype=torch.float32)  # written in phase 1
    cin, real_in = _parts(cin)
    matrix = MATRIX_FORM and _matrix_ready(length, chunk, None if resets is None else block_size)
    if matrix:  # without outputs, c_out's tables and kappa stand in unread
        _products(x, flags, cin, decay, (cin, True), decay[0], local, keep, x, meta, real_in, outputs=False)
    else:
        kernels.local_states_kernel[grid](x, *x.stride(), flags, *cin, *decay, local, length, dim, ndim, num_chunks,
                                          flags.shape[-1], keep, REAL_IN=real_in, **steps)
    incoming = torch.empty_like(local)
    final = x.new_empty(batch, dim, ndim, 2, dtype=torch.float32)
    kernels.scan_kernel[(grid[1], ndim, batch)](local, keep, *decay, x if h0 is None else h0,
                                                incoming, final, length, dim, ndim, num_chunks, CHUNK=chunk,
                                                BLOCK_D=BLOCK_D, UNROLL=UNROLL, REVERSE=reverse,
                                                HAS_H0=h0 is not None, HAS_RESET=resets is not None,
                                                num_warps=WARPS_SCAN, **LAUNCH)
    if outputs is None:
        return incoming, final, None
    cout, kappa, dtype = outputs
    y = x.new_empty(batch, length, dim, dtype=dtype)
    if matrix:
        _products(x, flags, cin, decay, _parts(cout), kappa, incoming, keep, y, meta, real_in, outputs=True)
    else:
        cout, real_out = _parts(cout)
        kernels.outputs_kernel[grid](x, *x.stride(), flags, *cin, *decay, *cout, kappa, incoming, y, length, dim,
                                     ndim, num_chunks, flags.shape[-1], REAL_IN=real_in, REAL_OUT=real_out, **steps)
    return incoming, final, y


def _matrix_ready(length: int, chunk: int, block_size: int | None) -> bool:
    """Whether a run can take the matrix products (cema_matrix): every chunk whole, and restarts, if any, only
    where chunks start."""
    return length % chunk == 0 and (block_size is None or block_size % chunk == 0)


def _matrix_precision() -> str:
    return "ieee" if torch.version.hip else MATRIX_PRECISION  # ROCm's Triton has no "tf32x3"


def _products(x: Tensor, flags: Tensor, cin: tuple[Tensor, Tensor], decay: tuple[Tensor, Tensor],
              cout: tuple[tuple[Tensor, Tensor], bool], kappa: Tensor, states: Tensor, keep: Tensor, y: Tensor,
              meta: dict, real_in: bool, outputs: bool) -> None:
    """Phase 1 (outputs False: writes states and keep) or phase 3 (reads states, writes y) as matrix products."""
    from megalodon.ops.triton import cema_matrix

    batch, length, dim = x.shape
    ndim = decay[0].shape[0]
    num_chunks = length // meta["CHUNK"]
    cout_parts, real_out = cout
    meta = dict(meta, BLOCK_N=max(16, meta["BLOCK_N"]))  # a dot's dimensions are 16 or more
    grid = (-(-batch * num_chunks // (MATRIX_ROWS * MATRIX_ROW_TILES)), -(-dim // MATRIX_BLOCK_D))
    cema_matrix.chunk_products_kernel[grid](
        x, *x.stride(), flags, *cin, *decay, *cout_parts, kappa, states, keep, y, length, dim, ndim, num_chunks,
        batch * num_chunks, flags.shape[-1], BLOCK_D=MATRIX_BLOCK_D, BLOCK_ROWS=MATRIX_ROWS, REAL_IN=real_in,
        REAL_OUT=real_out, OUTPUTS=outputs, PRECISION=_matrix_precision(),
        SUB=cema_matrix.SUB, ROW_TILES=MATRIX_ROW_TILES, num_warps=WARPS_MATRIX, **meta, **LAUNCH)


def _parts(coefficient: tuple[Tensor, Tensor | None]) -> tuple[tuple[Tensor, Tensor], bool]:
    """A coefficient's (real, imaginary) tables as the kernels take them, and whether it is real (the kernels then
    do not read the second table, which is the first again)."""
    real, imaginary = coefficient
    return (real, real if imaginary is None else imaginary), imaginary is None


def _block_n(ndim: int) -> int:
    return max(1, 1 << (ndim - 1).bit_length())


def _block_flags(block_reset: Tensor | None, block_size: int) -> tuple[Tensor, int] | None:
    """block_reset (B, blocks) bool as the kernels read it: its bytes as uint8 (a view, no launch), with the block
    size. The kernels find each step's restart from it, and phase 1 each chunk's, where per-step flags and a
    per-chunk reduction took five launches a call."""
    if block_reset is None:
        return None
    if block_size <= 0:
        raise ValueError(f"cema_scan: block_size must be positive with block_reset, got {block_size}")
    return block_reset.contiguous().view(torch.uint8), block_size


def _check(u: Tensor, alpha: Tensor, chunk: int) -> None:
    if chunk % 16 or chunk <= 0:
        raise ValueError(f"cema_scan: chunk must be a positive multiple of 16, got {chunk}")
    if u.dim() != 3 or u.shape[2] != alpha.shape[0]:
        raise ValueError(f"cema_scan: u must be (B, L, D) with D = {alpha.shape[0]}, got {tuple(u.shape)}")
    if alpha.dtype != torch.float32:
        raise ValueError(f"cema_scan: the parameters must be fp32 (the kernels compute in fp32), got {alpha.dtype}")


def _tables(alpha: Tensor, delta: Tensor, theta: Tensor, gamma: Tensor, omega: Tensor) -> tuple[Tensor, Tensor]:
    """Every (N, D) table the runs read, as rows of one (TABLE_ROWS, N, D) buffer derived from the parameters,
    and kappa (D,), in one launch
    (cema_tables.tables_kernel). The forward is the generic recurrence with outputs from the state before
    each step: y_t = Re(sum_n g h_t) + omega u_t = Re(sum_n g q h_{t-1}) + (omega + sum_n p Re g) u_t."""
    kernels = _table_kernels()
    dim, ndim = alpha.shape
    tables = alpha.new_empty(kernels.TABLE_ROWS, ndim, dim)
    kappa = alpha.new_empty(dim)
    kernels.tables_kernel[(-(-dim // BLOCK_D),)](*_contiguous(alpha, delta, theta, gamma, omega), tables, kappa, dim,
                                                 ndim, BLOCK_D=BLOCK_D, BLOCK_N=_block_n(ndim),
                                                 num_warps=WARPS_TABLES, **LAUNCH)
    return tables, kappa


def _contiguous(*tensors: Tensor) -> list[Tensor]:
    return [t.contiguous() for t in tensors]


@opaque_op("megalodon::cema_scan", mutates_args=())
@on_input_device
def cema_scan(u: Tensor, alpha: Tensor, delta: Tensor, theta: Tensor, gamma: Tensor, omega: Tensor,
              h0: Tensor | None = None, block_reset: Tensor | None = None, block_size: int = 0,
              chunk: int = CHUNK) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The CEMA of ops/cema.py on the chunked Triton scan, from its parameters: the kernels derive the
    coefficients (cema_coefficients) themselves, forward and backward. u (B, L, D) fp32/bf16/fp16; alpha, delta
    (D, N), theta (D,), gamma (D, N, 2) and omega (D,), fp32; h0 (B, D, N, 2) fp32 or None; block_reset
    (B, ceil(L / block_size)) bool or None, True where the state restarts at zero before that block's first step
    (ops/cema.py's block resets); chunk a multiple of 16. Returns y (B, L, D) fp32,
    the final state (B, D, N, 2) fp32, and, which backward reuses (not differentiable), the state entering each
    chunk (B, L / chunk, 2, N, D) fp32 and the coefficient tables (TABLE_ROWS, N, D) and kappa (D,) fp32."""
    _check(u, alpha, chunk)
    t = _table_kernels()
    tables, kappa = _tables(alpha, delta, theta, gamma, omega)
    h0 = None if h0 is None else h0.contiguous()
    resets = _block_flags(block_reset, block_size)
    incoming, final, y = _run(u, (tables[t.P], None), (tables[t.LOG_MAG], tables[t.ANGLE]), h0, resets, chunk,
                              False, ((tables[t.QG_RE], tables[t.QG_IM]), kappa, torch.float32))
    return y, final, incoming, tables, kappa


@cema_scan.register_fake
def _(u, alpha, delta, theta, gamma, omega, h0=None, block_reset=None, block_size=0, chunk=CHUNK):
    batch, length, dim = u.shape
    ndim = alpha.shape[1]
    return (u.new_empty(batch, length, dim, dtype=torch.float32),
            u.new_empty(batch, dim, ndim, 2, dtype=torch.float32),
            u.new_empty(batch, -(-length // chunk), 2, ndim, dim, dtype=torch.float32),
            u.new_empty(_table_kernels().TABLE_ROWS, ndim, dim, dtype=torch.float32),
            u.new_empty(dim, dtype=torch.float32))


@opaque_op("megalodon::cema_scan_backward", mutates_args=())
@on_input_device
def cema_scan_backward(dy: Tensor, dh: Tensor | None, u: Tensor, alpha: Tensor, delta: Tensor, theta: Tensor,
                       gamma: Tensor, omega: Tensor, h0: Tensor | None, block_reset: Tensor | None,
                       block_size: int, chunk: int, incoming: Tensor | None = None, tables: Tensor | None = None,
                       kappa: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of `cema_scan` for (u, alpha, delta, theta, gamma, omega, h0) from dy (B, L, D) and the final
    state's gradient dh (B, D, N, 2) or None. The gradient for h0 is zeros when h0 is None. incoming: the forward's
    states entering each chunk, or None to run them again; tables and kappa: the forward's, or None to derive them
    again."""
    t = _table_kernels()
    if tables is None or kappa is None:
        tables, kappa = _tables(alpha, delta, theta, gamma, omega)
    dy = dy.contiguous()
    dh = None if dh is None else dh.contiguous()
    h0 = None if h0 is None else h0.contiguous()
    resets = _block_flags(block_reset, block_size)
    # Adjoint: s = dL/dh_t from the future; s <- conj(q) (conj(g) dy_t + s), and dL/du_t = Re(sum_n p s) + kappa dy_t
    # with s taken before the step, so the same kernels run it in reverse time with c_in = conj(q g). It leaves
    # with dL/dh0. Fused or as matrix products, its outputs come from the pass that sums the parameters' gradients.
    batch, length, dim = u.shape
    matrix = MATRIX_BACKWARD and _matrix_ready(length, chunk, block_size if block_reset is not None else None)
    fused = FUSED_BACKWARD or matrix
    future, d_h0, du = _run(dy, (tables[t.QG_RE], tables[t.NEG_QG_IM]), (tables[t.LOG_MAG], tables[t.NEG_ANGLE]),
                            dh, resets, chunk, True, None if fused else ((tables[t.P], None), kappa, u.dtype))
    if incoming is None:
        incoming, _, _ = _run(u, (tables[t.P], None), (tables[t.LOG_MAG], tables[t.ANGLE]), h0, resets, chunk,
                              False, None)

    ndim = alpha.shape[1]
    num_chunks = incoming.shape[1]
    flags, block_size = (u, 1) if resets is None else resets
    coefficients = (flags, tables[t.P], tables[t.LOG_MAG], tables[t.ANGLE], tables[t.G_RE], tables[t.G_IM])
    # the per-chunk (or, as matrix products, per-program) sums that gradients_kernel adds up
    rows = -(-batch * num_chunks // (MATRIX_ROWS * MATRIX_ROW_TILES)) if matrix else batch * num_chunks
    partial = u.new_empty(rows, 5, ndim, dim, dtype=torch.float32)
    partial_omega = u.new_empty(rows, dim, dtype=torch.float32)
    if fused:
        du = torch.empty(u.shape, dtype=u.dtype, device=u.device)
    if matrix:
        from megalodon.ops.triton import cema_matrix

        cema_matrix.matrix_grads_kernel[(rows, -(-dim // MATRIX_GRADS_BLOCK_D))](
            u, *u.stride(), dy, *coefficients, kappa, incoming, future, du, partial, partial_omega, length, dim,
            ndim, num_chunks, batch * num_chunks, flags.shape[-1], CHUNK=chunk, BLOCK_D=MATRIX_GRADS_BLOCK_D,
            BLOCK_N=max(16, _block_n(ndim)), BLOCK_ROWS=MATRIX_ROWS, HAS_RESET=resets is not None,
            BLOCK_SIZE=block_size, PRECISION=_matrix_precision(), SUB=cema_matrix.SUB, ROW_TILES=MATRIX_ROW_TILES,
            num_warps=WARPS_MATRIX_GRADS, **LAUNCH)
    else:
        sweep = dict(CHUNK=chunk, BLOCK_D=BLOCK_D, BLOCK_N=_block_n(ndim), UNROLL=UNROLL,
                     HAS_RESET=resets is not None, FULL=length % chunk == 0, BLOCK_SIZE=block_size,
                     num_warps=WARPS_GRADS, **LAUNCH)
        grad_kernels = _backward_kernels()
        if fused:
            sweep.update(BLOCK_D=FUSED_BLOCK_D, num_warps=WARPS_FUSED)
            grad_kernels.adjoint_grads_kernel[(num_chunks, -(-dim // FUSED_BLOCK_D), batch)](
                u, *u.stride(), dy, *coefficients, omega.contiguous(), incoming, future, du, partial, partial_omega,
                length, dim, ndim, num_chunks, flags.shape[-1], TILE=max(sweep["BLOCK_N"], UNROLL), **sweep)
        else:
            grad_kernels.parameter_grads_kernel[(num_chunks, -(-dim // BLOCK_D), batch)](
                u, *u.stride(), dy, *coefficients, incoming, future, partial, partial_omega, length, dim, ndim,
                num_chunks, flags.shape[-1], **sweep)
    grads = [alpha.new_empty(dim, ndim), alpha.new_empty(dim, ndim), alpha.new_empty(dim),
             alpha.new_empty(dim, ndim, 2), alpha.new_empty(dim)]  # alpha, delta, theta, gamma, omega
    t.gradients_kernel[(-(-dim // GRADIENTS_BLOCK_D),)](
        partial, partial_omega, *_contiguous(alpha, delta, theta, gamma), *grads, rows, dim, ndim,
        BLOCK_D=GRADIENTS_BLOCK_D, BLOCK_N=_block_n(ndim), ROWS=GRADIENTS_ROWS, num_warps=WARPS_TABLES, **LAUNCH)
    return (du, *grads, d_h0)


@cema_scan_backward.register_fake
def _(dy, dh, u, alpha, delta, theta, gamma, omega, h0, block_reset, block_size, chunk, incoming=None, tables=None,
      kappa=None):
    batch, _, dim = u.shape
    return (torch.empty_like(u), torch.empty_like(alpha), torch.empty_like(delta), torch.empty_like(theta),
            torch.empty_like(gamma), torch.empty_like(omega),
            u.new_empty(batch, dim, alpha.shape[1], 2, dtype=torch.float32))


def _setup_context(ctx, inputs, output) -> None:
    u, alpha, delta, theta, gamma, omega, h0, block_reset, block_size, chunk = inputs
    # the chunks' incoming states (D N / 8 bytes a token at chunk 64: 2 KB at mega200M, about 2% of a layer's
    # activations) spare backward two launches that would compute them again, and the tables (9 N D floats, 0.6 MB
    # a layer at mega200M) the launch that would derive them again
    ctx.mark_non_differentiable(*output[2:])
    ctx.save_for_backward(u, alpha, delta, theta, gamma, omega, h0, block_reset, *output[2:])
    ctx.set_materialize_grads(False)  # an unused final state's gradient stays None: the kernels skip it
    ctx.chunk, ctx.block_size = chunk, block_size
    ctx.has_h0 = h0 is not None


def _backward(ctx, dy: Tensor | None, dh: Tensor | None, *_: Tensor | None):
    u, alpha, delta, theta, gamma, omega, h0, block_reset, incoming, tables, kappa = ctx.saved_tensors
    if dy is None:
        dy = u.new_zeros(u.shape, dtype=torch.float32)
    grads = cema_scan_backward(dy, dh, u, alpha, delta, theta, gamma, omega, h0, block_reset, ctx.block_size,
                               ctx.chunk, incoming, tables, kappa)
    return *grads[:6], grads[6] if ctx.has_h0 else None, None, None, None


cema_scan.register_autograd(_backward, setup_context=_setup_context)
