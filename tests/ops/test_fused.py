"""The memory-lean RMSNorm and SiLU-gated linear against their plain autograd references, in float64."""

import pytest
import torch

from megalodon.ops.fused import gated_linear, gated_linear_reference, rms_norm, rms_norm_reference


def leaves(*shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_() for s in shapes]


def grads_of(fn, inputs, seed=1):
    out = fn(*inputs)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return [out, *torch.autograd.grad((out * weight).sum(), [t for t in inputs if t is not None])]


@pytest.mark.parametrize("affine", [True, False])
def test_rms_norm_matches_reference_with_gradients(affine):
    x, weight = leaves((2, 5, 3, 8), (8,))
    weight = weight if affine else None
    inputs = [x] if weight is None else [x, weight]

    def fast(x, w=None):
        return rms_norm(x, w, 1e-5)

    def slow(x, w=None):
        return rms_norm_reference(x, w, 1e-5, torch.float64)

    for got, want in zip(grads_of(fast, inputs), grads_of(slow, inputs)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_rms_norm_keeps_only_its_input_and_one_scalar_per_row():
    x, weight = leaves((4, 6, 16), (16,))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = rms_norm(x, weight, 1e-5, torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert sum(t.numel() for t in saved if t is not weight) == x.numel() + 4 * 6


@pytest.mark.parametrize("with_x", [True, False])
def test_gated_linear_matches_reference_with_gradients(with_x):
    x, gate, weight = leaves((2, 7, 12), (2, 7, 12), (5, 12), seed=2)
    inputs = [x if with_x else None, gate, weight]
    got = grads_of(gated_linear, inputs)
    want = grads_of(gated_linear_reference, inputs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_gated_linear_keeps_its_inputs_only():
    x, gate, weight = leaves((3, 9, 12), (3, 9, 12), (5, 12), seed=3)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        gated_linear(x, gate, weight)
    assert {id(t) for t in saved} <= {id(x), id(gate), id(weight)}


def test_gated_linear_dropout_runs_the_reference_with_its_mask():
    x, gate, weight = leaves((2, 50, 12), (2, 50, 12), (5, 12), seed=4)
    torch.manual_seed(0)
    dropped = gated_linear(x, gate, weight, dropout_p=0.5, training=True)
    torch.manual_seed(0)
    torch.testing.assert_close(dropped, gated_linear_reference(x, gate, weight, 0.5, True))
    assert not torch.allclose(dropped, gated_linear(x, gate, weight))
    torch.testing.assert_close(gated_linear(x, gate, weight, dropout_p=0.5, training=False),
                               gated_linear(x, gate, weight))
