"""CEMA fast paths against the sequential recurrence, in float64."""

import pytest
import torch

from megalodon.layers.cema import CEMA
from megalodon.ops.cema import cema_blocked, cema_coefficients, cema_sequential, cema_step

C = 8


def make(dim=6, ndim=4, seed=0):
    torch.manual_seed(seed)
    layer = CEMA(dim, ndim).double()
    with torch.no_grad():
        layer.gamma[..., 1].normal_()  # exercise the imaginary part too
    coeffs = cema_coefficients(layer.alpha, layer.delta, layer.theta, layer.gamma)
    return coeffs, layer.omega.squeeze(-1)


def random_state(batch, dim, ndim):
    return torch.complex(torch.randn(batch, dim, ndim, dtype=torch.float64),
                         torch.randn(batch, dim, ndim, dtype=torch.float64))


@pytest.mark.parametrize("length", [1, 2, 7, C - 1, C, 3 * C + 5])
@pytest.mark.parametrize("with_h0", [False, True])
@pytest.mark.parametrize("block", [None, C, 3])
def test_blocked_matches_recurrence(length, with_h0, block):
    coeffs, omega = make()
    u = torch.randn(2, 6, length, dtype=torch.float64)
    h0 = random_state(2, 6, 4) if with_h0 else None
    y_ref, h_ref = cema_sequential(u, coeffs, omega, h0)
    y, h = cema_blocked(u, coeffs, omega, h0, block_size=block)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h, h_ref, rtol=1e-10, atol=1e-10)


def test_step_repeated_matches_block():
    coeffs, omega = make()
    u = torch.randn(3, 6, 11, dtype=torch.float64)
    y_block, h_block = cema_blocked(u, coeffs, omega, random_state(3, 6, 4) * 0, block_size=4)
    h = None
    steps = []
    for t in range(u.shape[-1]):
        y, h = cema_step(u[..., t], coeffs, omega, h)
        steps.append(y)
    torch.testing.assert_close(torch.stack(steps, -1), y_block, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h, h_block, rtol=1e-10, atol=1e-10)


def test_block_reset_restarts_state():
    coeffs, omega = make()
    u = torch.randn(2, 6, 4 * C, dtype=torch.float64)
    h0 = random_state(2, 6, 4)
    reset = torch.tensor([[False, False, True, False], [True, True, False, False]])
    y, h = cema_blocked(u, coeffs, omega, h0, block_size=C, block_reset=reset)
    for row in range(2):
        starts = [0] + [c * C for c in range(4) if reset[row, c]] + [4 * C]
        starts = sorted(set(starts))
        for a, b in zip(starts[:-1], starts[1:]):
            incoming = h0[row:row + 1] if a == 0 and not reset[row, 0] else None
            y_ref, h_ref = cema_sequential(u[row:row + 1, :, a:b], coeffs, omega, incoming)
            torch.testing.assert_close(y[row:row + 1, :, a:b], y_ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(h[row:row + 1], h_ref, rtol=1e-10, atol=1e-10)


def test_long_sequence_powers_do_not_overflow_in_fp32():
    coeffs, omega = make(dim=4, ndim=4)
    coeffs32 = type(coeffs)(*(t.to(torch.complex64) if t.is_complex() else t.float() for t in coeffs[:-1]))
    u = torch.randn(1, 4, 5000, dtype=torch.float64)
    y_ref, _ = cema_sequential(u, coeffs, omega)
    y, h = cema_blocked(u.float(), coeffs32, omega.float(), block_size=512)
    assert torch.isfinite(y).all() and torch.isfinite(torch.view_as_real(h)).all()
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-3, atol=1e-3)


def test_gradcheck_inputs_state_and_parameters():
    torch.manual_seed(1)
    layer = CEMA(3, 2).double()
    u = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    h0 = random_state(2, 3, 2).requires_grad_(True)

    def fn(u, h0, alpha, delta, theta, gamma, omega):
        coeffs = cema_coefficients(alpha, delta, theta, gamma)
        y, h = cema_blocked(u, coeffs, omega.squeeze(-1), h0, block_size=2)
        return y, torch.view_as_real(h)

    params = [p.detach().clone().requires_grad_(True) for p in
              (layer.alpha, layer.delta, layer.theta, layer.gamma, layer.omega)]
    assert torch.autograd.gradcheck(fn, (u, h0, *params))


def test_layer_runs_fp32_under_bf16_autocast():
    layer = CEMA(8, 4)
    x = torch.randn(2, 16, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, h = layer(x.bfloat16(), block_size=8, need_state=True)
    assert y.dtype == torch.float32 and h.dtype == torch.complex64
    y32, _ = layer(x.bfloat16().float(), block_size=8)
    torch.testing.assert_close(y, y32)


def test_inference_cache_follows_parameter_updates():
    layer = CEMA(8, 4).double()
    x = torch.randn(2, 12, 8, dtype=torch.float64)
    with torch.no_grad():
        before, _ = layer(x, block_size=4)
        layer.alpha.add_(0.3)  # e.g. an optimizer step between two evaluations
        after, _ = layer(x, block_size=4)
    fresh, _ = layer(x, block_size=4)  # grad mode: no cache at all
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, fresh.detach())
