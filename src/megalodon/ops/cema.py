"""Complex exponential moving average (spec section 4): pure functions, no module state.

Per channel d and EMA component n:

    h_t = p * u_t + q * h_{t-1}            (complex, h_{-1} = h0)
    y_t = Re(sum_n g * h_t) + omega * u_t

`cema_sequential` is that recurrence written out (the reference every path is tested against).
`cema_blocked` is the fast path: an FFT convolution per block, the closed-form state at each block end, a scan
over blocks (L / block steps, never L), and the bias that each block's incoming state adds to its outputs.
The same scan restarts the state at document boundaries, which is what packed training needs.
`cema_step` is the single-token decode update.

Everything here runs in fp32 (complex64) or float64 (complex128), never in bf16: the caller casts.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor


class CemaCoefficients(NamedTuple):
    """Per-(channel, component) coefficients, each (D, N) and real: complex numbers are kept as parts so that
    the hot paths run as real matmuls and elementwise ops (complex kernels are slow on CPU)."""

    p: Tensor  # input weight, sigmoid(alpha)
    log_mag: Tensor  # log|q|
    phi: Tensor  # arg q
    g_re: Tensor  # output weight gamma / sqrt(N), real part
    g_im: Tensor  # imaginary part
    q: Tensor  # the decay as one complex tensor, for the step and the scan
    g: Tensor  # the output weight as one complex tensor
    tables: dict | None = None  # memo of PowerTables by (block, tail), for coefficients reused at inference


def cema_coefficients(alpha: Tensor, delta: Tensor, theta: Tensor, gamma: Tensor) -> CemaCoefficients:
    """Derive p, q and g from the parameters: alpha, delta (D,N,1), theta (D,1,1), gamma (D,N,2)."""
    ndim = alpha.shape[1]
    p = torch.sigmoid(alpha).squeeze(-1)
    log_mag = torch.log(1.0 - p * torch.sigmoid(delta).squeeze(-1))
    harmonics = torch.arange(1, ndim + 1, dtype=alpha.dtype, device=alpha.device)
    phi = harmonics * torch.sigmoid(theta).squeeze(-1) * (2.0 * math.pi / ndim)  # D x N
    g_re, g_im = gamma[..., 0] / math.sqrt(ndim), gamma[..., 1] / math.sqrt(ndim)
    return CemaCoefficients(p, log_mag, phi, g_re, g_im, torch.polar(torch.exp(log_mag), phi),
                            torch.complex(g_re, g_im))


def q_powers(log_mag: Tensor, phi: Tensor, start: int, stop: int) -> tuple[Tensor, Tensor]:
    """Real and imaginary parts of q**j for j in [start, stop): two (D, N, stop - start).

    Computed as exp(j log|q|) and the angle j * phi, never by repeated products: |q|**j underflows to 0
    harmlessly for large j instead of accumulating error.
    """
    exponents = torch.arange(start, stop, dtype=phi.dtype, device=phi.device)
    magnitude = torch.exp(log_mag.unsqueeze(-1) * exponents)
    angle = phi.unsqueeze(-1) * exponents
    return magnitude * torch.cos(angle), magnitude * torch.sin(angle)


class PowerTables(NamedTuple):
    """Everything a blocked call needs from the powers q**j, j <= block, as real tensors."""

    kernel: Tensor  # D x block: the convolution kernel
    reversed: Tensor  # D x 2N x block: [Re, Im] of q**(block-1-j), for the closed-form block states
    reversed_tail: Tensor  # D x 2N x tail: the same for a shorter last block
    bias: Tensor  # D x 2N x block: [Re, Im] of q**(t+1), for the incoming-state bias


def _tables(p: Tensor, log_mag: Tensor, phi: Tensor, g_re: Tensor, g_im: Tensor, block: int,
            tail: int) -> PowerTables:
    q_re, q_im = q_powers(log_mag, phi, 0, block + 1)  # q**0 .. q**block
    kernel = ((p * g_re).unsqueeze(-1) * q_re[..., :block] - (p * g_im).unsqueeze(-1) * q_im[..., :block]).sum(1)

    def reversed_parts(length: int) -> Tensor:
        return torch.cat([q_re[..., :length].flip(-1), q_im[..., :length].flip(-1)], dim=1)

    bias = torch.cat([q_re[..., 1:], q_im[..., 1:]], dim=1)
    return PowerTables(kernel, reversed_parts(block), reversed_parts(tail), bias)


def power_tables(coeffs: CemaCoefficients, block: int, tail: int) -> PowerTables:
    """The tables for blocks of `block` steps and a last block of `tail` steps.

    In training the (D, N, block) intermediates would each be kept for backward; recomputing them there instead
    (activation checkpointing of this small elementwise work) roughly halves the CEMA's activation memory.
    At inference the tables are memoized on the coefficients."""
    args = (coeffs.p, coeffs.log_mag, coeffs.phi, coeffs.g_re, coeffs.g_im, block, tail)
    if coeffs.tables is not None:
        if (block, tail) not in coeffs.tables:
            coeffs.tables[block, tail] = _tables(*args)
        return coeffs.tables[block, tail]
    if torch.is_grad_enabled() and coeffs.p.requires_grad:
        from torch.utils.checkpoint import checkpoint

        return PowerTables(*checkpoint(_tables, *args, use_reentrant=False))
    return _tables(*args)


def causal_fft_conv(u: Tensor, kernel: Tensor) -> Tensor:
    """y[..., t] = sum_{j<=t} kernel[..., j] * u[..., t-j] along the last dim, via rfft at size >= 2L."""
    length = u.shape[-1]
    n_fft = 2 * (1 << (length - 1).bit_length())  # the reference's size: twice the next power of two
    spectrum = torch.fft.rfft(u, n=n_fft) * torch.fft.rfft(kernel, n=n_fft)
    return torch.fft.irfft(spectrum, n=n_fft)[..., :length]


def _closed_form_states(blocks: Tensor, coeffs: CemaCoefficients, reversed_powers: Tensor) -> Tensor:
    """p * sum_j q**(len-1-j) u_j for every block entered at zero: blocks (B, D, nb, len) -> (B, D, nb, N)
    complex. reversed_powers: (D, 2N, len). One real batched matmul with the channel as batch."""
    batch, dim, num_blocks, length = blocks.shape
    u = blocks.permute(1, 0, 2, 3).reshape(dim, batch * num_blocks, length)
    parts = torch.bmm(u, reversed_powers.transpose(1, 2)).view(dim, batch, num_blocks, -1).permute(1, 0, 2, 3)
    re, im = parts.chunk(2, dim=-1)
    return torch.complex(re, im) * coeffs.p.unsqueeze(1)


def _state_bias(h_in: Tensor, coeffs: CemaCoefficients, powers: Tensor) -> Tensor:
    """What each block's incoming state adds to its outputs: Re(sum_n g q**(t+1) h_in) for t < len.

    h_in: (B, D, nb, N) complex; powers: (D, 2N, len), [Re, Im] of q**1 .. q**len. Returns (B, D, nb, len)."""
    batch, dim, num_blocks, _ = h_in.shape
    g = coeffs.g.unsqueeze(1)
    gh = h_in * g
    lhs = torch.cat([gh.real, -gh.imag], dim=-1).permute(1, 0, 2, 3).reshape(dim, batch * num_blocks, -1)
    return torch.bmm(lhs, powers).view(dim, batch, num_blocks, -1).permute(1, 0, 2, 3)


def cema_blocked(
    u: Tensor,
    coeffs: CemaCoefficients,
    omega: Tensor,
    h0: Tensor | None = None,
    block_size: int | None = None,
    block_reset: Tensor | None = None,
    need_state: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """The vectorized CEMA over a block of steps.

    u: (B, D, L) real. omega: (D,). h0: (B, D, N) complex or None (zero).
    block_size: cut time into blocks of this many steps (default: one block). Costs O(L log block).
    block_reset: (B, num_blocks) bool; True restarts the state at zero at that block's first step.
    Returns y (B, D, L) and the final state h_L (B, D, N), or None when need_state is False.
    """
    batch, dim, length = u.shape
    block = length if block_size is None else min(block_size, length)
    num_blocks = -(-length // block)
    tail = length - (num_blocks - 1) * block  # steps in the last block

    blocks = torch.nn.functional.pad(u, (0, num_blocks * block - length)).view(batch, dim, num_blocks, block)
    tables = power_tables(coeffs, block, tail)
    y = causal_fft_conv(blocks, tables.kernel.unsqueeze(1))

    h_last = None
    if num_blocks > 1 or h0 is not None or need_state:
        h_local = _closed_form_states(blocks, coeffs, tables.reversed)  # B x D x nb x N
        if tail != block:  # the last block is shorter: its closed form uses its own length
            h_tail = _closed_form_states(blocks[..., -1:, :tail], coeffs, tables.reversed_tail)
            h_local = torch.cat([h_local[:, :, :-1], h_tail], dim=2)
        q_block = torch.polar(torch.exp(coeffs.log_mag * block), coeffs.phi * block)
        q_tail = torch.polar(torch.exp(coeffs.log_mag * tail), coeffs.phi * tail)

        h = torch.zeros_like(h_local[:, :, 0]) if h0 is None else h0.to(h_local.dtype)
        incoming = []
        for c in range(num_blocks):  # a scan over blocks, not over time
            if block_reset is not None:
                h = torch.where(block_reset[:, c, None, None], torch.zeros_like(h), h)
            incoming.append(h)
            h = (q_tail if c == num_blocks - 1 else q_block) * h + h_local[:, :, c]
        y = y + _state_bias(torch.stack(incoming, dim=2), coeffs, tables.bias)
        h_last = h if need_state else None

    y = y.reshape(batch, dim, num_blocks * block)[..., :length]
    return y + omega.unsqueeze(-1) * u, h_last


def cema_step(u: Tensor, coeffs: CemaCoefficients, omega: Tensor, h0: Tensor | None) -> tuple[Tensor, Tensor]:
    """One decode step: u (B, D) real, h0 (B, D, N) complex or None. Returns y (B, D) and the new state."""
    h = coeffs.p * u.unsqueeze(-1)
    if h0 is not None:
        h = h + coeffs.q * h0
    y = (coeffs.g * h).real.sum(-1) + omega * u
    return y, h


def cema_sequential(
    u: Tensor, coeffs: CemaCoefficients, omega: Tensor, h0: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The recurrence, one step at a time: the slow reference for tests. u (B, D, L)."""
    q = coeffs.q
    h = torch.zeros(u.shape[0], *q.shape, dtype=q.dtype, device=u.device) if h0 is None else h0
    outputs = []
    for t in range(u.shape[-1]):
        h = coeffs.p * u[..., t, None] + q * h
        outputs.append((coeffs.g * h).real.sum(-1) + omega * u[..., t])
    return torch.stack(outputs, dim=-1), h
