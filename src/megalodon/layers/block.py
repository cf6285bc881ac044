"""One Megalodon block: the MEGA layer, then the normalized FFN, with the two-hop residual."""

from __future__ import annotations

from torch import Tensor, nn

from megalodon.config import MegalodonConfig
from megalodon.layers.ffn import NormalizedFFN
from megalodon.layers.mega import MovingAverageGatedAttention
from megalodon.state import LayerState


class MegalodonBlock(nn.Module):
    def __init__(self, config: MegalodonConfig, layer_index: int):
        super().__init__()
        self.mega = MovingAverageGatedAttention(config)
        self.nffn = NormalizedFFN(config, layer_index)

    def forward(
        self, x: Tensor, rotation: tuple[Tensor, Tensor], state: LayerState | None, position: Tensor | None,
        block_reset: Tensor | None = None, need_state: bool = False,
    ) -> tuple[Tensor, LayerState | None]:
        y, new_state = self.mega(x, rotation, state, position, block_reset, need_state)
        # Second hop: the FFN's residual is the block input x, not the MEGA output y.
        return self.nffn(y, residual=x), new_state
