"""Data-light baselines: seeded random scores and weight magnitude (L2 norm of a structure's weights)."""

from __future__ import annotations

import torch

from llm_bip.adapters import BlockParts
from llm_bip.scoring.base import BlockGeometry, BlockScores, Scorer
from llm_bip.stats import BlockStats


class RandomScorer(Scorer):
    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def options(self) -> dict:
        return {"seed": self.seed}

    def score_block(self, parts: BlockParts, stats: BlockStats, geometry: BlockGeometry) -> BlockScores:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + geometry.layer)
        heads = torch.rand(geometry.num_heads, generator=generator)
        groups = torch.rand(geometry.num_kv_heads, generator=generator)
        channels = torch.rand(geometry.channels, generator=generator)
        return self._scores(stats, heads, groups, channels)


class MagnitudeScorer(Scorer):
    """L2 norm of all weights that go with the structure (q rows + o columns; k/v rows for a group;
    gate/up rows + down column for a channel)."""

    name = "magnitude"

    def score_block(self, parts: BlockParts, stats: BlockStats, geometry: BlockGeometry) -> BlockScores:
        hd, gs = geometry.head_dim, geometry.group_size
        q = parts.q_proj.weight.float().reshape(geometry.num_heads, hd, -1).pow(2).sum((1, 2))
        o = parts.o_proj.weight.float().reshape(-1, geometry.num_heads, hd).pow(2).sum((0, 2))
        kv = sum(p.weight.float().reshape(geometry.num_kv_heads, hd, -1).pow(2).sum((1, 2)) for p in (parts.k_proj, parts.v_proj))
        heads_sq = q + o
        groups = (heads_sq.reshape(geometry.num_kv_heads, gs).sum(1) + kv).sqrt()
        channels = (
            parts.gate_proj.weight.float().pow(2).sum(1)
            + parts.up_proj.weight.float().pow(2).sum(1)
            + parts.down_proj.weight.float().pow(2).sum(0)
        ).sqrt()
        return self._scores(stats, heads_sq.sqrt(), groups, channels)
