"""The materialized attention's masked softmax as one Triton kernel each way (ops/triton/causal_softmax.py):
against a float64 softmax and its autograd gradient, and the attention built on it against the dense float64
reference, under the interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1 without a GPU) or on a GPU."""

import pytest
import torch
from helpers import kernel_only
from sm90 import check_compiles_for_h100

from megalodon.ops import attention
from megalodon.ops.attention import chunked_attention, dense_chunk_attention

pytest.importorskip("triton")  # the kernels run under the interpreter on CPU
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.cuda  # on a GPU every kernel test here runs on it
# (queries, keys, offset): a whole chunk, the queries that finish a partial chunk (offset = cached keys), and rows
# of a length that is not a power of two
SHAPES = [(16, 16, 0), (5, 12, 7), (37, 37, 0)]


def masked_softmax_float64(scores, offset):
    queries, keys = scores.shape[-2:]
    future = torch.ones(queries, keys, dtype=torch.bool).triu(offset + 1).to(scores.device)
    return scores.double().masked_fill(future, float("-inf")).softmax(-1), future


def scores_of(queries, keys, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 3, queries, keys, generator=g) * 4).to(dtype).to(DEVICE)


@pytest.mark.parametrize("queries, keys, offset", SHAPES)
@pytest.mark.parametrize("dtype, out_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                              (torch.float32, torch.bfloat16)])
def test_forward_matches_float64(queries, keys, offset, dtype, out_dtype):
    from megalodon.ops.triton.causal_softmax import causal_softmax_fwd

    scores = scores_of(queries, keys, dtype, seed=queries)
    probs = causal_softmax_fwd(scores, offset, out_dtype)
    want, future = masked_softmax_float64(scores, offset)
    assert probs.dtype == out_dtype and probs.shape == scores.shape
    assert not probs[..., future].any(), "a masked key got probability"
    # fp32 to rounding; a bf16 output is the fp32 softmax rounded once to nearest: within half a step
    rtol = 1e-5 if out_dtype == torch.float32 else 2 ** -8
    torch.testing.assert_close(probs.double(), want, rtol=rtol, atol=1e-7)


@pytest.mark.parametrize("queries, keys, offset", SHAPES)
def test_backward_matches_float64_autograd(queries, keys, offset):
    """The recomputed probabilities and the scores' gradient against autograd through a float64 softmax."""
    from megalodon.ops.triton.causal_softmax import causal_softmax_bwd

    scores = scores_of(queries, keys, torch.float32, seed=10 + queries)
    grad_probs = scores_of(queries, keys, torch.float32, seed=20 + queries)
    probs, grad_scores = causal_softmax_bwd(scores, grad_probs, offset)
    leaf = scores.double().requires_grad_()
    want, future = masked_softmax_float64(leaf, offset)
    (want_grad,) = torch.autograd.grad(want, leaf, grad_probs.double())
    torch.testing.assert_close(probs.double(), want.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad_scores.double(), want_grad, rtol=1e-4, atol=1e-6)
    assert not grad_scores[..., future].any()


def test_backward_writes_each_output_in_its_dtype():
    """bf16 scores and an fp32 dP (values in another dtype than q and k): P in dP's dtype, dS in the scores'."""
    from megalodon.ops.triton.causal_softmax import causal_softmax_bwd

    scores = scores_of(16, 16, torch.bfloat16, seed=3)
    grad_probs = scores_of(16, 16, torch.float32, seed=4)
    probs, grad_scores = causal_softmax_bwd(scores, grad_probs, 0)
    assert probs.dtype == torch.float32 and grad_scores.dtype == torch.bfloat16
    leaf = scores.double().requires_grad_()
    want, _ = masked_softmax_float64(leaf, 0)
    (want_grad,) = torch.autograd.grad(want, leaf, grad_probs.double())
    torch.testing.assert_close(probs.double(), want.detach(), rtol=1e-5, atol=1e-7)
    scale = want_grad.abs().max().item()
    torch.testing.assert_close(grad_scores.double(), want_grad, rtol=2 ** -7, atol=2 ** -7 * scale)


def test_rows_longer_than_a_program_holds_stay_on_the_pytorch_path():
    from megalodon.ops.triton.causal_softmax import MAX_KEYS, supports_scores

    assert supports_scores(torch.empty(1, 1, 4, MAX_KEYS, device="meta"))
    assert not supports_scores(torch.empty(1, 1, 4, MAX_KEYS + 1, device="meta"))
    assert not supports_scores(torch.empty(1, 1, 4, 8, device="meta", dtype=torch.float64))


def qkv(length, dtype, seed, heads=2, dz=4, dv=6):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(2, length, heads, d, generator=g) * s).to(dtype).to(DEVICE)
            for d, s in ((dz, 2.0), (dz, 2.0), (dv, 1.0))]


def streamed(q, k, v, split, chunk):
    """chunked_attention over consecutive pieces with the caches carried (values as pre-activations)."""
    outs, k_cache, v_cache, start = [], None, None, 0
    for piece in split:
        part = slice(start, start + piece)
        out, k_cache, v_cache = chunked_attention(q[:, part], k[:, part], v[:, part], chunk, k_cache, v_cache,
                                                  silu_values=True)
        outs.append(out)
        start += piece
    return torch.cat(outs, 1)


def on_the_kernels(monkeypatch) -> list[str]:
    """Only the softmax kernels on (the rest of the attention as it is); records their calls."""
    from megalodon.ops.triton import causal_softmax as kernels

    return kernel_only(monkeypatch, attention, "causal_softmax", kernels, "causal_softmax_fwd", "causal_softmax_bwd")


@pytest.mark.parametrize("halves", [False, True], ids=["one-block", "query-halves"])
@pytest.mark.parametrize("split", [[29], [3, 5, 9, 12], [7, 1, 21]])
def test_attention_on_the_kernels_matches_the_dense_reference(monkeypatch, split, halves):
    """Chunked attention (fp32) with the caches carried across calls, outputs and the gradients of q, k and v,
    against the dense float64 reference; with the queries in halves (attention.query_blocks, as on CUDA for long
    chunks of long calls), each half's softmax at its own offset."""
    if halves:
        monkeypatch.setattr(attention, "query_blocks", lambda n, q: [(0, n // 2), (n // 2, n)] if n > 1 else [(0, n)])
    calls = on_the_kernels(monkeypatch)
    chunk, length = 8, sum(split)
    q, k, v = (t.requires_grad_() for t in qkv(length, torch.float32, seed=len(split)))
    weight = torch.randn(2, length, 2, 6, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    got = streamed(q, k, v, split, chunk)
    grads = torch.autograd.grad((got * weight).sum(), (q, k, v))
    assert set(calls) == {"causal_softmax_fwd", "causal_softmax_bwd"}

    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want = dense_chunk_attention(leaves[0], leaves[1], torch.nn.functional.silu(leaves[2]), chunk)
    want_grads = torch.autograd.grad((want * weight.double()).sum(), leaves)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    for name, a, b in zip("qkv", grads, want_grads):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5, msg=name)


def test_bf16_attention_on_the_kernels_matches_the_pytorch_path(monkeypatch):
    """bf16 q, k and v (autocast's dtypes): outputs and gradients as the PyTorch path gives them, to a bf16 step
    of each tensor's scale (each path rounds the probabilities and dS to bf16 from fp32 values computed in
    another order)."""
    q, k, v = qkv(29, torch.bfloat16, seed=5)
    weight = torch.randn(2, 29, 2, 6, generator=torch.Generator().manual_seed(2)).to(DEVICE)

    def run():
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        out = streamed(*leaves, [3, 26], chunk=8)
        return [out, *torch.autograd.grad((out.float() * weight).sum(), leaves)]

    want = run()
    calls = on_the_kernels(monkeypatch)
    got = run()
    assert set(calls) == {"causal_softmax_fwd", "causal_softmax_bwd"}
    for name, a, b in zip(("out", "q", "k", "v"), got, want):
        assert a.dtype == b.dtype == torch.bfloat16, name
        scale = b.abs().max().item()
        torch.testing.assert_close(a.float(), b.float(), rtol=2 ** -6, atol=2 ** -6 * scale, msg=name)


def test_custom_ops_pass_opcheck():
    """Schemas and fake (meta) implementations, as torch.compile relies on them."""
    from megalodon.ops.triton.causal_softmax import causal_softmax_bwd, causal_softmax_fwd

    scores, grad = scores_of(5, 12, torch.float32, seed=7), scores_of(5, 12, torch.bfloat16, seed=8)
    for op, args in ((causal_softmax_fwd, (scores, 7, torch.bfloat16)), (causal_softmax_bwd, (scores, grad, 7))):
        torch.library.opcheck(op.op, args, test_utils=("test_schema", "test_faketensor"))


def test_compiled_graph_holds_the_ops(monkeypatch):
    """Dynamo traces the attention op and both kernels with fullgraph (no graph break), forward and backward."""
    monkeypatch.setattr(attention, "use_triton", lambda op, *tensors: op == "causal_softmax")
    q, k, v = (t.requires_grad_() for t in qkv(20, torch.float32, seed=6))

    def fn(q, k, v):
        out, _, _ = chunked_attention(q, k, v, 8, silu_values=True)
        return out.square().sum()

    eager = torch.autograd.grad(fn(q, k, v), (q, k, v))
    compiled = torch.autograd.grad(torch.compile(fn, backend="aot_eager", fullgraph=True)(q, k, v), (q, k, v))
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b)


COMPILE_FOR_H100 = """
from megalodon.ops.triton import causal_softmax as kernels

i32 = "i32"
CASES = []
for scores, values, block, warps in (("*bf16", "*bf16", 2048, 8), ("*fp32", "*fp32", 512, 4),
                                     ("*bf16", "*bf16", 16384, 16)):
    CASES += [(kernels.causal_softmax_fwd_kernel, [scores, values] + [i32] * 3, dict(BLOCK=block), warps),
              (kernels.causal_softmax_bwd_kernel, [scores, values, values, scores] + [i32] * 3, dict(BLOCK=block),
               warps)]
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the other kernel tests compile and run them")
def test_kernels_compile_for_h100():
    """Both kernels compile to sm_90 cubins (triton ships ptxas; no GPU needed) at the block sizes chunks use."""
    check_compiles_for_h100(COMPILE_FOR_H100)
