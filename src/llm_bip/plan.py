"""A pruning plan as data: which heads, KV groups and FFN channels each block keeps.

Plans print, save to JSON, load and diff; `surgery.apply_plan` carries one out. Allocators decide
*how many* of each structure a block keeps (`BlockWidths`); `select` decides *which*, from scores.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from llm_bip.errors import LlmBipError

GQA_MODES = ("kv-groups", "query-heads")


@dataclass(frozen=True)
class BlockWidths:
    num_heads: int
    num_kv_heads: int
    channels: int


@dataclass
class BlockPlan:
    layer: int
    keep_heads: list[int]  # query heads, sorted; grouped so that each kept KV group keeps the same count
    keep_kv_heads: list[int]
    keep_channels: list[int]

    @property
    def widths(self) -> BlockWidths:
        return BlockWidths(len(self.keep_heads), len(self.keep_kv_heads), len(self.keep_channels))


@dataclass
class PruningPlan:
    blocks: list[BlockPlan]
    meta: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"meta": self.meta, "blocks": [asdict(b) for b in self.blocks]}

    @classmethod
    def from_json(cls, data: dict) -> PruningPlan:
        return cls(blocks=[BlockPlan(**b) for b in data["blocks"]], meta=data.get("meta", {}))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> PruningPlan:
        try:
            return cls.from_json(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise LlmBipError(f"cannot read plan {path}: {exc}") from None

    def summary(self) -> str:
        rows = [f"{'layer':>5} {'heads':>5} {'kv':>3} {'channels':>8}"]
        rows += [f"{b.layer:>5} {len(b.keep_heads):>5} {len(b.keep_kv_heads):>3} {len(b.keep_channels):>8}" for b in self.blocks]
        return "\n".join(rows)


def select(
    heads: torch.Tensor,
    groups: torch.Tensor,
    channels: torch.Tensor,
    widths: BlockWidths,
    gqa_mode: str,
    layer: int,
) -> BlockPlan:
    """The most important structures of one block at the given widths."""
    num_heads, num_kv = heads.numel(), groups.numel()
    group_size = num_heads // num_kv
    if gqa_mode == "kv-groups":
        kept_groups = _top(groups, widths.num_kv_heads)
        kept_heads = [g * group_size + i for g in kept_groups for i in range(group_size)]
    elif gqa_mode == "query-heads":
        per_group = widths.num_heads // num_kv
        kept_groups = list(range(num_kv))
        kept_heads = []
        for g in kept_groups:
            local = _top(heads[g * group_size : (g + 1) * group_size], per_group)
            kept_heads += [g * group_size + i for i in local]
    else:
        raise LlmBipError(f"unknown GQA mode '{gqa_mode}': use one of {', '.join(GQA_MODES)}")
    return BlockPlan(layer=layer, keep_heads=kept_heads, keep_kv_heads=kept_groups,
                     keep_channels=_top(channels, widths.channels))


def _top(scores: torch.Tensor, k: int) -> list[int]:
    # Stable order: ties broken by index, so plans are deterministic.
    order = sorted(range(scores.numel()), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:k])
