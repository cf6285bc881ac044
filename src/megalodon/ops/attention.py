"""Rotary embedding and chunk-wise causal attention (spec sections 8 and 9), as pure functions.

`queries_keys` makes a MEGA layer's q and k from z (per-head norm, affine, rotary); on CUDA one Triton kernel each
way does it (ops/triton/queries_keys.py).

Tokens attend causally within their own chunk of C tokens; chunks are aligned to the start of the stream.
A call may start mid-chunk: the keys and values of the current partial chunk come in as a cache, and the
trailing partial chunk goes out as the new cache. `dense_chunk_attention` is the slow reference: one dense
softmax with an explicit block-diagonal causal mask.

Inside a chunk, `attend` picks one of two exact paths (`attention_path` decides):
- SDPA, where the query/key and value head dims are equal (flash attention applies);
- otherwise the materialized form: q k^T in the compute dtype, a masked softmax in fp32, then the product with
  v. SDPA never picks flash when the dims differ (Megalodon's dv is 8x dz), and its fallbacks are slower than
  these three steps. Its backward recomputes the probabilities (as flash attention does), so that nothing of
  size (chunk x chunk) is kept for the backward pass. On CUDA its masked softmax is one Triton kernel each way
  (ops/triton/causal_softmax.py), which never reads the masked scores. It is an OpaqueOp (ops/triton/__init__.py):
  torch.compile holds it as one node with its own backward, which keeps q, k and v alone; traced through, the
  partitioner would keep the scores (chunk x chunk per chunk) and the values twice instead of recomputing them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from megalodon.ops.fused import rms_norm
from megalodon.ops.triton import opaque_op, use_triton


def rope_frequencies(head_dim: int, base: float) -> Tensor:
    """freqs[j] = 1 / base**(2j / head_dim), j < head_dim / 2."""
    return 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)


def rotary_angles(positions: Tensor, freqs: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The tables rotate_pairs takes for positions * freqs[j], shaped (B or 1, L, 1, d) to rotate (B, L, H, d)
    tensors: cos repeated over each pair (2j, 2j+1), and sin signed (-sin, +sin) over it. positions: (L,) shared
    by the batch, or (B, L) per row. A decode step computes them once for every layer."""
    angles = positions.to(dtype).unsqueeze(-1) * freqs.to(dtype)  # [B x] L x d/2
    if angles.dim() == 2:
        angles = angles.unsqueeze(0)
    sin = angles.sin()
    return angles.cos().repeat_interleave(2, -1).unsqueeze(2), torch.stack([-sin, sin], -1).flatten(-2).unsqueeze(2)


def rotate_pairs(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate adjacent feature pairs (2j, 2j+1) of x (B, L, H, d) by the angles of rotary_angles, in their dtype;
    returns x's dtype. As x cos + swap(x) sin with swap(x) = (x1, x0, x3, x2, ...): three kernels where the pairs
    taken apart and stacked again cost seven (a decode step runs this in every layer)."""
    xf = x.to(cos.dtype)
    swapped = xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return torch.addcmul(xf * cos, swapped, sin).to(x.dtype)


def queries_keys(z: Tensor, heads: int, eps: float, scale: Tensor, shift: Tensor,
                 rotation: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """q and k (B, L, H, dz) in z's dtype from z (B, L, H * dz): z normalized per head (RMSNorm without affine,
    statistics in fp32, the result in z's dtype, as the reference's bf16 runs), then q = zn scale[0] + shift[0]
    and k = zn scale[1] + shift[1] ((2, H * dz) each, fp32 or better), rotated by `rotation` (rotary_angles of
    the tokens' in-chunk positions), in fp32 or better. One fused Triton kernel each way on CUDA."""
    batch, length, width = z.shape
    dz = width // heads
    cos, sin = rotation
    if (use_triton("queries_keys", z) and z.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and cos.dtype == sin.dtype == scale.dtype == shift.dtype == torch.float32):
        from megalodon.ops.triton.queries_keys import queries_keys_triton

        return queries_keys_triton(z, heads, eps, scale, shift, cos, sin)
    zn = rms_norm(z.reshape(batch, length, heads, dz), None, eps, z.dtype).flatten(-2)
    qk = zn.unsqueeze(2) * scale + shift  # B x L x 2 x H * dz
    qk = rotate_pairs(qk.view(batch, length, 2 * heads, dz), cos, sin).to(z.dtype)
    return qk.unflatten(2, (2, heads)).unbind(2)  # backward stacks dq and dk: one kernel, no zero-filled halves


def apply_rotary(x: Tensor, positions: Tensor, freqs: Tensor) -> Tensor:
    """Rotate adjacent feature pairs (2j, 2j+1) of x (B, L, H, d) by positions * freqs[j], in fp32 or better.

    positions: (L,) shared by the batch, or (B, L) per row.
    """
    return rotate_pairs(x, *rotary_angles(positions, freqs, torch.promote_types(x.dtype, torch.float32)))


# ---- attention inside one chunk ----------------------------------------------------------------------------
def attention_path(q: Tensor, v: Tensor) -> str:
    """The one rule that picks how a chunk is attended: "sdpa" where the head dims agree, else "materialized"."""
    return "sdpa" if q.shape[-1] == v.shape[-1] else "materialized"


def _future(queries: int, keys: int, offset: int, device: torch.device) -> Tensor:
    """(queries, keys) bool, True where key j lies after query i, which sits at key position i + offset."""
    return torch.ones(queries, keys, dtype=torch.bool, device=device).triu(offset + 1)


def _masked_softmax(scores: Tensor, offset: int) -> Tensor:
    """softmax(scores + causal mask) in fp32 (or better), (..., Sq, Sk), overwriting the scores: the mask (a
    select: exact) in their dtype, the upcast inside the softmax, so that no fp32 copy of the scores is written
    first. One fused softmax, cheaper on CPU than a saved log-sum-exp's five passes, and deterministic, so that
    backward recomputes exactly the forward's probabilities."""
    scores = scores.masked_fill_(_future(scores.shape[-2], scores.shape[-1], offset, scores.device), float("-inf"))
    return scores.softmax(-1, dtype=torch.promote_types(scores.dtype, torch.float32))


def _fused_softmax(scores: Tensor) -> bool:
    """Whether the masked softmax (and its backward) runs as one Triton kernel (ops/triton/causal_softmax.py)."""
    if not use_triton("causal_softmax", scores):
        return False
    from megalodon.ops.triton.causal_softmax import supports_scores

    return supports_scores(scores)


# On CUDA, a chunk's queries are attended in up to QUERY_BLOCKS_MAX equal blocks of at least QUERY_BLOCK_MIN, each
# with only the keys up to its last query: n blocks skip (n - 1) / 2n of the (query, key) products, all of them
# masked (a quarter with 2 blocks, 3/8 with 4); at mega200M the products are 38% of a step's matmul FLOPs
# (docs/gpu.md), and its 2,048-token chunks take 4 blocks of 512. Each block costs 9 more launches a
# layer, so the split is taken only for a call of at least SPLIT_MIN_CHUNKS chunks (rows x chunks), where the
# GPU's work, not the host's launches, sets the time (at batch 1: from 16K tokens at mega200M), or where launches
# cost the host nothing (a step captured into a CUDA graph: launches_without_host_cost). On a CPU, splitting
# measured 18-34% faster on one idle thread but 4x slower at two threads on a loaded machine (each extra op
# waits for a preempted thread): one block there.
QUERY_BLOCK_MIN, QUERY_BLOCKS_MAX, SPLIT_MIN_CHUNKS = 256, 4, 8
_launches_cost_host = True


@contextlib.contextmanager
def launches_without_host_cost() -> Iterator[None]:
    """Within this, the attention takes its least GPU work whatever it costs in launches: for a step that a CUDA
    graph will replay (training/cuda_graphs.py captures inside it), where a launch costs the host nothing. A
    graph that torch.compile traces inside keeps the choice (compile guards on the setting)."""
    global _launches_cost_host
    before, _launches_cost_host = _launches_cost_host, False
    try:
        yield
    finally:
        _launches_cost_host = before


def query_blocks(queries: int, q: Tensor) -> list[tuple[int, int]]:
    """The (start, end) blocks of the queries of q (chunks x queries x heads x dz) that the materialized attention
    attends one at a time."""
    min_chunks = SPLIT_MIN_CHUNKS if _launches_cost_host else 1
    if q.is_cuda and q.shape[0] >= min_chunks:
        return split_queries(queries)
    return [(0, queries)]


def split_queries(queries: int) -> list[tuple[int, int]]:
    """A chunk's queries in up to QUERY_BLOCKS_MAX equal blocks of at least QUERY_BLOCK_MIN (one block if
    shorter): the split CUDA takes where it splits."""
    count = max(1, min(QUERY_BLOCKS_MAX, queries // QUERY_BLOCK_MIN))
    edges = [queries * i // count for i in range(count + 1)]
    return list(zip(edges[:-1], edges[1:]))


def _probabilities(scores: Tensor, offset: int, dtype: torch.dtype) -> Tensor:
    """The masked softmax of a block of scores in fp32 (or better), returned in dtype."""
    if _fused_softmax(scores):
        from megalodon.ops.triton.causal_softmax import causal_softmax_fwd

        return causal_softmax_fwd(scores, offset, dtype)
    return _masked_softmax(scores, offset).to(dtype)


def _softmax_backward(scores: Tensor, grad_p: Tensor, offset: int) -> tuple[Tensor, Tensor]:
    """From a block's scores and dP = dO V^T (in the values' dtype): the probabilities again, in dP's dtype (the
    forward's, bit for bit), and d scores = P * (dP - rowsum(dP * P)) in the scores' dtype. From the (Sq, Sk)
    tensors at hand, which keeps each row's gradient summing to zero (rowsum(dO * O), equal in exact arithmetic,
    would need O and two upcasts)."""
    if _fused_softmax(scores):
        from megalodon.ops.triton.causal_softmax import causal_softmax_bwd

        return causal_softmax_bwd(scores, grad_p, offset)
    probs_dtype = grad_p.dtype
    probs = _masked_softmax(scores, offset)
    grad_p = grad_p.to(probs.dtype)  # dP is the caller's fresh product (or its upcast copy): changed in place
    row = (grad_p * probs).sum(-1, keepdim=True)
    grad_s = grad_p.sub_(row).mul_(probs).to(scores.dtype)
    return probs.to(probs_dtype), grad_s


@opaque_op("megalodon::materialized_attention", mutates_args=())
def materialized_attention(q: Tensor, k: Tensor, v: Tensor, offset: int, silu_values: bool,
                           edges: list[int]) -> Tensor:
    """softmax(q k^T + mask) v over token-major (N, S, H, d) tensors, keeping q, k and v alone for backward,
    which recomputes the probabilities. The products run in the inputs' dtype, the softmax in fp32 (or better).
    All heads in each op; the queries in blocks from edges[i] to edges[i + 1] (query_blocks' blocks), each with
    the keys its queries see.

    silu_values: v holds pre-activations and the values are silu(v), applied here and again in backward, so that
    backward keeps v alone rather than v for the SiLU's gradient and silu(v) for the product's."""
    with torch.autocast(q.device.type, enabled=False):
        values = F.silu(v) if silu_values else v
        qh, kh, vh = (_heads_first(t) for t in (q, k, values))
        out = vh.new_empty(vh.shape[0], qh.shape[1], vh.shape[2])
        for start, end in zip(edges[:-1], edges[1:]):
            keys = min(k.shape[1], end + offset)  # the keys the block's last query sees
            scores = torch.bmm(qh[:, start:end], kh[:, :keys].transpose(1, 2))  # N * H x Sq x Sk
            # each block's product written in place: no concatenation after the blocks
            torch.bmm(_probabilities(scores, offset + start, v.dtype), vh[:, :keys], out=out[:, start:end])
        # token-major, so that the caller's (B, L, H * dv) is a view
        return _tokens_first(out, q.shape[2]).contiguous()


def _heads_first(t: Tensor) -> Tensor:
    """(N, S, H, d) token-major as (N * H, S, d), the batched GEMMs' layout: a view with one head."""
    return t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[3])


def _tokens_first(t: Tensor, heads: int) -> Tensor:
    """_heads_first undone, as a view: (N * H, S, d) to (N, S, H, d)."""
    return t.view(-1, heads, *t.shape[1:]).transpose(1, 2)


@materialized_attention.register_fake
def _(q, k, v, offset, silu_values, edges):
    return q.new_empty(*q.shape[:3], v.shape[-1], dtype=v.dtype)


@opaque_op("megalodon::materialized_attention_backward", mutates_args=())
def materialized_attention_backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, offset: int, silu_values: bool,
                                    edges: list[int]) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients of q, k and v for materialized_attention's output gradient `grad`, the probabilities
    recomputed block by block. An op of its own, so that a compiled graph cannot move part of it into the forward
    and keep what that part makes (a head-major copy of k, beside the storage q and k share)."""
    with torch.autocast(q.device.type, enabled=False):
        values = F.silu(v) if silu_values else v
        heads = q.shape[2]
        qh, kh, vh, gh = (_heads_first(t) for t in (q, k, values, grad.to(values.dtype)))
        grad_q, grad_k, grad_values = torch.empty_like(qh), None, None
        # The last block sees every key: its key and value gradients are the whole tensors, and the earlier blocks'
        # GEMMs add theirs into the leading keys in place (beta = 1: no sum of their own, one rounding).
        for start, end in reversed(list(zip(edges[:-1], edges[1:]))):
            keys = min(k.shape[1], end + offset)
            qb, kb, vb, gb = qh[:, start:end], kh[:, :keys], vh[:, :keys], gh[:, start:end]
            probs, grad_s = _softmax_backward(torch.bmm(qb, kb.transpose(1, 2)), torch.bmm(gb, vb.transpose(1, 2)),
                                              offset + start)
            if grad_k is None:
                grad_k, grad_values = torch.bmm(grad_s.transpose(1, 2), qb), torch.bmm(probs.transpose(1, 2), gb)
            else:
                grad_k[:, :keys].baddbmm_(grad_s.transpose(1, 2), qb)
                grad_values[:, :keys].baddbmm_(probs.transpose(1, 2), gb)
            torch.bmm(grad_s, kb, out=grad_q[:, start:end])
        grad_values = _tokens_first(grad_values, heads)
        grad_v = torch.ops.aten.silu_backward(grad_values, v) if silu_values else grad_values
    # token-major like the inputs (no copy with one head)
    return (_tokens_first(grad_q, heads).contiguous(), _tokens_first(grad_k, heads).contiguous(),
            grad_v.contiguous())


@materialized_attention_backward.register_fake
def _(grad, q, k, v, offset, silu_values, edges):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attention_context(ctx, inputs, output) -> None:
    q, k, v, offset, silu_values, edges = inputs
    ctx.save_for_backward(q, k, v)
    ctx.offset, ctx.silu_values, ctx.edges = offset, silu_values, edges


def _attention_backward(ctx, grad: Tensor):
    q, k, v = ctx.saved_tensors
    grads = materialized_attention_backward(grad, q, k, v, ctx.offset, ctx.silu_values, ctx.edges)
    return *grads, None, None, None


materialized_attention.register_autograd(_attention_backward, setup_context=_attention_context)


def attend(q: Tensor, k: Tensor, v: Tensor, offset: int = 0, dropout_p: float = 0.0,
           silu_values: bool = False) -> Tensor:
    """Causal attention of q (N, Sq, H, dz) over k (N, Sk, H, dz) and v (N, Sk, H, dv), token-major, with no
    scale (spec section 9: the 1/sqrt(dz) is folded into q). Query i sits at key position i + offset and sees
    keys 0..i + offset. Dropout, if any, acts on the probabilities. silu_values: the values are silu(v). Returns
    (N, Sq, H, dv)."""
    if attention_path(q, v) == "materialized" and not dropout_p:
        edges = [0] + [end for _, end in query_blocks(q.shape[1], q)]
        return materialized_attention(q, k, v, offset, silu_values, edges)
    if silu_values:
        v = F.silu(v)
    if attention_path(q, v) == "sdpa":
        if offset == 0 and q.shape[1] == k.shape[1]:
            mask, causal = None, True
        else:
            mask, causal = ~_future(q.shape[1], k.shape[1], offset, q.device), False
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask, is_causal=causal, dropout_p=dropout_p, scale=1.0)
        return out.transpose(1, 2)
    probs = F.dropout(_masked_softmax(torch.matmul(q.transpose(1, 2), k.transpose(1, 2).transpose(-1, -2)), offset),
                      dropout_p)
    return torch.matmul(probs.to(v.dtype), v.transpose(1, 2)).transpose(1, 2)


def attend_visible(q: Tensor, k: Tensor, v: Tensor, visible: Tensor, scale: float | None = None) -> Tensor:
    """Decode's attention: a few queries per row over the keys where `visible`, head-major: q (B, H, Sq, dk),
    k (B, H, S, dk), v (B, H, S, dv), visible (B, 1, Sq or 1, S) bool. scale None is 1/sqrt(dk). The products run
    in the inputs' dtype. Returns (B, H, Sq, dv).

    Where dk and dv differ (Megalodon), SDPA has no flash kernel, and its memory-efficient kernel gives one thread
    block to each head's block of queries: for one new token, one SM would read the whole value buffer (8 MiB per
    layer at mega200M). The materialized form runs instead, as in training: two batched GEMVs that spread over the
    GPU, and a masked softmax in fp32 (or better) over the scores."""
    if attention_path(q, v) == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale)
    scores = torch.matmul(q, k.transpose(-1, -2))
    upcast = torch.promote_types(scores.dtype, torch.float32)
    if scale != 1.0:
        scores = scores.to(upcast) * (q.shape[-1] ** -0.5 if scale is None else scale)
    # Masked in the compute dtype (a select: exact) and upcast inside the softmax, a kernel fewer than a copy first.
    probs = torch.where(visible, scores, float("-inf")).softmax(-1, dtype=upcast)
    return torch.matmul(probs.to(v.dtype), v)


# ---- chunks and the streaming cache ------------------------------------------------------------------------
def chunked_attention(
    q: Tensor, k: Tensor, v: Tensor, chunk_size: int,
    k_cache: Tensor | None = None, v_cache: Tensor | None = None, dropout_p: float = 0.0,
    silu_values: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Causal attention inside chunks, for a call that may start mid-chunk.

    q, k: (B, L, H, dz) already rotated; v: (B, L, H, dv). k_cache, v_cache: (B, c, H, d), c < chunk_size,
    the current partial chunk (same fill for every row). Returns the output (B, L, H, dv) and the new caches,
    which hold the trailing partial chunk (length (c + L) mod chunk_size).
    silu_values: v holds pre-activations, the values (and the value cache, in and out) are silu(v); where it
    can, the attention op applies it itself and keeps less for backward.
    """
    batch, length, heads, _ = q.shape
    fill = 0 if k_cache is None else k_cache.shape[1]
    if fill:
        if silu_values:  # the cache holds values: activate before joining them
            v, silu_values = F.silu(v), False
        k = torch.cat([k_cache.to(k.dtype), k], dim=1)
        v = torch.cat([v_cache.to(v.dtype), v], dim=1)
    total = fill + length
    pieces = []

    # Head: the queries that finish the current partial chunk see the cached keys plus their own.
    head = min(length, chunk_size - fill) if fill else 0
    if head:
        pieces.append(attend(q[:, :head], k[:, :fill + head], v[:, :fill + head], fill, dropout_p))

    # Body: whole chunks from here on, the last one zero-padded (padding sits after every real query). A body
    # shorter than a chunk is one chunk of its own length.
    start = fill + head
    body = total - start
    if body:
        size = min(body, chunk_size)
        num_chunks = -(-body // size)
        pad = num_chunks * size - body

        def to_chunks(t: Tensor) -> Tensor:  # (B * chunks) x C x H x d
            t = F.pad(t, (0, 0, 0, 0, 0, pad)) if pad else t
            return t.reshape(batch * num_chunks, size, heads, -1)

        out = attend(to_chunks(q[:, head:]), to_chunks(k[:, start:]), to_chunks(v[:, start:]), 0, dropout_p,
                     silu_values)  # silu(0) = 0: zero padding stays zero values
        out = out.reshape(batch, num_chunks * size, heads, -1)
        pieces.append(out[:, :body] if pad else out)

    out = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)
    keep = total % chunk_size
    v_tail = v[:, total - keep:]
    return out, k[:, total - keep:], F.silu(v_tail) if silu_values and keep else v_tail  # empty: nothing to do


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
    k_buf = F.pad(k_cache.to(k.dtype), (0, 0, 0, 0, 0, 1)).index_put((rows, fill), k[:, 0])
    v_buf = F.pad(v_cache.to(v.dtype), (0, 0, 0, 0, 0, 1)).index_put((rows, fill), v[:, 0])
    visible = (torch.arange(k_buf.shape[1], device=q.device) <= fill[:, None])[:, None, None, :]  # B x 1 x 1 x S
    out = attend_visible(q.transpose(1, 2), k_buf.transpose(1, 2), v_buf.transpose(1, 2), visible, 1.0)
    out = out.transpose(1, 2)
    new_fill = (fill + 1) % chunk_size
    keep = int(new_fill.max())
    return out, k_buf[:, :keep], v_buf[:, :keep]


def dense_chunk_attention(q: Tensor, k: Tensor, v: Tensor, chunk_size: int, start: int = 0) -> Tensor:
    """Slow reference: full softmax(q k^T) v with a block-diagonal causal mask. Positions count from `start`."""
    length = q.shape[1]
    pos = torch.arange(start, start + length, device=q.device)
    same_chunk = (pos[:, None] // chunk_size) == (pos[None, :] // chunk_size)
    allowed = same_chunk & (pos[None, :] <= pos[:, None])
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k).masked_fill(~allowed, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)
