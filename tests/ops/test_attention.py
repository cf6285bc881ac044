"""Chunked attention and rotary embedding against dense, explicit references."""

import pytest
import torch

from megalodon.ops.attention import (apply_rotary, chunked_attention, decode_attention, dense_chunk_attention,
                                     rope_frequencies)

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
