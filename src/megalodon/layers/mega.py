"""The MEGA layer (spec section 7): TimestepNorm -> CEMA -> normalized, gated chunk attention.

Attribute names follow the reference (`timenorm`, `cema`, `rmsnorm`, `wz`, ..., `gamma`, `beta`), so that the
reference state_dict maps onto this module key for key.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megalodon.config import MegalodonConfig
from megalodon.layers.cema import CEMA
from megalodon.layers.norms import RMSNorm, rms_normalize
from megalodon.layers.timestep_norm import TimestepNorm
from megalodon.ops.attention import apply_rotary, chunked_attention, decode_attention
from megalodon.ops.cema import cema_step
from megalodon.ops.static_kv import attend_slots, write_slot_
from megalodon.state import LayerState

if TYPE_CHECKING:
    from megalodon.decode_state import DecodeLayerState


class MovingAverageGatedAttention(nn.Module):
    def __init__(self, config: MegalodonConfig):
        super().__init__()
        self.config = config
        dim, heads = config.model_dim, config.num_heads
        self.timenorm = TimestepNorm(dim, config.norm_num_groups, config.norm_eps)
        self.cema = CEMA(dim, config.cema_ndim)
        self.rmsnorm = RMSNorm(dim, config.norm_eps, affine=config.norm_affine)
        self.wz = nn.Linear(dim, config.z_dim)
        self.wv = nn.Linear(dim, config.value_dim)
        self.wr = nn.Linear(dim, config.value_dim)
        self.wh1 = nn.Linear(dim, dim)
        self.wh2 = nn.Linear(config.value_dim, dim, bias=False)
        # Row 0 makes q, row 1 makes k, from the shared normalized z (applied as gamma + 1).
        self.gamma = nn.Parameter(torch.zeros(2, config.z_dim))
        self.beta = nn.Parameter(torch.zeros(2, config.z_dim))
        self.heads = heads

    def _queries_keys(self, mx: Tensor) -> tuple[Tensor, Tensor]:
        batch, length, _ = mx.shape
        dz = self.config.head_z_dim
        z = self.wz(mx).view(batch, length, self.heads, dz)
        compute_dtype = z.dtype  # bf16 under autocast
        z = rms_normalize(z, self.config.norm_eps).flatten(-2)  # fp32
        scale = (self.gamma.float() + 1.0) / math.sqrt(dz)
        q = z * scale[0] + self.beta[0].float()
        k = z * scale[1] + self.beta[1].float()
        shape = (batch, length, self.heads, dz)
        return q.view(shape).to(compute_dtype), k.view(shape).to(compute_dtype)

    def forward(
        self, x: Tensor, freqs: Tensor, state: LayerState | None, position: Tensor | None,
        block_reset: Tensor | None = None, need_state: bool = False,
    ) -> tuple[Tensor, LayerState | None]:
        """x: (B, L, D). position: (B,) tokens seen before this call, or None for a fresh stream."""
        cfg = self.config
        batch, length, _ = x.shape
        chunk = cfg.chunk_size
        hidden_drop = cfg.hidden_dropout if self.training else 0.0

        xn, norm_state = self.timenorm(x, None if state is None else state.norm, chunk, block_reset)
        c, cema_h = self.cema(xn, None if state is None else state.cema_h, chunk, block_reset, need_state)
        mx = F.dropout(self.rmsnorm(c.to(x.dtype)), hidden_drop, self.training)
        xn = xn.to(x.dtype)

        q, k = self._queries_keys(mx)
        v = F.silu(self.wv(xn)).view(batch, length, self.heads, cfg.head_value_dim)
        r = F.silu(self.wr(mx))

        fill = torch.zeros(batch, dtype=torch.int64, device=x.device) if position is None else position % chunk
        uniform = bool((fill == fill[0]).all())
        if uniform:
            start = int(fill[0])
            rope_pos = (torch.arange(length, device=x.device) + start) % chunk  # L
        elif length == 1:
            rope_pos = fill[:, None]  # B x 1
        else:
            raise ValueError("the rows of this state sit at different positions inside their chunks; only "
                             "single-token calls can advance them together (prefill each row separately, then "
                             "decode one token at a time)")
        q, k = apply_rotary(q, rope_pos, freqs), apply_rotary(k, rope_pos, freqs)

        k_cache = None if state is None else state.k_cache
        v_cache = None if state is None else state.v_cache
        attn_drop = cfg.attention_dropout if self.training else 0.0
        if uniform:
            if k_cache is not None:
                k_cache, v_cache = k_cache[:, :start], v_cache[:, :start]
            attn, k_cache, v_cache = chunked_attention(q, k, v, chunk, k_cache, v_cache, attn_drop)
        else:
            attn, k_cache, v_cache = decode_attention(q, k, v, k_cache, v_cache, fill, chunk)

        attn = F.dropout(attn.reshape(batch, length, cfg.value_dim) * r, hidden_drop, self.training)
        h = self.wh1(mx) + self.wh2(attn)
        out = F.dropout(h, cfg.dropout if self.training else 0.0, self.training) + x

        new_state = LayerState(cema_h, norm_state, k_cache, v_cache) if need_state else None
        return out, new_state

    @torch.no_grad()
    def decode_step_(self, x: Tensor, freqs: Tensor, fill: Tensor, state: DecodeLayerState) -> Tensor:
        """forward() for one token per row, x (B, 1, D), on static buffers (decode_state.py) updated in place: the
        norm statistics, the CEMA state, and the new key/value at slot fill[b] = position mod chunk_size, each row
        at its own in-chunk position. No host syncs and no data-dependent shapes: a CUDA graph can replay it.
        Inference only (no dropout, no autograd)."""
        cfg = self.config
        batch = x.shape[0]
        xn = self.timenorm.step_(x, state.norm)  # B x 1 x D fp32
        with torch.autocast(x.device.type, enabled=False):
            coeffs = self.cema.coefficients()
            omega = self.cema.omega.squeeze(-1).to(coeffs.p.dtype)
            c, _ = cema_step(xn[:, 0].to(coeffs.p.dtype), coeffs, omega, state.cema_h, out=state.cema_h)
        mx = self.rmsnorm(c.unsqueeze(1).to(x.dtype))
        xn = xn.to(x.dtype)

        q, k = self._queries_keys(mx)
        v = F.silu(self.wv(xn)).view(batch, 1, self.heads, cfg.head_value_dim)
        r = F.silu(self.wr(mx))
        q, k = apply_rotary(q, fill[:, None], freqs), apply_rotary(k, fill[:, None], freqs)
        write_slot_(state.keys, fill, k[:, 0])
        write_slot_(state.values, fill, v[:, 0])
        attn = attend_slots(q, state.keys, state.values, fill, scale=1.0)  # the 1/sqrt(dz) is folded into q

        h = self.wh1(mx) + self.wh2(attn.reshape(batch, 1, cfg.value_dim) * r)
        return h + x
