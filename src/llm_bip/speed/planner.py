"""From a speed target to a prune: how much to take, and from where, so the device's timing says it is met.

`--target-speedup 1.3` replaces `--ratio`: the planner predicts a plan's time from the device's timing
table (timing.py) and searches for the smallest removal whose predicted speed-up meets the target, by
one of three routes:

- width: only heads and channels (the default allocation's widths at each ratio);
- depth: only whole blocks, the fewest that meet the target;
- mixed: `depth_share` of the removed parameters from whole blocks, the rest from widths.

The fourth, `auto` (the default), is not planned here: api.plan_for_speed plans each of the three, prunes
a copy of the model by each, and keeps the one whose prune reads the lowest perplexity on calibration
text held out from the calibration samples (docs/results.md §9 measured that no one route is best for
quality at every speed; which is depends on the model).

plan_speed_refined then has the plan's own widths timed (timing.refine) and plans again, so that the plan
does not rest on the interpolation between the grid's widths. Which blocks and which channels go is still
decided by the scores during the prune; the planner only decides how many. Removed blocks are predicted as
the last prunable ones: every block of the supported models has the same shape, so which ones go does not
change the time.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from llm_bip.config import PruneConfig
from llm_bip.errors import LlmBipError
from llm_bip.params import BlockCosts
from llm_bip.pipeline import depth_parameters, plan_widths
from llm_bip.speed.timing import TimingTable, check_pass
from llm_bip.widths import BlockWidths

PLANNED_ROUTES = ("width", "mixed", "depth")
ROUTES = (*PLANNED_ROUTES, "auto")
RATIO_STEP = 1e-4  # ratios are searched to this step (rounded up, so the target stays met)
# Plans aim this much above the target. On this project's CPU host a plan's measured speed-up over its predicted
# one had a mean of 0.99 and a standard deviation of 2.8% (36 plans timed as whole models, docs/results.md §9):
# a plan aimed exactly at the target misses it about half the time; 3 of the 36 fell more than 5% short.
DEFAULT_MARGIN = 0.05
DEFAULT_ROUTE_SAMPLES = 64


@dataclass(frozen=True)
class SpeedTarget:
    speedup: float
    mode: str = "prefill"  # prefill or decode
    batch: int = 1
    seq_len: int = 128  # prompt length (prefill) or KV-cache length (decode) the timing uses
    route: str = "auto"
    depth_share: float = 0.5  # mixed (and auto's mixed candidate): share of the removed parameters in whole blocks
    margin: float = DEFAULT_MARGIN  # the plan's predicted speed-up aims this fraction above `speedup`
    # auto: the calibration samples (the first ones) each candidate route's trial prune uses; None: all of them.
    # The winner is then pruned again with every sample (docs/results.md §9: the same choice as from all
    # 256 on SmolLM2 and Qwen2.5-0.5B, 3.4x sooner).
    route_samples: int | None = DEFAULT_ROUTE_SAMPLES

    @property
    def aim(self) -> float:
        """The predicted speed-up a plan must reach: the target with the margin for the timing's noise."""
        return self.speedup * (1 + self.margin)

    def validate(self) -> SpeedTarget:
        if not isinstance(self.speedup, int | float) or not 1 < self.speedup < 100:
            raise LlmBipError(f"target speed-up {self.speedup}: give a factor above 1, e.g. 1.3")
        if not isinstance(self.margin, int | float) or not 0 <= self.margin < 1:
            raise LlmBipError(f"speed margin {self.margin}: give a fraction in [0, 1), e.g. 0.05 to plan 5% above "
                              "the target (0: exactly at it)")
        check_pass(self.mode, self.batch, self.seq_len)
        if self.route not in ROUTES:
            raise LlmBipError(f"unknown speed route '{self.route}': use one of {', '.join(ROUTES)}")
        if self.route_samples is not None and (not isinstance(self.route_samples, int) or self.route_samples < 1):
            raise LlmBipError(f"route samples {self.route_samples}: give a number of calibration samples >= 1 for "
                              "each candidate route's trial prune")
        if not 0 < self.depth_share < 1:
            raise LlmBipError(f"depth share {self.depth_share}: give a fraction in (0, 1) (mixed route)")
        return self


@dataclass(frozen=True)
class SpeedPlan:
    ratio: float | None  # of `ratio_of` parameters, blocks included; None: blocks only
    remove_blocks: int
    predicted_speedup: float
    dense_ms: float
    pruned_ms: float
    kept_widths: tuple[BlockWidths, ...] = ()  # the kept blocks' widths the prediction is of

    def config(self, config: PruneConfig) -> PruneConfig:
        """`config` with the planned amounts in place of a ratio."""
        return dataclasses.replace(config, ratio=self.ratio, remove_blocks=self.remove_blocks, depth_ratio=0.0).validate()


def plan_speed(costs: list[BlockCosts], counts: dict, config: PruneConfig, table: TimingTable,
               target: SpeedTarget) -> SpeedPlan:
    """The smallest removal along `target.route` whose predicted speed-up meets `target.aim` (the target with its
    margin)."""
    target.validate()
    if target.route not in PLANNED_ROUTES:
        raise LlmBipError(f"route '{target.route}' is chosen by pruning by each route and comparing: "
                          "use api.plan_for_speed with the calibration samples")
    base = counts["total"] if config.ratio_of == "total" else counts["non_embedding"]
    candidates = config.depth_candidates(len(costs))
    dense_ms = table.model_ms([c.widths for c in costs])

    def plan(ratio: float | None, blocks: int) -> SpeedPlan | None:
        """`blocks` whole blocks plus widths for the rest of `ratio`, with its predicted time (None: impossible)."""
        kept = kept_widths(ratio, blocks)
        if kept is None:
            return None
        pruned_ms = table.model_ms(kept)
        return SpeedPlan(ratio, blocks, dense_ms / pruned_ms, dense_ms, pruned_ms, tuple(kept))

    def predict(ratio: float | None, blocks: int) -> float | None:
        planned = plan(ratio, blocks)
        return planned.predicted_speedup if planned is not None else None

    def kept_widths(ratio: float | None, blocks: int) -> list[BlockWidths] | None:
        removed = candidates[len(candidates) - blocks:] if blocks else []
        kept = [i for i in range(len(costs)) if i not in removed]
        if ratio is None:
            widths = [c.widths for c in costs]
        else:
            rest = round(ratio * base) - depth_parameters(costs, removed)
            if rest < 0:
                return None
            try:
                widths = plan_widths(costs, rest, config, None, removed)
            except LlmBipError:
                return None
        return [widths[i] for i in kept]

    if target.route == "depth":
        for blocks in range(1, len(candidates)):
            planned = plan(None, blocks)
            if planned.predicted_speedup >= target.aim:
                return planned
        _unreachable(target, predict(None, len(candidates) - 1), f"removing {len(candidates) - 1} blocks")

    per_block = depth_parameters(costs, candidates[-1:])

    def blocks_for(ratio: float) -> int:
        if target.route == "width":
            return 0
        return min(len(candidates) - 1, math.floor(target.depth_share * ratio * base / per_block + 0.5))

    def meets(ratio: float) -> SpeedPlan | None:
        planned = plan(ratio, blocks_for(ratio))
        return planned if planned is not None and planned.predicted_speedup >= target.aim else None

    high = 1.0 - RATIO_STEP
    while high > 0 and predict(high, blocks_for(high)) is None:  # the most this route can remove
        high = round(high - 0.01, 4)
    # Where the number of whole blocks steps up (mixed), the widths give back what the block takes, so the
    # predicted speed-up can fall: it rises with the ratio only between the steps. So each stretch of one block
    # count is searched in turn, from the smallest ratio up, and the first that reaches the target has the answer.
    steps = [] if target.route == "width" else [
        (b - 0.5) * per_block / (target.depth_share * base) for b in range(1, len(candidates))]
    edges = [0.0, *(r for r in steps if 0 < r <= high), high + RATIO_STEP]
    for start, end in zip(edges, edges[1:], strict=False):
        top = round(math.floor((end - 1e-9) / RATIO_STEP) * RATIO_STEP, 4)  # this stretch's largest ratio
        if top >= start and meets(top) is not None:
            return _smallest_meeting(meets, start, top)
    _unreachable(target, predict(high, blocks_for(high)) if high > 0 else None, f"removing {high:.0%}")


def _smallest_meeting(meets: Callable[[float], SpeedPlan | None], low: float, top: float) -> SpeedPlan:
    """The plan at the smallest ratio on the RATIO_STEP grid in [low, top] that meets the target, where `top` does
    and the speed-up rises with the ratio: bisection, then a step up at a time from where it stopped (whole
    channels per block make the predicted speed-up a staircase, not exactly monotone)."""
    high = top
    while high - low > RATIO_STEP:
        middle = round((low + high) / 2, 6)
        low, high = (low, middle) if meets(middle) is not None else (middle, high)
    ratio = round(math.ceil(low / RATIO_STEP - 1e-9) * RATIO_STEP, 4)  # the first grid ratio from `low` on
    while (planned := meets(min(ratio, top))) is None:
        ratio = round(ratio + RATIO_STEP, 4)
    return planned


# Plan, time the plan's own shapes, plan again: at most this many timings (a plan that moves after its shape
# was timed moves by less each time: the curve is right where it was measured).
REFINE_ROUNDS = 3
REFINED_WIDTHS = 4  # per timing, the commonest kept widths (a uniform plan has one; an adaptive one, many)


def plan_speed_refined(costs: list[BlockCosts], counts: dict, config: PruneConfig, table: TimingTable,
                       target: SpeedTarget, time_shapes: Callable[[list[BlockWidths]], None] | None
                       ) -> tuple[SpeedPlan, list[SpeedPlan]]:
    """plan_speed, with the plan's own block shapes timed (`time_shapes` adds them to `table` as points) and
    planned again, until the plan's widths rest on points measured at them (or REFINE_ROUNDS timings;
    `time_shapes` None: plan_speed alone).
    Returns the plan and the plans before it, the grid's own first.

    The grid's points are 10-25% of the FFN apart and the plan sits exactly at its target, so the
    interpolation's error between them is the plan's error; a depth plan keeps full widths, which the grid
    measured, and needs no timing."""
    speed, earlier = plan_speed(costs, counts, config, table, target), []
    for _ in range(REFINE_ROUNDS if time_shapes is not None else 0):
        commonest = [w for w, _ in Counter(speed.kept_widths).most_common(REFINED_WIDTHS)]
        shapes = list(dict.fromkeys(s for w in commonest for s in table.unmeasured(w)))
        if not shapes:
            break
        time_shapes(shapes)
        earlier.append(speed)
        speed = plan_speed(costs, counts, config, table, target)
    return speed, earlier


def _unreachable(target: SpeedTarget, best: float | None, what: str) -> None:
    reach = f"at most {best:.2f}x" if best else "nothing"
    other = [r for r in PLANNED_ROUTES if r != target.route]
    raise LlmBipError(f"a {target.speedup}x {target.mode} speed-up ({describe_aim(target)}) is out of reach by "
                      f"{target.route}: {what} gives {reach} on this device's timing; lower --target-speedup"
                      f"{' or --speed-margin' if target.margin else ''}, or try --speed-route {' or '.join(other)}")


def describe_aim(target: SpeedTarget) -> str:
    """What a plan for `target` aims at, in words."""
    if not target.margin:
        return "planned exactly at it: no margin"
    return f"planned for {target.aim:.3g}x, a {target.margin:.0%} margin for the timing's noise"

