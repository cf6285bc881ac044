"""What the spawned ranks run for the trainer tests (test_trainer.py): `megalodon.training.trainer.train` on every
rank of the pool, as torchrun would run it. Rank 0 writes the run directory; the test reads it."""

from __future__ import annotations

from megalodon.training.config import TrainConfig
from megalodon.training.trainer import Trainer, train


def train_on_ranks(values: dict, run_dir: str, resume: bool = False, stop_at_step: int | None = None) -> dict:
    result = train(TrainConfig(**values), run_dir, resume=resume, progress=False, stop_at_step=stop_at_step)
    return {"steps": result.steps, "val_loss": result.val_loss, "finished": result.finished,
            "stopped_by": result.stopped_by}


def train_with_an_overflow(values: dict, run_dir: str, step: int) -> float:
    """An fp16 run in which one element of rank 0's gradient (its shard, under FSDP) overflows at `step`, as a
    gradient can overflow in one shard alone; returns this rank's loss scale at the end."""
    import torch
    import torch.distributed as dist

    from megalodon.training.loss_scaling import LossScaling

    unscale, calls = LossScaling.unscale_, [0]

    def overflowing(self, optimizer):
        calls[0] += 1
        if calls[0] == step and (not dist.is_initialized() or dist.get_rank() == 0):
            grad = optimizer.param_groups[0]["params"][0].grad
            (grad.to_local() if hasattr(grad, "to_local") else grad).view(-1)[0] = torch.inf
        unscale(self, optimizer)

    LossScaling.unscale_ = overflowing  # each rank of a pool keeps its modules: set back below
    try:
        with Trainer(TrainConfig(**values), run_dir, progress=False) as trainer:
            trainer.run()
            return trainer.loss_scaling.scaler.get_scale()
    finally:
        LossScaling.unscale_ = unscale


def error_on_ranks(values: dict, run_dir: str) -> str:
    """The error each rank raises when the run is refused (caught here, so that the pool stays usable)."""
    try:
        train(TrainConfig(**values), run_dir, progress=False)
    except ValueError as err:
        return str(err)
    return "no error"


def dropout_masks(seed: int, step: int) -> list[list[float]]:
    """The dropout mask each rank draws at a training step, twice (as the trainer seeds it: Ranks.seed_step)."""
    import torch
    import torch.nn.functional as F

    from megalodon.parallel.runtime import Ranks

    ranks = Ranks.for_run("ddp", 1, 16, torch.device("cpu"), 1.0)
    masks = []
    for _ in range(2):
        ranks.seed_step(seed, step)
        masks.append(F.dropout(torch.ones(32), 0.5).tolist())
    return masks


def train_recording_seeds(values: dict, run_dir: str) -> list[int]:
    """train_on_ranks, returning the steps for which the trainer reseeded this rank (Ranks.seed_step)."""
    from megalodon.parallel.runtime import Ranks

    steps, original = [], Ranks.seed_step
    Ranks.seed_step = lambda self, seed, step: steps.append(step) or original(self, seed, step)
    try:
        train_on_ranks(values, run_dir)
    finally:
        Ranks.seed_step = original
    return steps
