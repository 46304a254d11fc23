"""The scorer interface: every pruning method is a scorer plus an allocator.

A scorer turns one block's weights and calibration statistics into an importance per query head,
per KV group and per FFN channel. Scores of LLM-BIP are in block-output units (comparable between
heads and channels); other methods say so with `comparable_units = False`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llm_bip.adapters import BlockParts
from llm_bip.depth import block_score
from llm_bip.stats import BlockStats, StatsRequest, norm_scale
from llm_bip.widths import BlockWidths


@dataclass(frozen=True)
class BlockGeometry:
    """Where a block sits and its widths: what a scorer needs to read its weights and statistics."""

    layer: int
    head_dim: int
    widths: BlockWidths

    @property
    def num_heads(self) -> int:
        return self.widths.num_heads

    @property
    def num_kv_heads(self) -> int:
        return self.widths.num_kv_heads

    @property
    def channels(self) -> int:
        return self.widths.channels

    @property
    def group_size(self) -> int:
        return self.widths.group_size

    @property
    def group_width(self) -> int:
        """Columns of o_proj's input that one KV group's heads write."""
        return self.head_dim * self.group_size


@dataclass
class BlockScores:
    """Importance of each structure of one block (higher = more important)."""

    heads: torch.Tensor  # [num_heads]
    groups: torch.Tensor  # [num_kv_heads]
    channels: torch.Tensor  # [channels]
    output_norm: float | None  # ||y||_F of the block on the calibration data (None: not measured, see below)
    tokens: int
    attn_mean: torch.Tensor  # mean o_proj input, kept for bias compensation at re-plan time
    ffn_mean: torch.Tensor  # mean down_proj input
    lipschitz: float = 0.0
    # The whole block's score (depth.py): its relative change of the residual stream when skipped; None in
    # score files made before blocks were scored. Both are measured for score tables (`pipeline.score`); the
    # block loop's own per-block scores during a prune leave them None.
    block_score: float | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            "heads": self.heads,
            "groups": self.groups,
            "channels": self.channels,
            "attn_mean": self.attn_mean,
            "ffn_mean": self.ffn_mean,
        }


class Scorer:
    """Scores a block from one pass of statistics. Subclasses set `name` and implement `score_block`."""

    name: str = ""
    comparable_units: bool = False  # heads and channels scored in the same unit (block-output change)

    def stats_request(self) -> StatsRequest:
        return StatsRequest()

    def prepare(self, loaded, samples: torch.Tensor, batch_size: int) -> None:
        """Whole-model work before the block loop (e.g. one gradient pass for Taylor); default none."""

    def score_block(self, parts: BlockParts, stats: BlockStats, geometry: BlockGeometry) -> BlockScores:
        raise NotImplementedError

    def options(self) -> dict:
        """Settings that change the scores, recorded in the scores file and the pruning record."""
        return {}

    def channels_only(self) -> Scorer:
        """A scorer for a block whose heads all stay: it may skip work that only head scores need."""
        return self

    def _scores(self, stats: BlockStats, heads, groups, channels, lipschitz: float = 0.0) -> BlockScores:
        return BlockScores(
            heads=heads.float().cpu(),
            groups=groups.float().cpu(),
            channels=channels.float().cpu(),
            output_norm=None if stats.output_sq is None else stats.output_sq**0.5,
            tokens=stats.tokens,
            attn_mean=stats.attn_mean.cpu(),
            ffn_mean=stats.ffn_mean.cpu(),
            lipschitz=lipschitz,
            block_score=None if stats.skip_sq is None else block_score(stats.skip_sq, stats.output_sq or 0.0),
        )


def block_output_weight(linear: nn.Module, norm: nn.Module | None) -> torch.Tensor:
    """The weight of o_proj / down_proj as the block output sees it: W, or diag(g) W where a norm of scale
    g follows the projection (its 1 / rms per token is in the statistics' weights, stats.py)."""
    weight = linear.weight.float()
    return weight if norm is None else norm_scale(norm).to(weight.device)[:, None] * weight


def head_output_norms(o_weight: torch.Tensor, attn_gram: torch.Tensor, head_dim: int, heads_per_unit: int) -> torch.Tensor:
    """||W_o[:, cols(u)] o_u||_F over the calibration tokens for consecutive units of `heads_per_unit` heads,
    from the Gram matrix of o_proj's input: tr(W_u G_uu W_u^T). Summing heads first, then the norm."""
    width = head_dim * heads_per_unit
    units = o_weight.shape[1] // width
    w = o_weight.float().reshape(o_weight.shape[0], units, width)  # [hidden, units, width]
    g = attn_gram.reshape(units, width, units, width).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # [units, w, w]
    energy = torch.einsum("hua,uab,hub->u", w, g, w)
    return energy.clamp_min(0).sqrt()
