"""The exported code's stand-in for `megalodon.ops.triton`: an export ships no kernels, so every op runs its
PyTorch path. export_code.py inlines this file in place of the real dispatch module."""

from __future__ import annotations

from torch import Tensor


def use_triton(op: str, *tensors: Tensor) -> bool:
    """Never: the PyTorch path is the one an exported model runs, on any device."""
    return False


def runs_eagerly(*args) -> bool:
    """Whether a call runs eagerly on real tensors; asked only after use_triton, so never in an export."""
    return False
