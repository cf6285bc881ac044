"""An op's eager form from its registered autograd formula, shared by the package's custom ops
(ops/triton/__init__.py's OpaqueOp) and the exported code's stand-in for them (hf/no_triton.py)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def eager_function(fn: Callable, setup_context: Callable, backward: Callable) -> Callable:
    """fn(*inputs) as an autograd.Function's apply whose gradient is the formula torch.library's register_autograd
    takes: setup_context(ctx, inputs, output) after the call, backward(ctx, *grads) for the gradients."""

    class Eager(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            output = fn(*inputs)
            setup_context(ctx, inputs, output)
            return output

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)

    return Eager.apply
