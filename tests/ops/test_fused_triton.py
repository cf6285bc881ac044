"""The inference row-norm (ops/triton/fused.py, behind ops/fused.py's rms_norm and layer_norm) against the norms
in float64, under the interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1 without a GPU) or on a GPU."""

import pytest
import torch
import torch.nn.functional as F
from helpers import kernel_only
from sm90 import check_compiles_for_h100

from megalodon.ops import fused
from megalodon.ops.fused import layer_norm, rms_norm

pytest.importorskip("triton")  # the kernel runs under the interpreter on CPU
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.cuda  # on a GPU every kernel test here runs on it
ROWS, FEATURES = 5, 40  # a width that is not a power of two


def on_the_kernel(monkeypatch) -> list[str]:
    """The row-norm on for these tensors; records its calls."""
    import megalodon.ops.triton.fused as kernels

    return kernel_only(monkeypatch, fused, "norm_rows", kernels, "norm_rows")


def inputs(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(2, ROWS, FEATURES, generator=g) * 3 + 1).to(dtype)
    weight, bias = torch.randn(FEATURES, generator=g) * 0.2, torch.randn(FEATURES, generator=g) * 0.1
    return x.to(DEVICE), weight.to(DEVICE), bias.to(DEVICE)


def rounded(want: torch.Tensor, dtype: torch.dtype) -> dict:
    """Tolerances for an output rounded once to dtype, to nearest: half a step (Triton's interpreter rounds bf16
    as a GPU does through ops/triton/casts.py)."""
    step = 1e-5 if dtype == torch.float32 else 2 ** -8
    return dict(rtol=step, atol=step * want.abs().max().item() * 1e-2 + 1e-6)


@pytest.mark.parametrize("x_dtype, out_dtype", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                                (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("affine", ["weight", "scale", "none"])
def test_rms_norm_matches_float64(monkeypatch, x_dtype, out_dtype, affine):
    calls = on_the_kernel(monkeypatch)
    x, weight, _ = inputs(x_dtype, seed=0)
    with torch.no_grad():
        if affine == "scale":  # weight + 1 computed beforehand, as a decode step passes it
            got = rms_norm(x, None, 1e-5, out_dtype, scale=weight + 1)
        else:
            got = rms_norm(x, weight if affine == "weight" else None, 1e-5, out_dtype)
    assert calls and got.dtype == out_dtype
    xd = x.double()
    want = xd * torch.rsqrt(xd.square().mean(-1, keepdim=True) + 1e-5)
    if affine != "none":
        want = want * (weight.double() + 1)
    torch.testing.assert_close(got.double(), want, **rounded(want, out_dtype))


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_matches_float64(monkeypatch, x_dtype, affine):
    calls = on_the_kernel(monkeypatch)
    x, weight, bias = inputs(x_dtype, seed=1)
    weight, bias = (weight + 1, bias) if affine else (None, None)
    with torch.no_grad():
        got = layer_norm(x, weight, bias, 1e-5, x_dtype)
    assert calls and got.dtype == x_dtype
    want = F.layer_norm(x.double(), (FEATURES,), None if weight is None else weight.double(),
                        None if bias is None else bias.double(), 1e-5)
    torch.testing.assert_close(got.double(), want, **rounded(want, x_dtype))


def test_training_keeps_its_paths(monkeypatch):
    """Where a gradient is wanted the kernel does not run (it has no backward)."""
    calls = on_the_kernel(monkeypatch)
    x, weight, bias = inputs(torch.float32, seed=2)
    weight.requires_grad_()
    rms_norm(x, weight, 1e-5).sum().backward()
    layer_norm(x.requires_grad_(), None, None, 1e-5, torch.float32).sum().backward()
    assert not calls and weight.grad is not None and x.grad is not None


def test_llama_norm_matches_its_own_path(monkeypatch):
    """The Llama baseline's RMSNorm (weight as is, a bf16 model's bf16 weight) on the kernel for inference."""
    from megalodon.baseline.llama import RMSNorm

    norm = RMSNorm(FEATURES, 1e-5).to(DEVICE)
    x, weight, _ = inputs(torch.bfloat16, seed=3)
    with torch.no_grad():
        norm.weight.copy_(weight + 1)
        norm = norm.to(torch.bfloat16)
        want = norm(x)
        calls = on_the_kernel(monkeypatch)
        got = norm(x)
    assert calls and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=2 ** -7)


def test_custom_op_passes_opcheck():
    from megalodon.ops.triton.fused import norm_rows

    x, weight, bias = inputs(torch.bfloat16, seed=4)
    for args in ((x, weight, bias, 1e-5, True, torch.bfloat16), (x.float(), weight, None, 1e-5, False, torch.bfloat16),
                 (x, None, None, 1e-6, False, torch.float32)):
        torch.library.opcheck(norm_rows, args, test_utils=("test_schema", "test_faketensor"))


COMPILE_FOR_H100 = """
from megalodon.ops.triton import fused as kernels

CASES = []
for x, out in (("*fp32", "*bf16"), ("*bf16", "*bf16"), ("*fp32", "*fp32")):
    for center in (False, True):
        CASES.append((kernels.norm_rows_kernel, [x, "*fp32", "*fp32", out, "i32", "fp32"],
                      dict(CENTER=center, HAS_SCALE=True, HAS_SHIFT=center, BLOCK=1024)))
CASES.append((kernels.norm_rows_kernel, ["*bf16", "*bf16", "*bf16", "*bf16", "i32", "fp32"],
              dict(CENTER=False, HAS_SCALE=True, HAS_SHIFT=False, BLOCK=4096), 8))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the other kernel tests compile and run them")
def test_kernel_compiles_for_h100():
    """The kernel compiles to sm_90 cubins (triton ships ptxas; no GPU needed) for both norms and their dtypes."""
    check_compiles_for_h100(COMPILE_FOR_H100)
