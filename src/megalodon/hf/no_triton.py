"""The exported code's stand-in for `megalodon.ops.triton`: an export ships no kernels, so every op runs its
PyTorch path. export_code.py inlines this file in place of the real dispatch module."""

from __future__ import annotations

import torch
from torch import Tensor


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
        fn = self._fn

        class Direct(torch.autograd.Function):
            @staticmethod
            def forward(ctx, *inputs):
                output = fn(*inputs)
                setup_context(ctx, inputs, output)
                return output

            @staticmethod
            def backward(ctx, *grads):
                return backward(ctx, *grads)

        self._call = Direct.apply

    def __call__(self, *args):
        return self._call(*args)
