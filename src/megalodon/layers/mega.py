"""The MEGA layer (spec section 7): TimestepNorm -> CEMA -> normalized, gated chunk attention.

Attribute names follow the reference (`timenorm`, `cema`, `rmsnorm`, `wz`, ..., `gamma`, `beta`), so that the
reference state_dict maps onto this module key for key. The projections are small methods shared by `forward`
and the in-place decode step, so that the math lives in one place.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megalodon.config import MegalodonConfig
from megalodon.layers.cema import CEMA
from megalodon.layers.linears import gated_projection, plain, project, project_into_
from megalodon.layers.norms import RMSNorm, compute_dtype
from megalodon.layers.timestep_norm import TimestepNorm
from megalodon.ops.attention import chunked_attention, decode_attention, queries_keys
from megalodon.ops.cema import CemaCoefficients, cema_decay, cema_step
from megalodon.ops.fused import applied
from megalodon.ops.static_kv import SlotStep, write_and_attend
from megalodon.state import LayerState

if TYPE_CHECKING:
    from megalodon.decode_state import DecodeLayerState

# Below this many tokens per call, Wz, Wr and Wh1 run as three GEMMs: concatenating their weights would cost more
# than it saves. (A decoder concatenates them once per generation, in DecodeConstants.)
FUSED_PROJECTION_MIN_TOKENS = 16


class DecodeConstants(NamedTuple):
    """What a MEGA layer's decode step derives from its parameters alone: computed once per generation."""

    coeffs: CemaCoefficients
    omega: Tensor  # (D,)
    decay: tuple[Tensor, Tensor]  # q as (Re, Im), each (D, N)
    qk_affine: tuple[Tensor, Tensor]  # (2, z_dim) scale and shift that make q and k from normalized z
    rms_scale: Tensor | None  # (D,) what the RMSNorm of the CEMA output multiplies by (weight + 1)
    # Wz, Wr and Wh1 concatenated (weight, bias), in the weights' dtype: one GEMM per token, not three (it costs
    # a copy of those weights while the decoder lives); None where they are not plain linears (layers/linears.py)
    projection: tuple[Tensor, Tensor] | None


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

    # ---- the projections, shared by forward and decode_step_ ---------------------------------------------------
    def _joined_projection(self) -> tuple[Tensor, Tensor]:
        """The weights and biases of Wz, Wr and Wh1 concatenated, in their dtype."""
        linears = (self.wz, self.wr, self.wh1)
        return torch.cat([m.weight for m in linears]), torch.cat([m.bias for m in linears])

    def _mixed_projections(self, mx: Tensor, joined: tuple[Tensor, Tensor] | None = None
                           ) -> tuple[Tensor, Tensor, Tensor]:
        """Wz mx, Wr mx (the gate before its SiLU) and Wh1 mx, biases included, in mx's dtype. They share their
        input, so a call of many tokens runs them as one GEMM over the concatenated weights (the parameters stay
        separate, under the reference's names). Joined first and cast once: under autocast that is two kernels
        each way for the weights where casting each costs four (and again for the biases). joined:
        _joined_projection(), made beforehand (decode)."""
        linears = (self.wz, self.wr, self.wh1)
        if not plain(*linears) or joined is None and mx.shape[0] * mx.shape[1] < FUSED_PROJECTION_MIN_TOKENS:
            return tuple(project(m, mx) for m in linears)
        weight, bias = self._joined_projection() if joined is None else joined
        return F.linear(mx, weight.to(mx.dtype), bias.to(mx.dtype)).split([m.out_features for m in linears], -1)

    def _qk_affine(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(gamma + 1) / sqrt(dz) and beta, each (2, z_dim) in dtype: row 0 makes q, row 1 makes k."""
        return (self.gamma.to(dtype) + 1.0) / math.sqrt(self.config.head_z_dim), self.beta.to(dtype)

    def _queries_keys(self, z: Tensor, rotation: tuple[Tensor, Tensor],
                      affine: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """q and k (B, L, H, dz), rotated by `rotation` (rotary_angles of their in-chunk positions, in fp32 or
        better), in z's dtype: ops/attention.py::queries_keys with this layer's (gamma + 1) / sqrt(dz) and beta.
        affine: _qk_affine(), when the caller has it already."""
        if affine is None:
            affine = self._qk_affine(torch.promote_types(z.dtype, torch.float32))
        return queries_keys(z, self.heads, self.config.norm_eps, *affine, rotation)

    def _value_inputs(self, xn: Tensor) -> Tensor:
        """Wv xn, (B, L, H, dv), from the TimestepNorm output (not from mx): the values are silu of it."""
        batch, length, _ = xn.shape
        return self.wv(xn).view(batch, length, self.heads, self.config.head_value_dim)

    def _output(self, attn: Tensor, gate: Tensor | None, h1: Tensor, x: Tensor) -> Tensor:
        """dropout(Wh1 mx + Wh2 dropout(attn * silu(gate))) + x: the first hop of the residual. gate None: attn
        is attn * silu(gate) already (decode's attention applies the gate)."""
        training = self.training
        if gate is None and not training and h1.dtype == x.dtype:
            # a decode step, where h1 is this step's own: x + h1 (in h1, so only where that does not round x), then
            # the GEMM adds Wh2 attn into it (two kernels, where the out-of-place sums take three)
            return project_into_(h1.add_(x), self.wh2, attn)
        if gate is None:
            h = h1 + project(self.wh2, attn)
        else:
            h = h1 + gated_projection(self.wh2, attn, gate, self.config.hidden_dropout, training)
        return F.dropout(h, self.config.dropout if training else 0.0, training) + x

    # ---- a call of any length ----------------------------------------------------------------------------------
    def forward(
        self, x: Tensor, rotation: tuple[Tensor, Tensor], state: LayerState | None, position: Tensor | None,
        block_reset: Tensor | None = None, need_state: bool = False,
    ) -> tuple[Tensor, LayerState | None]:
        """x: (B, L, D). position: (B,) tokens seen before this call, or None for a fresh stream. rotation:
        rotary_angles of the tokens' in-chunk positions, in fp32 or better (Megalodon.rotation; the same for every
        layer, so made once per call and saved once for backward).

        A call of several tokens needs every row at the same in-chunk position, which the model checks: the
        key cache's length is then that position. A single token may find its rows at different positions."""
        cfg = self.config
        batch, length, _ = x.shape
        chunk = cfg.chunk_size
        dtype = compute_dtype(x)  # the linears' dtype: bf16 under autocast

        # xn in fp32 for the CEMA, and in the linears' dtype for Wv, both from the norm's one pass
        xn, xn_low, norm_state = self.timenorm(x, None if state is None else state.norm, chunk, block_reset,
                                               copy_dtype=dtype)
        c, cema_h = self.cema(xn, None if state is None else state.cema_h, chunk, block_reset, need_state)
        mx = F.dropout(self.rmsnorm(c, dtype), cfg.hidden_dropout if self.training else 0.0, self.training)
        z, gate, h1 = self._mixed_projections(mx)
        v_in = self._value_inputs(xn_low)

        q, k = self._queries_keys(z, rotation)
        if state is not None and length == 1:
            fill = position % chunk  # B: each row's own position in its chunk
            attn, k_cache, v_cache = decode_attention(q, k, F.silu(v_in), state.k_cache, state.v_cache, fill, chunk)
        else:
            k_cache = None if state is None else state.k_cache
            v_cache = None if state is None else state.v_cache
            # v = silu(v_in), applied by the attention op, which then keeps v_in alone for backward
            attn, k_cache, v_cache = chunked_attention(q, k, v_in, chunk, k_cache, v_cache,
                                                       cfg.attention_dropout if self.training else 0.0,
                                                       silu_values=True)

        out = self._output(attn.reshape(batch, length, cfg.value_dim), gate, h1, x)
        new_state = LayerState(cema_h, norm_state, k_cache, v_cache) if need_state else None
        return out, new_state

    @torch.no_grad()
    def decode_constants(self) -> DecodeConstants:
        """What decode_step_ derives from the parameters alone (fp32 or better): a decoder computes it once, not
        for every token. It holds the weights as they are now."""
        with torch.autocast(self.cema.omega.device.type, enabled=False):
            coeffs = self.cema.coefficients()
            return DecodeConstants(coeffs, self.cema.omega.squeeze(-1).to(coeffs.p.dtype), cema_decay(coeffs),
                                   self._qk_affine(torch.promote_types(self.gamma.dtype, torch.float32)),
                                   applied(self.rmsnorm.weight),
                                   self._joined_projection() if plain(self.wz, self.wr, self.wh1) else None)

    @torch.no_grad()
    def decode_step_(self, x: Tensor, rotation: tuple[Tensor, Tensor], step: SlotStep, state: DecodeLayerState,
                     constants: DecodeConstants | None = None) -> Tensor:
        """forward() for one token per row, x (B, 1, D), on static buffers (decode_state.py) updated in place: the
        norm statistics, the CEMA state, and the new key/value at slot step.slot[b] = position mod chunk_size,
        each row at its own in-chunk position. rotation: rotary_angles of those slots; rotation and step are the
        same in every layer, so the model's step makes them once. No host syncs and no data-dependent shapes: a
        CUDA graph can replay it. constants: decode_constants(), or None to compute them here. Inference only (no
        dropout, no autograd)."""
        batch = x.shape[0]
        dtype = compute_dtype(x)
        xn, xn_low = self.timenorm.step_(x, state.norm, dtype)  # B x 1 x D, fp32 and the linears' dtype
        constants = self.decode_constants() if constants is None else constants
        with torch.autocast(x.device.type, enabled=False):
            c, _ = cema_step(xn[:, 0].to(constants.omega.dtype), constants.coeffs, constants.omega, state.cema_h,
                             out=state.cema_h, decay=constants.decay)
        mx = self.rmsnorm(c.unsqueeze(1), dtype, constants.rms_scale)
        z, gate, h1 = self._mixed_projections(mx, constants.projection)
        q, k = self._queries_keys(z, rotation, constants.qk_affine)
        # the values are silu(Wv xn); the 1/sqrt(dz) is folded into q; the output comes gated by silu(gate)
        attn = write_and_attend(q, k, self._value_inputs(xn_low), state.keys, state.values, step, scale=1.0,
                                silu_values=True, gate=gate)
        return self._output(attn.reshape(batch, 1, self.config.value_dim), None, h1, x)
