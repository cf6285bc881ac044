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
    """Per-(channel, component) coefficients, each (D, N)."""

    p: Tensor  # real input weight, sigmoid(alpha)
    log_q: Tensor  # complex log of the decay q: log|q| + i * phi
    g: Tensor  # complex output weight, gamma / sqrt(N)


def cema_coefficients(alpha: Tensor, delta: Tensor, theta: Tensor, gamma: Tensor) -> CemaCoefficients:
    """Derive p, q (as log q) and g from the parameters: alpha, delta (D,N,1), theta (D,1,1), gamma (D,N,2)."""
    ndim = alpha.shape[1]
    p = torch.sigmoid(alpha).squeeze(-1)
    magnitude = 1.0 - p * torch.sigmoid(delta).squeeze(-1)
    harmonics = torch.arange(1, ndim + 1, dtype=alpha.dtype, device=alpha.device)
    phi = harmonics * torch.sigmoid(theta).squeeze(-1) * (2.0 * math.pi / ndim)  # D x N
    log_q = torch.complex(torch.log(magnitude), phi)
    g = torch.complex(gamma[..., 0], gamma[..., 1]) / math.sqrt(ndim)
    return CemaCoefficients(p, log_q, g)


def q_powers(log_q: Tensor, start: int, stop: int) -> Tensor:
    """q**j for j in [start, stop) as exp(j * log q): (D, N, stop - start). Never repeated products."""
    exponents = torch.arange(start, stop, dtype=log_q.real.dtype, device=log_q.device)
    return torch.exp(log_q.unsqueeze(-1) * exponents)


def cema_kernel(coeffs: CemaCoefficients, length: int) -> Tensor:
    """Real convolution kernel k[d, j] = Re(sum_n p g q**j), j < length: (D, length)."""
    weights = (coeffs.p * coeffs.g).unsqueeze(-1)
    return (weights * q_powers(coeffs.log_q, 0, length)).real.sum(1)


def causal_fft_conv(u: Tensor, kernel: Tensor) -> Tensor:
    """y[..., t] = sum_{j<=t} kernel[..., j] * u[..., t-j] along the last dim, via rfft at size >= 2L."""
    length = u.shape[-1]
    n_fft = 2 * (1 << (length - 1).bit_length())  # the reference's size: twice the next power of two
    spectrum = torch.fft.rfft(u, n=n_fft) * torch.fft.rfft(kernel, n=n_fft)
    return torch.fft.irfft(spectrum, n=n_fft)[..., :length]


def _complex_contract(u: Tensor, powers: Tensor) -> Tensor:
    """sum_j u[..., d, j] * powers[d, n, j] for real u: (..., D, N) complex, as two real contractions."""
    real = torch.einsum("...dj,dnj->...dn", u, powers.real)
    imag = torch.einsum("...dj,dnj->...dn", u, powers.imag)
    return torch.complex(real, imag)


def _state_bias(coeffs: CemaCoefficients, h_in: Tensor, length: int) -> Tensor:
    """What an incoming state adds to the next `length` outputs: Re(sum_n g q**(t+1) h_in) -> (..., D, length)."""
    gh = coeffs.g * h_in  # ..., D, N
    powers = q_powers(coeffs.log_q, 1, length + 1)  # D, N, length
    return torch.einsum("...dn,dnt->...dt", gh.real, powers.real) - torch.einsum(
        "...dn,dnt->...dt", gh.imag, powers.imag)


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

    padded = torch.nn.functional.pad(u, (0, num_blocks * block - length))
    blocks = padded.view(batch, dim, num_blocks, block).transpose(1, 2)  # B x nb x D x block
    y = causal_fft_conv(blocks, cema_kernel(coeffs, block))

    must_scan = num_blocks > 1 or h0 is not None or need_state
    if must_scan:
        # Closed-form state each block leaves behind when entered at zero: p * sum_j q**(len-1-j) u_j.
        reversed_powers = q_powers(coeffs.log_q, 0, block).flip(-1)
        h_local = coeffs.p * _complex_contract(blocks, reversed_powers)  # B x nb x D x N
        if tail != block:
            tail_powers = q_powers(coeffs.log_q, 0, tail).flip(-1)
            h_tail = coeffs.p * _complex_contract(blocks[:, -1, :, :tail], tail_powers)
            h_local = torch.cat([h_local[:, :-1], h_tail.unsqueeze(1)], dim=1)
        q_block = torch.exp(coeffs.log_q * block)
        q_tail = torch.exp(coeffs.log_q * tail)

        h = torch.zeros_like(h_local[:, 0]) if h0 is None else h0.to(h_local.dtype)
        incoming = []
        for c in range(num_blocks):  # a scan over blocks, not over time
            if block_reset is not None:
                h = torch.where(block_reset[:, c, None, None], torch.zeros_like(h), h)
            incoming.append(h)
            h = (q_tail if c == num_blocks - 1 else q_block) * h + h_local[:, c]
        h_in = torch.stack(incoming, dim=1)  # B x nb x D x N
        y = y + _state_bias(coeffs, h_in, block)
        h_last = h
    else:
        h_last = None

    y = y.transpose(1, 2).reshape(batch, dim, num_blocks * block)[..., :length]
    y = y + omega.unsqueeze(-1) * u
    return y, (h_last if need_state else None)


def cema_step(u: Tensor, coeffs: CemaCoefficients, omega: Tensor, h0: Tensor | None) -> tuple[Tensor, Tensor]:
    """One decode step: u (B, D) real, h0 (B, D, N) complex or None. Returns y (B, D) and the new state."""
    q = torch.exp(coeffs.log_q)
    h = coeffs.p * u.unsqueeze(-1)
    if h0 is not None:
        h = h + q * h0
    y = (coeffs.g * h).real.sum(-1) + omega * u
    return y, h


def cema_sequential(
    u: Tensor, coeffs: CemaCoefficients, omega: Tensor, h0: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The recurrence, one step at a time: the slow reference for tests. u (B, D, L)."""
    q = torch.exp(coeffs.log_q)
    h = torch.zeros(u.shape[0], *q.shape, dtype=q.dtype, device=u.device) if h0 is None else h0
    outputs = []
    for t in range(u.shape[-1]):
        h = coeffs.p * u[..., t, None] + q * h
        outputs.append((coeffs.g * h).real.sum(-1) + omega * u[..., t])
    return torch.stack(outputs, dim=-1), h
