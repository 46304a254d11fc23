"""The one type for a block's prunable widths: query heads, KV heads, FFN channels."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BlockWidths:
    num_heads: int
    num_kv_heads: int
    channels: int

    @property
    def group_size(self) -> int:
        """Query heads per KV group."""
        return self.num_heads // self.num_kv_heads

    def to_json(self) -> dict:
        """The saved form (pruned configs' `layer_widths`, records), in Hugging Face's field names."""
        return {"num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
                "intermediate_size": self.channels}

    @classmethod
    def from_json(cls, data: dict) -> BlockWidths:
        return cls(data["num_attention_heads"], data["num_key_value_heads"], data["intermediate_size"])
