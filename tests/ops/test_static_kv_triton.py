"""A decode step's attention in two Triton kernels (ops/triton/static_kv.py, behind ops/static_kv.py::
write_and_attend): the buffers it writes and the output it gives, against the PyTorch path (slot writes, then
attend_slots, itself checked in float64 by test_static_kv.py) and against attention over the visible slots in
float64, under the interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1 without a GPU) or on a GPU."""

import helpers
import pytest
import torch
from sm90 import check_compiles_for_h100

from megalodon.ops import static_kv
from megalodon.ops.static_kv import slot_step, write_and_attend

pytest.importorskip("triton")  # the kernels run under the interpreter on CPU
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.cuda  # on a GPU every kernel test here runs on it
# several blocks of slots in each kernel (and a partial one), several blocks of value features; dk != dv
BATCH, SLOTS, HEADS, DK, DV = 4, 150, 2, 8, 80


def step_inputs(dtype, seed):
    """Buffers full of stale entries, rows at different slots (the first, a middle one, the last) and the new
    token's q, k and v (v as pre-activations)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype).to(DEVICE)

    keys, values = randn(BATCH, SLOTS, HEADS, DK), randn(BATCH, SLOTS, HEADS, DV)
    qk = randn(BATCH, 1, 2 * HEADS, DK)  # q and k as the model has them: slices of one tensor, strided rows
    qk[:, :, :HEADS] *= 0.7
    q, k, v = qk[:, :, :HEADS], qk[:, :, HEADS:], randn(BATCH, 1, HEADS, DV)
    step = slot_step(torch.tensor([0, 133, SLOTS - 1, 5], device=DEVICE), SLOTS)
    return q, k, v, keys, values, step


def gate_of(dtype, seed):
    """An output gate (B, 1, H * DV) as the model has it: a slice of a wider projection (strided rows)."""
    wide = torch.randn(BATCH, 1, HEADS * DV + 24, generator=torch.Generator().manual_seed(seed)) * 2
    return wide.to(dtype).to(DEVICE)[..., 5:5 + HEADS * DV]


def both_paths(monkeypatch, fn):
    import megalodon.ops.triton.static_kv as kernels

    return helpers.both_paths(monkeypatch, fn, static_kv, "static_kv", kernels, "write_and_attend_triton")


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("silu_values", [True, False])
@pytest.mark.parametrize("scale", [1.0, None])
def test_fp32_step_matches_the_pytorch_path(monkeypatch, silu_values, scale, gated):
    q, k, v, keys, values, step = step_inputs(torch.float32, seed=0)
    gate = gate_of(torch.float32, seed=10) if gated else None

    def run():
        buffers = keys.clone(), values.clone()
        return write_and_attend(q, k, v, *buffers, step, scale, silu_values, gate), *buffers

    (out, keys_got, values_got), (out_want, keys_want, values_want) = both_paths(monkeypatch, run)
    assert out.shape == (BATCH, 1, HEADS, DV) and out.dtype == torch.float32
    torch.testing.assert_close(keys_got, keys_want, rtol=0, atol=0)  # the new key, copied
    torch.testing.assert_close(values_got, values_want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, out_want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("value_slots", [32, 256])
def test_fp32_step_matches_float64_attention_over_the_visible_slots(monkeypatch, value_slots):
    """Each row's output against softmax(q k^T) silu(v) over slots 0..slot[b] in float64, where slot[b] holds
    the new key and value: the stale entries after it play no part, not even NaNs (the value kernel reads no
    slot past a row's own). value_slots: the value kernel's slots a step, so that its loop runs several steps
    and a partial one (32), or one step for the whole buffer (256)."""
    import megalodon.ops.triton.static_kv as kernels

    q, k, v, keys, values, step = step_inputs(torch.float32, seed=1)
    monkeypatch.setattr(static_kv, "use_triton", lambda op, *tensors: op == "static_kv")
    monkeypatch.setattr(kernels, "VALUE_SLOTS", value_slots)
    for b, slot in enumerate(step.slot.tolist()):
        keys[b, slot + 1:], values[b, slot + 1:] = float("nan"), float("nan")
    buffers = keys.clone(), values.clone()
    gate = gate_of(torch.float32, seed=11)
    out = write_and_attend(q, k, v, *buffers, step, scale=1.0, silu_values=True, gate=gate)
    silu = torch.nn.functional.silu
    for b, slot in enumerate(step.slot.tolist()):
        seen_keys = torch.cat([keys[b, :slot], k[b]]).double()
        seen_values = torch.cat([values[b, :slot], silu(v[b])]).double()
        probs = torch.einsum("hd,shd->hs", q[b, 0].double(), seen_keys).softmax(-1)
        want = torch.einsum("hs,shd->hd", probs, seen_values) * silu(gate[b, 0].double()).view(HEADS, DV)
        torch.testing.assert_close(out[b, 0].double(), want, rtol=1e-5, atol=1e-5)


def test_bf16_step_matches_the_pytorch_path(monkeypatch):
    """A bf16 model's step: the scores and the probabilities rounded to bf16 where the PyTorch path rounds them,
    so the two agree to a bf16 step (a value the two compute in fp32 in another order can round either way)."""
    q, k, v, keys, values, step = step_inputs(torch.bfloat16, seed=2)
    gate = gate_of(torch.bfloat16, seed=12)

    def run():
        buffers = keys.clone(), values.clone()
        return write_and_attend(q, k, v, *buffers, step, 1.0, True, gate), *buffers

    (out, keys_got, values_got), (out_want, keys_want, values_want) = both_paths(monkeypatch, run)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(keys_got, keys_want, rtol=0, atol=0)
    torch.testing.assert_close(values_got.float(), values_want.float(), rtol=2 ** -7, atol=2 ** -7)
    scale = out_want.abs().max().item()
    torch.testing.assert_close(out.float(), out_want.float(), rtol=2 ** -6, atol=2 ** -6 * scale)


def test_equal_head_dims_stay_on_sdpa(monkeypatch):
    """The Llama's dims (dk == dv): SDPA's path, not these kernels."""
    import megalodon.ops.triton.static_kv as kernels

    monkeypatch.setattr(static_kv, "use_triton", lambda op, *tensors: True)
    monkeypatch.setattr(kernels, "write_and_attend_triton", lambda *a: pytest.fail("the kernels ran"))
    q, k, v, keys, values, step = step_inputs(torch.float32, seed=3)
    write_and_attend(q, k, k.clone(), keys, keys.clone(), step)


def test_custom_ops_pass_opcheck():
    """Schemas (with the buffers declared mutated) and fake (meta) implementations, as torch.compile relies on."""
    from megalodon.ops.triton.static_kv import slot_scores, slot_values

    q, k, v, keys, values, step = step_inputs(torch.float32, seed=4)
    scores = slot_scores(q[:, 0], k[:, 0], v[:, 0], keys.clone(), values.clone(), step.slot,
                         step.visible.flatten(1), 1.0, True)
    torch.library.opcheck(slot_scores.op, (q[:, 0], k[:, 0], v[:, 0], keys, values, step.slot, step.visible.flatten(1),
                                        1.0, True), test_utils=("test_schema", "test_faketensor"))
    for gate in (None, gate_of(torch.float32, seed=13)[:, 0]):
        torch.library.opcheck(slot_values.op, (scores, values, gate, torch.bfloat16),
                              test_utils=("test_schema", "test_faketensor"))


def test_compiled_step_holds_the_ops(monkeypatch):
    """Dynamo traces write_and_attend on the kernels with fullgraph; the buffers are written as in eager."""
    monkeypatch.setattr(static_kv, "use_triton", lambda op, *tensors: op == "static_kv")
    q, k, v, keys, values, step = step_inputs(torch.float32, seed=5)

    gate = gate_of(torch.float32, seed=14)

    def fn(keys, values):
        return write_and_attend(q, k, v, keys, values, step, 1.0, True, gate)

    eager_buffers, compiled_buffers = (keys.clone(), values.clone()), (keys.clone(), values.clone())
    want = fn(*eager_buffers)
    got = torch.compile(fn, backend="aot_eager", fullgraph=True)(*compiled_buffers)
    torch.testing.assert_close(got, want)
    for a, b in zip(compiled_buffers, eager_buffers):
        torch.testing.assert_close(a, b)


COMPILE_FOR_H100 = """
from megalodon.ops.triton import static_kv as kernels

i32, f32 = "i32", "fp32"
CASES = []
for t in ("*bf16", "*fp32"):
    CASES += [(kernels.slot_scores_kernel, [t, t, t, t, t, "*i64", "*i1", "*fp32"] + [i32] * 6 + [f32],
               dict(SILU_VALUES=True, BLOCK_S=16, BLOCK_K=256, BLOCK_V=64)),
              (kernels.slot_values_kernel, ["*fp32", t, t, t] + [i32] * 4,
               dict(GATED=True, BLOCK_ALL=2048, BLOCK_S=256, BLOCK_V=16)),
              (kernels.slot_values_kernel, ["*fp32", t, t, t] + [i32] * 4,
               dict(GATED=False, BLOCK_ALL=4096, BLOCK_S=32, BLOCK_V=128))]
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the other kernel tests compile and run them")
def test_kernels_compile_for_h100():
    """Both kernels compile to sm_90 cubins (triton ships ptxas; no GPU needed), bf16 and fp32, at mega200M's
    head dims and chunk."""
    check_compiles_for_h100(COMPILE_FOR_H100)
