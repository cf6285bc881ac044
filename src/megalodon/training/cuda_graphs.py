"""A training step's forward and backward replayed from CUDA graphs, for batches of one fixed shape.

At short lengths a Megalodon step on a GPU is bound by the host, not the GPU: on an H100 a mega200M step at 4K
kept the GPU busy 35 ms of its 93 (docs/gpu.md, "H100 figures"), the rest being Python, the custom ops'
dispatch and Triton's launcher, once for each of about 1,900 kernels. Captured once, a step costs two graph
replays on the host. torch.cuda.make_graphed_callables does the capture (warm-up on a side stream, one graph
for the forward and one for the backward, the parameters as static inputs); this module fits a model and a loss
function to it.

What a graph fixes at capture, the caller must keep: the batch's shapes, dtypes and device, the model's
structure and mode (train), and no host syncs or CPU-side randomness inside the step. The optimizer may update
the weights in place between steps (their addresses stay); it must not replace them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from megalodon.ops.attention import launches_without_host_cost


class _Loss(nn.Module):
    """loss_fn(model, *batch) under autocast, as one module for make_graphed_callables."""

    def __init__(self, model: nn.Module, loss_fn: Callable[..., Tensor], autocast_dtype: torch.dtype | None):
        super().__init__()
        self.model, self.loss_fn, self.autocast_dtype = model, loss_fn, autocast_dtype

    def forward(self, *batch: Tensor) -> Tensor:
        if self.autocast_dtype is None:
            return self.loss_fn(self.model, *batch)
        # cache_enabled=False: make_graphed_callables requires it (a cached cast is state outside the graph)
        with torch.autocast("cuda", dtype=self.autocast_dtype, cache_enabled=False):
            return self.loss_fn(self.model, *batch)


def graphed_loss(model: nn.Module, loss_fn: Callable[..., Tensor], sample_batch: Sequence[Tensor],
                 autocast_dtype: torch.dtype | None = torch.bfloat16, warmup_steps: int = 3) -> Callable[..., Tensor]:
    """A function batch -> loss equal to loss_fn(model, *batch) under autocast(autocast_dtype), whose forward and
    backward replay CUDA graphs captured here from `sample_batch` (tensors on the model's GPU; their values do
    not matter, their shapes and dtypes are the only ones the function then takes). `loss.backward()` leaves
    the gradients in the parameters' .grad as an eager step does. Call it outside autocast: the cast happens
    inside the graph. The warm-up runs `warmup_steps` forward and backward passes whose gradients are
    discarded.

    One backward per optimizer step, then zero_grad(set_to_none=True) (the default): the gradients come out of
    the graph's static buffers, which autograd may hand to .grad as they are, so that a second backward would
    overwrite the first's rather than add to it. Gradient accumulation across calls is not supported: a call
    while a parameter's .grad is set raises."""
    if not torch.cuda.is_available():
        raise RuntimeError("graphed_loss captures CUDA graphs and needs a CUDA GPU; on a CPU train eagerly")
    devices = {p.device for p in model.parameters()} | {t.device for t in sample_batch}
    if len(devices) != 1 or next(iter(devices)).type != "cuda":
        raise ValueError(f"graphed_loss needs the model and the sample batch on one CUDA device, got "
                         f"{sorted(map(str, devices))}: move them with .to('cuda') first")
    if not model.training:
        raise ValueError("graphed_loss captures a training step: call model.train() first (a graph keeps the "
                         "mode it was captured in)")
    if torch.is_autocast_enabled("cuda"):
        raise RuntimeError("call graphed_loss outside torch.autocast: it applies autocast_dtype inside the graph, "
                           "where autocast's weight cache must be off")
    # launches_without_host_cost: a replay launches nothing from the host, so the attention may take its form of
    # least GPU work at any length (a long chunk's queries in blocks, ops/attention.py's query_blocks)
    with torch.cuda.device(next(iter(devices))), launches_without_host_cost():
        graphed = torch.cuda.make_graphed_callables(_Loss(model, loss_fn, autocast_dtype), tuple(sample_batch),
                                                    num_warmup_iters=warmup_steps, allow_unused_input=True)
    params = [p for p in model.parameters() if p.requires_grad]

    def step(*batch: Tensor) -> Tensor:
        if any(p.grad is not None for p in params):
            raise RuntimeError("graphed_loss: the parameters still hold gradients (.grad is set): call "
                               "optimizer.zero_grad(set_to_none=True) after each optimizer step; a graphed step "
                               "cannot add its gradients to earlier ones (no accumulation across calls)")
        return graphed(*batch)

    return step
