"""The CEMA decode step in one Triton kernel (ops/cema.py, `cema_step`), for CUDA.

h_new = p u + q h and y = sum_n Re(g h_new) + omega u, for one token per row, in fp32 real pairs. One program per
(row, block of channels) holds its (BLOCK_D x N) state in registers: it reads h before it writes h_new, and no
other program touches those elements, so `out` may be h itself. On the PyTorch path this step is about a dozen
elementwise kernels per layer; a decode step replayed from a CUDA graph pays for each one. Inference only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from megalodon.ops.triton import LAUNCH, cdiv, next_power_of_2, on_input_device, opaque_op

BLOCK_D = 64


@triton.jit
def _cema_step_kernel(u_ptr, h_ptr, out_ptr, y_ptr, p_ptr, q_re_ptr, q_im_ptr, g_re_ptr, g_im_ptr, omega_ptr, D, N,
                      BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    channels = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    components = tl.arange(0, BLOCK_N)
    dmask = channels < D
    mask = dmask[:, None] & (components < N)[None, :]
    coeff = channels[:, None] * N + components[None, :]  # (D, N) coefficients
    pair = (row * D + channels[:, None]) * N * 2 + components[None, :] * 2  # (B, D, N, 2) state, real part

    u = tl.load(u_ptr + row * D + channels, mask=dmask, other=0.0)
    h_re = tl.load(h_ptr + pair, mask=mask, other=0.0)
    h_im = tl.load(h_ptr + pair + 1, mask=mask, other=0.0)
    q_re = tl.load(q_re_ptr + coeff, mask=mask, other=0.0)
    q_im = tl.load(q_im_ptr + coeff, mask=mask, other=0.0)
    pu = tl.load(p_ptr + coeff, mask=mask, other=0.0) * u[:, None]
    new_re = pu + q_re * h_re - q_im * h_im
    new_im = q_im * h_re + q_re * h_im
    g_re = tl.load(g_re_ptr + coeff, mask=mask, other=0.0)
    g_im = tl.load(g_im_ptr + coeff, mask=mask, other=0.0)
    y = tl.sum(g_re * new_re - g_im * new_im, axis=1) + tl.load(omega_ptr + channels, mask=dmask, other=0.0) * u
    tl.store(y_ptr + row * D + channels, y, mask=dmask)
    tl.store(out_ptr + pair, new_re, mask=mask)
    tl.store(out_ptr + pair + 1, new_im, mask=mask)


@opaque_op("megalodon::cema_step_", mutates_args=("out",))
@on_input_device
def cema_step_kernel(u: Tensor, h: Tensor, out: Tensor, p: Tensor, q_re: Tensor, q_im: Tensor, g_re: Tensor,
                     g_im: Tensor, omega: Tensor) -> Tensor:
    """u (B, D) fp32; h and out (B, D, N, 2) fp32 contiguous (out may be h), out overwritten with the new state;
    p, q_re, q_im, g_re, g_im (D, N) and omega (D,) fp32 contiguous. Returns y (B, D)."""
    batch, dim = u.shape
    ndim = p.shape[-1]
    y = torch.empty_like(u)
    grid = (batch, cdiv(dim, BLOCK_D))
    _cema_step_kernel[grid](u, h, out, y, p, q_re, q_im, g_re, g_im, omega, dim, ndim,
                            BLOCK_D=BLOCK_D, BLOCK_N=next_power_of_2(ndim), **LAUNCH)
    return y


@cema_step_kernel.register_fake
def _(u, h, out, p, q_re, q_im, g_re, g_im, omega):
    return torch.empty_like(u)
