"""The Triton TimestepNorm (forward and backward) against the float64 per-token reference, under the interpreter on
CPU (tests/conftest.py sets TRITON_INTERPRET=1 without a GPU) or on a GPU when there is one."""

import pytest
import torch
from helpers import requires_cuda
from sm90 import check_compiles_for_h100

from megalodon.ops import timestep_norm as ops
from megalodon.ops.timestep_norm import NormStats, timestep_norm, timestep_norm_sequential

pytest.importorskip("triton")  # the kernels run under the interpreter on CPU
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.cuda  # on a GPU every kernel test here runs on it
G, D = 3, 12


def on_device(*items):
    """Tensors and NormStats moved to DEVICE (where the kernels run: the GPU, or the CPU under the interpreter)."""
    moved = [NormStats(*(t.to(DEVICE) for t in item)) if isinstance(item, NormStats) else item.to(DEVICE)
             for item in items]
    return moved[0] if len(moved) == 1 else moved


def triton_path(*args, **kwargs):
    from megalodon.ops.triton.timestep_norm import timestep_norm_triton

    return timestep_norm_triton(*args, **kwargs)


def reference(x, initial, prior, weight, bias, eps, block, reset):
    """Spec section 5 token by token in float64; a reset block restarts its row at the prior."""
    rows, finals = [], []
    for b in range(x.shape[0]):
        state = NormStats(*(t[b:b + 1] for t in initial))
        pieces = []
        for c, start in enumerate(range(0, x.shape[1], block)):
            if reset is not None and reset[b, c]:
                state = NormStats(prior.count.expand(1), prior.mean.expand(1, -1), prior.var.expand(1, -1))
            y, state = timestep_norm_sequential(x[b:b + 1, start:start + block], state, weight, bias, eps)
            pieces.append(y)
        rows.append(torch.cat(pieces, 1))
        finals.append(state)
    return torch.cat(rows), NormStats(*(torch.cat(ts) for ts in zip(*finals)))


def case(batch, length, count, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(batch, length, D, generator=g) * 2 + 3).to(dtype)
    initial = NormStats(torch.arange(batch) * count, torch.randn(batch, G, generator=g, dtype=torch.float64) + 3,
                        torch.rand(batch, G, generator=g, dtype=torch.float64) + 0.5)
    prior = NormStats(torch.tensor(count), torch.randn(G, generator=g, dtype=torch.float64),
                      torch.rand(G, generator=g, dtype=torch.float64) + 0.5)
    weight, bias = torch.randn(D, generator=g) * 0.5, torch.randn(D, generator=g)
    return x, initial, prior, weight, bias


def leaves(x, initial, prior, weight, bias):
    """Fresh leaf tensors on DEVICE for the triton run, and float64 CPU copies for the reference."""
    inputs = [x, initial.mean, initial.var, prior.mean, prior.var, weight, bias]
    dev = [t.detach().to(DEVICE).requires_grad_() for t in inputs]
    ref = [t.detach().double().requires_grad_() for t in inputs]
    return dev, ref


def run(fn, tensors, counts, eps, block, reset):
    x, mean, var, prior_mean, prior_var, weight, bias = tensors
    initial = NormStats(counts[0].to(x.device), mean, var)
    prior = NormStats(counts[1].to(x.device), prior_mean, prior_var)
    return fn(x, initial, prior, weight, bias, eps, block, None if reset is None else reset.to(x.device))


def triton_fn(x, initial, prior, weight, bias, eps, block, reset):
    return triton_path(x, initial, weight, bias, eps, block, reset, prior)


@pytest.mark.parametrize("scan_tiles", [None, (2, 1, 1, 32), (2, 2, 1, 1), (2, 2, 1, 5), (2, 2, 1, 5, 2)],
                         ids=["default-tiles", "2x1-tiles", "2x2-tiles-whole-blocks", "2x2-tiles-5-segments",
                              "2x2-tiles-5-segments-carried-2-at-a-time"])
@pytest.mark.parametrize("batch,length,block,count,resets", [
    (2, 23, 5, 2, [[0, 1, 0, 0, 1], [1, 0, 0, 1, 0]]),  # L not a multiple of the block, resets, prior count > 0
    (1, 16, 16, 0, None),  # one block, prior count 0
    (3, 40, 8, 3, [[0, 0, 1, 0, 0]] * 3),  # several tiles per row
])
def test_forward_and_gradients_match_the_float64_reference(monkeypatch, batch, length, block, count, resets,
                                                           scan_tiles):
    """scan_tiles: the scans' (tokens, groups, warps) per tile and segments per row (ops/triton/timestep_norm.py's
    SCAN_*, which a GPU sweep may change): 2 x 1 makes many tiles per block and one program per group, and 32
    segments give each tile its own; 1 segment makes a block's tiles one segment, 5 uneven segments of several
    tiles (2 groups a program there: fewer programs under the interpreter). A fifth value: the carries' segments
    loaded at a time (CARRY_SEGMENTS; 8 by default: the 2x1 tiles' 20 segments a row take two whole groups and a
    remainder, with blocks starting inside groups)."""
    if scan_tiles is not None:
        from megalodon.ops.triton import timestep_norm as kernels

        names = ("SCAN_TOKENS", "SCAN_GROUPS", "SCAN_WARPS", "SCAN_SEGMENTS", "CARRY_SEGMENTS")
        for name, value in zip(names, scan_tiles):
            monkeypatch.setattr(kernels, name, value)
    x, initial, prior, weight, bias = case(batch, length, count, seed=length)
    reset = None if resets is None else torch.tensor(resets, dtype=torch.bool)
    dev, ref = leaves(x, initial, prior, weight, bias)
    counts = (initial.count, prior.count)
    y, final = run(triton_fn, dev, counts, 1e-5, block, reset)
    y_ref, final_ref = run(reference, ref, counts, 1e-5, block, reset)

    torch.testing.assert_close(y.cpu().double(), y_ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(final.count.cpu(), final_ref.count)
    assert final.mean.dtype == torch.float64 and final.var.dtype == torch.float64
    torch.testing.assert_close(final.mean.cpu(), final_ref.mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(final.var.cpu(), final_ref.var, rtol=1e-5, atol=1e-6)

    g = torch.Generator().manual_seed(1)
    dy, dm, dv = (torch.randn(t.shape, generator=g, dtype=torch.float64)
                  for t in (y_ref, final_ref.mean, final_ref.var))

    def loss(y, final):
        return ((y.double() * dy.to(y.device)).sum() + (final.mean * dm.to(y.device)).sum()
                + (final.var * dv.to(y.device)).sum())

    grads = torch.autograd.grad(loss(y, final), dev)
    grads_ref = torch.autograd.grad(loss(y_ref, final_ref), ref, allow_unused=True, materialize_grads=True)
    names = ["x", "mean", "var", "prior_mean", "prior_var", "weight", "bias"]
    for name, got, want in zip(names, grads, grads_ref):
        scale = want.abs().max().clamp(min=1.0)
        torch.testing.assert_close(got.cpu().double() / scale, want / scale, rtol=0, atol=2e-5, msg=name)
    if resets is None:  # no reset: the prior is unused
        assert grads[3].abs().max() == 0


def test_bf16_input():
    x, initial, prior, weight, bias = case(2, 19, 1, seed=7, dtype=torch.bfloat16)
    dev, ref = leaves(x, initial, prior, weight, bias)
    counts = (initial.count, prior.count)
    y, final = run(triton_fn, dev, counts, 1e-5, 8, None)
    y_ref, final_ref = run(reference, ref, counts, 1e-5, 8, None)
    assert y.dtype == torch.float32  # statistics and output in fp32 from the bf16 values
    torch.testing.assert_close(y.cpu().double(), y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final.var.cpu(), final_ref.var, rtol=1e-5, atol=1e-6)
    (dx,) = torch.autograd.grad(y.sum() + final.mean.sum(), dev[0])
    (dx_ref,) = torch.autograd.grad(y_ref.sum() + final_ref.mean.sum(), ref[0])
    assert dx.dtype == torch.bfloat16
    torch.testing.assert_close(dx.cpu().double(), dx_ref, rtol=2e-2, atol=2e-2 * dx_ref.abs().max().item())


def test_long_stream_with_a_large_mean_stays_accurate():
    """Long tiles and a carry far from zero: the shifted sums and float64 carry keep fp32 rounding in check."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 1500, D, generator=g, dtype=torch.float64) + 300.0
    initial = NormStats(torch.zeros(1, dtype=torch.int64), torch.zeros(1, G, dtype=torch.float64),
                        torch.ones(1, G, dtype=torch.float64))
    weight, bias = torch.zeros(D, dtype=torch.float64), torch.zeros(D, dtype=torch.float64)
    y_ref, s_ref = ops.timestep_norm_blocked(x, initial, weight, bias, 1e-5, block_size=512)
    y, s = triton_path(*on_device(x.float(), initial, weight.float(), bias.float()), 1e-5, 512)
    torch.testing.assert_close(s.var.cpu(), s_ref.var, rtol=1e-4, atol=0)
    torch.testing.assert_close(y[:, -200:].cpu().double(), y_ref[:, -200:], rtol=1e-3, atol=1e-3)


def test_two_calls_equal_one():
    x, initial, _, weight, bias = case(2, 21, 0, seed=3)
    x, initial, weight, bias = on_device(x, initial, weight, bias)
    y, s = triton_path(x, initial, weight, bias, 1e-5, 4)
    y1, s1 = triton_path(x[:, :10], initial, weight, bias, 1e-5, 4)
    y2, s2 = triton_path(x[:, 10:], s1, weight, bias, 1e-5, 4)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, rtol=1e-5, atol=1e-5)
    assert torch.equal(s2.count, s.count)
    torch.testing.assert_close(s2.var, s.var, rtol=1e-6, atol=1e-7)


def test_dispatch_picks_triton_without_pad_mask(monkeypatch):
    """The one dispatch function: the kernels when use_triton says so (here forced, on whatever DEVICE is), the PyTorch
    path for a pad_mask or float64."""
    x, initial, prior, weight, bias = on_device(*case(2, 9, 1, seed=5))
    calls = []
    import megalodon.ops.triton.timestep_norm as kernels

    monkeypatch.setattr(ops, "use_triton", lambda op, *tensors: op == "timestep_norm")
    original = kernels.timestep_norm_triton
    monkeypatch.setattr(kernels, "timestep_norm_triton", lambda *a, **k: calls.append(1) or original(*a, **k))
    timestep_norm(x, initial, weight, bias, 1e-5, 4, prior=prior)
    assert calls == [1]
    no_padding = torch.zeros(2, 9, dtype=torch.bool, device=DEVICE)
    timestep_norm(x, initial, weight, bias, 1e-5, 4, prior=prior, pad_mask=no_padding)
    timestep_norm(x.double(), initial, weight.double(), bias.double(), 1e-5, 4, prior=prior)
    assert calls == [1]


@pytest.mark.parametrize("uses", ["both", "copy only"])
def test_low_precision_copy_and_its_gradient(uses):
    """copy_dtype: y again in bf16 from the same pass, as torch's cast of y makes it, and backward adds the copy's
    gradient to y's, against the float64 reference fed the sum. "copy only": y's own gradient is None."""
    x, initial, prior, weight, bias = case(2, 21, 1, seed=11)
    reset = torch.tensor([[False, True, False], [True, False, False]])
    dev, ref = leaves(x, initial, prior, weight, bias)
    counts = (initial.count, prior.count)

    def with_copy(x, initial, prior, weight, bias, eps, block, reset):
        return triton_path(x, initial, weight, bias, eps, block, reset, prior, copy_dtype=torch.bfloat16)

    y, copy, final = run(with_copy, dev, counts, 1e-5, 8, reset)
    y_ref, final_ref = run(reference, ref, counts, 1e-5, 8, reset)
    assert y.dtype == torch.float32 and copy.dtype == torch.bfloat16 and copy.shape == y.shape
    assert torch.equal(copy, y.detach().to(torch.bfloat16))
    torch.testing.assert_close(final.var.cpu(), final_ref.var, rtol=1e-5, atol=1e-6)

    g = torch.Generator().manual_seed(2)
    dy = torch.randn(y_ref.shape, generator=g, dtype=torch.float64) * (uses == "both")
    d_copy = torch.randn(y_ref.shape, generator=g).to(torch.bfloat16)  # bf16: what reaches the copy is bf16
    loss = (copy * d_copy.to(DEVICE)).float().sum() + (y.double() * dy.to(DEVICE)).sum() * (uses == "both")
    grads = torch.autograd.grad(loss, [dev[0], dev[1], dev[5], dev[6]])
    grads_ref = torch.autograd.grad((y_ref * (dy + d_copy.double())).sum(), [ref[0], ref[1], ref[5], ref[6]])
    for name, got, want in zip(["x", "mean", "weight", "bias"], grads, grads_ref):
        scale = want.abs().max().clamp(min=1.0)
        torch.testing.assert_close(got.cpu().double() / scale, want / scale, rtol=0, atol=2e-5, msg=name)


def test_pytorch_path_returns_the_same_copy():
    """Where the Triton kernels do not run (the CPU, float64, a pad_mask), copy_dtype gives y cast, and y itself
    when copy_dtype is y's dtype."""
    x, initial, prior, weight, bias = case(2, 9, 1, seed=12)
    y, stats = timestep_norm(x, initial, weight, bias, 1e-5, 4)
    y2, copy, stats2 = timestep_norm(x, initial, weight, bias, 1e-5, 4, copy_dtype=torch.bfloat16)
    torch.testing.assert_close(y2, y)
    assert torch.equal(copy, y.to(torch.bfloat16))
    torch.testing.assert_close(stats2.var, stats.var)
    y3, same, _ = timestep_norm(x, initial, weight, bias, 1e-5, 4, copy_dtype=torch.float32)
    assert same is y3


@pytest.mark.parametrize("copy_dtype", [None, torch.bfloat16])
def test_custom_ops_pass_opcheck(copy_dtype):
    """Schema, fake (meta) implementations and autograd registration, as torch.compile relies on them."""
    from megalodon.ops.triton.timestep_norm import timestep_norm_fwd

    x, initial, prior, weight, bias = case(2, 10, 2, seed=6)
    args = (x.to(DEVICE).requires_grad_(), initial.count, initial.mean.requires_grad_(), initial.var,
            prior.count.expand(2).contiguous(), prior.mean.expand(2, G).contiguous(),
            prior.var.expand(2, G).contiguous(), torch.tensor([[False, True, False]]).expand(2, 3).contiguous(),
            weight.requires_grad_(), bias, 1e-5, 4, copy_dtype)
    args = tuple(a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(timestep_norm_fwd.op, args, test_utils=("test_schema", "test_faketensor",
                                                               "test_autograd_registration"))


def test_compiled_graph_holds_the_op(monkeypatch):
    """Dynamo traces the dispatch and the custom op with fullgraph (no graph break), forward and backward."""
    x, initial, prior, weight, bias = on_device(*case(2, 12, 1, seed=8))
    monkeypatch.setattr(ops, "use_triton", lambda op, *tensors: True)
    x = x.requires_grad_()

    def fn(x):
        y, s = timestep_norm(x, initial, weight, bias, 1e-5, 4, prior=prior)
        return y.square().sum() + s.var.sum()

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    (g_eager,) = torch.autograd.grad(fn(x), x)
    (g_compiled,) = torch.autograd.grad(compiled(x), x)
    torch.testing.assert_close(g_compiled, g_eager)


@requires_cuda
def test_cuda_matches_the_pytorch_path_at_a_real_shape():
    """On a GPU: the compiled kernels (not the interpreter) at a mega200M-like width, against the PyTorch path."""
    torch.manual_seed(0)
    x = torch.randn(2, 3000, 1024, device="cuda").requires_grad_()
    initial = NormStats(torch.tensor([0, 5000], device="cuda"), torch.randn(2, 32, device="cuda", dtype=torch.float64),
                        torch.rand(2, 32, device="cuda", dtype=torch.float64) + 0.5)
    weight, bias = torch.randn(1024, device="cuda"), torch.randn(1024, device="cuda")
    reset = torch.tensor([[False, True], [False, False]], device="cuda")
    y, s = triton_path(x, initial, weight, bias, 1e-5, 2048, reset)
    y_ref, s_ref = ops.timestep_norm_blocked(x.double(), initial, weight.double(), bias.double(), 1e-5, 2048, reset)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s.var, s_ref.var, rtol=1e-5, atol=1e-6)
    (dx,) = torch.autograd.grad((y * y_ref.detach().float()).sum(), x)
    (dx_ref,) = torch.autograd.grad((y_ref * y_ref.detach()).sum(), x)
    torch.testing.assert_close(dx.double(), dx_ref.double(), rtol=1e-3, atol=1e-3 * dx_ref.abs().max().item())


@requires_cuda
def test_cuda_low_precision_copy_at_a_real_shape():
    """On a GPU, at a mega200M-like width: the bf16 copy is y rounded as torch rounds it, and the gradients with
    both outputs used equal those of y alone fed the summed gradient."""
    torch.manual_seed(1)
    x = torch.randn(1, 4096, 1024, device="cuda").requires_grad_()
    initial = NormStats(torch.tensor([0], device="cuda"), torch.zeros(1, 32, device="cuda", dtype=torch.float64),
                        torch.ones(1, 32, device="cuda", dtype=torch.float64))
    weight, bias = torch.randn(1024, device="cuda"), torch.randn(1024, device="cuda")
    y, copy, _ = triton_path(x, initial, weight, bias, 1e-5, 2048, copy_dtype=torch.bfloat16)
    assert torch.equal(copy, y.detach().to(torch.bfloat16))
    dy = torch.randn_like(y)
    d_copy = torch.randn(y.shape, device="cuda").to(torch.bfloat16)
    (dx,) = torch.autograd.grad((y * dy).sum() + (copy.float() * d_copy.float()).sum(), x)
    y_alone, _ = triton_path(x, initial, weight, bias, 1e-5, 2048)
    (dx_want,) = torch.autograd.grad((y_alone * (dy + d_copy.float())).sum(), x)
    torch.testing.assert_close(dx, dx_want, rtol=1e-5, atol=1e-5 * dx_want.abs().max().item())


def test_step_kernel_matches_the_pytorch_step(monkeypatch):
    """The fused decode step (forced on; on the CPU the interpreter runs it), functional and in place, fp32 and bf16,
    against the PyTorch step; a count of zero (the prior has no weight) included. Each group of x is c +- d, so
    both paths see the same exact moments and the float64 update must agree to 1e-12 (a fp32 update at count 1M
    would be off by 1e-7)."""
    from megalodon.ops.timestep_norm import timestep_norm_step, timestep_norm_step_

    g = torch.Generator().manual_seed(9)
    state = NormStats(torch.tensor([0, 6, 1_000_000]), torch.randn(3, G, generator=g, dtype=torch.float64) + 3,
                      torch.rand(3, G, generator=g, dtype=torch.float64) + 0.5)
    weight, bias = torch.randn(D, generator=g), torch.randn(D, generator=g)
    state, weight, bias = on_device(state, weight, bias)
    for dtype in (torch.float32, torch.bfloat16):
        centers = torch.randint(-16, 16, (3, 1, G, 1), generator=g) / 4 + 3
        spreads = 2.0 ** torch.randint(-2, 2, (3, 1, G, 1), generator=g)
        x = (centers + spreads * torch.tensor([1.0, -1.0, -1.0, 1.0])).flatten(-2).to(DEVICE, dtype)
        with torch.no_grad():
            y_ref, new_ref = timestep_norm_step(x, state, weight, bias, 1e-5)
            monkeypatch.setattr(ops, "use_triton", lambda op, *t: op == "timestep_norm_step")
            y, new = timestep_norm_step(x, state, weight, bias, 1e-5)
            buffers = NormStats(*(t.clone() for t in state))
            y_in_place, y_copy = timestep_norm_step_(x, buffers, weight, bias, 1e-5, torch.bfloat16)
            monkeypatch.undo()
        for got in (y, y_in_place):
            torch.testing.assert_close(got, y_ref, rtol=1e-5, atol=1e-5)
        # the copy in the linears' dtype: the kernel's own y, rounded to nearest as torch's cast rounds it
        assert y_copy.dtype == torch.bfloat16 and y_copy.shape == y_ref.shape
        assert torch.equal(y_copy, y_in_place.to(torch.bfloat16))
        for got_state in (new, buffers):
            assert torch.equal(got_state.count, new_ref.count)
            torch.testing.assert_close(got_state.mean, new_ref.mean, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(got_state.var, new_ref.var, rtol=1e-12, atol=1e-12)
        assert state.count.tolist() == [0, 6, 1_000_000]  # the functional step left its input alone


@requires_cuda
def test_in_place_step_runs_in_a_cuda_graph_without_host_syncs():
    from megalodon.ops.timestep_norm import timestep_norm_step_

    torch.manual_seed(0)
    x = torch.randn(4, 1, 1024, device="cuda")
    weight, bias = torch.randn(1024, device="cuda"), torch.randn(1024, device="cuda")
    state = NormStats(torch.zeros(4, dtype=torch.int64, device="cuda"),
                      torch.zeros(4, 32, dtype=torch.float64, device="cuda"),
                      torch.ones(4, 32, dtype=torch.float64, device="cuda"))
    reference = NormStats(*(t.clone() for t in state))
    with torch.no_grad():
        timestep_norm_step_(x, NormStats(*(t.clone() for t in state)), weight, bias, 1e-5)  # warm-up (compiles)
        graph = torch.cuda.CUDAGraph()
        torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.cuda.graph(graph):
                y = timestep_norm_step_(x, state, weight, bias, 1e-5)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        for _ in range(3):
            graph.replay()
            y_ref = ops.timestep_norm_step_(x, reference, weight, bias, 1e-5)
        torch.testing.assert_close(y, y_ref)
        assert state.count.tolist() == [3] * 4
        torch.testing.assert_close(state.var, reference.var)


COMPILE_FOR_H100 = """
from megalodon.ops.triton import timestep_norm as glue
from megalodon.ops.triton import timestep_norm_carry as carries
from megalodon.ops.triton import timestep_norm_kernels as kernels
from megalodon.ops.triton import timestep_norm_step as step

f32, f64, i64, i32 = "*fp32", "*fp64", "*i64", "i32"
tile = dict(BLOCK_T=64, BLOCK_DG=32)
CASES = []
for x in ("*bf16", f32):
    CASES += [(kernels.moments_kernel, [x, f32, f32] + [i32] * 4, tile),
              (kernels.normalize_kernel, [x] + [f32] * 5 + ["*bf16"] + [i32] * 4, dict(tile, COPY=True)),
              (kernels.normalize_kernel, [x] + [f32] * 6 + [i32] * 4, dict(tile, COPY=False)),
              (kernels.norm_bwd_kernel, [x, f32, "*bf16"] + [f32] * 7 + [i32] * 4, dict(tile, HAS_COPY=True)),
              (kernels.norm_bwd_kernel, [x, f32, f32] + [f32] * 7 + [i32] * 4, dict(tile, HAS_COPY=False)),
              (kernels.dx_kernel, [x, f32, "*bf16"] + [f32] * 5 + [x] + [i32] * 4, dict(tile, HAS_COPY=True)),
              (kernels.dx_kernel, [x, f32, f32] + [f32] * 5 + [x] + [i32] * 4, dict(tile, HAS_COPY=False)),
              (step._step_kernel, [x, i64, f64, f64, f32, f32, f32, x, i32, i32, i32, "fp32"],
               dict(COPY=x != f32, BLOCK_G=32, BLOCK_DG=32))]
# the scans' default tiles, and the tilings benchmarks/bench_timestep_norm.py --scan-tiles tries on a GPU
for has_reset, tokens, groups, warps in ((True, 256, 8, 4), (False, 256, 8, 4), (True, 1024, 2, 4),
                                         (True, 2048, 2, 8), (True, 64, 8, 4)):
    reset = "*i8" if has_reset else i64
    tile = dict(BLOCK_T=tokens, BLOCK_G=groups)
    carry = dict(tile, SEGS=glue.CARRY_SEGMENTS)
    for totals in (True, False):
        CASES += [(kernels.scan_fwd_kernel, [f32] * 4 + [f64, f64, i64, f64, f64] + [i32] * 7 + ["fp32"],
                   dict(tile, TOTALS=totals), warps),
                  (kernels.scan_bwd_kernel, [f32] * 3 + [i64, f64, f64] + [f32] * 6 + [i32] * 8,
                   dict(tile, TOTALS=totals, HAS_FINAL=has_reset), warps)]
    CASES += [(carries.carry_fwd_kernel, [f64, f64, i64, f64, f64, i64, f64, f64, reset, f64, f64, i64, i64, f64,
                                          f64] + [i32] * 6, dict(carry, HAS_RESET=has_reset), 1),
              (carries.carry_bwd_kernel, [f32] * 8 + [reset, i64, f64, i64, f64] + [f64] * 4 + [i32] * 6,
               dict(carry, HAS_RESET=has_reset), 1)]
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the other kernel tests compile and run them")
def test_kernels_compile_for_h100():
    """Every kernel variant compiles to an sm_90 cubin (triton ships ptxas; no GPU needed), so that what the
    interpreter accepts but the compiler rejects (loop-carried types, scalar masks) is caught on CPU
    (tests/sm90.py)."""
    check_compiles_for_h100(COMPILE_FOR_H100)
