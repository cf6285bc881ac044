"""The one collective that chunk parallelism needs: an all-gather that autograd sees through.

`torch.distributed.nn.functional.all_gather` would do, but it is deprecated in torch 2.13, and on gloo its backward
falls back to an all-to-all built from `scatter` calls that take group ranks for global ranks: it fails on any
subgroup that does not contain global rank 0 (the chunk-parallel groups of a (dp, cp) mesh). The backward here is a
plain reduce-scatter, which gloo and NCCL both provide.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

# torch 2.13 deprecates reduce_scatter_tensor for reduce_scatter_single; older releases lack the new name.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _GatherSummaries(torch.autograd.Function):
    @staticmethod
    def forward(ctx, summary: Tensor, group) -> Tensor:
        ctx.group = group
        summary = summary.contiguous()
        parts = [torch.empty_like(summary) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, summary, group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        # Every rank's loss may depend on every rank's summary: this rank's gradient is the sum of what all
        # ranks send back for its slot.
        out = torch.empty_like(grad[0])
        _reduce_scatter(out, grad.flatten(0, 1).contiguous(), group=ctx.group)  # (P B, ...) -> (B, ...)
        return out, None


def gather_summaries(summary: Tensor, group) -> Tensor:
    """All-gather `summary` (B, ...), the same shape on every rank, over `group`: (P, B, ...), differentiable.

    The backward is collective too: every rank of the group must run it, so every rank's output must depend on
    the gathered tensor (the callers index into it rather than skip it on rank 0)."""
    return _GatherSummaries.apply(summary, group)
