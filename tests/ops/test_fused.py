"""The memory-lean RMSNorm and SiLU-gated linear against their plain autograd references, in float64; and the
RMSNorm on torch's fused kernel (F.rms_norm), which CUDA runs."""

import pytest
import torch
from helpers import force_fused_rms_norm, requires_cuda, saved_bytes

from megalodon.baseline import llama
from megalodon.ops import fused
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


@pytest.mark.parametrize("weight_as", ["weight", "scale", None])
def test_rms_norm_on_torch_kernel_matches_reference_with_gradients(monkeypatch, weight_as):
    force_fused_rms_norm(monkeypatch)
    x, weight = leaves((2, 5, 3, 8), (8,), seed=5)
    inputs = [x] if weight_as is None else [x, weight]

    def fast(x, w=None):
        if weight_as == "scale":
            return rms_norm(x, None, 1e-5, scale=w + 1.0)
        return rms_norm(x, w, 1e-5)

    def slow(x, w=None):
        return rms_norm_reference(x, w, 1e-5, torch.float64)

    for got, want in zip(grads_of(fast, inputs), grads_of(slow, inputs)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_on_torch_kernel_keeps_fp32_statistics_and_casts_last(monkeypatch, out_dtype, affine):
    x, weight = leaves((3, 4, 16), (16,), seed=6)
    x = (x * 100).to(torch.bfloat16).detach()  # a bf16 input is normalized in fp32, as on the other path
    weight = weight.float() if affine else None
    want = rms_norm(x, weight, 1e-5, out_dtype)
    force_fused_rms_norm(monkeypatch)
    got = rms_norm(x, weight, 1e-5, out_dtype)
    assert got.dtype == out_dtype
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_llama_norm_on_torch_kernel_matches_its_own(monkeypatch, dtype):
    torch.manual_seed(7)
    norm = llama.RMSNorm(8, 1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.2)
    x = torch.randn(2, 5, 8, dtype=dtype, requires_grad=True)
    want = grads_of(norm, [x])
    force_fused_rms_norm(monkeypatch)
    tolerance = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-2, atol=1e-2)
    for got, expected in zip(grads_of(norm, [x]), want):
        assert got.dtype == expected.dtype
        torch.testing.assert_close(got, expected, **tolerance)


@requires_cuda
def test_rms_norm_on_cuda_of_a_bf16_input_keeps_fp32_statistics():
    x = (torch.randn(4, 64, 256, device="cuda") * 100).bfloat16()
    want = rms_norm_reference(x.double(), None, 1e-5, torch.float64).bfloat16()
    torch.testing.assert_close(rms_norm(x, None, 1e-5, torch.bfloat16), want, rtol=2 ** -8, atol=0)  # 1 bf16 step


@requires_cuda
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_rms_norm_on_cuda_in_training(monkeypatch, out_dtype, kernels):
    """On a GPU, torch's fused kernel (where the Triton row-norm is off, as in a compiled graph) and the Triton
    row-norm, each against the float64 reference, gradients included, keeping only x and one scalar per row."""
    assert "cuda" in fused.FUSED_RMS_NORM_DEVICES, "this torch has no fused RMSNorm kernel for CUDA"
    if kernels == "torch":
        monkeypatch.setattr(fused, "use_triton", lambda op, *tensors: op != "norm_rows")
    x, weight = (t.detach().cuda().float().requires_grad_() for t in leaves((4, 64, 256), (256,), seed=8))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = rms_norm(x, weight, 1e-5, out_dtype)
    assert out.dtype == out_dtype
    assert sum(t.numel() for t in saved if t.dim() > 1) == x.numel() + 4 * 64
    got = [out, *torch.autograd.grad(out.float().square().sum(), [x, weight])]
    x64, w64 = (t.detach().double().requires_grad_() for t in (x, weight))
    ref = rms_norm_reference(x64, w64, 1e-5, torch.float64)
    want = [ref, *torch.autograd.grad(ref.square().sum(), [x64, w64])]
    tolerance = 1e-5 if out_dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got[0].double(), want[0], rtol=tolerance, atol=tolerance)
    # bf16: the gradients inherit the output's rounding (d/dout of out^2 is 2 out), which a row's sums through
    # the norm's Jacobian spread: two bf16 steps of each gradient's scale
    tolerance = 1e-5 if out_dtype == torch.float32 else 2 ** -7
    for a, b in zip(got[1:], want[1:]):
        torch.testing.assert_close(a.double(), b, rtol=tolerance, atol=tolerance * b.abs().max().item())


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


@pytest.mark.parametrize("with_x", [True, False])
def test_compiled_gated_linear_keeps_its_inputs_only(with_x):
    """torch.compile holds the gated linear as one node (an OpaqueOp) with its own backward: a compiled graph keeps
    as many bytes as eager (the inputs), where the partitioner, tracing through, kept the product and the gate
    too; and computes what eager computes, gradients included."""
    x, gate, weight = leaves((2, 16, 12), (2, 16, 12), (5, 12), seed=5)
    inputs = [x if with_x else None, gate, weight]
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: gated_linear(*a) * 2, fullgraph=True)
    input_bytes = sum(t.untyped_storage().nbytes() for t in inputs if t is not None)
    assert saved_bytes(gated_linear, *inputs) == saved_bytes(compiled, *inputs) == input_bytes
    for a, b in zip(grads_of(compiled, inputs), grads_of(lambda *a: gated_linear(*a) * 2, inputs)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_gated_linear_op_passes_opcheck():
    """Schema, fake implementation, autograd registration and AOT dispatch, as torch.compile relies on them."""
    x, gate, weight = leaves((2, 7, 12), (2, 7, 12), (5, 12), seed=6)
    for args in ((x, gate, weight), (None, gate, weight)):
        torch.library.opcheck(fused._gated_linear.op, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_linear_adds_the_product_into_a_strided_output_in_place(dtype):
    """out += x @ W^T in place: against float64 (bf16: one rounding of the sum, so within a bf16 step of it), on
    an `out` that is a column slice of a wider tensor (the decode step's h1), leaving the other columns alone."""
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(3, 1, 40, generator=g).to(dtype)
    x, weight = torch.randn(3, 1, 24, generator=g).to(dtype), torch.randn(16, 24, generator=g).to(dtype)
    before = wide.clone()
    out = wide[..., 20:36]
    want = out.double() + x.double() @ weight.double().t()
    got = fused.add_linear_(out, x, weight)
    assert got.data_ptr() == out.data_ptr() and got.shape == (3, 1, 16)
    tolerance = 1e-5 if dtype == torch.float32 else 2 ** -7
    scale = want.abs().max().item()
    torch.testing.assert_close(wide[..., 20:36].double(), want, rtol=tolerance, atol=tolerance * scale)
    torch.testing.assert_close(wide[..., :20], before[..., :20], rtol=0, atol=0)
    torch.testing.assert_close(wide[..., 36:], before[..., 36:], rtol=0, atol=0)


def test_add_linear_of_mixed_dtypes_adds_the_product_in_the_inputs_dtype():
    """An fp32 `out` (autocast's residual) and bf16 x and weight: the product in bf16, added into fp32 out."""
    g = torch.Generator().manual_seed(1)
    out, x = torch.randn(4, 16, generator=g), torch.randn(4, 8, generator=g).bfloat16()
    weight = torch.randn(16, 8, generator=g).bfloat16()
    want = out + torch.nn.functional.linear(x, weight).float()
    got = fused.add_linear_(out, x, weight)
    assert got is out and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)
