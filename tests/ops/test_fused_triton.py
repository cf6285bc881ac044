"""The kernels of ops/triton/fused.py against float64, under the interpreter on CPU (tests/conftest.py sets
TRITON_INTERPRET=1 without a GPU) or on a GPU: the inference row-norm (behind ops/fused.py's rms_norm and
layer_norm), the SiLU gate of the gated linear, forward and backward, and the decode's GEMM into its output."""

import pytest
import torch
import torch.nn.functional as F
from helpers import kernel_only
from sm90 import check_compiles_for_h100

from megalodon.ops import fused
from megalodon.ops.fused import gated_linear, gated_linear_reference, layer_norm, rms_norm

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


def test_training_takes_the_training_kernels(monkeypatch):
    """Where a gradient is wanted the inference kernel does not run (it keeps nothing for backward): the training
    kernels do."""
    import megalodon.ops.triton.fused as kernels

    calls = kernel_only(monkeypatch, fused, "norm_rows", kernels, "norm_rows", "norm_rows_training",
                        "norm_rows_backward")
    x, weight, bias = inputs(torch.float32, seed=2)
    weight.requires_grad_()
    rms_norm(x, weight, 1e-5).sum().backward()
    layer_norm(x.requires_grad_(), None, None, 1e-5, torch.float32).sum().backward()
    assert calls == ["norm_rows_training", "norm_rows_backward"] * 2
    assert weight.grad is not None and x.grad is not None


def norm_float64(x, scale, shift, center, eps=1e-5):
    xd = x.double()
    if center:
        xd = xd - xd.mean(-1, keepdim=True)
    out = xd * torch.rsqrt(xd.square().mean(-1, keepdim=True) + eps)
    out = out if scale is None else out * scale.double()
    return out if shift is None else out + shift.double()


@pytest.mark.parametrize("center", [False, True], ids=["rms", "layer"])
@pytest.mark.parametrize("x_dtype, out_dtype", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                                (torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("affine", ["scale+shift", "scale", "none"])
@pytest.mark.parametrize("programs", [512, 4], ids=["row-per-program", "rows-per-program"])
def test_row_norm_training_matches_float64(monkeypatch, center, x_dtype, out_dtype, affine, programs):
    """The training kernels against float64 autograd: the output (rounded once), x's gradient in x's dtype and the
    affine's gradients summed over rows; with few backward programs, each takes several rows and the last one
    fewer (21 rows over 4 programs)."""
    import megalodon.ops.triton.fused as kernels

    monkeypatch.setattr(kernels, "NORM_BWD_PROGRAMS", programs)
    if affine == "scale+shift" and not center:
        pytest.skip("an RMSNorm has no shift")
    g = torch.Generator().manual_seed(11)
    x = (torch.randn(3, 7, FEATURES, generator=g) * 3 + 1).to(x_dtype).to(DEVICE)
    scale = (torch.randn(FEATURES, generator=g) * 0.2 + 1).to(DEVICE) if affine != "none" else None
    shift = (torch.randn(FEATURES, generator=g) * 0.1).to(DEVICE) if affine == "scale+shift" else None
    grad = torch.randn(x.shape, generator=g).to(out_dtype).to(DEVICE)
    leaves = [t.requires_grad_() for t in (x, scale, shift) if t is not None]
    monkeypatch.setattr(fused, "use_triton", lambda op, *tensors: op == "norm_rows")
    kernel = fused.row_norm_kernel(x, scale, shift)
    assert kernel == fused._RowNorm.apply  # a gradient is wanted: the training kernels
    out = kernel(x, scale, shift, 1e-5, center, out_dtype)
    got = [out, *torch.autograd.grad(out, leaves, grad)]
    assert got[0].dtype == out_dtype and got[1].dtype == x_dtype
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    x64, scale64, shift64 = leaves64 + [None] * (3 - len(leaves64))
    want = norm_float64(x64, scale64, shift64, center)
    wants = [want.detach(), *torch.autograd.grad(want, leaves64, grad.double())]
    torch.testing.assert_close(got[0].double(), wants[0], **rounded(wants[0], out_dtype))
    # x's gradient: fp32 arithmetic, then one rounding to x's dtype; the parameters' sums over 21 rows in fp32
    step = 1e-5 if x_dtype == torch.float32 else 2 ** -8
    torch.testing.assert_close(got[1].double(), wants[1], rtol=step, atol=1e-5 * wants[1].abs().max().item())
    for a, b in zip(got[2:], wants[2:]):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


def test_compiled_norms_keep_torch_ops(monkeypatch):
    """Under torch.compile the norms stay torch's ops, which Inductor fuses with the casts around them."""
    import megalodon.ops.triton.fused as kernels

    calls = kernel_only(monkeypatch, fused, "norm_rows", kernels, "norm_rows_training", "norm_rows_backward")
    x, weight, bias = inputs(torch.float32, seed=12)
    for t in (x, weight, bias):
        t.requires_grad_()

    def norms(x, weight, bias):
        return rms_norm(x, weight, 1e-5, torch.bfloat16).float() + layer_norm(x, weight, bias, 1e-5, torch.float32)

    out = torch.compile(norms, backend="aot_eager", fullgraph=True)(x, weight, bias)
    out.square().sum().backward()
    assert not calls
    torch.testing.assert_close(out, norms(x, weight, bias))


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
        torch.library.opcheck(norm_rows.op, args, test_utils=("test_schema", "test_faketensor"))


# ---- the SiLU gate -----------------------------------------------------------------------------------------------
def gate_inputs(dtype, cols, with_x, sliced, seed):
    """x and the gate, (2, 3, cols) each; sliced: the gate a column slice of a wider tensor, as the MEGA layer cuts
    it from its joined projection (rows read with a stride, not copied)."""
    g = torch.Generator().manual_seed(seed)
    wide = torch.randn(2, 3, cols + 7 if sliced else cols, generator=g) * 3
    gate = (wide[..., 5:5 + cols] if sliced else wide).to(dtype).to(DEVICE)
    x = torch.randn(2, 3, cols, generator=g).to(dtype).to(DEVICE) if with_x else None
    return x, gate


def gate_float64(x, gate, grad):
    """hidden = x * silu(gate) and its gradients, in float64 by autograd."""
    x64 = None if x is None else x.double().requires_grad_()
    g64 = gate.double().requires_grad_()
    hidden = torch.nn.functional.silu(g64) * (1 if x64 is None else x64)
    grads = torch.autograd.grad(hidden, [t for t in (x64, g64) if t is not None], grad.double())
    return hidden.detach(), grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_x", [True, False], ids=["x", "no-x"])
@pytest.mark.parametrize("cols, sliced", [(40, False), (40, True), (1100, True)],
                         ids=["40", "40-sliced", "1100-sliced"])
def test_silu_gate_matches_float64(dtype, with_x, cols, sliced):
    """Forward and backward kernels, each output rounded once: widths inside one block and across two (1100
    columns), the gate read in place from a wider tensor's columns."""
    from megalodon.ops.triton.fused import silu_gate, silu_gate_backward

    x, gate = gate_inputs(dtype, cols, with_x, sliced, seed=cols)
    grad = (torch.randn(gate.shape, generator=torch.Generator().manual_seed(9)) * 2).to(dtype).to(DEVICE)
    want, want_grads = gate_float64(x, gate, grad)
    got = silu_gate(gate, x)
    assert got.dtype == dtype and got.shape == gate.shape
    torch.testing.assert_close(got.double(), want, **rounded(want, dtype))
    hidden, dx, dgate = silu_gate_backward(gate, x, grad)
    torch.testing.assert_close(hidden.double(), want, **rounded(want, dtype))
    for got_grad, wanted in zip([t for t in (dx, dgate) if t is not None], want_grads):
        assert got_grad.dtype == dtype
        torch.testing.assert_close(got_grad.double(), wanted, **rounded(wanted, dtype))
    assert (dx is None) == (x is None)


@pytest.mark.parametrize("with_x", [True, False], ids=["x", "no-x"])
def test_gated_linear_on_the_kernels_matches_float64(monkeypatch, with_x):
    """gated_linear with the gate on the kernels (the GEMMs on torch), output and the gradients of x, the gate and
    the weight, against the float64 reference; inference (no gradient) takes the forward kernel too."""
    import megalodon.ops.triton.fused as kernels

    calls = kernel_only(monkeypatch, fused, "silu_gate", kernels, "silu_gate", "silu_gate_backward")
    x, gate = gate_inputs(torch.float32, 24, with_x, sliced=True, seed=5)
    weight = torch.randn(7, 24, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    leaves = [t.detach().requires_grad_() for t in (x, gate, weight) if t is not None]
    inputs = leaves if with_x else [None, *leaves]
    out = gated_linear(*inputs)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    got = [out, *torch.autograd.grad(out, leaves, grad)]
    assert calls == ["silu_gate", "silu_gate_backward"]
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    ref = gated_linear_reference(*(leaves64 if with_x else [None, *leaves64]))
    want = [ref, *torch.autograd.grad(ref, leaves64, grad.double())]
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
    with torch.no_grad():
        torch.testing.assert_close(gated_linear(*inputs), out.detach())
    assert calls[-1] == "silu_gate"


def test_compiled_gated_linear_runs_the_forward_kernel_and_traces_its_backward(monkeypatch):
    """Under torch.compile the gated linear is one node of the graph (an OpaqueOp, so that the graph keeps its
    inputs alone for backward): its forward runs as eager code, the gate's kernel included; its backward formula
    is traced, the gate's part as torch's ops, which Inductor fuses."""
    import megalodon.ops.triton.fused as kernels

    calls = kernel_only(monkeypatch, fused, "silu_gate", kernels, "silu_gate", "silu_gate_backward")
    x, gate = (t.requires_grad_() for t in gate_inputs(torch.float32, 24, True, sliced=False, seed=8))
    weight = torch.randn(7, 24, device=DEVICE, requires_grad=True)
    compiled = torch.compile(gated_linear, backend="aot_eager", fullgraph=True)
    out = compiled(x, gate, weight)
    out.square().sum().backward()
    assert calls == ["silu_gate"]
    want = gated_linear_reference(x.detach(), gate.detach(), weight.detach())
    torch.testing.assert_close(out.detach(), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, block", [(1, 1), (3, 2), (8, 4)])  # the outputs a program: what the tuning tries
def test_add_linear_matches_float64(monkeypatch, dtype, rows, block):
    """out += x @ weight^T into a column slice of a wider tensor (strided rows, as a decode step's projections
    are cut), from x rows that are strided too: 37 outputs (not a multiple of a program's), 300 features (a
    partial tile), fp32 sums rounded once; what is outside the slice is not touched."""
    import megalodon.ops.triton.fused as kernels

    monkeypatch.setattr(kernels, "ADD_LINEAR_BLOCK", block)
    calls = kernel_only(monkeypatch, fused, "add_linear", kernels, "add_linear")
    g = torch.Generator().manual_seed(rows)
    wide = torch.randn(rows, 50, generator=g).to(dtype).to(DEVICE)
    x = torch.randn(rows, 2, 300, generator=g).to(dtype).to(DEVICE)[:, 1]
    weight = (torch.randn(37, 300, generator=g) * 0.05).to(dtype).to(DEVICE)
    before = wide.clone()
    out = wide[:, 5:42]
    with torch.no_grad():
        assert fused.add_linear_(out, x, weight) is out
    assert calls == ["add_linear"]
    want = before[:, 5:42].double() + x.double() @ weight.double().t()
    torch.testing.assert_close(out.double(), want, **rounded(want, dtype))
    torch.testing.assert_close(wide[:, :5], before[:, :5], rtol=0, atol=0)
    torch.testing.assert_close(wide[:, 42:], before[:, 42:], rtol=0, atol=0)


def test_add_linear_leaves_many_rows_and_mixed_dtypes_to_torch(monkeypatch):
    """More rows than a program holds (a prefill, a wide batch) and mixed dtypes take torch's ops, as before."""
    import megalodon.ops.triton.fused as kernels

    calls = kernel_only(monkeypatch, fused, "add_linear", kernels, "add_linear")
    weight = torch.randn(16, 24, device=DEVICE)
    many = torch.randn(kernels.ADD_LINEAR_MAX_ROWS + 1, 24, device=DEVICE), torch.randn(9, 16, device=DEVICE)
    torch.testing.assert_close(fused.add_linear_(many[1].clone(), *many[:1], weight),
                               many[1].clone().addmm_(many[0], weight.t()), rtol=0, atol=0)
    x, out = torch.randn(2, 24, device=DEVICE, dtype=torch.bfloat16), torch.randn(2, 16, device=DEVICE)
    torch.testing.assert_close(fused.add_linear_(out.clone(), x, weight),
                               out + F.linear(x, weight.to(torch.bfloat16)), rtol=0, atol=0)
    assert calls == []


COMPILE_FOR_H100 = """
from megalodon.ops.triton import fused as kernels

CASES = []
for x, out in (("*fp32", "*bf16"), ("*bf16", "*bf16"), ("*fp32", "*fp32")):
    for center in (False, True):
        for stats in (False, True):
            CASES.append((kernels.norm_rows_kernel, [x, "*fp32", "*fp32", out, "*fp32", "*fp32", "i32", "fp32"],
                          dict(CENTER=center, HAS_SCALE=True, HAS_SHIFT=center, SAVE_STATS=stats, BLOCK=1024)))
        # backward: x, the output's gradient (in the output's dtype), scale, mean, rstd, dx (x's), the partials
        CASES.append((kernels.norm_rows_bwd_kernel, [x, out, "*fp32", "*fp32", "*fp32", x, "*fp32", "i32", "i32",
                                                     "i32"],
                      dict(CENTER=center, HAS_SCALE=True, PARAM_GRADS=True, BLOCK=1024)))
CASES.append((kernels.norm_rows_kernel, ["*bf16", "*bf16", "*bf16", "*bf16", "*fp32", "*fp32", "i32", "fp32"],
              dict(CENTER=False, HAS_SCALE=True, HAS_SHIFT=False, SAVE_STATS=False, BLOCK=4096), 8))
CASES.append((kernels.norm_rows_bwd_kernel, ["*fp32", "*bf16", "*fp32", "*fp32", "*fp32", "*fp32", "*fp32", "i32",
                                             "i32", "i32"],
              dict(CENTER=False, HAS_SCALE=False, PARAM_GRADS=False, BLOCK=4096), 8))
for t in ("*bf16", "*fp32"):
    for rows, tile in ((1, kernels.ADD_LINEAR_TILE), (8, 512)):  # the launcher's tile for 8 rows of one output
        CASES.append((kernels.add_linear_kernel, [t, t, t, "i32", "i32", "i32", "i32", "i32"],
                      dict(ROWS=rows, BLOCK=kernels.ADD_LINEAR_BLOCK, TILE=tile)))
    for has_x in (True, False):
        CASES.append((kernels.silu_gate_kernel, [t, t, t, "i32", "i64", "i64"],
                      dict(HAS_X=has_x, BLOCK=kernels.GATE_BLOCK)))
        CASES.append((kernels.silu_gate_bwd_kernel, [t, t, t, t, t, t, "i32", "i64", "i64", "i64"],
                      dict(HAS_X=has_x, BLOCK=kernels.GATE_BLOCK)))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the other kernel tests compile and run them")
def test_kernel_compiles_for_h100():
    """The kernel compiles to sm_90 cubins (triton ships ptxas; no GPU needed) for both norms and their dtypes."""
    check_compiles_for_h100(COMPILE_FOR_H100)
