"""Complex exponential moving average (spec section 4): pure functions, no module state.

Per channel d and EMA component n:

    h_t = p * u_t + q * h_{t-1}            (complex, h_{-1} = h0)
    y_t = Re(sum_n g * h_t) + omega * u_t

The paths:
- `cema_sequential`: that recurrence written out, in complex numbers: the reference every path is tested against.
- `cema_chunked`: the PyTorch fast path, in real arithmetic. Time is cut into chunks of T <= 64 steps.
  1. Inside a chunk the outputs are the causal convolution with k[j] = Re(sum_n p g q**j), j < T (plus omega on
     the diagonal): one (T x T) Toeplitz matmul per channel.
  2. Each chunk's final state from a zero start, p * sum_j q**(T-1-j) u_j, is one matmul with a (T, 2N) table.
  3. A scan over chunks (L / T steps of (B, D, N) work, never L) carries the state and restarts it at documents.
  4. The state entering a chunk adds Re(sum_n g q**(t+1) h_in) to its outputs: one matmul with a (2N, T) table.
  Every table is (D, T, T) or (D, 2N, T) whatever L is, so nothing is memoized and nothing grows with L.
  Autograd keeps a channel-major copy of u and the chunks' incoming states: (1 + 2N / T) D floats per token
  (1.5 D at N = 16), plus the small tables.
  Why not the FFT convolution the spec describes: the FFT needs (D, N, block) power tables (0.76 GiB per layer
  at mega200M with chunk 2048), complex intermediates that Inductor cannot compile, and padding to twice the next
  power of two. These three small real matmuls are exact, compile to one graph, and measured about 3x faster
  than the FFT path on the `small` training shape on CPU (forward + backward).
- The Triton path (ops/triton/cema.py) runs the same chunking on CUDA with the state held in registers, and
  derives the coefficients from the parameters inside its kernels (forward and backward), so it takes the
  parameters, not the coefficients.
- `cema_from_parameters` is the one function that decides which path runs; `cema` is the PyTorch path from given
  coefficients.
- `cema_step`: the single-token decode update. `cema_state_bias`: what an incoming state adds to a segment's
  outputs, for chunk parallelism (spec section 14).

States at this level are real pairs (..., N, 2), laid out as `torch.view_as_real` does, because Inductor runs
complex ops eagerly; the layer converts to complex64 at the state boundary. Everything runs in fp32 or float64,
never in bf16: the paths upcast.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from megalodon.ops.triton import use_triton

MAX_CHUNK = 64  # steps per chunk on the PyTorch path: Toeplitz work grows with T, the scan's steps with L / T


class CemaCoefficients(NamedTuple):
    """Per-(channel, component) coefficients, each (D, N) and real: complex numbers are kept as parts so that
    the hot paths run as real matmuls and elementwise ops, and compile."""

    p: Tensor  # input weight, sigmoid(alpha)
    log_mag: Tensor  # log|q|, finite even where |q| rounds to 0
    phi: Tensor  # arg q
    g_re: Tensor  # output weight gamma / sqrt(N), real part
    g_im: Tensor  # imaginary part

    @property
    def q(self) -> Tensor:
        """The decay as one complex tensor (for the reference and tests)."""
        return torch.polar(torch.exp(self.log_mag), self.phi)

    @property
    def g(self) -> Tensor:
        return torch.complex(self.g_re, self.g_im)


def log_decay(alpha: Tensor, delta: Tensor) -> Tensor:
    """log|q| = log(1 - sigmoid(alpha) sigmoid(delta)), finite wherever the inputs are.

    Where the product x rounds to 1 in fp32, log(1 - x) is -inf and exp(-inf * 0) = NaN at the power q**0. Above
    x = 1/2 it is log(s(-a) + s(a) s(-d)), the same number as a sum of two positive terms (no cancellation), floored
    at the smallest normal float; below, log1p(-x) keeps its relative accuracy. The branches are blended by
    arithmetic (both are finite everywhere): torch.where costs 10x an elementwise op on CPU, and decode pays it."""
    s_alpha = torch.sigmoid(alpha)
    x = s_alpha * torch.sigmoid(delta)
    upper = (x > 0.5).to(x.dtype)
    direct = torch.log1p(-x.clamp(max=0.5))
    tiny = torch.finfo(x.dtype).tiny
    log_space = torch.log((torch.sigmoid(-alpha) + s_alpha * torch.sigmoid(-delta)).clamp(min=tiny))
    return direct + upper * (log_space - direct)


def cema_coefficients(alpha: Tensor, delta: Tensor, theta: Tensor, gamma: Tensor) -> CemaCoefficients:
    """Derive p, q and g from the parameters: alpha, delta (D,N,1), theta (D,1,1), gamma (D,N,2).

    A (D, N) elementwise computation, cheap enough to redo on every call: no cache can go stale."""
    ndim = alpha.shape[1]
    harmonics = torch.arange(1, ndim + 1, dtype=alpha.dtype, device=alpha.device)
    phi = harmonics * torch.sigmoid(theta).squeeze(-1) * (2.0 * math.pi / ndim)  # D x N
    scale = 1.0 / math.sqrt(ndim)
    return CemaCoefficients(torch.sigmoid(alpha).squeeze(-1), log_decay(alpha, delta).squeeze(-1), phi,
                            gamma[..., 0] * scale, gamma[..., 1] * scale)


def q_powers(log_mag: Tensor, phi: Tensor, start: int, stop: int, step: int = 1) -> tuple[Tensor, Tensor]:
    """Real and imaginary parts of q**j for j in range(start, stop, step): two (D, N, len(range)).

    Computed as exp(j log|q|) and the angle j * phi, never by repeated products: |q|**j underflows to 0
    harmlessly for large j instead of accumulating error."""
    exponents = torch.arange(start, stop, step, dtype=phi.dtype, device=phi.device)
    magnitude = torch.exp(log_mag.unsqueeze(-1) * exponents)
    angle = phi.unsqueeze(-1) * exponents
    return magnitude * torch.cos(angle), magnitude * torch.sin(angle)


def cema_from_parameters(
    u: Tensor, alpha: Tensor, delta: Tensor, theta: Tensor, gamma: Tensor, omega: Tensor, h0: Tensor | None = None,
    block_size: int | None = None, block_reset: Tensor | None = None, need_state: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """cema(u, cema_coefficients(alpha, delta, theta, gamma), omega, ...): the one place that chooses the Triton
    or the PyTorch path. On CUDA (fp32 parameters) one Triton op derives the coefficients in its kernels, forward
    and backward, where the PyTorch derivation is some 60 small kernels per call; everywhere else, that formula.
    Parameters as the CEMA layer holds them: alpha, delta (D, N, 1), theta (D, 1, 1), gamma (D, N, 2); omega (D,)."""
    if alpha.dtype == torch.float32 and use_triton("cema", u):
        from megalodon.ops.triton.cema import CHUNK, cema_scan  # CHUNK read at each call: bench_cema.py --chunks

        dim, ndim = alpha.shape[:2]
        _check_inputs(u, dim, ndim, h0, block_size, block_reset)
        y, h, *_ = cema_scan(u, alpha.view(dim, ndim), delta.view(dim, ndim), theta.view(dim), gamma, omega, h0,
                             block_reset, block_size or 0, CHUNK)
        return y, h if need_state else None
    return cema(u, cema_coefficients(alpha, delta, theta, gamma), omega, h0, block_size, block_reset, need_state)


def cema(
    u: Tensor, coeffs: CemaCoefficients, omega: Tensor, h0: Tensor | None = None, block_size: int | None = None,
    block_reset: Tensor | None = None, need_state: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """The CEMA over a sequence from its coefficients, on the PyTorch path (cema_chunked).

    u: (B, L, D), any float dtype (upcast to the coefficients' dtype). omega: (D,). h0: (B, D, N, 2) real pairs
    or None (zero). block_reset: (B, ceil(L / block_size)) bool; True restarts the state at zero at the first step
    of that block of `block_size` steps (the chunk grid of packed documents).
    Returns y (B, L, D) in the coefficients' dtype and the final state (B, D, N, 2), or None if not need_state.
    """
    _check_inputs(u, *coeffs.p.shape, h0, block_size, block_reset)
    return cema_chunked(u.to(coeffs.p.dtype), coeffs, omega, h0, block_size, block_reset, need_state)


def _check_inputs(u: Tensor, channels: int, ndim: int, h0: Tensor | None, block_size: int | None,
                  block_reset: Tensor | None) -> None:
    batch, length, dim = u.shape
    if length == 0:
        raise ValueError("CEMA input has no time steps (L = 0): pass at least one token")
    if channels != dim:
        raise ValueError(f"CEMA input has {dim} channels but the coefficients are for {channels}")
    if h0 is not None and (h0.shape != (batch, dim, ndim, 2) or h0.is_complex()):
        raise ValueError(f"CEMA incoming state must be real pairs of shape {(batch, dim, ndim, 2)} "
                         f"(torch.view_as_real of the complex state), got {tuple(h0.shape)} {h0.dtype}")
    if block_reset is not None:
        if block_size is None:
            raise ValueError("block_reset needs block_size: the resets are at the first step of each block")
        blocks = -(-length // block_size)
        if block_reset.shape != (batch, blocks) or block_reset.dtype != torch.bool:
            raise ValueError(f"block_reset must be a bool tensor of shape (batch, ceil(L / block_size)) = "
                             f"{(batch, blocks)}, got {block_reset.dtype} {tuple(block_reset.shape)}")


def chunk_length(length: int, block_size: int | None, has_resets: bool) -> int:
    """Steps per chunk on the PyTorch path: at most MAX_CHUNK, and a divisor of block_size when there are resets,
    so that every reset falls on a chunk boundary. A block size whose divisors are all small is used whole."""
    if not has_resets or block_size is None:
        return max(1, min(MAX_CHUNK, length))
    best = max(d for d in range(1, min(MAX_CHUNK, block_size) + 1) if block_size % d == 0)
    return best if best >= 16 or block_size <= MAX_CHUNK else block_size


class ChunkTables(NamedTuple):
    """The real tables for chunks of T steps: everything the PyTorch path needs from the powers q**j, j <= T."""

    toeplitz: Tensor  # D x T x T: [s, t] = k[t - s] for s <= t, with omega on the diagonal
    states: Tensor  # D x T x 2N: p [Re, Im] q**(T-1-s), so that u @ states is a chunk's final state from zero
    bias: Tensor  # D x 2N x T: [Re, -Im] of g q**(t+1), so that [Re h, Im h] @ bias = Re(sum_n g q**(t+1) h)
    decay: Tensor  # D x 2N x 2N: q**T as a real matrix, so that [Re h, Im h] @ decay = q**T h


def _output_table(coeffs: CemaCoefficients, re: Tensor, im: Tensor) -> Tensor:
    """[Re, -Im] of g q**j for the given powers (D, N, T): (D, 2N, T), so that
    [Re h, Im h] @ table = Re(sum_n g q**j h)."""
    g_re, g_im = coeffs.g_re.unsqueeze(-1), coeffs.g_im.unsqueeze(-1)
    return torch.cat([g_re * re - g_im * im, -(g_re * im + g_im * re)], dim=1)


def chunk_tables(coeffs: CemaCoefficients, omega: Tensor, steps: int) -> ChunkTables:
    # Full-width power tables only: on CPU these (D, N, T) ops are memory-bound, and every slice would cost a
    # zero-filled gradient buffer in backward.
    bias = _output_table(coeffs, *q_powers(coeffs.log_mag, coeffs.phi, 1, steps + 1))  # g q**(t+1), t < T
    lag0 = (coeffs.p * coeffs.g_re).sum(1, keepdim=True) + omega.unsqueeze(-1)  # omega * u_t rides on lag 0
    lags = (coeffs.p.unsqueeze(-1) * bias[:, :coeffs.p.shape[1], :steps - 1]).sum(1)  # Re(sum_n p g q**j), j >= 1
    # [s, t] = k[t - s]: row T-1-s of the sliding windows over [0 (T-1 times), k], so reversed along rows
    toeplitz = F.pad(torch.cat([lag0, lags], dim=1), (steps - 1, 0)).unfold(1, steps, 1).flip(1)
    re, im = q_powers(coeffs.log_mag, coeffs.phi, steps - 1, -1, -1)  # q**(T-1-s), s < T
    p = coeffs.p.unsqueeze(-1)
    states = torch.cat([p * re, p * im], dim=1).transpose(1, 2)
    decay_re, decay_im = q_powers(coeffs.log_mag, coeffs.phi, steps, steps + 1)
    return ChunkTables(toeplitz, states, bias, _rotation(decay_re[..., 0], decay_im[..., 0]))


def _rotation(re: Tensor, im: Tensor) -> Tensor:
    """Multiplication by the complex (D, N) number re + i im as a real (D, 2N, 2N) matrix acting on row vectors
    [Re h | Im h]. Dense and mostly zeros, but one batched matmul per scan step beats six elementwise ops."""
    re, im = torch.diag_embed(re), torch.diag_embed(im)
    return torch.cat([torch.cat([re, im], dim=2), torch.cat([-im, re], dim=2)], dim=1)


class _Transpose(torch.autograd.Function):
    """A 2-D transpose, contiguous, with a contiguous gradient too. Through a plain `.t()` view the matmuls of
    the backward get a strided gradient, and CPU bmm then copies every channel's matrix separately; a 3-D
    permute copy is 10x slower than this 2-D one (both measured on the `small` training shape)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.t().contiguous()

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.t().contiguous()


def cema_chunked(
    u: Tensor, coeffs: CemaCoefficients, omega: Tensor, h0: Tensor | None = None, block_size: int | None = None,
    block_reset: Tensor | None = None, need_state: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """The PyTorch path of `cema` (same arguments): chunked Toeplitz matmuls and a scan over chunks."""
    batch, length, dim = u.shape
    ndim = coeffs.p.shape[1]
    steps = chunk_length(length, block_size, block_reset is not None)
    num_chunks = -(-length // steps)
    tail = length - (num_chunks - 1) * steps
    tables = chunk_tables(coeffs, omega, steps)

    # D x (B * chunks) x T: channels lead, so that every product below is one batched matmul per channel.
    chunks = _Transpose.apply(u.reshape(-1, dim)).view(dim, batch, length)
    if num_chunks * steps > length:
        chunks = F.pad(chunks, (0, num_chunks * steps - length))
    chunks = chunks.view(dim, -1, steps)
    y = torch.bmm(chunks, tables.toeplitz)

    h_last = None
    if num_chunks > 1 or h0 is not None or need_state:
        local = torch.bmm(chunks, tables.states).view(dim, batch, num_chunks, 2 * ndim).unbind(2)  # from zero
        keep = None
        if block_reset is not None:  # chunk c restarts where its block does and the chunk starts that block
            starts = torch.arange(num_chunks, device=u.device) * steps
            keep = torch.where(starts % block_size == 0, ~block_reset[:, starts // block_size], True)
            keep = keep.to(u.dtype).T.unsqueeze(-1)  # chunks x B x 1
        h = u.new_zeros(dim, batch, 2 * ndim) if h0 is None else h0.to(u.dtype).permute(1, 0, 3, 2).flatten(2)
        incoming = []
        for c in range(num_chunks):  # the scan over chunks, not over time
            if keep is not None:
                h = h * keep[c]
            incoming.append(h)
            if c < num_chunks - 1:
                h = torch.baddbmm(local[c], h, tables.decay)
        y = torch.baddbmm(y, torch.stack(incoming, dim=2).view(dim, -1, 2 * ndim), tables.bias)
        if need_state:  # the last chunk may be short: its own decay and the last `tail` rows of the state table
            re, im = q_powers(coeffs.log_mag, coeffs.phi, tail, tail + 1)
            last = torch.bmm(chunks.view(dim, batch, num_chunks, steps)[:, :, -1, :tail],
                             tables.states[:, steps - tail:])
            h = torch.baddbmm(last, h, _rotation(re[..., 0], im[..., 0]))
            h_last = h.view(dim, batch, 2, ndim).permute(1, 0, 3, 2).contiguous()

    y = y.view(dim, batch, num_chunks * steps)[..., :length].reshape(dim, -1)
    return _Transpose.apply(y).view(batch, length, dim), h_last


def cema_state_bias(
    h_in: Tensor, coeffs: CemaCoefficients, length: int, block_size: int | None = None,
    block_reset: Tensor | None = None,
) -> Tensor:
    """What entering a segment of `length` steps at state h_in (B, D, N, 2) adds to its outputs:
    Re(sum_n g q**(t+1) h_in) at step t, as (B, length, D), and 0 from the segment's first reset on (block_reset
    as in `cema`). Differentiable. Chunk by chunk: the tables are (D, N, length / T) and (D, 2N, T), never
    (D, N, length). With `cema` from a zero state, this is what chunk parallelism needs (spec section 14)."""
    batch, dim, ndim, _ = h_in.shape
    steps = max(1, min(MAX_CHUNK, length))
    num_chunks = -(-length // steps)
    re, im = (t.unsqueeze(1) for t in q_powers(coeffs.log_mag, coeffs.phi, 0, num_chunks * steps, steps))
    h_re, h_im = h_in[..., 0].transpose(0, 1).unsqueeze(-1), h_in[..., 1].transpose(0, 1).unsqueeze(-1)
    # The state entering chunk c is q**(c T) h_in: D x B x 2N x chunks.
    entering = torch.cat([re * h_re - im * h_im, re * h_im + im * h_re], dim=2)
    table = _output_table(coeffs, *q_powers(coeffs.log_mag, coeffs.phi, 1, steps + 1))
    bias = torch.bmm(entering.transpose(2, 3).reshape(dim, -1, 2 * ndim), table)
    bias = bias.view(dim, batch, num_chunks * steps)[..., :length].permute(1, 2, 0)
    if block_reset is None:
        return bias
    before_reset = step_resets(block_reset, block_size, length).cumsum(1) == 0  # B x L
    return bias * before_reset.unsqueeze(-1)


def step_resets(block_reset: Tensor, block_size: int, length: int) -> Tensor:
    """Per-step reset flags (B, L) from per-block ones (B, ceil(L / block_size)): True at a restarted block's
    first step."""
    first = torch.arange(block_size, device=block_reset.device) == 0
    return (block_reset.unsqueeze(-1) & first).flatten(1)[:, :length]  # B x (blocks * block_size), cut to L


def cema_decay(coeffs: CemaCoefficients) -> tuple[Tensor, Tensor]:
    """q as real parts (Re q, Im q), each (D, N): what cema_step multiplies the state by."""
    magnitude = torch.exp(coeffs.log_mag)
    return magnitude * torch.cos(coeffs.phi), magnitude * torch.sin(coeffs.phi)


def cema_step(
    u: Tensor, coeffs: CemaCoefficients, omega: Tensor, h: Tensor | None, out: Tensor | None = None,
    decay: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """One decode step: u (B, D), h (B, D, N, 2) real pairs or None (zero). Returns y (B, D) and the new state.

    Sync-free and shape-static, for CUDA graphs: with `out` (which may be `h` itself, e.g.
    torch.view_as_real(state.cema_h)) the new state is written there in place and `out` is returned. The
    coefficients, and `decay` (cema_decay(coeffs), computed here when None), depend on the parameters only: a
    decode loop computes them once per generation. On CUDA in fp32 it is one Triton kernel (ops/triton/cema_step.py)."""
    if h is not None:
        q_re, q_im = cema_decay(coeffs) if decay is None else decay
        kernel_inputs = (u, h, coeffs.p, q_re, q_im, coeffs.g_re, coeffs.g_im, omega)
        if (use_triton("cema_step", u, h) and u.dtype == h.dtype == coeffs.p.dtype == torch.float32
                and all(t.is_contiguous() for t in kernel_inputs) and (out is None or out.is_contiguous())):
            from megalodon.ops.triton.cema_step import cema_step_kernel

            out = torch.empty_like(h) if out is None else out
            return cema_step_kernel(u, h, out, *kernel_inputs[2:]), out
    pu = coeffs.p * u.unsqueeze(-1)  # B x D x N
    out = torch.empty(*pu.shape, 2, dtype=pu.dtype, device=pu.device) if out is None else out
    if h is None:
        new_re, new_im = pu, torch.zeros_like(pu)
    else:
        h_re, h_im = h[..., 0], h[..., 1]
        new_re = torch.addcmul(pu, q_re, h_re).sub_(q_im * h_im)  # before `out` is written: it may be h
        new_im = torch.addcmul(q_im * h_re, q_re, h_im)
    y = (coeffs.g_re * new_re).sub_(coeffs.g_im * new_im).sum(-1).addcmul_(omega, u)
    out[..., 0].copy_(new_re)
    out[..., 1].copy_(new_im)
    return y, out


def cema_sequential(
    u: Tensor, coeffs: CemaCoefficients, omega: Tensor, h0: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The recurrence, one step at a time, in complex numbers: the slow reference for tests.
    u (B, D, L) real, h0 (B, D, N) complex or None. Returns y (B, D, L) and the last state h (B, D, N) complex."""
    q, g = coeffs.q, coeffs.g
    h = torch.zeros(u.shape[0], *q.shape, dtype=q.dtype, device=u.device) if h0 is None else h0
    outputs = []
    for t in range(u.shape[-1]):
        h = coeffs.p * u[..., t, None] + q * h
        outputs.append((g * h).real.sum(-1) + omega * u[..., t])
    return torch.stack(outputs, dim=-1), h
