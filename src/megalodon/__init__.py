"""megalodon-torch: Megalodon (Ma et al., 2024) in plain PyTorch."""

from megalodon.config import PRESETS, MegalodonConfig, count_parameters
from megalodon.model import Megalodon
from megalodon.state import LayerState, MegalodonState

__all__ = ["PRESETS", "MegalodonConfig", "Megalodon", "MegalodonState", "LayerState", "count_parameters"]
__version__ = "0.1.0"
