"""Chunked attention and rotary embedding against dense, explicit references."""

import pytest
import torch
from helpers import saved_bytes

from megalodon.ops.attention import (apply_rotary, attention_path, chunked_attention, decode_attention,
                                     dense_chunk_attention, rope_frequencies)

C = 8


def qkv(batch, length, heads=2, dz=4, dv=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, length, heads, dz, generator=g, dtype=torch.float64),
            torch.randn(batch, length, heads, dz, generator=g, dtype=torch.float64),
            torch.randn(batch, length, heads, dv, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("length", [1, 3, C, C + 1, 3 * C - 2, 4 * C])
def test_chunked_matches_dense(length):
    q, k, v = qkv(2, length)
    out, k_cache, v_cache = chunked_attention(q, k, v, C)
    torch.testing.assert_close(out, dense_chunk_attention(q, k, v, C), rtol=1e-10, atol=1e-10)
    assert k_cache.shape[1] == length % C and v_cache.shape[1] == length % C


@pytest.mark.parametrize("split", [[1] * 13, [3, 5, 5], [7, 1, 9, 2], [2, 20], [8, 8, 1]])
def test_streamed_pieces_match_dense(split):
    total = sum(split)
    q, k, v = qkv(2, total, seed=1)
    reference = dense_chunk_attention(q, k, v, C)
    outs, k_cache, v_cache, start = [], None, None, 0
    for piece in split:
        sl = slice(start, start + piece)
        out, k_cache, v_cache = chunked_attention(q[:, sl], k[:, sl], v[:, sl], C, k_cache, v_cache)
        outs.append(out)
        start += piece
        assert k_cache.shape[1] == start % C
    torch.testing.assert_close(torch.cat(outs, 1), reference, rtol=1e-10, atol=1e-10)


def streamed(q, k, v, split, dropout_p=0.0, chunk=C, silu_values=False):
    outs, k_cache, v_cache, start = [], None, None, 0
    for piece in split:
        sl = slice(start, start + piece)
        out, k_cache, v_cache = chunked_attention(q[:, sl], k[:, sl], v[:, sl], chunk, k_cache, v_cache, dropout_p,
                                                  silu_values)
        outs.append(out)
        start += piece
    return torch.cat(outs, 1)


@pytest.mark.parametrize("dv", [4, 6])  # SDPA, the materialized form
@pytest.mark.parametrize("split", [[3 * C - 2], [5], [3, 5, 9], [7, 1, 2 * C + 3]])
def test_silu_values_equal_attention_over_silu_v_with_gradients(dv, split):
    """silu_values: v holds pre-activations (applied inside the op on the materialized path, before it
    elsewhere); outputs, carried value caches and gradients equal attention over silu(v), in float64."""
    q, k, v = (t.requires_grad_() for t in qkv(2, sum(split), dv=dv, seed=9))
    weight = torch.randn(2, sum(split), 2, dv, dtype=torch.float64)
    got = streamed(q, k, v, split, silu_values=True)
    want = dense_chunk_attention(q, k, torch.nn.functional.silu(v), C)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    grads = torch.autograd.grad((got * weight).sum(), (q, k, v))
    for g, w in zip(grads, torch.autograd.grad((want * weight).sum(), (q, k, v))):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)
    _, _, v_cache = chunked_attention(q, k, v, C, silu_values=True)
    torch.testing.assert_close(v_cache, torch.nn.functional.silu(v[:, sum(split) - v_cache.shape[1]:]))


def test_silu_values_keep_the_pre_activations_alone():
    """The materialized op applies the SiLU itself: backward keeps v's pre-activations, not silu(v) as well (nor
    the output: the softmax's gradient comes from the recomputed probabilities)."""
    q, k, v = (t.requires_grad_() for t in qkv(2, 4 * C, dv=6, seed=10))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        chunked_attention(q, k, v, C, silu_values=True)
    value_sized = [t for t in saved if t.shape[-1] == 6 and t.numel()]
    assert [t.untyped_storage().data_ptr() for t in value_sized] == [v.untyped_storage().data_ptr()]


@pytest.mark.parametrize("dv", [4, 6])  # dv = dz: SDPA; dv != dz: the materialized form
@pytest.mark.parametrize("split", [[3 * C - 2], [C], [5], [3, 5, 9], [7, 1, 2 * C + 3]])
def test_gradients_match_dense_in_float64(dv, split):
    q, k, v = (t.requires_grad_() for t in qkv(2, sum(split), dv=dv, seed=4))
    assert attention_path(q, v) == ("sdpa" if dv == 4 else "materialized")
    weight = torch.randn(2, sum(split), 2, dv, dtype=torch.float64)
    grads = torch.autograd.grad((streamed(q, k, v, split) * weight).sum(), (q, k, v))
    expected = torch.autograd.grad((dense_chunk_attention(q, k, v, C) * weight).sum(), (q, k, v))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("split", [[128], [10, 60, 58], [100, 3, 40]])
def test_long_chunks_with_cached_keys_match_dense_in_float64(split):
    """Chunks of 64 on the materialized path, calls starting mid-chunk (cached keys before the queries) and at
    chunk starts: outputs and gradients are the dense ones."""
    chunk, total = 64, sum(split)
    q, k, v = (t.requires_grad_() for t in qkv(2, total, dv=6, seed=7))
    weight = torch.randn(2, total, 2, 6, dtype=torch.float64)
    got = streamed(q, k, v, split, chunk=chunk)
    want = dense_chunk_attention(q, k, v, chunk)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    grads = torch.autograd.grad((got * weight).sum(), (q, k, v))
    for g, w in zip(grads, torch.autograd.grad((want * weight).sum(), (q, k, v))):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cuts", [[0.5], [0.3, 0.7]], ids=["two-blocks", "three-blocks"])
@pytest.mark.parametrize("silu_values", [False, True])
@pytest.mark.parametrize("split", [[128], [10, 60, 58], [100, 3, 40]])
def test_query_blocks_match_dense_in_float64(monkeypatch, cuts, silu_values, split):
    """The materialized op attends a chunk's queries in blocks (on CUDA, halves of long chunks in long calls),
    each with only the keys it sees, caches before the queries included: outputs and gradients are the dense
    ones, for any cut (forced here on the CPU, with uneven and three blocks too)."""
    from megalodon.ops import attention

    def blocks(queries, q):
        edges = [0, *sorted({round(queries * c) for c in cuts} - {0, queries}), queries]
        return list(zip(edges[:-1], edges[1:]))

    calls = []
    monkeypatch.setattr(attention, "query_blocks", lambda queries, q: calls.append(queries) or blocks(queries, q))
    chunk, total = 64, sum(split)
    q, k, v = (t.requires_grad_() for t in qkv(2, total, dv=6, seed=11))
    weight = torch.randn(2, total, 2, 6, dtype=torch.float64)
    got = streamed(q, k, v, split, chunk=chunk, silu_values=silu_values)
    want = dense_chunk_attention(q, k, torch.nn.functional.silu(v) if silu_values else v, chunk)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    grads = torch.autograd.grad((got * weight).sum(), (q, k, v))
    for g, w in zip(grads, torch.autograd.grad((want * weight).sum(), (q, k, v))):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)
    assert calls and max(calls) > 2  # blocks of several queries were cut


def test_query_blocks_split_long_chunks_of_long_calls_on_cuda_only():
    from megalodon.ops.attention import (QUERY_BLOCK_MIN, QUERY_BLOCKS_MAX, SPLIT_MIN_CHUNKS,
                                         launches_without_host_cost, query_blocks, split_queries)

    def chunks(n, device="cpu"):  # q as the op sees it: (chunks, queries, heads, dz); only its size counts
        return torch.empty(n, 0, 1, 1, device=device)

    # equal blocks of at least QUERY_BLOCK_MIN queries, at most QUERY_BLOCKS_MAX of them, covering the chunk
    assert split_queries(QUERY_BLOCK_MIN * 2 - 1) == [(0, QUERY_BLOCK_MIN * 2 - 1)]
    assert split_queries(QUERY_BLOCK_MIN * 2) == [(0, QUERY_BLOCK_MIN), (QUERY_BLOCK_MIN, 2 * QUERY_BLOCK_MIN)]
    assert split_queries(2048) == [(0, 512), (512, 1024), (1024, 1536), (1536, 2048)] and QUERY_BLOCKS_MAX == 4
    assert split_queries(1000) == [(0, 333), (333, 666), (666, 1000)]
    assert query_blocks(4096, chunks(64)) == [(0, 4096)]  # never on a CPU
    with launches_without_host_cost():
        assert query_blocks(4096, chunks(1)) == [(0, 4096)]
    if torch.cuda.is_available():
        many, few = chunks(SPLIT_MIN_CHUNKS, "cuda"), chunks(SPLIT_MIN_CHUNKS - 1, "cuda")
        assert query_blocks(2048, many) == split_queries(2048)
        assert query_blocks(2048, few) == [(0, 2048)]
        with launches_without_host_cost():  # a step for a CUDA graph: a single chunk splits too
            assert query_blocks(2048, chunks(1, "cuda")) == split_queries(2048)
        assert query_blocks(2048, few) == [(0, 2048)]  # and the setting ends with the context


def test_materialized_path_keeps_nothing_of_chunk_by_chunk_size_for_backward():
    q, k, v = (t.requires_grad_() for t in qkv(2, 4 * C, dv=6))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        out, _, _ = chunked_attention(q, k, v, C)
    assert saved and not [s for s in saved if tuple(s[-2:]) == (C, C)], saved
    out.sum().backward()  # and the backward still runs from what was kept


@pytest.mark.parametrize("silu_values", [False, True])
def test_compiled_materialized_path_keeps_q_k_and_v_alone(silu_values):
    """torch.compile holds the materialized attention as one node (an OpaqueOp) with its own backward op: a
    compiled graph keeps q, k and v, as eager does, where the partitioner, tracing through, kept the scores
    (chunk x chunk), the values twice and a head-major copy of k; and computes what eager computes, gradients
    included."""
    q, k, v = (t.requires_grad_() for t in qkv(2, 4 * C, dv=6, seed=7))

    def attention(q, k, v):
        return chunked_attention(q, k, v, C, silu_values=silu_values)[0] * 2

    torch._dynamo.reset()
    compiled = torch.compile(attention, fullgraph=True)
    inputs = sum(t.untyped_storage().nbytes() for t in (q, k, v))
    assert saved_bytes(attention, q, k, v) == saved_bytes(compiled, q, k, v) == inputs
    weight = torch.randn(q.shape[:3] + (6,), dtype=torch.float64)
    got, want = compiled(q, k, v), attention(q, k, v)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad((got * weight).sum(), (q, k, v)),
                    torch.autograd.grad((want * weight).sum(), (q, k, v))):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_materialized_attention_op_passes_opcheck():
    """Schema, fake implementation, autograd registration and AOT dispatch, as torch.compile relies on them; with
    the queries in blocks too."""
    from megalodon.ops.attention import materialized_attention

    q, k, v = (t.requires_grad_() for t in qkv(3, C, dv=6, seed=8))
    from megalodon.ops.attention import materialized_attention_backward

    for offset, silu_values, edges in ((0, False, [0, C]), (0, True, [0, 3, C]), (2, True, [0, 5, C])):
        keys = (k, v) if not offset else (torch.cat([k, k[:, :offset]], 1), torch.cat([v, v[:, :offset]], 1))
        torch.library.opcheck(materialized_attention.op, (q, *keys, offset, silu_values, edges))
        grad = torch.randn(*q.shape[:3], 6, dtype=q.dtype)
        torch.library.opcheck(materialized_attention_backward.op, (grad, q, *keys, offset, silu_values, edges),
                              test_utils=("test_schema", "test_faketensor"))


def test_bf16_materialized_path_is_close_to_float64():
    q, k, v = qkv(2, 3 * C + 3, dv=6, seed=5)
    out, _, _ = chunked_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), C)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), dense_chunk_attention(q, k, v, C), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("dv", [4, C])
def test_attention_dropout_drops_probabilities(dv):
    """With one-hot values (v = identity over a chunk's keys), each output row is its row of dropped
    probabilities: every entry is 0 or p / (1 - rate), and both occur."""
    q, k, _ = qkv(2, C, heads=1, dz=4, seed=6)
    v = torch.eye(C, dtype=torch.float64).expand(2, C, C).unsqueeze(2)[..., :dv].contiguous()
    torch.manual_seed(0)
    out, _, _ = chunked_attention(q, k, v, C, dropout_p=0.5)
    probs = dense_chunk_attention(q, k, v, C)
    kept = torch.isclose(out, 2 * probs, rtol=1e-10, atol=1e-12)
    dropped = out == 0
    assert bool((kept | dropped).all()) and bool((dropped & (probs > 0)).any()) and bool(kept[probs > 0].any())


def test_decode_with_rows_at_different_fills():
    q, k, v = qkv(3, 20, seed=2)
    prefixes = [5, 7, 15]  # fills 5, 7, 7
    caches = []
    for row, n in enumerate(prefixes):
        _, kc, vc = chunked_attention(q[row:row + 1, :n], k[row:row + 1, :n], v[row:row + 1, :n], C)
        caches.append((kc, vc))
    width = max(kc.shape[1] for kc, _ in caches)
    pad = lambda t: torch.nn.functional.pad(t, (0, 0, 0, 0, 0, width - t.shape[1]))  # noqa: E731
    k_buf = torch.cat([pad(kc) for kc, _ in caches])
    v_buf = torch.cat([pad(vc) for _, vc in caches])
    fill = torch.tensor([n % C for n in prefixes])
    for step in range(4):  # crosses a chunk boundary for the rows at fill 7
        idx = torch.tensor(prefixes) + step
        qs, ks, vs = (t[torch.arange(3), idx].unsqueeze(1) for t in (q, k, v))
        out, k_buf, v_buf = decode_attention(qs, ks, vs, k_buf, v_buf, fill, C)
        for row, n in enumerate(prefixes):
            ref = dense_chunk_attention(q[row:row + 1, :n + step + 1], k[row:row + 1, :n + step + 1],
                                        v[row:row + 1, :n + step + 1], C)[:, -1:]
            torch.testing.assert_close(out[row:row + 1], ref, rtol=1e-10, atol=1e-10)
        fill = (fill + 1) % C


def test_rotary_rotates_adjacent_pairs_as_complex_numbers():
    torch.manual_seed(3)
    x = torch.randn(2, 5, 3, 8, dtype=torch.float64)
    positions = torch.tensor([0, 1, 2, 7, 3])
    freqs = rope_frequencies(8, 10000.0)
    rotated = apply_rotary(x, positions, freqs)
    as_complex = torch.complex(x[..., 0::2], x[..., 1::2])
    angle = positions[:, None, None].double() * freqs
    expected = torch.view_as_real(as_complex * torch.exp(1j * angle)).flatten(-2)
    torch.testing.assert_close(rotated, expected)
    assert torch.equal(apply_rotary(x, torch.zeros(5, dtype=torch.long), freqs), x)


def test_rope_frequencies_follow_the_spec():
    freqs = rope_frequencies(6, 100.0)
    torch.testing.assert_close(freqs, torch.tensor([1.0, 100 ** (-2 / 6), 100 ** (-4 / 6)], dtype=torch.float64))
