"""A wall-clock training budget (--time_budget_min) turned into a number of steps, from the pace of the run's
steady-state steps."""

from __future__ import annotations

CALIBRATION_STEPS = 5  # steady-state steps timed before the budget becomes max_steps


class TimeBudget:
    """Estimates the steps that fit in `minutes` of wall clock.

    The estimate is final at the end of warmup: the schedule does not depend on max_steps before then, so the run
    (and any resumed run) follows one fixed schedule. Until then it only sizes the progress bar."""

    def __init__(self, minutes: float, warmup_steps: int, ranks=None):
        self.seconds, self.warmup_steps, self.ranks = minutes * 60, warmup_steps, ranks
        self.timed_from: tuple[int, float, bool] | None = None  # (step, elapsed, CUDA graphs captured)

    def observe(self, step: int, elapsed: float, captured: bool) -> tuple[int | None, int | None]:
        """After `step` steps and `elapsed` seconds of the run: (max_steps, the progress bar's total), each None
        while unknown. On several ranks a collective: every rank calls it at the same step."""
        # the first step of a process pays one-off costs, as does a step that captures CUDA graphs: leave them out
        if self.timed_from is None or self.timed_from[2] != captured:
            self.timed_from = (step, elapsed, captured)
            return None, None
        first_step, first_time, _ = self.timed_from
        if step - first_step < CALIBRATION_STEPS:
            return None, None
        per_step = (elapsed - first_time) / (step - first_step)
        if self.ranks is not None:  # one estimate for all ranks: their clocks differ a little
            per_step, elapsed = (v / self.ranks.world for v in self.ranks.sum([per_step, elapsed]))
        total = max(step + 1, step + int((self.seconds - elapsed) / per_step))
        return (total if step >= self.warmup_steps else None), total
