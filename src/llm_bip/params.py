"""Parameter accounting: what each prunable structure costs, read from the actual module shapes."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from llm_bip.adapters import FamilyAdapter


def _bias(linear: nn.Linear) -> int:
    return 0 if linear.bias is None else 1


@dataclass(frozen=True)
class BlockCosts:
    """Parameters removed with one query head, one KV head's k/v rows (its query heads not included),
    and one FFN channel, plus the block's current widths and fixed (unprunable) parameters."""

    head: int
    kv: int
    channel: int
    num_heads: int
    num_kv_heads: int
    channels: int
    fixed: int

    def total(self, heads: int, kv_heads: int, channels: int) -> int:
        return self.fixed + heads * self.head + kv_heads * self.kv + channels * self.channel

    @property
    def prunable(self) -> int:
        return self.total(self.num_heads, self.num_kv_heads, self.channels) - self.fixed


def block_costs(adapter: FamilyAdapter, block: nn.Module, head_dim: int) -> BlockCosts:
    p = adapter.parts(block)
    hidden = p.q_proj.in_features
    num_heads, num_kv, channels = adapter.widths(block, head_dim)
    head = head_dim * (hidden + _bias(p.q_proj)) + hidden * head_dim
    kv = head_dim * (2 * hidden + _bias(p.k_proj) + _bias(p.v_proj))
    channel = 2 * hidden + _bias(p.gate_proj) + _bias(p.up_proj) + hidden
    prunable = num_heads * head + num_kv * kv + channels * channel
    fixed = sum(q.numel() for q in block.parameters()) - prunable
    return BlockCosts(head, kv, channel, num_heads, num_kv, channels, fixed)


def count_parameters(model: nn.Module, adapter: FamilyAdapter) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    embedding = adapter.embedding_parameters(model)
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding}
