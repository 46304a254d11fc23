"""The learning-rate schedule of a recovery run: linear warm-up, then linear decay to zero; and, for a run with a
time budget, the length that ends the decay when the budget runs out."""

from __future__ import annotations

import math

# Steps timed before a run's length is fitted to its time budget (after its first step, which also pays for
# allocations and is not typical): enough to average out one slow step, few enough that the warm-up planned
# before the fit barely matters.
FIT_PROBE_STEPS = 4
# The fitted run aims to end within this share of the budget. Step times drift by several percent within a
# run on a shared machine (docs/results.md §11: a run planned for 240 steps from another run's pace made 228),
# and a run that hits the limit first stops before its rate has decayed.
FIT_MARGIN = 0.95


def effective_warmup(warmup_steps: int, total_steps: int) -> int:
    """Warm-up steps, at most a tenth of the run (LLM-Pruner's 100 of ~1,560 steps is 6%)."""
    return min(warmup_steps, math.ceil(total_steps / 10))


class LinearSchedule:
    """The Hugging Face Trainer's default (linear warm-up, then linear decay to 0), as in LLM-Pruner: the
    factor of the peak rate at each step, for `torch.optim.lr_scheduler.LambdaLR`.

    An object rather than a closure so that `refit` can move the run's end once its pace is known, and so
    that LambdaLR's `state_dict` carries the warm-up and the end into a checkpoint.
    """

    def __init__(self, warmup_steps: int, total_steps: int) -> None:
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps

    def refit(self, warmup_steps: int, total_steps: int) -> None:
        self.warmup_steps, self.total_steps = warmup_steps, total_steps

    def __call__(self, step: int) -> float:
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
    left = FIT_MARGIN * budget_s - elapsed_s
    if per_step <= 0.0:
        raise ValueError(f"a step must take some time, got {step_s} s")
    return done + max(0, math.floor(left / per_step))
