"""Rotary embedding and chunk-wise causal attention (spec sections 8 and 9), as pure functions.

Tokens attend causally within their own chunk of C tokens; chunks are aligned to the start of the stream.
A call may start mid-chunk: the keys and values of the current partial chunk come in as a cache, and the
trailing partial chunk goes out as the new cache. `dense_chunk_attention` is the slow reference: one dense
softmax with an explicit block-diagonal causal mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def rope_frequencies(head_dim: int, base: float) -> Tensor:
    """freqs[j] = 1 / base**(2j / head_dim), j < head_dim / 2."""
    return 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)


def apply_rotary(x: Tensor, positions: Tensor, freqs: Tensor) -> Tensor:
    """Rotate adjacent feature pairs (2j, 2j+1) of x (B, L, H, d) by positions * freqs[j], in fp32 or better.

    positions: (L,) shared by the batch, or (B, L) per row.
    """
    compute = torch.promote_types(x.dtype, torch.float32)
    angles = positions.to(compute).unsqueeze(-1) * freqs.to(compute)  # [B x] L x d/2
    if angles.dim() == 2:
        angles = angles.unsqueeze(0)
    cos, sin = angles.cos().unsqueeze(2), angles.sin().unsqueeze(2)  # B x L x 1 x d/2
    pairs = x.to(compute).unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
    return rotated.flatten(-2).to(x.dtype)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool, dropout_p: float) -> Tensor:
    """SDPA over (..., H, S, d) with no scaling beyond the one folded into q (scale=1)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout_p,
                                          scale=1.0)


def chunked_attention(
    q: Tensor, k: Tensor, v: Tensor, chunk_size: int,
    k_cache: Tensor | None = None, v_cache: Tensor | None = None, dropout_p: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Causal attention inside chunks, for a call that may start mid-chunk.

    q, k: (B, L, H, dz) already rotated; v: (B, L, H, dv). k_cache, v_cache: (B, c, H, d), c < chunk_size,
    the current partial chunk (same fill for every row). Returns the output (B, L, H, dv) and the new caches,
    which hold the trailing partial chunk (length (c + L) mod chunk_size).
    """
    batch, length, heads, _ = q.shape
    fill = 0 if k_cache is None else k_cache.shape[1]
    if fill:
        k = torch.cat([k_cache.to(k.dtype), k], dim=1)
        v = torch.cat([v_cache.to(v.dtype), v], dim=1)
    total = fill + length
    pieces = []

    # Head: the queries that finish the current partial chunk see the cached keys plus their own.
    head = min(length, chunk_size - fill) if fill else 0
    if head:
        q_idx = torch.arange(head, device=q.device) + fill
        mask = torch.arange(fill + head, device=q.device) <= q_idx[:, None]
        out = _sdpa(q[:, :head].transpose(1, 2), k[:, :fill + head].transpose(1, 2),
                    v[:, :fill + head].transpose(1, 2), mask, False, dropout_p)
        pieces.append(out.transpose(1, 2))

    # Body: whole chunks from here on, plus a zero-padded tail chunk; padding sits after every real query.
    start = fill + head
    body = total - start
    if body:
        num_chunks = -(-body // chunk_size)
        pad = num_chunks * chunk_size - body

        def to_chunks(t: Tensor) -> Tensor:  # (B * chunks) x H x C x d: 4-D, as every SDPA backend accepts
            t = F.pad(t, (0, 0, 0, 0, 0, pad))
            return t.view(batch * num_chunks, chunk_size, heads, -1).transpose(1, 2)

        out = _sdpa(to_chunks(q[:, head:]), to_chunks(k[:, start:]), to_chunks(v[:, start:]), None, True,
                    dropout_p)
        out = out.transpose(1, 2).reshape(batch, num_chunks * chunk_size, heads, -1)[:, :body]
        pieces.append(out)

    out = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)
    keep = total % chunk_size
    return out, k[:, total - keep:], v[:, total - keep:]


def decode_attention(
    q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, fill: Tensor, chunk_size: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """One new token per row when rows sit at different in-chunk positions.

    q, k: (B, 1, H, dz), v: (B, 1, H, dv). k_cache, v_cache: (B, S, H, d) buffers whose first fill[b] entries
    are row b's partial chunk. Returns the output (B, 1, H, dv) and the new buffers; a row that completes its
    chunk starts the next one empty (its stale entries lie beyond its fill and are masked).
    """
    batch = q.shape[0]
    rows = torch.arange(batch, device=q.device)
    slots = k_cache.shape[1] + 1
    k_buf = F.pad(k_cache.to(k.dtype), (0, 0, 0, 0, 0, 1)).index_put((rows, fill), k[:, 0])
    v_buf = F.pad(v_cache.to(v.dtype), (0, 0, 0, 0, 0, 1)).index_put((rows, fill), v[:, 0])
    mask = (torch.arange(slots, device=q.device) <= fill[:, None])[:, None, None, :]  # B x 1 x 1 x S
    out = _sdpa(q.transpose(1, 2), k_buf.transpose(1, 2), v_buf.transpose(1, 2), mask, False, 0.0)
    new_fill = (fill + 1) % chunk_size
    keep = int(new_fill.max())
    return out.transpose(1, 2), k_buf[:, :keep], v_buf[:, :keep]


def dense_chunk_attention(q: Tensor, k: Tensor, v: Tensor, chunk_size: int, start: int = 0) -> Tensor:
    """Slow reference: full softmax(q k^T) v with a block-diagonal causal mask. Positions count from `start`."""
    length = q.shape[1]
    pos = torch.arange(start, start + length)
    same_chunk = (pos[:, None] // chunk_size) == (pos[None, :] // chunk_size)
    allowed = same_chunk & (pos[None, :] <= pos[:, None])
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k).masked_fill(~allowed, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)
