"""The learning-rate schedule of a recovery run: linear warm-up, then linear decay to zero."""

from __future__ import annotations

import math
from collections.abc import Callable


def effective_warmup(warmup_steps: int, total_steps: int) -> int:
    """Warm-up steps, at most a tenth of the run (LLM-Pruner's 100 of ~1,560 steps is 6%)."""
    return min(warmup_steps, math.ceil(total_steps / 10))


def linear_schedule(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    # The Hugging Face Trainer's default (linear warmup, then linear decay to 0), as in LLM-Pruner.
    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor
