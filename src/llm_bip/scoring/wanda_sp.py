"""Wanda-sp (structured Wanda, as FLAP's `prune_wanda_sp` implements it in CASIA-IVA-Lab/FLAP
`lib/prune.py`): the score of an input column j of o_proj / down_proj is

    S_j = sum_i |W_ij| · ||x_j||_2      (||x_j||_2 over all calibration tokens)

a head is the sum of its columns, a KV group the sum of its heads (GQA, which the source predates).
Only o_proj and down_proj weights enter: q/k/v and gate/up do not, as in the source.

The source takes mean_i and ||x_j|| / sqrt(#samples); both are constant factors per matrix, so the ranking
inside a block, which is all that Wanda-sp's uniform allocation uses, is the same. Its recipe is uniform
allocation, no compensation and sequential calibration (each block scored on the outputs of the already
pruned blocks), as the source prunes a layer before it computes the next layer's inputs.
"""

from __future__ import annotations

import torch

from llm_bip.adapters import BlockParts
from llm_bip.scoring.base import BlockGeometry, BlockScores, Scorer
from llm_bip.stats import BlockStats


class WandaSpScorer(Scorer):
    name = "wanda-sp"

    @torch.no_grad()
    def score_block(self, parts: BlockParts, stats: BlockStats, geometry: BlockGeometry) -> BlockScores:
        attn_norm = torch.diagonal(stats.attn_gram).clamp_min(0).sqrt()  # ||x_j||_2 of o_proj's inputs
        columns = parts.o_proj.weight.float().abs().sum(0) * attn_norm
        channels = parts.down_proj.weight.float().abs().sum(0) * stats.ffn_sq.clamp_min(0).sqrt()
        heads = columns.reshape(geometry.num_heads, geometry.head_dim).sum(1)
        groups = heads.reshape(geometry.num_kv_heads, geometry.group_size).sum(1)
        return self._scores(stats, heads, groups, channels)
