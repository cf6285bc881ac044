"""The exported code's stand-in for `megalodon.ops.triton`: an export ships no kernels, so every op runs its
PyTorch path. export_code.py inlines this file in place of the real dispatch module."""

from __future__ import annotations

from torch import Tensor

from megalodon.ops.formula import eager_function


def use_triton(op: str, *tensors: Tensor) -> bool:
    """Never: the PyTorch path is the one an exported model runs, on any device."""
    return False


def runs_eagerly(*args) -> bool:
    """Whether a call runs eagerly on real tensors; asked only after use_triton, so never in an export."""
    return False


def opaque_op(name: str, mutates_args=()):
    """The function as an op called directly, never registered: an export may share a process with the package,
    which registers its custom ops under these names, and a traced graph may trace through it."""
    return _DirectOp


class _DirectOp:
    """OpaqueOp's eager path alone: the implementation, through an autograd.Function made from the registered
    formula."""

    def __init__(self, fn):
        self._fn = self._call = fn

    def register_fake(self, fake):
        return fake

    def register_autograd(self, backward, setup_context) -> None:
        self._call = eager_function(self._fn, setup_context, backward)

    def __call__(self, *args):
        return self._call(*args)
