"""FLAP (An et al., AAAI 2024; CASIA-IVA-Lab/FLAP `lib/prune.py`): fluctuation-based scores,
standardised per layer, one threshold over heads and channels of all layers, bias compensation.

Score of an input column j of o_proj / down_proj (FLAP's metrics, WIFV the default):

    WIFV: var_t(x_j) · sum_i W_ij^2      IFV: var_t(x_j)      WIFN: mean_i |W_ij| · sqrt(mean_t x_j^2)

FLAP squares the attention column metric (and only that one) before anything else. With
`standardize` (FLAP's adaptive structures AL-MM / AL-AM, the default AL-AM) each layer's attention
columns and FFN channels are standardised separately, (m - mean) / std over the layer, and a head is the
mean of its columns' standardised values; a KV group (GQA, which FLAP predates) is the mean over its
heads' columns. Without it (FLAP's UL-UM) a head is the sum of its columns' raw values.

FLAP's allocation (AL-AM) is `flap_allocate`: every head unit and channel of every layer in one list,
sorted by score alone, pruned from the bottom until the removed parameters reach the target. That is
not `global-adaptive` (which ranks by score per parameter, each block normalised by its output norm),
so it lives here until the allocator registry names it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from llm_bip.adapters import BlockParts
from llm_bip.errors import LlmBipError
from llm_bip.params import BlockCosts
from llm_bip.plan import BlockWidths
from llm_bip.scoring.base import BlockGeometry, BlockScores, Scorer
from llm_bip.stats import BlockStats

if TYPE_CHECKING:  # allocation imports scoring.base, so importing it at module level would be circular
    from llm_bip.allocation import AllocationConfig

FLAP_METRICS = ("wifv", "ifv", "wifn")


def _standardize(x: torch.Tensor) -> torch.Tensor:
    # torch.std is FLAP's (unbiased); a constant layer would divide by zero, so it maps to zeros.
    std = x.std() if x.numel() > 1 else x.new_tensor(0.0)
    return (x - x.mean()) / std if float(std) > 0 else torch.zeros_like(x)


class FlapScorer(Scorer):
    name = "flap"

    def __init__(self, metric: str = "wifv", standardize: bool = True) -> None:
        metric = metric.lower()
        if metric not in FLAP_METRICS:
            raise LlmBipError(f"unknown FLAP metric '{metric}': use one of {', '.join(FLAP_METRICS)}")
        self.metric, self.standardize = metric, standardize
        # Standardised scores are what FLAP compares across heads, channels and layers with one threshold.
        self.comparable_units = standardize

    def options(self) -> dict:
        return {"metric": self.metric, "standardize": self.standardize}

    def _column_metric(self, weight: torch.Tensor, var: torch.Tensor, mean_sq: torch.Tensor) -> torch.Tensor:
        w = weight.float()
        if self.metric == "wifv":
            return var * w.pow(2).sum(0)
        if self.metric == "ifv":
            return var.clone()
        return w.abs().mean(0) * mean_sq.sqrt()

    @torch.no_grad()
    def score_block(self, parts: BlockParts, stats: BlockStats, geometry: BlockGeometry) -> BlockScores:
        n = stats.tokens
        attn_sq = torch.diagonal(stats.attn_gram) / n
        attn = self._column_metric(parts.o_proj.weight, stats.attn_var, attn_sq) ** 2  # FLAP squares heads' metric
        channels = self._column_metric(parts.down_proj.weight, stats.ffn_var, stats.ffn_sq / n)
        hd, gs = geometry.head_dim, geometry.group_size
        if self.standardize:
            attn, channels = _standardize(attn), _standardize(channels)
            heads = attn.reshape(geometry.num_heads, hd).mean(1)
            groups = attn.reshape(geometry.num_kv_heads, gs * hd).mean(1)
        else:
            heads = attn.reshape(geometry.num_heads, hd).sum(1)
            groups = attn.reshape(geometry.num_kv_heads, gs * hd).sum(1)
        return self._scores(stats, heads, groups, channels)


def flap_allocate(
    costs: list[BlockCosts], target_removed: int, config: AllocationConfig, scores: list[BlockScores]
) -> list[BlockWidths]:
    """FLAP's AL-AM allocation: one list of every head unit and channel of the prunable layers, ranked
    by score alone; remove from the weakest up while the parameters fit the target.

    FLAP thresholds where the cumulative parameter weight of the kept structures is nearest to
    (1 - ratio) of the total; skipping a head unit that would overshoot and going on with channels lands
    within one channel of the target instead, as every allocator here does. Our cut needs one head unit
    and one channel left in each block (FLAP itself may empty a layer's attention); `max_block_ratio` is
    not applied, as FLAP has no cap. In kv-groups mode a unit is a KV group (mean of its heads' standardised
    scores); in query-heads mode a unit takes the r-th weakest query head of every KV group (mean score).
    """
    from llm_bip.allocation import head_units

    if config.round_to > 1:
        raise LlmBipError("flap allocation does not round widths: use round-to 1")
    if scores is None:
        raise LlmBipError("flap allocation needs scores")
    layers = list(range(len(costs))) if config.prunable_layers is None else sorted(config.prunable_layers)
    if not layers:
        raise LlmBipError("no prunable layers: widen the layer range")
    units = [head_units(c, config.gqa_mode) for c in costs]
    most = sum(costs[i].prunable - units[i].cost - costs[i].channel for i in layers)
    if target_removed < 0 or target_removed > most:
        raise LlmBipError(
            f"cannot remove {target_removed:,} parameters from the prunable blocks (at most {most:,} while "
            "keeping one head unit and one channel per block): lower the ratio or widen the layer range"
        )
    candidates: list[tuple[float, int, int, int]] = []  # (score, kind 0 head unit / 1 channel, layer, rank)
    for i in layers:
        for rank, value in enumerate(_unit_scores(scores[i], config.gqa_mode, units[i].count)):
            candidates.append((value, 0, i, rank))
        candidates += [(value, 1, i, k) for k, value in enumerate(scores[i].channels.tolist())]
    candidates.sort()
    removed = {i: [0, 0] for i in range(len(costs))}
    spent = 0
    smallest = min(costs[i].channel for i in layers)
    for _value, kind, i, _rank in candidates:
        if target_removed - spent < smallest:
            break
        cost = units[i].cost if kind == 0 else costs[i].channel
        limit = units[i].count if kind == 0 else costs[i].channels
        if spent + cost > target_removed or removed[i][kind] >= limit - 1:
            continue
        removed[i][kind] += 1
        spent += cost
    return [
        BlockWidths(
            c.num_heads - removed[i][0] * u.per_unit.num_heads,
            c.num_kv_heads - removed[i][0] * u.per_unit.num_kv_heads,
            c.channels - removed[i][1],
        )
        for i, (c, u) in enumerate(zip(costs, units, strict=True))
    ]


def _unit_scores(scores: BlockScores, gqa_mode: str, count: int) -> list[float]:
    """Scores of a block's 1st, 2nd, ... head unit to go, weakest first (so a block's units leave in order
    whatever the global sort interleaves)."""
    if gqa_mode == "kv-groups":
        return sorted(scores.groups.tolist())
    per_group = scores.heads.reshape(-1, count).sort(dim=1).values  # [kv groups, heads per group] ascending
    return per_group.mean(0).tolist()  # FLAP averages the columns a structure removes
