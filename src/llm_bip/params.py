"""Parameter accounting: what each prunable structure costs, read from the actual module shapes."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from llm_bip.adapters import FamilyAdapter
from llm_bip.widths import BlockWidths


def _bias(linear: nn.Linear) -> int:
    return 0 if linear.bias is None else 1


@dataclass(frozen=True)
class BlockCosts:
    """Parameters removed with one query head, one KV head's k/v rows (its query heads not included),
    and one FFN channel; the block's current widths and its fixed (unprunable) parameters."""

    head: int
    kv: int
    channel: int
    widths: BlockWidths
    fixed: int

    def total(self, widths: BlockWidths) -> int:
        return self.fixed + widths.num_heads * self.head + widths.num_kv_heads * self.kv + widths.channels * self.channel

    @property
    def prunable(self) -> int:
        return self.total(self.widths) - self.fixed

    def to_json(self) -> dict:
        return {"head": self.head, "kv": self.kv, "channel": self.channel, "fixed": self.fixed, **self.widths.to_json()}

    @classmethod
    def from_json(cls, data: dict) -> BlockCosts:
        return cls(data["head"], data["kv"], data["channel"], BlockWidths.from_json(data), data["fixed"])


def block_costs(adapter: FamilyAdapter, block: nn.Module) -> BlockCosts:
    p = adapter.parts(block)
    head_dim = adapter.head_dim
    hidden = p.q_proj.in_features
    widths = adapter.widths(block)
    head = head_dim * (hidden + _bias(p.q_proj)) + hidden * head_dim
    kv = head_dim * (2 * hidden + _bias(p.k_proj) + _bias(p.v_proj))
    channel = 2 * hidden + _bias(p.gate_proj) + _bias(p.up_proj) + hidden
    prunable = widths.num_heads * head + widths.num_kv_heads * kv + widths.channels * channel
    fixed = sum(q.numel() for q in block.parameters()) - prunable
    return BlockCosts(head, kv, channel, widths, fixed)


def count_parameters(model: nn.Module, adapter: FamilyAdapter) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    embedding = adapter.embedding_parameters(model)
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding}


def counts_from_costs(costs: list[BlockCosts], embedding: int) -> dict[str, int]:
    blocks = sum(c.total(c.widths) for c in costs)
    return {"total": blocks + embedding, "embedding": embedding, "non_embedding": blocks}
