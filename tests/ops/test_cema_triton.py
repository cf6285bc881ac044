"""The CEMA's Triton path (ops/triton/cema.py), forward and backward, against the float64 recurrence and its
autograd gradients. Under the interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1 without a GPU), or on a
GPU when there is one; and compiled for an H100 (sm_90) wherever triton's NVIDIA backend can compile."""

import pytest
import torch
from helpers import requires_cuda
from sm90 import check_compiles_for_h100

from megalodon.layers.cema import CEMA
from megalodon.ops.cema import cema_coefficients, cema_decay, cema_sequential, cema_step, step_resets

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.cuda  # on a GPU every kernel test here runs on it
CHUNK = 16  # the kernels' chunk, small so that short sequences span several


def triton_scan(u, params, h0=None, block_reset=None, block=0, chunk=CHUNK):
    """The op on the CEMA layer's parameters: alpha, delta (D, N, 1), theta (D, 1, 1), gamma (D, N, 2), omega
    (D, 1), passed in the shapes the op takes (as ops/cema.py's cema_from_parameters does); restarts where
    block_reset (B, blocks) flags a block of `block` steps."""
    from megalodon.ops.triton.cema import cema_scan

    return cema_scan(u, *op_parameters(params), h0, block_reset, block, chunk)[:2]  # y and the final state


def op_parameters(params):
    alpha, delta, theta, gamma, omega = params
    dim, ndim = alpha.shape[:2]
    return alpha.view(dim, ndim), delta.view(dim, ndim), theta.view(dim), gamma, omega.view(dim)


def parameters(dim, ndim, seed):
    torch.manual_seed(seed)
    layer = CEMA(dim, ndim)
    with torch.no_grad():
        layer.gamma[..., 1].normal_()
    return [p.detach() for p in (layer.alpha, layer.delta, layer.theta, layer.gamma, layer.omega)]


def reference(u, params, h0, resets):
    """The recurrence step by step in complex128, with autograd: u (B, L, D), resets (B, L) or None."""
    alpha, delta, theta, gamma, omega = params
    coeffs = cema_coefficients(alpha, delta, theta, gamma)
    q, g = coeffs.q, coeffs.g
    h = torch.zeros(u.shape[0], *q.shape, dtype=q.dtype) if h0 is None else torch.view_as_complex(h0)
    outputs = []
    for t in range(u.shape[1]):
        if resets is not None:
            h = torch.where(resets[:, t, None, None], torch.zeros_like(h), h)
        h = coeffs.p * u[:, t, :, None] + q * h
        outputs.append((g * h).real.sum(-1) + omega.squeeze(-1) * u[:, t])
    return torch.stack(outputs, dim=1), torch.view_as_real(h)


def run_both(batch, length, dim, ndim, with_h0, block, seed=0, dtype=torch.float32, params=None, chunk=CHUNK):
    """Outputs and gradients of the Triton path (on DEVICE) and of the float64 reference, for the same inputs
    and the same random output gradients."""
    params = parameters(dim, ndim, seed) if params is None else params
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, length, dim, generator=g).to(dtype)
    h0 = torch.randn(batch, dim, ndim, 2, generator=g) if with_h0 else None
    resets = block_reset = None
    if block is not None:
        block_reset = torch.rand(batch, -(-length // block), generator=g) < 0.5
        block_reset[0, 0] = True
        resets = step_resets(block_reset, block, length)
    dy = torch.randn(batch, length, dim, generator=g, dtype=torch.float64)
    dh = torch.randn(batch, dim, ndim, 2, generator=g, dtype=torch.float64)

    def grads(inputs, y, h):
        return torch.autograd.grad((y * dy.to(y)).sum() + (h * dh.to(h)).sum(), [t for t in inputs if t is not None])

    ref_inputs = [t if t is None else t.double().requires_grad_() for t in (u, h0, *params)]
    y_ref, h_ref = reference(ref_inputs[0], ref_inputs[2:], ref_inputs[1], resets)
    dev_inputs = [t if t is None else t.to(DEVICE).requires_grad_() for t in (u, h0, *params)]
    u_dev, h0_dev, *params_dev = dev_inputs
    y, h = triton_scan(u_dev, params_dev, h0_dev, None if block_reset is None else block_reset.to(DEVICE), block or 0,
                       chunk)
    return (y, h, grads(dev_inputs, y, h)), (y_ref, h_ref, grads(ref_inputs, y_ref, h_ref))


def assert_close(actual, expected, tol):
    """Within tol of the reference, relative to the reference's largest entry."""
    scale = expected.abs().max().clamp(min=1e-6)
    torch.testing.assert_close(actual.double().cpu() / scale, expected / scale, rtol=0, atol=tol)


@pytest.mark.parametrize("batch, length, with_h0, block", [
    (2, 1, True, None), (2, 7, False, None), (2, 16, True, 8), (2, 33, True, 16), (2, 3 * CHUNK + 5, False, 8),
    (2, 2 * CHUNK, False, None),  # whole chunks: the kernels compiled without bounds on their steps (FULL)
    # more chunks than the scan takes in one tile (UNROLL = 8): a full tile and a partial one, and two full ones
    (1, 11 * CHUNK + 3, True, 24), (1, 16 * CHUNK, True, 32),
])
def test_forward_and_backward_match_the_recurrence(batch, length, with_h0, block):
    (y, h, grads), (y_ref, h_ref, grads_ref) = run_both(batch, length, 6, 4, with_h0, block)
    assert y.dtype == torch.float32 and h.shape == (batch, 6, 4, 2)
    assert_close(y, y_ref, 1e-5)
    assert_close(h, h_ref, 1e-5)  # the returned final state is the recurrence's last h
    for grad, expected in zip(grads, grads_ref):  # u, h0, alpha, delta, theta, gamma, omega
        assert_close(grad, expected, 2e-5)


@pytest.mark.parametrize("batch, length, with_h0, block", [(2, 2 * CHUNK + 8, True, 16), (1, 3 * CHUNK, False, None)])
def test_the_other_step_settings_match_the_recurrence(monkeypatch, batch, length, with_h0, block):
    """The step kernels' PREFETCH_FORWARD and PREFETCH_REVERSE, which a GPU sweep may set either way, each the
    other way round, and their registers capped (STEP_REGISTERS, which the GPU's tuning may set: on a GPU the
    kernels then spill): a partial last chunk with resets and an incoming state, and whole chunks (FULL)."""
    from megalodon.ops.triton import cema as glue

    monkeypatch.setattr(glue, "PREFETCH_FORWARD", not glue.PREFETCH_FORWARD)
    monkeypatch.setattr(glue, "PREFETCH_REVERSE", not glue.PREFETCH_REVERSE)
    monkeypatch.setattr(glue, "STEP_REGISTERS", 128 if glue.STEP_REGISTERS is None else None)
    (y, h, grads), (y_ref, h_ref, grads_ref) = run_both(batch, length, 6, 4, with_h0, block)
    assert_close(y, y_ref, 1e-5)
    assert_close(h, h_ref, 1e-5)
    for grad, expected in zip(grads, grads_ref):
        assert_close(grad, expected, 2e-5)


@pytest.mark.parametrize("batch, length, with_h0, block, dtype, dim, ndim", [
    (2, 7, False, None, torch.float32, 6, 4), (2, 3 * CHUNK + 5, True, 8, torch.float32, 6, 4),
    (2, 2 * CHUNK, True, None, torch.float32, 6, 4),  # whole chunks (FULL)
    (1, 11 * CHUNK + 3, True, 24, torch.float32, 6, 4), (2, 2 * CHUNK + 8, False, 16, torch.bfloat16, 6, 4),
    # several channel blocks, the last partial, and N = 16 (the steps' tile is the states' own shape)
    (1, 2 * CHUNK + 3, True, 16, torch.float32, 20, 16),
])
def test_the_fused_backward_matches_the_recurrence(monkeypatch, batch, length, with_h0, block, dtype, dim, ndim):
    """FUSED_BACKWARD (one reverse pass for the input's and the parameters' gradients, which the GPU's tuning may
    pick): partial last chunks, restarts inside and at the edges of chunks, an incoming state, and a bf16 input
    whose gradient comes back in bf16."""
    from megalodon.ops.triton import cema as glue

    monkeypatch.setattr(glue, "FUSED_BACKWARD", not glue.FUSED_BACKWARD)
    (y, h, grads), (y_ref, h_ref, grads_ref) = run_both(batch, length, dim, ndim, with_h0, block, dtype=dtype)
    assert grads[0].dtype == dtype
    for grad, expected in zip(grads, grads_ref):  # u, h0, alpha, delta, theta, gamma, omega
        assert_close(grad, expected, 2e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("chunk, length, block", [(48, 2 * 48 + 19, 16), (128, 2 * 128, None)])
def test_the_chunk_lengths_the_tuning_tries_match_the_recurrence(chunk, length, block):
    """gpu_tuning.py times chunks of 96 and 128 steps (one wave of programs at 4K on an H200): a chunk that is not a
    power of two with a partial last one and resets, and whole chunks of 128 (FULL)."""
    (y, h, grads), (y_ref, h_ref, grads_ref) = run_both(2, length, 6, 4, True, block, chunk=chunk)
    assert_close(y, y_ref, 1e-5)
    assert_close(h, h_ref, 1e-5)
    for grad, expected in zip(grads, grads_ref):
        assert_close(grad, expected, 2e-5)


@pytest.mark.parametrize("batch, length, with_h0, block, dtype, dim, ndim, fused", [
    (2, 2 * CHUNK, False, None, torch.float32, 6, 4, False),
    (3, 5 * CHUNK, True, CHUNK, torch.float32, 6, 4, False),  # restarts at chunk starts; rows across the batch
    (1, 4 * CHUNK, True, 2 * CHUNK, torch.bfloat16, 6, 4, False),
    (2, 3 * CHUNK, True, CHUNK, torch.float32, 20, 16, False),  # several channel blocks, the last partial; N = 16
    (2, 3 * CHUNK, True, CHUNK, torch.float32, 6, 4, True),  # feeding the fused backward
    (2, 9 * CHUNK, True, 3 * CHUNK, torch.float32, 6, 4, False),  # more rows (B x chunks) than a tile's 16
    (2, 9 * CHUNK, True, 3 * CHUNK, torch.float32, 6, 4, None),  # ... and a tile a program: two programs of rows
])
def test_the_matrix_form_matches_the_recurrence(monkeypatch, batch, length, with_h0, block, dtype, dim, ndim, fused):
    """MATRIX_FORM (phases 1 and 3 as matrix products over sub-blocks of 16 steps, cema_matrix), which the GPU's
    tuning may pick, forward and adjoint: restarts at chunk starts, an incoming state, bf16 input, channels and
    components that do not fill its tiles, rows over one program's tiles or several programs, and with the fused
    backward. fused None: the two-pass backward, one tile of rows a program."""
    from megalodon.ops.triton import cema as glue

    monkeypatch.setattr(glue, "MATRIX_FORM", True)
    monkeypatch.setattr(glue, "FUSED_BACKWARD", bool(fused))
    if fused is None:
        monkeypatch.setattr(glue, "MATRIX_ROW_TILES", 1)
    launches = []
    products = glue._products
    monkeypatch.setattr(glue, "_products", lambda *args, **kwargs: launches.append(kwargs) or products(*args, **kwargs))
    (y, h, grads), (y_ref, h_ref, grads_ref) = run_both(batch, length, dim, ndim, with_h0, block, dtype=dtype)
    assert len(launches) == (3 if fused else 4)  # phases 1 and 3, forward and adjoint (fused: its own outputs)
    assert_close(y, y_ref, 1e-5)
    assert_close(h, h_ref, 1e-5)
    for grad, expected in zip(grads, grads_ref):  # u, h0, alpha, delta, theta, gamma, omega
        assert_close(grad, expected, 2e-5 if dtype == torch.float32 else 1e-2)


class LaunchCounter:
    """Stands in for a Triton kernel: counts its launches and runs it."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@pytest.mark.parametrize("batch, length, with_h0, block, dtype, dim, ndim, forward", [
    (2, 2 * CHUNK, False, None, torch.float32, 6, 4, False),
    (3, 5 * CHUNK, True, CHUNK, torch.float32, 6, 4, True),  # restarts at chunk starts; rows across the batch
    (1, 4 * CHUNK, True, 2 * CHUNK, torch.bfloat16, 6, 4, False),  # du comes back in bf16
    (2, 3 * CHUNK, True, CHUNK, torch.float32, 20, 16, True),  # several channel blocks, the last partial; N = 16
    (2, 9 * CHUNK, True, 3 * CHUNK, torch.float32, 6, 4, False),  # more rows than a tile's: two tiles
    (2, 9 * CHUNK, True, 3 * CHUNK, torch.float32, 6, 4, None),  # ... and a tile a program: two programs' sums
])
def test_the_matrix_backward_matches_the_recurrence(monkeypatch, batch, length, with_h0, block, dtype, dim, ndim,
                                                    forward):
    """MATRIX_BACKWARD (dL/du and the parameters' sums as matrix products in one reverse pass over each chunk's
    sub-blocks, cema_matrix.matrix_grads_kernel), which the GPU's tuning may pick, with the forward's chunk runs as
    matrix products or as steps: every gradient against float64's. forward None: steps, one tile of rows a
    program."""
    from megalodon.ops.triton import cema as glue
    from megalodon.ops.triton import cema_matrix

    monkeypatch.setattr(glue, "MATRIX_BACKWARD", True)
    monkeypatch.setattr(glue, "MATRIX_FORM", bool(forward))
    if forward is None:
        monkeypatch.setattr(glue, "MATRIX_ROW_TILES", 1)
    counter = LaunchCounter(cema_matrix.matrix_grads_kernel)
    monkeypatch.setattr(cema_matrix, "matrix_grads_kernel", counter)
    (y, h, grads), (y_ref, h_ref, grads_ref) = run_both(batch, length, dim, ndim, with_h0, block, dtype=dtype)
    assert counter.launches == 1
    assert grads[0].dtype == dtype
    assert_close(y, y_ref, 1e-5)
    for grad, expected in zip(grads, grads_ref):  # u, h0, alpha, delta, theta, gamma, omega
        assert_close(grad, expected, 2e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("length, block", [(2 * CHUNK + 5, None), (3 * CHUNK, CHUNK // 2)])
def test_the_matrix_form_leaves_other_runs_to_the_step_kernels(monkeypatch, length, block):
    """A partial last chunk, or restarts inside chunks: MATRIX_FORM and MATRIX_BACKWARD set, the step kernels run,
    and the results hold."""
    from megalodon.ops.triton import cema as glue
    from megalodon.ops.triton import cema_matrix

    monkeypatch.setattr(glue, "MATRIX_FORM", True)
    monkeypatch.setattr(glue, "MATRIX_BACKWARD", True)
    monkeypatch.setattr(glue, "_products", lambda *args, **kwargs: pytest.fail("the matrix form ran"))
    monkeypatch.setattr(cema_matrix, "matrix_grads_kernel", None)  # launching it would fail
    (y, h, grads), (y_ref, h_ref, grads_ref) = run_both(2, length, 6, 4, True, block)
    assert_close(y, y_ref, 1e-5)
    for grad, expected in zip(grads, grads_ref):
        assert_close(grad, expected, 2e-5)


def test_split_calls_equal_one_call():
    """Consecutive calls that carry the state equal one call, at cuts inside and on chunk boundaries."""
    params = [p.to(DEVICE) for p in parameters(6, 4, 2)]
    u = torch.randn(2, 45, 6, device=DEVICE)
    y_full, h_full = triton_scan(u, params)
    h, parts = None, []
    for start, stop in [(0, 7), (7, 32), (32, 45)]:
        y, h = triton_scan(u[:, start:stop], params, h)
        parts.append(y)
    torch.testing.assert_close(torch.cat(parts, 1), y_full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, h_full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("matrix", [False, True], ids=["steps", "matrix"])
def test_coefficients_from_extreme_parameters(monkeypatch, matrix):
    """The kernels derive the coefficients themselves: |q| near 1 (log1p of a tiny x), near 0 (the log-space
    branch where sigmoid(alpha) sigmoid(delta) > 1/2), in between, and phases over the whole range, with the
    gradients of each parameter against float64 autograd through cema_coefficients; the step kernels, and the
    matrix products forward and backward (whose powers reach q**16)."""
    from megalodon.ops.triton import cema as glue

    monkeypatch.setattr(glue, "MATRIX_FORM", matrix)
    monkeypatch.setattr(glue, "MATRIX_BACKWARD", matrix)
    alpha, delta, theta, gamma, omega = parameters(8, 4, seed=5)
    with torch.no_grad():
        alpha.copy_(torch.tensor([-12.0, -4.0, 0.0, 4.0, 9.0, 2.0, -1.0, 6.0]).view(8, 1, 1).expand(8, 4, 1))
        delta.copy_(torch.tensor([-9.0, 3.0, 0.5, 5.0, 8.0, -2.0, 12.0, 1.0]).view(8, 1, 1).expand(8, 4, 1))
        theta.copy_(torch.linspace(-6.0, 6.0, 8).view(8, 1, 1))
    length, block = (48, 16) if matrix else (40, 8)  # whole chunks, restarts at their starts, for the products
    (y, h, grads), (y_ref, h_ref, grads_ref) = run_both(2, length, 8, 4, True, block,
                                                        params=[alpha, delta, theta, gamma, omega])
    assert_close(y, y_ref, 1e-5)
    assert_close(h, h_ref, 1e-5)
    # d theta sums the phase gradient over every step of long-lived states: in fp32 about 5e-5 of its largest
    # entry here, the same for the plain fp32 recurrence under autograd
    for grad, expected, tolerance in zip(grads, grads_ref, [2e-5] * 4 + [1e-4] + [2e-5] * 2):
        assert_close(grad, expected, tolerance)


def test_channels_and_components_that_do_not_fill_a_tile():
    """D = 40 spans two channel blocks of 32; N = 3 is padded to 4 in registers."""
    (y, h, grads), (y_ref, h_ref, grads_ref) = run_both(1, 21, 40, 3, True, None, seed=1)
    assert_close(y, y_ref, 1e-5)
    assert_close(h, h_ref, 1e-5)
    for grad, expected in zip(grads, grads_ref):
        assert_close(grad, expected, 2e-5)


def test_bf16_input_is_upcast_in_the_kernel():
    (y, h, grads), (y_ref, h_ref, grads_ref) = run_both(2, 20, 6, 4, True, None, dtype=torch.bfloat16)
    assert y.dtype == torch.float32 and grads[0].dtype == torch.bfloat16
    assert_close(y, y_ref, 1e-5)  # the reference sees the same bf16-rounded input, in float64
    assert_close(grads[0], grads_ref[0], 1e-2)  # du is rounded to bf16 on the way out
    for grad, expected in zip(grads[1:], grads_ref[1:]):
        assert_close(grad, expected, 2e-5)


def test_backward_reuses_the_forwards_chunk_states():
    """The states entering each chunk and the coefficient tables that forward returns (and autograd saves) give
    backward exactly what backward computes again without them, resets and an initial state included."""
    from megalodon.ops.triton.cema import cema_scan, cema_scan_backward

    params = op_parameters(parameters(8, 4, 3))
    params = [t.to(DEVICE) for t in params]
    u = torch.randn(2, 37, 8, device=DEVICE)
    h0 = torch.randn(2, 8, 4, 2, device=DEVICE)
    block_reset = torch.tensor([[False, False, False], [False, True, False]], device=DEVICE)  # blocks of 13 steps
    resets = (block_reset, 13)
    _, _, incoming, tables, kappa = cema_scan(u, *params, h0, *resets, CHUNK)
    assert incoming.shape == (2, 3, 2, 4, 8) and kappa.shape == (8,) and tables.shape[1:] == (4, 8)
    dy, dh = torch.randn(2, 37, 8, device=DEVICE), torch.randn(2, 8, 4, 2, device=DEVICE)
    again = cema_scan_backward(dy, dh, u, *params, h0, *resets, CHUNK)
    for saved in ((incoming,), (incoming, tables, kappa)):
        reused = cema_scan_backward(dy, dh, u, *params, h0, *resets, CHUNK, *saved)
        for a, b in zip(reused, again):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_op_registration_fake_and_autograd():
    """torch.library.opcheck: schema, fake tensors, autograd registration, and AOT dispatch as compile uses it."""
    from megalodon.ops.triton.cema import cema_scan

    params = [t.detach().clone().requires_grad_() for t in op_parameters(parameters(4, 2, 0))]
    u = torch.randn(2, 5, 4, device=DEVICE, requires_grad=True)
    h0 = torch.randn(2, 4, 2, 2, device=DEVICE, requires_grad=True)
    block_reset = torch.tensor([[False, False, False], [False, True, False]], device=DEVICE)  # blocks of 2 steps
    torch.library.opcheck(cema_scan.op, (u, *(t.to(DEVICE) for t in params), h0, block_reset, 2, CHUNK))


def test_compiled_graph_holds_the_op():
    """fullgraph=True: no graph break around the custom op, and the same numbers as eager."""
    params = [p.to(DEVICE) for p in parameters(4, 2, 0)]
    u = torch.randn(2, 19, 4, device=DEVICE)

    def fn(u, *params):
        y, h = triton_scan(u, params)
        return y.square().sum() + h.square().sum()

    leaves = [t.clone().requires_grad_() for t in (u, *params)]
    eager = fn(*leaves)
    eager_grads = torch.autograd.grad(eager, leaves)
    leaves = [t.clone().requires_grad_() for t in (u, *params)]
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(*leaves)
    compiled_grads = torch.autograd.grad(compiled, leaves)
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b)


def test_bad_chunk_is_refused():
    params = parameters(4, 2, 0)
    with pytest.raises(ValueError, match="multiple of 16"):
        triton_scan(torch.randn(1, 5, 4), params, chunk=24)


@pytest.mark.parametrize("in_place", [True, False])
def test_the_decode_step_kernel_equals_the_recurrence(in_place):
    """One token per row through the step kernel (70 channels: a partial block; N = 5: a partial tile), against
    one step of the float64 recurrence and the PyTorch step; in place (out is h, as decoding runs it) or not."""
    from megalodon.ops.triton.cema_step import cema_step_kernel

    alpha, delta, theta, gamma, omega = parameters(70, 5, seed=3)
    coeffs = cema_coefficients(alpha, delta, theta, gamma)
    omega = omega.squeeze(-1).contiguous()
    u = torch.randn(3, 70)
    h = torch.randn(3, 70, 5, 2)
    expected_y, expected_h = cema_sequential(u.double()[..., None], cema_coefficients(
        *(t.double() for t in (alpha, delta, theta, gamma))), omega.double(), torch.view_as_complex(h.double()))
    torch_y, torch_h = cema_step(u, coeffs, omega, h.clone())
    state = h.clone().to(DEVICE)
    out = state if in_place else torch.empty_like(state)
    on_device = [t.to(DEVICE).contiguous() for t in (coeffs.p, *cema_decay(coeffs), coeffs.g_re, coeffs.g_im, omega)]
    y = cema_step_kernel(u.to(DEVICE), state, out, *on_device).cpu()
    torch.testing.assert_close(y.double(), expected_y[..., 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.view_as_complex(out.cpu()).to(torch.complex128), expected_h, rtol=1e-5,
                               atol=1e-5)
    torch.testing.assert_close(y, torch_y, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.cpu(), torch_h, rtol=1e-6, atol=1e-6)
    if not in_place:
        assert torch.equal(state.cpu(), h)  # the old state is read, never written


@requires_cuda
def test_cuda_decode_step_runs_the_kernel_in_place(monkeypatch):
    """On CUDA, cema_step (as the decode step calls it: out is h) takes the kernel; MEGALODON_DISABLE_TRITON
    gives the PyTorch path, and the two agree."""
    from megalodon.ops.triton import cema_step as step_module

    alpha, delta, theta, gamma, omega = (t.cuda() for t in parameters(70, 5, seed=4))
    coeffs = cema_coefficients(alpha, delta, theta, gamma)
    omega = omega.squeeze(-1).contiguous()
    u, h = torch.randn(3, 70, device="cuda"), torch.randn(3, 70, 5, 2, device="cuda")
    calls = []
    kernel = step_module.cema_step_kernel
    monkeypatch.setattr(step_module, "cema_step_kernel", lambda *args: calls.append(1) or kernel(*args))
    fast_h = h.clone()
    fast_y, _ = cema_step(u, coeffs, omega, fast_h, out=fast_h)
    monkeypatch.setenv("MEGALODON_DISABLE_TRITON", "cema_step")
    slow_h = h.clone()
    slow_y, _ = cema_step(u, coeffs, omega, slow_h, out=slow_h)
    assert calls == [1]
    torch.testing.assert_close(fast_y, slow_y, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fast_h, slow_h, rtol=1e-6, atol=1e-6)


COMPILE_FOR_H100 = """
from megalodon.ops.triton import cema as glue
from megalodon.ops.triton import cema_kernels as kernels
from megalodon.ops.triton import cema_tables as tables
from megalodon.ops.triton import cema_step as step
from megalodon.ops.triton import cema_backward as fused
from megalodon.ops.triton import cema_matrix as products

warps = {"scan_kernel": glue.WARPS_SCAN, "parameter_grads_kernel": glue.WARPS_GRADS,
         "adjoint_grads_kernel": glue.WARPS_FUSED,
         "tables_kernel": glue.WARPS_TABLES, "gradients_kernel": glue.WARPS_TABLES}
fp32, ints = "*fp32", ["i32"] * 4  # L, D, N, num_chunks
x = ["*bf16", "i32", "i32", "i32", "*u8"]  # a bf16 input with its strides, the reset flags
shapes = dict(CHUNK=glue.CHUNK, BLOCK_D=glue.BLOCK_D, BLOCK_N=16, UNROLL=glue.UNROLL, BLOCK_SIZE=2048)
# Each constexpr flag compiles different code: every branch appears at least once (8 compiles, not all 34).
CASES = []
for reverse in (False, True):
    flags = dict(shapes, REVERSE=reverse, HAS_RESET=True, FULL=reverse, REAL_IN=not reverse, PREFETCH=reverse)
    CASES.append((kernels.local_states_kernel, x + [fp32] * 5 + ints + ["i32", fp32], flags))  # blocks, keep
    CASES.append((kernels.outputs_kernel, x + [fp32] * 8 + ["*bf16" if reverse else fp32] + ints + ["i32"],
                  dict(flags, REAL_OUT=reverse)))
    CASES.append((kernels.scan_kernel, [fp32] * 7 + ints, dict(CHUNK=glue.CHUNK, BLOCK_D=glue.BLOCK_D,
                                                                 UNROLL=glue.UNROLL, REVERSE=reverse,
                                                                 HAS_RESET=reverse, HAS_H0=reverse)))
    CASES.append((fused.parameter_grads_kernel, x[:4] + [fp32, "*u8"] + [fp32] * 9 + ints + ["i32"],
                  dict(shapes, HAS_RESET=reverse, FULL=not reverse)))
    CASES.append((fused.adjoint_grads_kernel,
                  x[:4] + [fp32, "*u8"] + [fp32] * 8 + ["*bf16", fp32, fp32] + ints + ["i32"],
                  dict(shapes, BLOCK_D=glue.FUSED_BLOCK_D, TILE=16, HAS_RESET=reverse, FULL=not reverse)))
blocks = dict(BLOCK_D=glue.BLOCK_D, BLOCK_N=16)
CASES.append((tables.tables_kernel, [fp32] * 7 + ["i32", "i32"], blocks))
CASES.append((tables.gradients_kernel, [fp32] * 11 + ["i32"] * 3,
              dict(BLOCK_D=glue.GRADIENTS_BLOCK_D, BLOCK_N=16, ROWS=glue.GRADIENTS_ROWS)))
# the matrix form: "ieee" first, as the T4 and the MI300X compile each kernel's first case (ROCm's Triton has no
# "tf32x3"); then its four variants as an H100 runs them
matrix = x[:2] + x[3:] + [fp32] * 9
variants = [("ieee", True, False)] + [("tf32x3", o, r) for o in (False, True) for r in (False, True)]
for precision, outputs, reverse in variants:
    CASES.append((products.chunk_products_kernel, matrix + ["*bf16" if outputs and reverse else fp32] + ["i32"] * 6,
                  dict(CHUNK=glue.CHUNK, BLOCK_D=glue.MATRIX_BLOCK_D, BLOCK_N=16, BLOCK_ROWS=glue.MATRIX_ROWS,
                       REVERSE=reverse, HAS_RESET=True, REAL_IN=not reverse, REAL_OUT=reverse, OUTPUTS=outputs,
                       BLOCK_SIZE=2048, PRECISION=precision, SUB=products.SUB, ROW_TILES=glue.MATRIX_ROW_TILES,
                       stride_xd=1)))
grads = ["*bf16", "i32", "i32", fp32, "*u8"] + [fp32] * 8 + ["*bf16", fp32, fp32] + ["i32"] * 6
for precision, reset in [("ieee", False), ("tf32x3", True)]:
    CASES.append((products.matrix_grads_kernel, grads,
                  dict(CHUNK=glue.CHUNK, BLOCK_D=glue.MATRIX_GRADS_BLOCK_D, BLOCK_N=16, BLOCK_ROWS=glue.MATRIX_ROWS,
                       HAS_RESET=reset, BLOCK_SIZE=2048, PRECISION=precision, SUB=products.SUB,
                       ROW_TILES=glue.MATRIX_ROW_TILES, stride_ud=1)))
warps.update(chunk_products_kernel=glue.WARPS_MATRIX, matrix_grads_kernel=glue.WARPS_MATRIX_GRADS)
CASES = [(fn, types, constexprs, warps.get(fn.__name__, glue.WARPS_STEPS)) for fn, types, constexprs in CASES]
CASES.append((step._cema_step_kernel, [fp32] * 10 + ["i32", "i32"], dict(BLOCK_D=step.BLOCK_D, BLOCK_N=16)))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the other kernel tests compile and run them")
def test_kernels_compile_for_h100():
    """Every kernel variant compiles to an sm_90 cubin (no GPU needed: triton ships ptxas), so that a kernel the
    interpreter accepts but the compiler rejects is caught on CPU (tests/sm90.py)."""
    check_compiles_for_h100(COMPILE_FOR_H100)


IN_THREAD_ON_H100 = """
from megalodon.ops.triton import cema as glue
from megalodon.ops.triton import cema_backward as grads
from megalodon.ops.triton import cema_kernels as kernels

fp32, ints, unit = "*fp32", ["i32"] * 4, dict(stride_xd=1, stride_ud=1)  # the launcher makes a unit stride constant
x = ["*bf16", "i32", "i32", "*u8"]  # u (B, L, D) bf16 with its batch and time strides, the reset flags
shapes = dict(CHUNK=glue.CHUNK, BLOCK_D=glue.BLOCK_D, BLOCK_N=16, UNROLL=glue.UNROLL, BLOCK_SIZE=2048)
CASES = []
# prefetch as each direction runs it in every variant; the other setting, which the GPU sweep may pick, too
default = {False: glue.PREFETCH_FORWARD, True: glue.PREFETCH_REVERSE}
for reverse, reset, prefetch in [(r, s, default[r]) for r in (False, True) for s in (False, True)] + [
        (r, False, not default[r]) for r in (False, True)]:
    flags = dict(shapes, REVERSE=reverse, HAS_RESET=reset, FULL=not reset, REAL_IN=not reverse,
                 PREFETCH=prefetch, stride_xd=1)
    CASES.append((kernels.local_states_kernel, x + [fp32] * 5 + ints + ["i32", fp32], flags, glue.WARPS_STEPS))
    CASES.append((kernels.outputs_kernel, x + [fp32] * 8 + ["*bf16" if reverse else fp32] + ints + ["i32"],
                  dict(flags, REAL_OUT=reverse), glue.WARPS_STEPS))
    if prefetch == default[reverse]:
        CASES.append((kernels.scan_kernel, [fp32] * 7 + ints,
                      dict(CHUNK=glue.CHUNK, BLOCK_D=glue.BLOCK_D, UNROLL=glue.UNROLL, REVERSE=reverse,
                           HAS_RESET=reset, HAS_H0=reset), glue.WARPS_SCAN))
    if not reset and prefetch == default[reverse]:
        CASES.append((grads.parameter_grads_kernel, x[:3] + [fp32, "*u8"] + [fp32] * 9 + ints + ["i32"],
                      dict(shapes, HAS_RESET=reverse, FULL=not reverse, stride_ud=1),
                      glue.WARPS_GRADS))
"""


WARP_LOCAL_ON_H100 = """
from megalodon.ops.triton import cema as glue
from megalodon.ops.triton import cema_backward as fused

fp32, ints = "*fp32", ["i32"] * 4
shapes = dict(CHUNK=glue.CHUNK, BLOCK_D=glue.FUSED_BLOCK_D, BLOCK_N=16, UNROLL=glue.UNROLL, TILE=16, stride_ud=1,
              BLOCK_SIZE=2048)
CASES = [(fused.adjoint_grads_kernel,
          ["*bf16", "i32", "i32", fp32, "*u8"] + [fp32] * 8 + ["*bf16", fp32, fp32] + ints + ["i32"],
          dict(shapes, HAS_RESET=reset, FULL=not reset), glue.WARPS_FUSED) for reset in (False, True)]
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the other kernel tests compile and run them")
def test_fused_backward_sums_the_components_inside_a_warp_as_launched():
    """The fused backward kernel at mega200M (N = 16), compiled as launched: each step's sum over a channel's
    components is shuffles inside a warp, with no barrier or shared memory (at 4 warps it took both every step)."""
    check_compiles_for_h100(WARP_LOCAL_ON_H100, check="assert_warp_local")


MATRIX_ON_H100 = """
from megalodon.ops.triton import cema as glue
from megalodon.ops.triton import cema_matrix as products

fp32 = "*fp32"
matrix = ["*bf16", "i32", "i32", "*u8"] + [fp32] * 9
CASES = [(products.chunk_products_kernel, matrix + ["*bf16" if outputs else fp32] + ["i32"] * 6,
          dict(CHUNK=glue.CHUNK, BLOCK_D=glue.MATRIX_BLOCK_D, BLOCK_N=16, BLOCK_ROWS=glue.MATRIX_ROWS, REVERSE=True,
               HAS_RESET=True, REAL_IN=False, REAL_OUT=True, OUTPUTS=outputs, BLOCK_SIZE=2048, PRECISION="tf32x3",
               SUB=products.SUB, ROW_TILES=glue.MATRIX_ROW_TILES, stride_xd=1), glue.WARPS_MATRIX)
         for outputs in (False, True)]
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the other kernel tests compile and run them")
def test_matrix_form_keeps_to_registers_as_launched():
    """The chunk runs as matrix products at their default tiling, compiled as launched at mega200M (the adjoint's
    runs, the larger), spill nothing: at 8 channels a program they spilled 680 bytes a thread."""
    check_compiles_for_h100(MATRIX_ON_H100, check="assert_no_spill")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the other kernel tests compile and run them")
def test_step_kernels_keep_each_channel_in_one_thread_as_launched():
    """The per-step kernels, compiled as the launcher specializes them at mega200M (D = 1024 and the strides
    divisible by 16, a unit channel stride), keep a channel's components and steps in one thread: no barrier,
    shuffle or shared memory anywhere (specializing D had put N across 4 threads, with all three every step)."""
    check_compiles_for_h100(IN_THREAD_ON_H100, check="assert_in_thread")


@requires_cuda
@pytest.mark.parametrize("settings", ["as-set", "flipped", "matrix-flipped"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_layer_matches_the_pytorch_path(monkeypatch, dtype, settings):
    """On a GPU the layer dispatches to Triton: outputs, state and gradients as the float64 PyTorch path's; with
    the step kernels' prefetch as set and each direction flipped, the backward fused or not the other way round,
    and the chunk runs and the backward as matrix products or not the other way round (the tuning may pick any of
    them; 384 steps, whole chunks, for the matrix form to run)."""
    from megalodon.ops.triton import cema as glue

    if settings == "flipped":
        monkeypatch.setattr(glue, "PREFETCH_FORWARD", not glue.PREFETCH_FORWARD)
        monkeypatch.setattr(glue, "PREFETCH_REVERSE", not glue.PREFETCH_REVERSE)
        monkeypatch.setattr(glue, "FUSED_BACKWARD", not glue.FUSED_BACKWARD)
    if settings == "matrix-flipped":
        monkeypatch.setattr(glue, "MATRIX_FORM", not glue.MATRIX_FORM)
        monkeypatch.setattr(glue, "MATRIX_BACKWARD", not glue.MATRIX_BACKWARD)
    torch.manual_seed(0)
    layer = CEMA(64, 16).cuda()
    reference_layer = CEMA(64, 16).double()
    reference_layer.load_state_dict(layer.state_dict())
    x = torch.randn(3, 384 if settings == "matrix-flipped" else 300, 64).to(dtype)
    h0 = torch.randn(3, 64, 16, dtype=torch.complex64)
    reset = torch.rand(3, 3) < 0.5

    def run(module, x, h0, reset):
        x = x.detach().requires_grad_()
        y, h = module(x, h0, 128, reset, need_state=True)
        loss = y.square().sum() + torch.view_as_real(h).square().sum()
        return [y, torch.view_as_real(h), *torch.autograd.grad(loss, [x, *module.parameters()])]

    results = run(layer, x.cuda(), h0.cuda(), reset.cuda())
    expected = run(reference_layer, x.double(), h0.to(torch.complex128), reset)
    for actual, wanted in zip(results, expected):
        assert_close(actual, wanted.detach(), 1e-2 if actual.dtype == torch.bfloat16 else 1e-4)
