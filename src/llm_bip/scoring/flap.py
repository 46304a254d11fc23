"""FLAP (An et al., AAAI 2024; CASIA-IVA-Lab/FLAP `lib/prune.py`): fluctuation-based scores,
standardised per layer, one threshold over heads and channels of all layers, bias compensation.

Score of an input column j of o_proj / down_proj (FLAP's metrics, WIFV the default):

    WIFV: var_t(x_j) · sum_i W_ij^2      IFV: var_t(x_j)      WIFN: mean_i |W_ij| · sqrt(mean_t x_j^2)

FLAP squares the attention column metric (and only that one) before anything else. With
`standardize` (FLAP's adaptive structures AL-MM / AL-AM, the default AL-AM) each layer's attention
columns and FFN channels are standardised separately, (m - mean) / std over the layer, and a head is the
mean of its columns' standardised values; a KV group (GQA, which FLAP predates) is the mean over its
heads' columns. Without it (FLAP's UL-UM) a head is the sum of its columns' raw values.

FLAP's allocation (AL-AM) is the `flap` allocator in `allocation.py`: every head unit and channel of
every layer in one list, sorted by score alone, pruned from the bottom until the removed parameters
reach the target (not `global-adaptive`, which ranks by score per parameter, each block normalised by
its output norm).
"""

from __future__ import annotations

import torch

from llm_bip.adapters import BlockParts
from llm_bip.errors import LlmBipError
from llm_bip.scoring.base import BlockGeometry, BlockScores, Scorer
from llm_bip.stats import BlockStats

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
