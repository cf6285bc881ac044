"""Fused Triton kernels for the blocked TimestepNorm (ops/timestep_norm.py): training and prefill on CUDA.

Shapes: x (B, L, D) fp32/bf16/fp16 with D = G * DG; the per-token statistics are (B, L, G) fp32; the running
state (count (B,) int64, mean/var (B, G) float64) enters and leaves in float64. No pad_mask (the PyTorch path has it).

Forward, five launches (the kernels are in ops/triton/timestep_norm_kernels.py, the carries in
timestep_norm_carry.py):
1. `moments_kernel`, grid (B*L / BLOCK_T, G): per-token group mean mu and population variance s2 of a
   (BLOCK_T tokens x DG features) tile, two-pass in registers.
2-4. A scan over time of the small (B, L, 2G) tensor, in tiles of BLOCK_T tokens x BLOCK_G groups, the tiles of a
   block (the chunk grid) grouped into segments (SCAN_SEGMENTS a row, never across a block) that run in parallel:
   2. `scan_fwd_kernel` (TOTALS), grid (B, G / BLOCK_G, segments): each segment's mean and var (its count
      follows from where it lies);
   3. `carry_fwd_kernel`, grid (B, G / BLOCK_G): the mean and var entering every segment and the count entering
      every block, by Chan merges in float64 from segment to segment (so that rounding does not grow with
      position; counts exact int64), restarting at the prior at a block's start where block_reset says so; and
      the final state;
   4. `scan_fwd_kernel`, grid as 2: per tile, prefix sums of mu - c and s2 + (mu - c)^2 shifted by the tile's
      first token mean c (Welford within the tile in closed form), then a Chan merge of the carry into every
      token, giving its cumulative mean and rstd = (var + eps)^-1/2; the carry absorbs each tile's totals.
5. `normalize_kernel`, same grid as 1: y = (x - mean_t) * rstd_t * (weight + 1) + bias, in fp32, and where asked
   (copy_dtype: the linears' dtype under autocast) y again in that dtype, which a cast would otherwise make with
   a launch of its own and a second read of y.
Saved for backward: x (the input), mean_t and rstd_t (B, L, G) fp32, and the count entering each block (B, nb).

Backward. Since the last reset, from the state (n0, m0, v0) it restarted at, token t's statistics are
    n_t = n0 + k_t,  m_t = (n0 m0 + sum_{i<=t} mu_i) / n_t,
    v_t = (n0 (v0 + m0^2) + sum_{i<=t} (s2_i + mu_i^2)) / n_t - m_t^2
so, with A_i = sum_{t>=i} dm_t / n_t, C_i = sum_{t>=i} dv_t / n_t and E_i(c) = sum_{t>=i} dv_t (m_t - c) / n_t
(suffix sums up to the next reset; E for any shift c, E(c') = E(c) + (c - c') C):
    d mu_i = A_i + 2 (mu_i - c) C_i - 2 E_i(c),   d s2_i = C_i,   d m0 = n0 (A + 2 (m0 - c) C - 2 E(c)),   d v0 = n0 C
and through mu_i = mean_j x_ij, s2_i = mean_j (x_ij - mu_i)^2 the token mean cancels:
    dx_ij = g_ij rstd_i + (P_i + 2 C_i (x_ij - m_i)) / DG,   g = dy * (weight + 1),   P_i = A_i - 2 E_i(m_i).
Five launches:
6. `norm_bwd_kernel`, grid as 1 (here and in 10, dy is y's gradient plus its copy's, added on load):
   dm_t = -rstd sum_j g, dv_t = -rstd^2 / 2 * sum_j g xhat, and per-tile partial sums of dy * xhat and dy for
   the weight and bias gradients. The final state's gradients join the last token's.
7-9. The reverse scan for P and C over the forward's segments: `scan_bwd_kernel` (TOTALS) sums A, C and E over
   each segment; `carry_bwd_kernel` carries them from segment to segment backwards (E rebased between shifts),
   handing what reaches a reset to the prior's gradient (and clearing it) and what reaches the start to the
   incoming state's gradient; `scan_bwd_kernel` then gives every token its P and C from the sums after its tile.
10. `dx_kernel`, grid as 1: dx.

Both directions are OpaqueOps (ops/triton/__init__.py): custom ops (`megalodon::timestep_norm_fwd` / `_bwd`)
with fake implementations and autograd registered, so a compiled graph holds each as one node, called directly in
eager mode.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from megalodon.ops.timestep_norm import NormStats
from megalodon.ops.timestep_norm_stats import block_size_of, per_row
from megalodon.ops.triton import LAUNCH, cdiv, next_power_of_2, on_input_device, opaque_op
from megalodon.ops.triton import timestep_norm_carry as carry
from megalodon.ops.triton import timestep_norm_kernels as kernels


def _token_tiles(groups: int, dim: int) -> tuple[int, int]:
    """BLOCK_T x BLOCK_DG tiles of about 2K elements for the per-token kernels (sm_90, 4 warps: 90-160 registers
    a thread, no spills; 4K-element tiles took up to 250)."""
    block_dg = next_power_of_2(dim // groups)
    return max(1, min(64, 2048 // block_dg)), block_dg


# The scans' tiles: at most SCAN_TOKENS tokens (never past a block) by SCAN_GROUPS groups, SCAN_WARPS warps a
# program, and a row's tiles cut into about SCAN_SEGMENTS segments of whole tiles (never across a block) that run
# in parallel: one pass sums each segment, a short sequential pass carries the state from segment to segment, and
# a last pass runs each segment's tiles in order from the carry that enters it. A row's sequential chain is then
# its segments, not its tiles (16 tiles at 4K and 256 tokens a tile, 128 at 32K: the scans took 52-55 us a layer
# at 4K on the H100 with one program walking every tile). No tiling the GPU sweep tries (256 x 8 x 4 warps,
# 1024 x 2 x 4, 2048 x 2 x 8, 64 x 8 x 4) spills on sm_90 (up to 244 registers a thread, in the backward's last
# pass); benchmarks/bench_timestep_norm.py --scan-tiles times them on a GPU.
SCAN_TOKENS, SCAN_GROUPS, SCAN_WARPS, SCAN_SEGMENTS = 256, 8, 4, 32
# The carry kernels load CARRY_SEGMENTS segments' sums at once, before that many segments' stores: one memory
# latency each, where a load after every segment's stores (which may alias it) cost one a segment.
CARRY_SEGMENTS = 8


class _ScanLayout(NamedTuple):
    """The scans' tiling of rows of `blocks` blocks: tiles of BLOCK_T `tokens` x BLOCK_G `groups`, `tiles` a
    block, in segments of seg_tiles tiles, segs_per_block a block."""

    tokens: int
    groups: int
    blocks: int
    tiles: int
    seg_tiles: int
    segs_per_block: int

    @property
    def segments(self) -> int:  # a row's
        return self.blocks * self.segs_per_block


def _scan_layout(groups: int, block: int, num_blocks: int) -> _ScanLayout:
    """The scans' tiling and segments for rows of num_blocks blocks (the module's SCAN_* read at each call)."""
    tokens = min(next_power_of_2(block), SCAN_TOKENS)
    tiles = cdiv(block, tokens)
    seg_tiles = max(1, -(-num_blocks * tiles // SCAN_SEGMENTS))
    return _ScanLayout(tokens, min(next_power_of_2(groups), SCAN_GROUPS), num_blocks, tiles, seg_tiles,
                       -(-tiles // seg_tiles))


# ---- the custom ops -------------------------------------------------------------------------------------------

@opaque_op("megalodon::timestep_norm_fwd", mutates_args=())
@on_input_device
def timestep_norm_fwd(
    x: Tensor, count: Tensor, mean: Tensor, var: Tensor, prior_count: Tensor, prior_mean: Tensor,
    prior_var: Tensor, block_reset: Tensor | None, weight: Tensor, bias: Tensor, eps: float, block_size: int,
    copy_dtype: torch.dtype | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """y (B, L, D) fp32, y in copy_dtype (an empty tensor where None), mean_t and rstd_t (B, L, G) fp32, the count
    entering each block (B, nb), and the final count (B,) int64, mean and var (B, G) float64. All inputs
    contiguous; the state and prior given per row."""
    batch, length, dim = x.shape
    groups = mean.shape[-1]
    num_blocks = -(-length // block_size)
    mu, s2, mean_t, rstd_t = (x.new_empty(batch, length, groups, dtype=torch.float32) for _ in range(4))
    y = torch.empty(batch, length, dim, dtype=torch.float32, device=x.device)
    copy = torch.empty(0 if copy_dtype is None else y.shape, dtype=copy_dtype or y.dtype, device=x.device)
    block_count = torch.empty(batch, num_blocks, dtype=torch.int64, device=x.device)
    final_count = torch.empty_like(count)
    final_mean, final_var = torch.empty_like(mean), torch.empty_like(var)

    tokens = batch * length
    block_t, block_dg = _token_tiles(groups, dim)
    token_grid = (cdiv(tokens, block_t), groups)
    kernels.moments_kernel[token_grid](x, mu, s2, tokens, dim, groups, dim // groups, BLOCK_T=block_t,
                                       BLOCK_DG=block_dg, **LAUNCH)
    scan = _scan_layout(groups, block_size, num_blocks)
    seg_mean, seg_var, in_mean, in_var = (mean.new_empty(batch, scan.segments, groups) for _ in range(4))
    scan_grid = (batch, cdiv(groups, scan.groups))
    segment_args = (length, groups, block_size, scan.tiles, scan.segs_per_block, scan.seg_tiles, scan.segments, eps)
    for totals in (True, False):  # each segment's totals; the carry into each (between the two); each token's
        kernels.scan_fwd_kernel[(*scan_grid, scan.segments)](
            mu, s2, mean_t, rstd_t, seg_mean, seg_var, block_count, in_mean, in_var, *segment_args,
            TOTALS=totals, BLOCK_T=scan.tokens, BLOCK_G=scan.groups, num_warps=SCAN_WARPS, **LAUNCH)
        if totals:
            # the flags' own bytes (a view, not a launch); any pointer when there are none
            reset = count if block_reset is None else block_reset.view(torch.int8)
            carry.carry_fwd_kernel[scan_grid](
                seg_mean, seg_var, count, mean, var, prior_count, prior_mean, prior_var, reset, in_mean, in_var,
                block_count, final_count, final_mean, final_var, length, groups, block_size, num_blocks,
                scan.segs_per_block, scan.seg_tiles, HAS_RESET=block_reset is not None, BLOCK_T=scan.tokens,
                BLOCK_G=scan.groups, SEGS=CARRY_SEGMENTS, num_warps=1, **LAUNCH)  # one warp: a chain of small steps
    kernels.normalize_kernel[token_grid](x, mean_t, rstd_t, weight, bias, y, y if copy_dtype is None else copy,
                                         tokens, dim, groups, dim // groups, BLOCK_T=block_t, BLOCK_DG=block_dg,
                                         COPY=copy_dtype is not None, **LAUNCH)
    return y, copy, mean_t, rstd_t, block_count, final_count, final_mean, final_var


@timestep_norm_fwd.register_fake
def _(x, count, mean, var, prior_count, prior_mean, prior_var, block_reset, weight, bias, eps, block_size,
      copy_dtype):
    batch, length, dim = x.shape
    groups = mean.shape[-1]
    stats = x.new_empty(batch, length, groups, dtype=torch.float32)
    copy = x.new_empty((0,) if copy_dtype is None else (batch, length, dim), dtype=copy_dtype or torch.float32)
    return (x.new_empty(batch, length, dim, dtype=torch.float32), copy, stats, torch.empty_like(stats),
            x.new_empty(batch, -(-length // block_size), dtype=torch.int64), torch.empty_like(count),
            torch.empty_like(mean), torch.empty_like(var))


@opaque_op("megalodon::timestep_norm_bwd", mutates_args=())
@on_input_device
def timestep_norm_bwd(
    dy: Tensor, d_copy: Tensor | None, d_final_mean: Tensor | None, d_final_var: Tensor | None, x: Tensor,
    mean_t: Tensor, rstd_t: Tensor, block_count: Tensor, count: Tensor, mean: Tensor, prior_count: Tensor,
    prior_mean: Tensor, block_reset: Tensor | None, weight: Tensor, block_size: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of x, the incoming mean and var, the prior mean and var, and of weight and bias stacked (2, D): one
    sum over the token tiles' partials, which backward splits outside the op. d_copy: the gradient of
    y's low-precision copy, or None. d_final_mean and d_final_var: the final state's gradients, both or neither
    (None where the loss does not use the state)."""
    batch, length, dim = x.shape
    groups = mean.shape[-1]
    num_blocks = block_count.shape[1]
    tokens = batch * length
    block_t, block_dg = _token_tiles(groups, dim)
    token_grid = (cdiv(tokens, block_t), groups)
    dm, dv, p, c = (x.new_empty(batch, length, groups, dtype=torch.float32) for _ in range(4))
    partial = x.new_empty(2, token_grid[0], dim, dtype=torch.float32)  # the weight's and the bias's
    has_copy = d_copy is not None
    d_copy = d_copy if has_copy else dy  # any pointer when there is none
    kernels.norm_bwd_kernel[token_grid](x, dy, d_copy, mean_t, rstd_t, weight, dm, dv, partial[0], partial[1],
                                        tokens, dim, groups, dim // groups, BLOCK_T=block_t, BLOCK_DG=block_dg,
                                        HAS_COPY=has_copy, **LAUNCH)
    d_state = [torch.empty_like(mean) for _ in range(4)]  # incoming mean and var, prior mean and var
    scan = _scan_layout(groups, block_size, num_blocks)
    # per segment: its own sums A, C, E and E's shift; then the sums after it, in the same layout
    totals, after = ([x.new_empty(batch, scan.segments, groups, dtype=torch.float32) for _ in range(4)]
                     for _ in range(2))
    has_final = d_final_mean is not None
    scan_grid = (batch, cdiv(groups, scan.groups))
    for sums in (totals, after):  # each segment's sums; the carry between segments (after the first); each token's
        kernels.scan_bwd_kernel[(*scan_grid, scan.segments)](
            dm, dv, mean_t, block_count,
            d_final_mean if has_final else mean, d_final_var if has_final else mean,  # any pointer when unused
            p, c, *sums, length, groups, block_size, num_blocks, scan.tiles, scan.segs_per_block, scan.seg_tiles,
            scan.segments, TOTALS=sums is totals, HAS_FINAL=has_final, BLOCK_T=scan.tokens, BLOCK_G=scan.groups,
            num_warps=SCAN_WARPS, **LAUNCH)
        if sums is totals:
            reset = count if block_reset is None else block_reset.view(torch.int8)
            carry.carry_bwd_kernel[scan_grid](
                *totals, *after, reset, count, mean, prior_count, prior_mean, *d_state, length, groups,
                block_size, num_blocks, scan.segs_per_block, scan.seg_tiles, HAS_RESET=block_reset is not None,
                BLOCK_T=scan.tokens, BLOCK_G=scan.groups, SEGS=CARRY_SEGMENTS, num_warps=1, **LAUNCH)
    dx = torch.empty_like(x)
    kernels.dx_kernel[token_grid](x, dy, d_copy, mean_t, rstd_t, p, c, weight, dx, tokens, dim, groups,
                                  dim // groups, BLOCK_T=block_t, BLOCK_DG=block_dg, HAS_COPY=has_copy, **LAUNCH)
    return dx, *d_state, partial.sum(1).to(weight.dtype)  # one sum for both: backward splits it


@timestep_norm_bwd.register_fake
def _(dy, d_copy, d_final_mean, d_final_var, x, mean_t, rstd_t, block_count, count, mean, prior_count, prior_mean,
      block_reset, weight, block_size):
    state = torch.empty_like(mean)
    return (torch.empty_like(x), state, torch.empty_like(state), torch.empty_like(state), torch.empty_like(state),
            weight.new_empty(2, *weight.shape))


def _setup_context(ctx, inputs, output) -> None:
    x, count, mean, _, prior_count, prior_mean, _, block_reset, weight, _, _, block_size, _ = inputs
    _, _, mean_t, rstd_t, block_count, _, _, _ = output
    ctx.mark_non_differentiable(*output[2:6])
    ctx.set_materialize_grads(False)  # unused outputs' gradients stay None: no zero tensors made only to be read
    ctx.block_size = block_size
    ctx.save_for_backward(x, mean_t, rstd_t, block_count, count, mean, prior_count, prior_mean, block_reset, weight)


def _backward(ctx, dy, d_copy, _mean_t, _rstd_t, _block_count, _final_count, d_final_mean, d_final_var):
    x, mean_t, rstd_t, block_count, count, mean, prior_count, prior_mean, block_reset, weight = ctx.saved_tensors
    if dy is None:  # the loss reads only the copy, or neither
        dy, d_copy = (x.new_zeros(x.shape, dtype=torch.float32) if d_copy is None else d_copy), None
    dy = dy.contiguous()
    d_copy = None if d_copy is None else d_copy.contiguous()
    if (d_final_mean is None) != (d_final_var is None):  # the kernel takes both or neither
        d_final_mean = torch.zeros_like(mean) if d_final_mean is None else d_final_mean
        d_final_var = torch.zeros_like(mean) if d_final_var is None else d_final_var
    if d_final_mean is not None:
        d_final_mean, d_final_var = d_final_mean.contiguous(), d_final_var.contiguous()
    dx, d_mean, d_var, d_prior_mean, d_prior_var, d_affine = timestep_norm_bwd(
        dy, d_copy, d_final_mean, d_final_var, x, mean_t, rstd_t, block_count, count, mean, prior_count, prior_mean,
        block_reset, weight, ctx.block_size)
    return dx, None, d_mean, d_var, None, d_prior_mean, d_prior_var, None, *d_affine, None, None, None


timestep_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


def timestep_norm_triton(
    x: Tensor, initial: NormStats, weight: Tensor, bias: Tensor, eps: float, block_size: int | None = None,
    block_reset: Tensor | None = None, prior: NormStats | None = None, copy_dtype: torch.dtype | None = None,
) -> tuple[Tensor, NormStats] | tuple[Tensor, Tensor, NormStats]:
    """The Triton path of `megalodon.ops.timestep_norm.timestep_norm` (same arguments and returns, no pad_mask)."""
    batch, length, _ = x.shape
    groups = initial.mean.shape[-1]

    initial_rows = [t.contiguous() for t in per_row(initial, batch, groups)]  # as the kernels read them
    prior_rows = initial_rows if prior is None else [t.contiguous() for t in per_row(prior, batch, groups)]
    copied = copy_dtype not in (None, torch.float32)  # y itself is fp32
    y, copy, _, _, _, count, mean, var = timestep_norm_fwd(
        x.contiguous(), *initial_rows, *prior_rows,
        None if block_reset is None else block_reset.contiguous(), weight.contiguous(), bias.contiguous(),
        float(eps), block_size_of(length, block_size), copy_dtype if copied else None)
    stats = NormStats(count, mean, var)
    return (y, stats) if copy_dtype is None else (y, copy if copied else y, stats)
