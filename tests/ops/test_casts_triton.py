"""ops/triton/casts.py: the kernels' downcast rounds to nearest (ties to even) as torch's casts do, on a GPU and
under Triton's interpreter, whose own fp32 -> bf16 conversion truncates."""

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from megalodon.ops.triton.casts import cast  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.cuda


@triton.jit
def cast_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, cast(tl.load(x_ptr + offs, mask=offs < n), y_ptr.dtype.element_ty), mask=offs < n)


def run_cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    y = torch.empty(x.shape, dtype=dtype, device=DEVICE)
    cast_kernel[(1,)](x.to(DEVICE), y, x.numel(), BLOCK=triton.next_power_of_2(x.numel()))
    return y.cpu()


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # 3.4e38 to fp16: inf, as torch
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cast_rounds_as_torch_does(dtype):
    ties = [1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8), 2 ** -20 * (1 + 2 ** -8)]  # halfway: to the even neighbour
    specials = [float("inf"), -float("inf"), 3.4e38, -0.0, 0.0, 65504.0, 1e-3]
    x = torch.cat([torch.tensor(ties + specials), torch.randn(500, generator=torch.Generator().manual_seed(0)) * 50])
    got, want = run_cast(x, dtype), x.to(dtype)
    assert torch.equal(got, want), (got != want).nonzero()[:5]
    assert run_cast(torch.tensor([float("nan")]), dtype).isnan().all()
