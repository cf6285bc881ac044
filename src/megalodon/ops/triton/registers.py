"""Helpers for values a program holds in registers, shared by the kernels of several ops: one column of a small
tile (a step of the CEMA's, a segment of the TimestepNorm carries'), and a mask and-ed with a scalar flag."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def column(tile, cols, k: tl.constexpr):
    """Column k of a (rows, cols) tile, as (rows,). The select is known at compile time and adding -0.0 is exact:
    where a thread holds whole rows this compiles to reading one register."""
    return tl.sum(tl.where(cols[None, :] == k, tile, -0.0), axis=1)


@triton.jit
def with_column(tile, cols, k: tl.constexpr, values):
    """The tile with column k replaced by values (rows,): register moves, as in column."""
    return tl.where(cols[None, :] == k, values[:, None], tile)


@triton.jit
def both(mask, valid):
    """mask & valid for a scalar valid, as a select: Triton's interpreter turns that & into int32, which a mask
    refuses."""
    return tl.where(valid, mask, False)
