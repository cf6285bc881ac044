"""torch.compile of the CEMA on CPU: one graph (fullgraph), no complex ops for Inductor to run eagerly, and the
same outputs and gradients as eager."""

import warnings

import pytest
import torch

from megalodon.layers.cema import CEMA
from megalodon.ops.cema import cema, cema_coefficients


@pytest.mark.slow
def test_compiled_cema_matches_eager_without_complex_ops():
    torch.manual_seed(0)
    layer = CEMA(8, 4)
    params = [p.detach() for p in (layer.alpha, layer.delta, layer.theta, layer.gamma, layer.omega)]
    u = torch.randn(2, 30, 8)
    h0 = torch.randn(2, 8, 4, 2)  # real pairs: the layer converts the complex state at its boundary
    reset = torch.tensor([[False, True], [True, False]])

    def fn(u, h0, alpha, delta, theta, gamma, omega):
        y, h = cema(u, cema_coefficients(alpha, delta, theta, gamma), omega.squeeze(-1), h0, 16, reset)
        return y.square().mean() + h.square().mean()

    def run(f):
        leaves = [t.clone().requires_grad_() for t in (u, h0, *params)]
        loss = f(*leaves)
        return [loss, *torch.autograd.grad(loss, leaves)]

    expected = run(fn)
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = run(torch.compile(fn, fullgraph=True))
    complex_warnings = [str(w.message) for w in caught if "complex" in str(w.message).lower()]
    assert not complex_warnings, complex_warnings
    for actual, wanted in zip(compiled, expected):
        torch.testing.assert_close(actual, wanted, rtol=1e-5, atol=1e-6)
