"""The carried state of stateful training, row by row of the global batch: a checkpoint holds it whole, in row
order; a step holds one state per micro-batch, of this rank's rows."""

from __future__ import annotations

from pathlib import Path

from megalodon.state import MegalodonState


def micro_batch_streams(whole: MegalodonState, batch_size: int, grad_accum: int, ranks, device,
                        source: Path) -> list[MegalodonState]:
    """Each micro-batch's rows of `whole` (the global batch's state, read from the checkpoint `source`) on this
    rank: the rows Ranks.rows gives it, cut as the trainer cuts its micro-batches."""
    if whole.batch_size != batch_size:
        raise ValueError(f"{source} carries the state of {whole.batch_size} rows; this run has batch_size "
                         f"{batch_size}")
    dp, dp_rank = (1, 0) if ranks is None else (ranks.dp, ranks.dp_rank)
    micro = batch_size // (dp * grad_accum)
    first = dp_rank * micro * grad_accum
    return [whole[first + m * micro: first + (m + 1) * micro].to(device) for m in range(grad_accum)]


def global_streams(streams: list[MegalodonState | None], ranks) -> MegalodonState | None:
    """The state of every row of the global batch, in row order, from each rank's micro-batch states (a collective
    on several ranks); None before every micro-batch has one."""
    mine = None
    if all(s is not None for s in streams):
        mine = MegalodonState.stack([s.to("cpu") for s in streams])
    return mine if ranks is None else ranks.gather_rows(mine)
