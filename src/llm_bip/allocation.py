"""Allocators: how many heads, KV groups and channels each block keeps, to an exact parameter target.

- uniform: the same fraction of head units and of channels in every prunable block;
- block-adaptive: every prunable block gives up the same number of parameters, choosing between
  heads and channels by score per parameter (needs scores in one unit, as LLM-BIP's are);
- global-adaptive: one model-wide pool ranked by score per parameter, each block's scores divided by
  its output norm ||y||_F (relative change), with at most `max_block_ratio` of any block removed;
- flap: FLAP's own allocation (AL-AM): one model-wide pool ranked by score alone;
- sensitivity: each block's share of the channels to remove inversely proportional to its measured
  end-to-end sensitivity (sensitivity.py); head units as uniform, or, with head ratio "auto", taken where
  their measured cost is below what the channels they spare would cost.

Every allocator removes head units greedily and then fills the rest of the target with channels, so
the adaptive allocators land within one channel's parameters of the target (within `round_to`
channels when widths are rounded); uniform keeps every prunable block at the same width, so it lands
within one channel per block.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from llm_bip.errors import LlmBipError
from llm_bip.params import BlockCosts
from llm_bip.plan import GQA_MODES
from llm_bip.scoring.base import BlockScores
from llm_bip.widths import BlockWidths

ALLOCATIONS = ("uniform", "block-adaptive", "global-adaptive", "flap", "sensitivity")


@dataclass(frozen=True)
class AllocationConfig:
    strategy: str = "uniform"
    gqa_mode: str = "kv-groups"
    prunable_layers: tuple[int, ...] | None = None  # None = every block
    round_to: int = 1  # kept FFN widths rounded to a multiple of this
    # uniform: fraction of head units to remove (None: the same as channels); "auto" (sensitivity only): by
    # the measured cost of a head unit against a channel's
    head_ratio: float | str | None = None
    max_block_ratio: float = 0.9  # global-adaptive: most of a block's prunable parameters it may lose
    sensitivity_cap: float = 0.75  # sensitivity: most of a block's channels it may lose


@dataclass(frozen=True)
class Curvature:
    """The sensitivity allocator's cost model, per block (None where not measured): removing x channels costs
    channels[i] · x^exponent, removing u head units heads[i] · u^exponent (in KL; sensitivity.py measures
    both)."""

    channels: list[float | None]
    heads: list[float | None] | None = None  # None: heads follow the uniform rule
    exponent: float | list[float | None] = 2.0  # one for every block, or each block's own (fitted from two trials)

    def exponent_of(self, i: int) -> float:
        return self.exponent[i] if isinstance(self.exponent, list) else self.exponent


@dataclass
class _HeadUnits:
    count: int  # head units in the block
    cost: int  # parameters of one unit
    per_unit: BlockWidths  # heads, kv heads removed per unit


def head_units(costs: BlockCosts, gqa_mode: str) -> _HeadUnits:
    group_size = costs.widths.num_heads // costs.widths.num_kv_heads
    if gqa_mode == "kv-groups":
        return _HeadUnits(costs.widths.num_kv_heads, group_size * costs.head + costs.kv, BlockWidths(group_size, 1, 0))
    if gqa_mode == "query-heads":
        return _HeadUnits(group_size, costs.widths.num_kv_heads * costs.head, BlockWidths(costs.widths.num_kv_heads, 0, 0))
    raise LlmBipError(f"unknown GQA mode '{gqa_mode}': use one of {', '.join(GQA_MODES)}")


def allocate(
    costs: list[BlockCosts], target_removed: int, config: AllocationConfig, scores: list[BlockScores] | None = None,
    sensitivity: Curvature | None = None,
) -> list[BlockWidths]:
    """Widths per block that remove `target_removed` parameters (within one channel's parameters)."""
    layers = list(range(len(costs))) if config.prunable_layers is None else sorted(config.prunable_layers)
    if not layers:
        raise LlmBipError("no prunable layers: widen the layer range")
    units = [head_units(costs[i], config.gqa_mode) for i in range(len(costs))]
    most = sum(costs[i].prunable - units[i].cost - costs[i].channel for i in layers)
    if target_removed < 0 or target_removed > most:
        raise LlmBipError(
            f"cannot remove {target_removed:,} parameters from the prunable blocks (at most {most:,} while "
            "keeping one head unit and one channel per block): lower the ratio or widen the layer range"
        )
    if config.head_ratio == "auto" and config.strategy != "sensitivity":
        raise LlmBipError("head ratio 'auto' takes heads by their measured cost: it needs --allocation sensitivity")
    if config.strategy not in ("uniform", "sensitivity") and scores is None:
        raise LlmBipError(f"{config.strategy} allocation needs scores")
    if config.strategy == "uniform":
        removed = _uniform(costs, units, layers, target_removed, config)
    elif config.strategy == "sensitivity":
        if sensitivity is None:
            raise LlmBipError("sensitivity allocation needs each block's measured sensitivity")
        if (config.head_ratio == "auto") != (sensitivity.heads is not None):
            raise LlmBipError("head ratio 'auto' needs each block's measured head sensitivity, and only it uses one")
        removed = _by_sensitivity(costs, units, layers, target_removed, config, sensitivity)
    elif config.strategy in ("block-adaptive", "global-adaptive"):
        removed = _adaptive(costs, units, layers, target_removed, config, scores)
    elif config.strategy == "flap":
        if config.round_to > 1:
            raise LlmBipError("flap allocation does not round widths: use round-to 1")
        removed = _flap(costs, units, layers, target_removed, config, scores)
    else:
        raise LlmBipError(f"unknown allocation '{config.strategy}': use one of {', '.join(ALLOCATIONS)}")
    if config.round_to > 1:
        removed = _round_channels(costs, units, removed, target_removed, config.round_to, layers)
    return [widths_after(costs[i], units[i], *removed[i]) for i in range(len(costs))]


def widths_after(costs: BlockCosts, units: _HeadUnits, head_units_removed: int, channels_removed: int) -> BlockWidths:
    """A block's widths once `head_units_removed` head units and `channels_removed` channels are gone."""
    return BlockWidths(
        costs.widths.num_heads - head_units_removed * units.per_unit.num_heads,
        costs.widths.num_kv_heads - head_units_removed * units.per_unit.num_kv_heads,
        costs.widths.channels - channels_removed,
    )


def _fill_channels(costs, layers, removed, remaining: int) -> None:
    """Spread `remaining` parameters over the layers' channels as evenly as the widths allow."""
    channel_cost = costs[layers[0]].channel
    total = round(remaining / channel_cost)
    free = {i: costs[i].widths.channels - 1 - removed[i][1] for i in layers}
    while total > 0:
        open_layers = [i for i in layers if free[i] > 0]
        if not open_layers:
            raise LlmBipError("the target needs more channels than the prunable blocks have: lower the ratio")
        share, extra = divmod(total, len(open_layers))
        for rank, i in enumerate(open_layers):
            take = min(free[i], share + (1 if rank < extra else 0))
            removed[i][1] += take
            free[i] -= take
            total -= take


def _uniform(costs, units, layers, target, config) -> dict[int, list[int]]:
    prunable = sum(costs[i].prunable for i in layers)
    ratio = config.head_ratio if config.head_ratio is not None else target / prunable
    removed = {i: [0, 0] for i in range(len(costs))}
    for i in layers:
        removed[i][0] = min(units[i].count - 1, round(ratio * units[i].count))
    # Rounding heads up can overshoot a small target: give head units back until it fits.
    for i in reversed(layers):
        while sum(units[j].cost * removed[j][0] for j in layers) > target and removed[i][0] > 0:
            removed[i][0] -= 1
    # A target beyond what the channels can give (e.g. head_ratio 0 at a high ratio) takes head units,
    # one per block in turn, until the channels can cover the rest.
    channel_room = sum((costs[i].widths.channels - 1) * costs[i].channel for i in layers)
    while target - sum(units[j].cost * removed[j][0] for j in layers) > channel_room:
        open_layers = [i for i in layers if removed[i][0] < units[i].count - 1]
        if not open_layers:
            break
        step = min(open_layers, key=lambda i: (removed[i][0], i))
        removed[step][0] += 1
    heads = sum(units[i].cost * removed[i][0] for i in layers)
    # Uniform means the same width in every prunable block (so the stock config can describe it):
    # the channel count per block is rounded, which puts the total within one channel per block.
    per_block = round((target - heads) / (costs[layers[0]].channel * len(layers)))
    for i in layers:
        removed[i][1] = min(per_block, costs[i].widths.channels - 1)
    return removed


def _by_sensitivity(costs, units, layers, target, config, curvature: Curvature) -> dict[int, list[int]]:
    """Channels (and, with head ratio "auto", head units) spread so that the predicted loss is least.

    A block's KL is taken as a power a of what it loses, c_i x^a, from one trial cut each (Curvature; a = 2,
    the second-order behaviour of a smooth loss near its optimum, unless measured otherwise). For a given
    number of channel parameters, the least total is reached by removing channels r_i ∝ (p_i / c_i)^(1/(a-1))
    (p_i: parameters of one channel; for a = 2 simply p_i / c_i); with a power a_i of each block's own (fitted
    from two trials), r_i = (λ p_i / (a_i c_i))^(1/(a_i-1)) for the one λ that meets the target. Capped at
    `sensitivity_cap` of the block's channels (or the uniform plan's share, if more): the model is extrapolated
    from one trial, and on SmolLM2 at 50% letting the least sensitive blocks lose up to 90% cost more than
    uniform on WikiText-2 @2048, while 75% beat uniform on every text (docs/results.md §11). Head units are then
    taken one at a time, each where it lowers the predicted total the most (its own cost against the channels it
    spares), while any does."""
    missing = [i for i in layers if curvature.channels[i] is None]
    if missing:
        raise LlmBipError(f"no measured sensitivity for layers {missing}")
    removed = _uniform(costs, units, layers, target, config if curvature.heads is None else
                       dataclasses.replace(config, head_ratio=0.0))
    channels = {i: curvature.channels[i] for i in layers}
    floor = max(max(channels.values()) * 1e-6, 1e-30)  # a block the cut leaves untouched
    weight = {i: costs[i].channel / max(channels[i], floor) for i in layers}
    exponent = {i: curvature.exponent_of(i) for i in layers}
    if isinstance(curvature.exponent, list):  # the optimum's condition a_i c_i r_i^(a_i - 1) ∝ p_i keeps each a_i
        weight = {i: w / exponent[i] for i, w in weight.items()}
    most = max(weight.values())
    weight = {i: w / most for i, w in weight.items()}  # at most 1: the bisection's scale starts in range
    power = {i: 1 / (exponent[i] - 1) for i in layers}
    # A block may always lose what the uniform plan takes from it, so any target uniform meets is met.
    cap = {i: min(costs[i].widths.channels - 1,
                  max(math.floor(config.sensitivity_cap * costs[i].widths.channels), removed[i][1])) for i in layers}

    def spread(channel_params: float) -> dict[int, float] | None:
        """Channels removed per block (fractional) for `channel_params` parameters; None if they do not fit."""
        def spent(scale: float) -> float:
            return sum(costs[i].channel * min(cap[i], (scale * weight[i]) ** power[i]) for i in layers)

        if channel_params <= 0:
            return {i: 0.0 for i in layers} if channel_params == 0 else None
        if spent(math.inf) < channel_params:
            return None
        low, high = 0.0, 1.0
        while spent(high) < channel_params:
            high *= 2
        for _ in range(100):
            middle = (low + high) / 2
            low, high = (middle, high) if spent(middle) < channel_params else (low, middle)
        return {i: min(cap[i], (high * weight[i]) ** power[i]) for i in layers}

    def predicted(heads: dict[int, int]) -> tuple[float, dict[int, float] | None]:
        share = spread(target - sum(units[i].cost * heads[i] for i in layers))
        if share is None:
            return math.inf, None
        head_cost = (sum((curvature.heads[i] or 0.0) * heads[i] ** exponent[i] for i in layers) if curvature.heads
                     else 0.0)
        return sum(channels[i] * share[i] ** exponent[i] for i in layers) + head_cost, share

    heads = {i: removed[i][0] for i in layers}
    best, share = predicted(heads)
    if share is None:
        raise LlmBipError(f"the target needs more channels than {config.sensitivity_cap:g} of every block's: lower "
                          "the ratio, raise --sensitivity-cap, or let heads go (--head-ratio)")
    while curvature.heads is not None:
        options = []
        for i in layers:
            if curvature.heads[i] is not None and heads[i] < units[i].count - 1:
                loss, spread_then = predicted({**heads, i: heads[i] + 1})
                options.append((loss, i, spread_then))
        if not options or min(options)[0] >= best:
            break
        best, i, share = min(options, key=lambda option: option[:2])
        heads[i] += 1
    for i in layers:
        removed[i] = [heads[i], math.floor(share[i])]
    # What the floors left goes to the blocks with the largest remainders, within their caps.
    channel_params = target - sum(units[i].cost * heads[i] for i in layers)
    left = round((channel_params - sum(costs[i].channel * removed[i][1] for i in layers)) / costs[layers[0]].channel)
    for i in sorted(layers, key=lambda i: (removed[i][1] - share[i], i)):
        if left <= 0:
            break
        if removed[i][1] < cap[i]:
            removed[i][1] += 1
            left -= 1
    return removed


def _adaptive(costs, units, layers, target, config, scores) -> dict[int, list[int]]:
    removed = {i: [0, 0] for i in range(len(costs))}
    global_pool = config.strategy == "global-adaptive"
    candidates = []
    for i in layers:
        norm = scores[i].output_norm if global_pool else 1.0
        norm = norm or 1.0
        for rank, value in enumerate(_unit_scores(scores[i], config.gqa_mode, units[i])):
            candidates.append((value / (units[i].cost * norm), i, "head", rank))
        for k, value in enumerate(scores[i].channels.tolist()):
            candidates.append((value / (costs[i].channel * norm), i, "channel", k))
    candidates.sort(key=lambda c: (c[0], c[1], c[3]))
    if global_pool:
        cap = {i: config.max_block_ratio * costs[i].prunable for i in layers}
        _greedy(candidates, costs, units, removed, target, cap)
    else:
        share, extra = divmod(target, len(layers))
        carry = 0
        for n, i in enumerate(layers):
            # What a block leaves unspent (less than a channel) moves on, so the total stays exact.
            budget = share + (1 if n < extra else 0) + carry
            carry = budget - _greedy([c for c in candidates if c[1] == i], costs, units, removed, budget, None)
    heads = sum(units[i].cost * removed[i][0] for i in layers)
    channels = sum(costs[i].channel * removed[i][1] for i in layers)
    _fill_channels(costs, layers, removed, target - heads - channels)
    return removed


def _greedy(candidates, costs, units, removed, budget: int, cap) -> int:
    """Take the least important structures first while they fit the budget; returns parameters taken.
    Head units of a block go in rank order (weakest first), and one head unit always stays."""
    spent = 0
    block_spent: dict[int, int] = {}
    smallest = min((costs[c[1]].channel for c in candidates), default=0)
    for _value, i, kind, _rank in candidates:
        if budget - spent < smallest:
            break
        cost = units[i].cost if kind == "head" else costs[i].channel
        if spent + cost > budget:
            continue
        if cap is not None and block_spent.get(i, 0) + cost > cap[i]:
            continue
        if kind == "head":
            if removed[i][0] >= units[i].count - 1:
                continue
            removed[i][0] += 1
        else:
            if removed[i][1] >= costs[i].widths.channels - 1:
                continue
            removed[i][1] += 1
        spent += cost
        block_spent[i] = block_spent.get(i, 0) + cost
    return spent


def _unit_scores(scores: BlockScores, gqa_mode: str, units: _HeadUnits) -> list[float]:
    """Score of removing the 1st, 2nd, ... head unit of a block, weakest first."""
    if gqa_mode == "kv-groups":
        return sorted(scores.groups.tolist())
    group_size = units.count
    per_group = scores.heads.reshape(-1, group_size).sort(dim=1).values  # [kv, group_size] ascending
    # A stripe takes the r-th weakest head of every group; their output changes add in quadrature.
    return per_group.pow(2).sum(0).sqrt().tolist()


def _round_channels(costs, units, removed, target, multiple, layers) -> dict[int, list[int]]:
    for i in layers:
        kept = costs[i].widths.channels - removed[i][1]
        kept = max(multiple, multiple * round(kept / multiple))
        removed[i][1] = costs[i].widths.channels - min(kept, costs[i].widths.channels)

    def total() -> int:
        return sum(units[i].cost * removed[i][0] + costs[i].channel * removed[i][1] for i in layers)

    step = costs[layers[0]].channel * multiple
    # Move whole multiples between blocks until the total is as close to the target as the grid allows.
    for n in range(10 * len(layers)):
        gap = target - total()
        if abs(gap) <= step / 2:
            break
        i = layers[n % len(layers)]
        if gap > 0 and costs[i].widths.channels - removed[i][1] - multiple >= multiple:
            removed[i][1] += multiple
        elif gap < 0 and removed[i][1] >= multiple:
            removed[i][1] -= multiple
    return removed


def _flap(costs, units, layers, target, config, scores) -> dict[int, list[int]]:
    """FLAP's AL-AM allocation (CASIA-IVA-Lab/FLAP `lib/prune.py`): one list of every head unit and channel
    of the prunable layers, ranked by score alone (FLAP's scores are standardised per layer); remove from
    the weakest up while the parameters fit the target.

    FLAP thresholds where the cumulative parameter weight of the kept structures is nearest to
    (1 - ratio) of the total; skipping a head unit that would overshoot and going on with channels lands
    within one channel of the target instead, as every allocator here does. Our cut needs one head unit
    and one channel left in each block (FLAP itself may empty a layer's attention); `max_block_ratio` is
    not applied, as FLAP has no cap. In kv-groups mode a unit is a KV group (mean of its heads' standardised
    scores); in query-heads mode a unit takes the r-th weakest query head of every KV group (mean score).
    """
    candidates: list[tuple[float, int, int, int]] = []  # (score, kind 0 head unit / 1 channel, layer, rank)
    for i in layers:
        if config.gqa_mode == "kv-groups":
            unit_scores = sorted(scores[i].groups.tolist())
        else:  # FLAP averages the columns a structure removes
            unit_scores = scores[i].heads.reshape(-1, units[i].count).sort(dim=1).values.mean(0).tolist()
        candidates += [(value, 0, i, rank) for rank, value in enumerate(unit_scores)]
        candidates += [(value, 1, i, k) for k, value in enumerate(scores[i].channels.tolist())]
    candidates.sort()
    removed = {i: [0, 0] for i in range(len(costs))}
    spent = 0
    smallest = min(costs[i].channel for i in layers)
    for _value, kind, i, _rank in candidates:
        if target - spent < smallest:
            break
        cost = units[i].cost if kind == 0 else costs[i].channel
        limit = units[i].count if kind == 0 else costs[i].widths.channels
        if spent + cost > target or removed[i][kind] >= limit - 1:
            continue
        removed[i][kind] += 1
        spent += cost
    return removed
