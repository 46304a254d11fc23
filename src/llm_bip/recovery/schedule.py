"""The learning-rate schedule of a recovery run: linear warm-up, then linear decay to zero; and, for a run with a
time budget (`schedule_to_time`), the fitting of its length to the budget as the pace of its steps becomes known."""

from __future__ import annotations

import logging
import math
from typing import Any

log = logging.getLogger(__name__)

# Steps timed before a run's length is fitted to its time budget (after its first step, which also pays for
# allocations and is not typical).
FIT_PROBE_STEPS = 4
# Shares of the budget after which the run's length is fitted again, from the pace of all its steps so far.
# One early fit is not enough: a SmolLM2 LoRA run's steps 2-5 took 9.6 s each and its average was 8.0 s, so
# fitted once it ended at 77% of its budget (docs/results.md §11).
REFIT_AT = (0.25, 0.5, 0.75, 0.9)
# A fitted run aims to end within this share of the budget: what is left absorbs the drift of the pace after
# the last fit, where a run that hits the limit first stops before its rate has decayed.
FIT_MARGIN = 0.97


def effective_warmup(warmup_steps: int, total_steps: int) -> int:
    """Warm-up steps, at most a tenth of the run (LLM-Pruner's 100 of ~1,560 steps is 6%)."""
    return min(warmup_steps, math.ceil(total_steps / 10))


class LinearSchedule:
    """The Hugging Face Trainer's default (linear warm-up, then linear decay to 0), as in LLM-Pruner: the
    factor of the peak rate at each step, for `torch.optim.lr_scheduler.LambdaLR`.

    `continue_to` moves the end of a run under way: from `anchor_step` the factor falls linearly from what it
    was there to zero at the new end, so the rate does not jump. An object rather than a closure so that
    LambdaLR's `state_dict` carries all of it into a checkpoint. Steps before the anchor are not asked for
    again.
    """

    def __init__(self, warmup_steps: int, total_steps: int) -> None:
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.anchor_step: int | None = None
        self.anchor_factor: float | None = None

    def restart(self, warmup_steps: int, total_steps: int) -> None:
        """A new warm-up and end, as if planned so from the start (for a run still in its warm-up)."""
        self.warmup_steps, self.total_steps = warmup_steps, total_steps
        self.anchor_step = self.anchor_factor = None

    def continue_to(self, step: int, total_steps: int) -> None:
        """From `step` on, fall linearly from the factor `step` has now to zero at `total_steps`."""
        self.anchor_factor = self(step)
        self.anchor_step, self.total_steps = step, total_steps

    def __call__(self, step: int) -> float:
        if self.anchor_step is not None and step >= self.anchor_step:
            assert self.anchor_factor is not None
            left = max(0.0, (self.total_steps - step) / max(1, self.total_steps - self.anchor_step))
            return self.anchor_factor * left
        if step < self.warmup_steps:
            return step / max(1, self.warmup_steps)
        return max(0.0, (self.total_steps - step) / max(1, self.total_steps - self.warmup_steps))


def steps_that_fit(
    done: int, elapsed_s: float, budget_s: float, step_s: float, eval_s: float = 0.0, eval_every: int | None = None
) -> int:
    """The run's total steps if it is to end within `FIT_MARGIN` of `budget_s` seconds of training.

    `done` steps took `elapsed_s` so far; each further step takes `step_s`, and every `eval_every` steps a
    held-out evaluation takes `eval_s` more. At least `done`: a run already past its share stops now.
    """
    per_step = step_s + (eval_s / eval_every if eval_every else 0.0)
    if per_step <= 0.0:
        raise ValueError(f"a step must take some time, got {step_s} s")
    left = FIT_MARGIN * budget_s - elapsed_s
    return done + max(0, math.floor(left / per_step))


class TimeFit:
    """Fits a run's length to its time budget: once its first `FIT_PROBE_STEPS` steps are timed, and again at
    each share of the budget in `REFIT_AT`, from the average pace since this process's first step (held-out
    evaluations apart, then counted by their own time). Never longer than the run planned.

    `fits` (the checkpoint's record, appended to) says how each fit was made; a resumed run keeps them and the
    schedule they set, and fits again only at the shares of the budget still ahead.
    """

    def __init__(
        self, schedule: LinearSchedule, budget_s: float, warmup_steps: int, planned_steps: int,
        eval_every: int | None, fits: list[dict[str, Any]],
    ) -> None:  # fmt: skip
        self.schedule, self.budget_s, self.warmup_steps = schedule, budget_s, warmup_steps
        self.planned_steps, self.eval_every, self.fits = planned_steps, eval_every, fits
        self._pace_start: tuple[float, int] | None = None  # (seconds spent, steps done) after this process's first step
        self._eval_since_start = 0.0
        self._eval_s: float | None = None

    @property
    def total_steps(self) -> int | None:
        return self.fits[-1]["total_steps"] if self.fits else None

    def timed_eval(self, seconds: float) -> None:
        """A held-out evaluation took `seconds` (they are not part of a step's pace)."""
        self._eval_s = seconds
        if self._pace_start is not None:
            self._eval_since_start += seconds

    def after_step(self, done: int, elapsed_s: float) -> bool:
        """Called when step `done` is taken, before the scheduler moves on (so the next step's rate follows a
        new end); `elapsed_s` of the budget are spent. True when the run's length was fitted (again)."""
        if self._pace_start is None:
            self._pace_start = (elapsed_s, done)
            return False
        timed = done - self._pace_start[1]
        if timed < FIT_PROBE_STEPS:
            return False
        if self.fits:
            if len(self.fits) > len(REFIT_AT) or elapsed_s < REFIT_AT[len(self.fits) - 1] * self.budget_s:
                return False
        step_s = (elapsed_s - self._pace_start[0] - self._eval_since_start) / timed
        fits = steps_that_fit(done, elapsed_s, self.budget_s, step_s, self._eval_s or 0.0, self.eval_every)
        total = min(self.planned_steps, fits)
        if not self.fits or done < self.schedule.warmup_steps:
            self.schedule.restart(effective_warmup(self.warmup_steps, total), total)
        else:
            self.schedule.continue_to(done, total)
        self.fits.append({
            "at_step": done, "elapsed_s": elapsed_s, "step_s": step_s, "eval_s": self._eval_s, "total_steps": total,
            "warmup_steps": self.schedule.warmup_steps, "shortened": total < self.planned_steps,
        })  # fmt: skip
        log.info(
            "schedule fitted to the %.0f s budget at step %d (%.0f s spent, %.2f s a step): the rate reaches zero "
            "at step %d", self.budget_s, done, elapsed_s, step_s, total,
        )  # fmt: skip
        return True
