"""A downcast that rounds as a GPU does, under Triton's interpreter too.

On a GPU `x.to(tl.bfloat16)` rounds to nearest (ties to even), as torch's casts do. Triton's interpreter (the
CPU tests) truncates instead, so a kernel's bf16 output there differs from the PyTorch path's by a bf16 step in
about half its values, and a model-level comparison drifts by that bias over tokens and layers. `cast` rounds
the fp32 bits itself under the interpreter and is the plain cast when compiled.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def cast(x, dtype: tl.constexpr):
    """x in dtype, rounded to nearest even. Only fp32 to bf16 needs the help: the interpreter's fp16 rounds."""
    if INTERPRETED and dtype == tl.bfloat16 and x.dtype == tl.float32:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = tl.where(x == x, bits.to(tl.float32, bitcast=True), x)  # a NaN stays one
    return x.to(dtype)
