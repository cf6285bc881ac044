"""megalodon-torch: Megalodon (Ma et al., 2024) in plain PyTorch."""

import re

import torch

TORCH_FLOOR = (2, 10)


def check_torch(version: str) -> None:
    """Refuse a torch older than the floor, which pip enforces but `--no-deps` installs, source checkouts on
    PYTHONPATH and preinstalled images skip: torch 2.9 compiles a decode step with wrong logits, without an
    error (docs/gpu.md, "Which torch")."""
    found = re.match(r"(\d+)\.(\d+)", version)
    if found is None or (int(found[1]), int(found[2])) < TORCH_FLOOR:
        floor = ".".join(map(str, TORCH_FLOOR))
        raise ImportError(f"megalodon-torch needs torch>={floor}, and this is torch {version}: older releases "
                          f"compile wrong decode steps and lack the distributed APIs it uses. "
                          f"Fix: pip install 'torch>={floor}'")


check_torch(torch.__version__)

from megalodon.config import PRESETS, MegalodonConfig, count_parameters
from megalodon.model import Megalodon
from megalodon.state import LayerState, MegalodonState

__all__ = ["PRESETS", "MegalodonConfig", "Megalodon", "MegalodonState", "LayerState", "count_parameters"]
__version__ = "0.1.0"
