"""Dynamic loss scaling for fp16 training (`--dtype fp16`), on torch.amp.GradScaler.

fp16 runs on the tensor cores of GPUs that have no bf16 ones (V100, T4), but its smallest step is 2^-24 where
bf16's is 2^-133: small gradients would round to zero. GradScaler multiplies the loss by a large scale before
backward and divides the gradients by it before the optimizer; when a gradient overflows, the step is skipped
and the scale halved, and after 2,000 steps without one it doubles. Under FSDP2 the overflow check is
all-reduced over the ranks (DTensor's rule for it), so every rank skips the same steps and keeps the same scale.
On N ranks each rank backpropagates its loss times N (FSDP and DDP average the ranks' gradients), so the scale
settles about N times lower than in one process: fp16 sees their product.

The trainer keeps its own contract: one read of the device per step. The overflow shows in the gradient norm it
reads anyway (an inf or NaN gradient makes the norm one), so the trainer decides to skip from that read and calls
the optimizer itself; GradScaler's step() would read its overflow flags a second time. A skipped step still counts
as a step (the data and the learning rate move on, as in torch's AMP recipe), so resuming replays it exactly: the
scale and its growth counter are saved with every checkpoint.
"""

from __future__ import annotations

import torch
from torch import Tensor

INITIAL_SCALE = 2.0 ** 16  # GradScaler's default: a few skipped steps at the start find the scale that fits
# Below this scale the gradients overflow fp16 even unscaled: the run has diverged, and halving further would only
# skip every step that follows.
MIN_SCALE = 2.0 ** -10


class LossScaling:
    """The loss scale of a run: GradScaler where enabled (fp16), the identity otherwise."""

    def __init__(self, enabled: bool, device: torch.device):
        self.enabled = enabled
        self.scaler = torch.amp.GradScaler(device.type, init_scale=INITIAL_SCALE, enabled=enabled)
        self.skipped = 0  # steps skipped for an overflow, over the whole run

    def scale(self, loss: Tensor) -> Tensor:
        """The loss to backpropagate."""
        return self.scaler.scale(loss)

    def current(self, like: Tensor) -> Tensor:
        """The scale this step's loss was multiplied by, as a 0-dim tensor on the device (no host read)."""
        return self.scaler.scale(torch.ones((), dtype=torch.float32, device=like.device)).to(like.dtype)

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the gradients by the scale, noting on the device whether any overflowed; before clipping."""
        self.scaler.unscale_(optimizer)

    def stepped(self) -> None:
        """After the optimizer's step: the scale grows once enough steps have passed without an overflow."""
        self.scaler.update()

    def skip(self, step: int, scale: float) -> None:
        """A step whose gradients overflowed (the caller skips the optimizer): halve the scale. Raises once the
        scale would fall below MIN_SCALE."""
        self.scaler.update()
        self.skipped += 1
        if scale * self.scaler.get_backoff_factor() < MIN_SCALE:
            raise RuntimeError(
                f"training diverged at step {step}: the gradients overflow fp16 even at a loss scale of {scale:.3g}. "
                "Lower --lr or raise --warmup_steps, or train in --dtype bf16 (GPUs from Ampere on) or fp32")

    def hint(self, loss_finite: bool) -> str:
        """What to add to the message of a diverged run: a loss that is not finite may be fp16's overflow."""
        if not self.enabled or loss_finite:
            return ""
        return (". Under --dtype fp16 an activation may have overflowed fp16's range (65504) in the forward pass: "
                "--dtype bf16 (GPUs from Ampere on) or fp32 do not overflow there")

    def summary(self) -> dict:
        """The final scale and the steps skipped, for the run's summary; empty when disabled."""
        return {"loss_scale": self.scaler.get_scale(), "skipped_steps": self.skipped} if self.enabled else {}

    def state_dict(self) -> dict:
        """Plain numbers (JSON): the scale, its growth counter and the steps skipped; empty when disabled."""
        return {**self.scaler.state_dict(), "skipped": self.skipped} if self.enabled else {}

    def load_state_dict(self, state: dict) -> None:
        """A checkpoint's state; an empty one (a run that did not train in fp16) leaves the initial scale."""
        if self.enabled and state:
            state = dict(state)
            self.skipped = state.pop("skipped", 0)
            self.scaler.load_state_dict(state)
