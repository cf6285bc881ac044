"""What the spawned ranks run for the trainer tests (test_trainer.py): `megalodon.training.trainer.train` on every
rank of the pool, as torchrun would run it. Rank 0 writes the run directory; the test reads it."""

from __future__ import annotations

from megalodon.training.config import TrainConfig
from megalodon.training.trainer import train


def train_on_ranks(values: dict, run_dir: str, resume: bool = False, stop_at_step: int | None = None) -> dict:
    result = train(TrainConfig(**values), run_dir, resume=resume, progress=False, stop_at_step=stop_at_step)
    return {"steps": result.steps, "val_loss": result.val_loss, "finished": result.finished,
            "stopped_by": result.stopped_by}


def error_on_ranks(values: dict, run_dir: str) -> str:
    """The error each rank raises when the run is refused (caught here, so that the pool stays usable)."""
    try:
        train(TrainConfig(**values), run_dir, progress=False)
    except ValueError as err:
        return str(err)
    return "no error"
