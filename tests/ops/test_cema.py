"""The CEMA's PyTorch paths against the sequential recurrence, in float64; the review fixes of issue 12."""

import pytest
import torch

from megalodon.layers.cema import CEMA
from megalodon.ops.cema import (cema, cema_chunked, cema_coefficients, cema_sequential, cema_state_bias, cema_step,
                                chunk_length, log_decay)

C = 8


def make(dim=6, ndim=4, seed=0):
    torch.manual_seed(seed)
    layer = CEMA(dim, ndim).double()
    with torch.no_grad():
        layer.gamma[..., 1].normal_()  # exercise the imaginary part too
    coeffs = cema_coefficients(layer.alpha, layer.delta, layer.theta, layer.gamma)
    return coeffs, layer.omega.squeeze(-1)


def random_state(batch, dim, ndim):
    return torch.randn(batch, dim, ndim, 2, dtype=torch.float64)


def reference(u, coeffs, omega, h0=None, block_size=None, block_reset=None):
    """The recurrence step by step in complex128, restarting at resets, laid out like `cema`: u (B, L, D)."""
    q, g = coeffs.q, coeffs.g
    h = torch.zeros(u.shape[0], *q.shape, dtype=q.dtype) if h0 is None else torch.view_as_complex(h0)
    outputs = []
    for t in range(u.shape[1]):
        if block_reset is not None and t % block_size == 0:
            h = torch.where(block_reset[:, t // block_size, None, None], torch.zeros_like(h), h)
        h = coeffs.p * u[:, t, :, None] + q * h
        outputs.append((g * h).real.sum(-1) + omega * u[:, t])
    return torch.stack(outputs, dim=1), torch.view_as_real(h)


@pytest.mark.parametrize("length", [1, 2, 7, C - 1, C, 3 * C + 5, 64, 65, 150])
@pytest.mark.parametrize("with_h0", [False, True])
def test_chunked_matches_recurrence(length, with_h0):
    coeffs, omega = make()
    u = torch.randn(2, length, 6, dtype=torch.float64)
    h0 = random_state(2, 6, 4) if with_h0 else None
    y_ref, h_ref = cema_sequential(u.transpose(1, 2), coeffs, omega,
                                   None if h0 is None else torch.view_as_complex(h0))
    y, h = cema_chunked(u, coeffs, omega, h0)
    torch.testing.assert_close(y, y_ref.transpose(1, 2), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h, torch.view_as_real(h_ref), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("length, block", [(4 * C, C), (4 * C + 3, C), (250, 100), (300, 128), (70, 67)])
def test_block_reset_restarts_state(length, block):
    coeffs, omega = make()
    u = torch.randn(3, length, 6, dtype=torch.float64)
    h0 = random_state(3, 6, 4)
    blocks = -(-length // block)
    reset = torch.rand(3, blocks, generator=torch.Generator().manual_seed(length)) < 0.5
    reset[0, 0], reset[1, 0] = True, False
    y, h = cema(u, coeffs, omega, h0, block, reset)
    y_ref, h_ref = reference(u, coeffs, omega, h0, block, reset)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h, h_ref, rtol=1e-10, atol=1e-10)


def test_chunk_length_keeps_resets_on_chunk_boundaries():
    assert chunk_length(1000, None, False) == 64 and chunk_length(5, None, False) == 5
    assert chunk_length(1000, 256, True) == 64 and chunk_length(1000, 100, True) == 50
    assert chunk_length(1000, 8, True) == 8
    assert chunk_length(5000, 2 * 1021, True) == 2 * 1021  # no divisor in 16..64: the block is used whole


def test_split_calls_equal_one_call():
    """Any split of a sequence into consecutive calls with the state carried equals one call."""
    coeffs, omega = make()
    u = torch.randn(2, 157, 6, dtype=torch.float64)
    y_full, h_full = cema(u, coeffs, omega)
    for cuts in ([1, 64, 100], [63, 64, 65], [5]):
        h, parts = None, []
        for start, stop in zip([0, *cuts], [*cuts, 157]):
            y, h = cema(u[:, start:stop], coeffs, omega, h)
            parts.append(y)
        torch.testing.assert_close(torch.cat(parts, 1), y_full, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(h, h_full, rtol=1e-10, atol=1e-10)


def test_step_repeated_matches_block():
    coeffs, omega = make()
    u = torch.randn(3, 11, 6, dtype=torch.float64)
    y_block, h_block = cema(u, coeffs, omega, random_state(3, 6, 4) * 0)
    h, steps = None, []
    for t in range(u.shape[1]):
        y, h = cema_step(u[:, t], coeffs, omega, h)
        steps.append(y)
    torch.testing.assert_close(torch.stack(steps, 1), y_block, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h, h_block, rtol=1e-10, atol=1e-10)


def test_step_writes_in_place():
    """For CUDA graphs: with out=h the state buffer (here a view of a complex state) is updated in place."""
    coeffs, omega = make()
    state = torch.view_as_complex(random_state(2, 6, 4))
    expected_y, expected_h = cema_step(torch.ones(2, 6, dtype=torch.float64), coeffs, omega,
                                       torch.view_as_real(state).clone())
    buffer = torch.view_as_real(state)
    y, h = cema_step(torch.ones(2, 6, dtype=torch.float64), coeffs, omega, buffer, out=buffer)
    assert h.data_ptr() == state.data_ptr()
    torch.testing.assert_close(y, expected_y)
    torch.testing.assert_close(torch.view_as_real(state), expected_h)


def test_state_bias_is_what_the_incoming_state_adds():
    coeffs, omega = make()
    u = torch.randn(2, 150, 6, dtype=torch.float64)
    h0 = random_state(2, 6, 4)
    y_from_zero, _ = cema(u, coeffs, omega)
    y_from_h0, _ = cema(u, coeffs, omega, h0)
    torch.testing.assert_close(y_from_zero + cema_state_bias(h0, coeffs, 150), y_from_h0, rtol=1e-10, atol=1e-10)
    reset = torch.tensor([[False, True], [False, False]])  # row 0 restarts at step 100: no bias from there
    bias = cema_state_bias(h0, coeffs, 150, 100, reset)
    assert bias[0, 100:].abs().max() == 0 and bias[0, :100].abs().max() > 0 and bias[1, 100:].abs().max() > 0


def test_long_sequence_powers_do_not_overflow_in_fp32():
    coeffs, omega = make(dim=4, ndim=4)
    coeffs32 = type(coeffs)(*(t.float() for t in coeffs))
    u = torch.randn(1, 5000, 4, dtype=torch.float64)
    y_ref, _ = reference(u, coeffs, omega)
    y, h = cema(u.float(), coeffs32, omega.float(), block_size=512)
    assert torch.isfinite(y).all() and torch.isfinite(h).all()
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-3, atol=1e-3)


def test_gradcheck_inputs_state_and_parameters():
    torch.manual_seed(1)
    layer = CEMA(3, 2).double()
    u = torch.randn(2, 11, 3, dtype=torch.float64, requires_grad=True)
    h0 = random_state(2, 3, 2).requires_grad_(True)
    reset = torch.tensor([[False, True, False], [False, False, True]])

    def fn(u, h0, alpha, delta, theta, gamma, omega):
        coeffs = cema_coefficients(alpha, delta, theta, gamma)
        return cema(u, coeffs, omega.squeeze(-1), h0, 4, reset)

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


def test_layer_state_is_complex_at_the_boundary():
    layer = CEMA(6, 4).double()
    x = torch.randn(2, 9, 6, dtype=torch.float64)
    y_full, h_full = layer(x, need_state=True)
    y_a, h = layer(x[:, :4], need_state=True)
    y_b, h = layer(x[:, 4:5], h)  # the single-step path
    y_c, h = layer(x[:, 5:], h, need_state=True)
    assert h.dtype == torch.complex128
    torch.testing.assert_close(torch.cat([y_a, y_b, y_c], 1), y_full)
    torch.testing.assert_close(h, h_full)


def test_bad_inputs_name_the_problem():
    coeffs, omega = make()
    u = torch.randn(2, 9, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match="real pairs"):
        cema(u, coeffs, omega, torch.view_as_complex(random_state(2, 6, 4)))
    with pytest.raises(ValueError, match="needs block_size"):
        cema(u, coeffs, omega, block_reset=torch.zeros(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="block_reset must be"):
        cema(u, coeffs, omega, block_size=4, block_reset=torch.zeros(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool tensor"):  # the kernels read the flags' bytes
        cema(u, coeffs, omega, block_size=4, block_reset=torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="channels"):
        cema(u[..., :5], coeffs, omega)
    with pytest.raises(ValueError, match="no time steps"):
        cema(u[:, :0], coeffs, omega)


# Review fixes (issue 12, items 1, 3 and 4).

def _tensor_bytes(obj, seen=None) -> int:
    """Bytes of every tensor reachable from obj through attributes, containers and named tuples."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        return _tensor_bytes(vars(obj), seen)
    return 0


def test_inference_keeps_no_memory_that_grows_with_lengths():
    """Issue 12 item 1: evaluating many lengths used to leave a power table per (block, tail) on the layer."""
    layer = CEMA(16, 4).eval()
    baseline = _tensor_bytes(layer)
    with torch.no_grad():
        for length in range(1, 60, 3):
            layer(torch.randn(1, length, 16), block_size=8)
            layer(torch.randn(1, length, 16), torch.zeros(1, 16, 4, dtype=torch.complex64), block_size=8)
    assert _tensor_bytes(layer) == baseline


def test_no_nan_when_the_decay_rounds_to_zero():
    """Issue 12 item 3: sigmoid(alpha) sigmoid(delta) rounds to 1 in fp32, so log|q| was -inf and q**0 NaN."""
    layer = CEMA(4, 2)
    with torch.no_grad():
        layer.alpha.fill_(30.0)
        layer.delta.fill_(30.0)
    x = torch.randn(2, 40, 4, requires_grad=True)
    y, h = layer(x, block_size=8, need_state=True)
    assert torch.isfinite(y).all() and torch.isfinite(torch.view_as_real(h)).all()
    y.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())
    reference_layer = CEMA(4, 2).double()
    reference_layer.load_state_dict(layer.state_dict())
    y_ref, _ = reference_layer(x.double(), block_size=8)  # |q| ~ 1e-13 in float64: y is p g u + omega u
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)


def test_log_decay_is_accurate_everywhere():
    values = torch.tensor([-40.0, -8.0, -1.0, 0.0, 0.3, 2.0, 9.0, 17.0, 40.0], dtype=torch.float64)
    alpha, delta = torch.meshgrid(values, values, indexing="ij")
    expected = torch.log1p(-torch.sigmoid(alpha) * torch.sigmoid(delta))
    both_large = (alpha > 30) & (delta > 30)  # float64's own product rounds to 1 there: exact log-space form
    exact = (torch.log(torch.exp(-alpha) + torch.exp(-delta) + torch.exp(-alpha - delta))
             - torch.log1p(torch.exp(-alpha)) - torch.log1p(torch.exp(-delta)))
    expected[both_large] = exact[both_large]
    got = log_decay(alpha.float(), delta.float()).double()
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=2e-6, atol=1e-30)


def test_data_edits_reach_the_outputs():
    """Issue 12 item 4: the coefficient cache was keyed on param._version, which `.data` edits do not bump."""
    layer = CEMA(8, 4).double().eval()
    x = torch.randn(2, 12, 8, dtype=torch.float64)
    with torch.no_grad():
        before, _ = layer(x, block_size=4)
        layer.alpha.data.mul_(3)
        after, _ = layer(x, block_size=4)
        fresh = CEMA(8, 4).double()
        fresh.load_state_dict(layer.state_dict())
        expected, _ = fresh(x, block_size=4)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, expected)
