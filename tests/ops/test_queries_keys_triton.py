"""The fused Triton queries and keys (per-head norm, affine, rotary; forward and backward) against the PyTorch path
of ops/attention.py::queries_keys, itself checked in float64 by the model tests: under the interpreter on CPU
(tests/conftest.py sets TRITON_INTERPRET=1 without a GPU) or on a GPU when there is one."""

import helpers
import pytest
import torch
from sm90 import check_compiles_for_h100

from megalodon.ops import attention
from megalodon.ops.attention import queries_keys, rope_frequencies, rotary_angles

pytest.importorskip("triton")  # the kernels run under the interpreter on CPU
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.cuda  # on a GPU every kernel test here runs on it
HEADS, DZ = 2, 8


def inputs(batch, length, seed, dtype=torch.float32, per_row=False, extra=5):
    """z as a slice of a wider projection (strided rows, as the model's), the affine, the rotary tables of
    in-chunk positions (shared, or per row as in decode)."""
    g = torch.Generator().manual_seed(seed)
    wide = torch.randn(batch, length, HEADS * DZ + extra, generator=g) * 3
    z = wide.to(dtype)[..., :HEADS * DZ]
    scale = torch.randn(2, HEADS * DZ, generator=g) * 0.3 + 1
    shift = torch.randn(2, HEADS * DZ, generator=g) * 0.1
    positions = torch.randint(0, 16, (batch, length), generator=g) if per_row else torch.arange(length) % 16
    rotation = rotary_angles(positions, rope_frequencies(DZ, 100.0), torch.float32)
    return [t.to(DEVICE) for t in (z, scale, shift)], tuple(t.to(DEVICE) for t in rotation)


def both_paths(monkeypatch, fn):
    import megalodon.ops.triton.queries_keys as kernels

    return helpers.both_paths(monkeypatch, fn, attention, "queries_keys", kernels, "queries_keys_triton")


@pytest.mark.parametrize("per_row", [False, True], ids=["shared-positions", "per-row-positions"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_matches_the_pytorch_path(monkeypatch, dtype, per_row):
    (z, scale, shift), rotation = inputs(3, 11, seed=0, dtype=dtype, per_row=per_row)
    (q, k), (q_want, k_want) = both_paths(monkeypatch, lambda: queries_keys(z, HEADS, 1e-5, scale, shift, rotation))
    # fp32 to rounding. In bf16 an element of zn can land one bf16 step apart (statistics summed in another
    # order), which the affine and the rotation carry to about two steps of q or k.
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2 ** -6, atol=2 ** -6)
    for got, want in ((q, q_want), (k, k_want)):
        assert got.dtype == dtype and got.shape == (3, 11, HEADS, DZ)
        torch.testing.assert_close(got.float(), want.float(), **tolerance)


@pytest.mark.parametrize("per_row", [False, True], ids=["shared-positions", "per-row-positions"])
def test_gradients_match_the_float64_path(monkeypatch, per_row):
    """Gradients of z, the scale and the shift through the kernels (fp32) against the PyTorch path in float64."""
    (z, scale, shift), rotation = inputs(2, 70, seed=1, per_row=per_row)  # several token tiles
    weights = [torch.randn(2, 70, HEADS, DZ, generator=torch.Generator().manual_seed(s)).to(DEVICE) for s in (2, 3)]

    def grads(dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (z, scale, shift)]
        q, k = queries_keys(leaves[0], HEADS, 1e-5, leaves[1], leaves[2], tuple(t.to(dtype) for t in rotation))
        loss = (q * weights[0].to(dtype)).sum() + (k * weights[1].to(dtype)).sum()
        return torch.autograd.grad(loss, leaves)

    want = grads(torch.float64)  # the PyTorch path (no kernel takes float64)
    monkeypatch.setattr(attention, "use_triton", lambda op, *tensors: op == "queries_keys")
    got = grads(torch.float32)
    for name, a, b in zip(("z", "scale", "shift"), got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4, msg=name)


def test_bf16_gradients_match_the_pytorch_path(monkeypatch):
    """A bf16 z on both paths: the gradients of z (bf16), the scale and the shift (fp32) agree at bf16's
    resolution (each path rounds zn and dz itself, from fp32 values computed in another order)."""
    (z, scale, shift), rotation = inputs(2, 70, seed=6, dtype=torch.bfloat16)
    weights = [torch.randn(2, 70, HEADS, DZ, generator=torch.Generator().manual_seed(s)).to(DEVICE) for s in (7, 8)]

    def grads():
        leaves = [t.detach().requires_grad_() for t in (z, scale, shift)]
        q, k = queries_keys(leaves[0], HEADS, 1e-5, leaves[1], leaves[2], rotation)
        loss = (q.float() * weights[0]).sum() + (k.float() * weights[1]).sum()
        return torch.autograd.grad(loss, leaves)

    got, want = both_paths(monkeypatch, grads)
    for name, a, b in zip(("z", "scale", "shift"), got, want):
        assert a.dtype == b.dtype, name
        scale_of = b.abs().max().item()
        torch.testing.assert_close(a.float(), b.float(), rtol=2 ** -6, atol=2 ** -6 * scale_of, msg=name)


def test_custom_op_passes_opcheck():
    """Schema, fake (meta) implementations and autograd registration, as torch.compile relies on them."""
    from megalodon.ops.triton.queries_keys import queries_keys_fwd

    (z, scale, shift), (cos, sin) = inputs(2, 6, seed=4)
    args = (z.contiguous().requires_grad_(), scale.requires_grad_(), shift.requires_grad_(), cos.contiguous(),
            sin.contiguous(), HEADS, 1e-5)
    torch.library.opcheck(queries_keys_fwd.op, args, test_utils=("test_schema", "test_faketensor",
                                                             "test_autograd_registration"))


def test_compiled_graph_holds_the_op(monkeypatch):
    """Dynamo traces the dispatch and the custom op with fullgraph (no graph break), forward and backward."""
    (z, scale, shift), rotation = inputs(2, 9, seed=5)
    monkeypatch.setattr(attention, "use_triton", lambda op, *tensors: True)
    z = z.detach().requires_grad_()

    def fn(z):
        q, k = queries_keys(z, HEADS, 1e-5, scale, shift, rotation)
        return q.square().sum() + k.sum()

    (g_eager,) = torch.autograd.grad(fn(z), z)
    (g_compiled,) = torch.autograd.grad(torch.compile(fn, backend="aot_eager", fullgraph=True)(z), z)
    torch.testing.assert_close(g_compiled, g_eager)


COMPILE_FOR_H100 = """
from megalodon.ops.triton import queries_keys as kernels

f32, i32 = "*fp32", "i32"
CASES = []
for z in ("*bf16", f32):
    CASES += [(kernels.qk_fwd_kernel, [z, f32, f32, f32, f32, z, f32] + [i32] * 6 + ["fp32"],
               dict(BLOCK_T=8, BLOCK_D=256)),
              (kernels.qk_bwd_kernel, [z, z, f32, f32, f32, f32, z, f32] + [i32] * 6, dict(BLOCK_T=8, BLOCK_D=256))]
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the other kernel tests compile and run them")
def test_kernels_compile_for_h100():
    """Both kernels compile to sm_90 cubins (triton ships ptxas; no GPU needed), bf16 and fp32 (tests/sm90.py)."""
    check_compiles_for_h100(COMPILE_FOR_H100)
