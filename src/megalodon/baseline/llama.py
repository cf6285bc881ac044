"""A Llama-style Transformer: the matched baseline every Megalodon result is compared against.

Pre-norm blocks of RMSNorm, causal softmax attention with rotary positions (half-split pairs) and a SwiGLU
feed-forward; no biases. Attribute names follow Hugging Face's LlamaForCausalLM (`embed_tokens`,
`layers.i.self_attn.q_proj`, `layers.i.mlp.gate_proj`, `norm`, `lm_head`) so weights map over one to one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megalodon.baseline.cache import KVCache, StaticKVCache, attention_mask, document_begins
from megalodon.layers.norms import compute_dtype
from megalodon.ops.fused import FUSED_RMS_NORM_DEVICES, add_linear_, row_norm_kernel, torch_rms_norm
from megalodon.ops.loss import IGNORE_INDEX, summed_cross_entropy
from megalodon.ops.static_kv import SlotStep, slot_step, write_and_attend
from megalodon.validation import check_targets, check_token_ids


@dataclass
class LlamaConfig:
    vocab_size: int
    num_layers: int = 4
    model_dim: int = 256
    num_heads: int = 4
    ffn_hidden_dim: int = 704
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    dropout: float = 0.0  # on the embeddings, the attention probabilities and both residual branches

    def __post_init__(self) -> None:
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.model_dim // self.num_heads

    def validate(self) -> None:
        for name in ("vocab_size", "num_layers", "model_dim", "num_heads", "ffn_hidden_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive integer, got {value!r}")
        if self.model_dim % self.num_heads:
            raise ValueError(f"LlamaConfig.model_dim ({self.model_dim}) must be divisible by num_heads "
                             f"({self.num_heads})")
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig.model_dim / num_heads = {self.head_dim} must be even: rotary "
                             "embedding rotates feature pairs")
        if not self.rope_base > 0:
            raise ValueError(f"LlamaConfig.rope_base must be > 0, got {self.rope_base!r}")
        if not self.norm_eps > 0:
            raise ValueError(f"LlamaConfig.norm_eps must be > 0, got {self.norm_eps!r}")
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(f"LlamaConfig.tie_embeddings must be a bool, got {self.tie_embeddings!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LlamaConfig.dropout must be in [0, 1), got {self.dropout!r}")


class RMSNorm(nn.Module):
    """Llama's RMSNorm: weight initialized to 1 and applied as is (unlike Megalodon's weight + 1)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        kernel = row_norm_kernel(x, self.weight)  # on CUDA: the same Triton kernels as Megalodon's norms
        if kernel is not None:
            return kernel(x, self.weight, None, self.eps, False, x.dtype)
        if x.device.type in FUSED_RMS_NORM_DEVICES:  # torch's fused kernel, as Megalodon's norms use there
            return torch_rms_norm(x, self.weight, self.eps, x.dtype)
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # statistics in fp32 or better
        return (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps) * self.weight).to(x.dtype)


def rotary_tables(positions: Tensor, head_dim: int, base: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The tables apply_rotary takes for rotary positions (B, L), each B x 1 x L x head_dim: cos over both halves,
    and sin signed (-sin on the first half, +sin on the second). Angles in float64: exact at long range."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64, device=positions.device) / head_dim)
    angles = positions.to(torch.float64)[..., None] * inv_freq  # B x L x head_dim/2
    sin = angles.sin()
    return (torch.cat([angles.cos()] * 2, dim=-1).unsqueeze(1).to(dtype),
            torch.cat([-sin, sin], dim=-1).unsqueeze(1).to(dtype))


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the pairs (x[j], x[j + head_dim/2]) of x (B, H, L, head_dim), in the dtype of the tables: x cos plus
    the halves swapped times the signed sin, the same few kernels per call as Megalodon's rotary
    (ops/attention.py), so that the two models' steps stay comparable."""
    xf = x.to(cos.dtype)
    first, second = xf.chunk(2, dim=-1)
    return torch.addcmul(xf * cos, torch.cat([second, first], dim=-1), sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        dim = config.model_dim
        self.num_heads, self.head_dim, self.dropout = config.num_heads, config.head_dim, config.dropout
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                past: tuple[Tensor, Tensor] | None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """mask None means plain causal attention over this call alone. Returns the output and all keys/values."""
        batch, length, dim = x.shape

        def heads(t: Tensor) -> Tensor:
            return t.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)  # B x H x L x hd

        q = apply_rotary(heads(self.q_proj(x)), cos, sin)
        k = apply_rotary(heads(self.k_proj(x)), cos, sin)
        v = heads(self.v_proj(x))
        if past is not None:
            k = torch.cat([past[0].to(k.dtype), k], dim=2)
            v = torch.cat([past[1].to(v.dtype), v], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                             dropout_p=self.dropout if self.training else 0.0)
        out = out.transpose(1, 2).reshape(batch, length, dim)
        return F.dropout(self.o_proj(out), self.dropout, self.training), (k, v)

    def decode_step_(self, x: Tensor, cos: Tensor, sin: Tensor, keys: Tensor, values: Tensor,
                     step: SlotStep) -> Tensor:
        """forward() for one token per row, x (B, 1, D), writing its key and value at slot `position` of the
        static buffers (B, max_length, H, head_dim) and attending to slots doc_begin..position (step); returns
        the heads' output before o_proj, which the block adds into its residual in place (Block.decode_step_)."""
        batch, _, dim = x.shape

        def heads(t: Tensor) -> Tensor:
            return t.view(batch, 1, self.num_heads, self.head_dim).transpose(1, 2)  # B x H x 1 x hd

        q = apply_rotary(heads(self.q_proj(x)), cos, sin).transpose(1, 2)  # B x 1 x H x hd
        k = apply_rotary(heads(self.k_proj(x)), cos, sin).transpose(1, 2)
        out = write_and_attend(q, k, heads(self.v_proj(x)).transpose(1, 2), keys, values, step)
        return out.reshape(batch, 1, dim)


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.model_dim, config.ffn_hidden_dim, bias=False)
        self.up_proj = nn.Linear(config.model_dim, config.ffn_hidden_dim, bias=False)
        self.down_proj = nn.Linear(config.ffn_hidden_dim, config.model_dim, bias=False)
        self.dropout = config.dropout

    def forward(self, x: Tensor) -> Tensor:
        return F.dropout(self.down_proj(self.gated(x)), self.dropout, self.training)

    def gated(self, x: Tensor) -> Tensor:
        """silu(gate(x)) * up(x): what down_proj reads."""
        return F.silu(self.gate_proj(x)) * self.up_proj(x)


class Block(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.model_dim, config.norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.model_dim, config.norm_eps)
        self.mlp = FeedForward(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                past: tuple[Tensor, Tensor] | None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        attended, kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, past)
        x = x + attended
        return x + self.mlp(self.post_attention_layernorm(x)), kv

    def decode_step_(self, x: Tensor, cos: Tensor, sin: Tensor, keys: Tensor, values: Tensor,
                     step: SlotStep) -> Tensor:
        """forward() for a decode step; x, the step's own hidden state, is updated in place: o_proj and down_proj
        add their products into it (add_linear_), as Megalodon's decode step adds into its own tensors."""
        attended = self.self_attn.decode_step_(self.input_layernorm(x), cos, sin, keys, values, step)
        add_linear_(x, attended, self.self_attn.o_proj.weight)
        return add_linear_(x, self.mlp.gated(self.post_attention_layernorm(x)), self.mlp.down_proj.weight)


class Llama(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.model_dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.model_dim, config.norm_eps)
        self.lm_head = nn.Linear(config.model_dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 init: normal(0, 0.02), and 0.02 / sqrt(2 * layers) on the projections that write to the
        residual stream, so its variance does not grow with depth. Norm weights start at 1."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, 0.02)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        residual_std = 0.02 / math.sqrt(2 * self.config.num_layers)
        for block in self.layers:
            nn.init.normal_(block.self_attn.o_proj.weight, 0.0, residual_std)
            nn.init.normal_(block.mlp.down_proj.weight, 0.0, residual_std)

    def compile_blocks(self, **options) -> "Llama":
        """torch.compile each block and the final norm in place, as Megalodon.compile_blocks does (the same
        options, the same reasons); returns the model."""
        for block in self.layers:
            block.compile(**options)
        self.norm.compile(**options)
        return self

    def forward(
        self, input_ids: Tensor, doc_start: Tensor | None = None, past: KVCache | None = None,
        return_past: bool = False, window: int | None = None, targets: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, KVCache]:
        """Logits (B, L, vocab_size) in fp32 (or better), and the cache after the last token when return_past.

        doc_start: (B, L) bool, True where a document begins: attention stops there and rotary positions
        restart at 0, so a document gives the same logits packed or alone. Any position may start one.
        past: the cache of the stream so far, or None to start fresh.
        window: attend only to the last `window` positions (the query's own included); the cache keeps only
        the keys that a later query can still see, so its size stays bounded. Use one window for a stream.
        targets: (B, L) int64, the token after each position (-100 where none): return the summed cross-entropy
        (an fp32 scalar) in place of the logits, without ever holding all of them (ops/loss.py).
        """
        batch, length = check_token_ids(input_ids, self.config.vocab_size)
        if targets is not None:
            check_targets(targets, batch, length, self.config.vocab_size, IGNORE_INDEX)
        self._check_call(batch, length, doc_start, past, window)
        device = input_ids.device
        start = 0 if past is None else past.position
        num_cached = 0 if past is None else past.num_cached
        positions = torch.arange(start, start + length, device=device)  # L: stream positions
        previous = torch.zeros(batch, dtype=torch.int64, device=device) if past is None else past.doc_begin
        doc_begin = document_begins(doc_start, positions, previous)  # B x L

        table_dtype = torch.promote_types(self.embed_tokens.weight.dtype, torch.float32)
        cos, sin = rotary_tables(positions - doc_begin, self.config.head_dim, self.config.rope_base, table_dtype)
        key_doc = doc_begin if past is None else torch.cat([past.key_doc_begin, doc_begin], dim=1)  # B x S
        mask = None  # the fast path: SDPA's own causal mask
        if past is not None or doc_start is not None or window is not None:
            key_pos = torch.arange(start - num_cached, start + length, device=device)
            mask = attention_mask(positions, doc_begin, key_pos, key_doc, window)

        x = F.dropout(self.embed_tokens(input_ids), self.config.dropout, self.training)  # B x L x D
        new_kv = []
        for i, block in enumerate(self.layers):
            x, kv = block(x, cos, sin, mask, None if past is None else (past.keys[i], past.values[i]))
            new_kv.append(kv)
        if targets is not None:
            hidden = self.norm(x).to(compute_dtype(x)).flatten(0, 1)  # as autocast casts the head's input
            out = summed_cross_entropy(hidden, self.lm_head.weight, targets.flatten())
        else:
            logits = self.lm_head(self.norm(x))
            out = logits.to(torch.promote_types(logits.dtype, torch.float32))
        if not return_past:
            return out

        total = num_cached + length
        keep = total if window is None else min(total, window - 1)  # the next query sees window - 1 old keys

        def trim(t: Tensor) -> Tensor:  # clone, so that the dropped keys are freed, not kept as a view's base
            return t if keep == total else t[..., total - keep:, :].clone()

        cache = KVCache(
            keys=[trim(k) for k, _ in new_kv], values=[trim(v) for _, v in new_kv],
            key_doc_begin=key_doc[:, total - keep:].clone(), doc_begin=doc_begin[:, -1].clone(),
            position=start + length, window=window,
        )
        return out, cache

    @torch.no_grad()
    def decode_step_(self, input_ids: Tensor, cache: StaticKVCache) -> Tensor:
        """One token per row, input_ids (B,) int64, on a StaticKVCache advanced in place; returns the logits
        (B, vocab_size) in fp32 (or better). Equal to forward() with the KVCache it holds, but with static shapes
        and no host sync, for CUDA graphs and torch.compile. Ids and room in the cache are not checked here (that
        needs a sync on a GPU): megalodon.inference.decoding.StaticDecoder checks what it can."""
        if input_ids.shape != (cache.batch_size,):
            raise ValueError(f"decode_step_ takes one token id per row, shape ({cache.batch_size},), "
                             f"got {tuple(input_ids.shape)}")
        table_dtype = torch.promote_types(self.embed_tokens.weight.dtype, torch.float32)
        cos, sin = rotary_tables((cache.position - cache.doc_begin)[:, None], self.config.head_dim,
                                 self.config.rope_base, table_dtype)
        step = slot_step(cache.position, cache.max_length, first=cache.doc_begin)  # the same in every layer
        x = self.embed_tokens(input_ids).unsqueeze(1)  # B x 1 x D
        for block, keys, values in zip(self.layers, cache.keys, cache.values, strict=True):
            x = block.decode_step_(x, cos, sin, keys, values, step)
        cache.position.add_(1)
        logits = self.lm_head(self.norm(x))[:, 0]
        return logits.to(torch.promote_types(logits.dtype, torch.float32))

    def static_cache(self, batch_size: int, max_length: int, past: KVCache | None = None) -> StaticKVCache:
        """A StaticKVCache for this model with room for max_length positions: empty, or holding `past`."""
        if past is not None:
            return StaticKVCache.from_cache(past, max_length)
        cfg, weight = self.config, self.embed_tokens.weight
        return StaticKVCache.allocate(cfg.num_layers, batch_size, max_length, cfg.num_heads, cfg.head_dim,
                                      weight.device, weight.dtype)

    def _check_call(self, batch: int, length: int, doc_start: Tensor | None, past: KVCache | None,
                    window: int | None) -> None:
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            raise ValueError(f"window must be None or an integer >= 1, got {window!r}")
        if doc_start is not None and (not isinstance(doc_start, Tensor) or doc_start.dtype != torch.bool
                                      or doc_start.shape != (batch, length)):
            found = (f"{doc_start.dtype} {tuple(doc_start.shape)}" if isinstance(doc_start, Tensor)
                     else type(doc_start).__name__)
            raise ValueError(f"doc_start must be a bool tensor of shape {(batch, length)}, got {found}")
        if past is None:
            return
        if not isinstance(past, KVCache):
            raise TypeError(f"past must be a KVCache, got {type(past).__name__}")
        if len(past.keys) != self.config.num_layers:
            raise ValueError(f"past holds {len(past.keys)} layers, but the model has {self.config.num_layers}")
        if past.batch_size != batch:
            raise ValueError(f"past was built for batch size {past.batch_size}, but input_ids has {batch} rows")
        if past.window != window:
            raise ValueError(f"past was built with window={past.window}, got window={window}: a stream must "
                             "keep one window (the cache already dropped the keys a wider one would need)")

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
