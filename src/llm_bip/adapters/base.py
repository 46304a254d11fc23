"""What the pruning pipeline needs to know about a decoder-only model family.

Scoring, allocation and surgery talk to a model only through a `FamilyAdapter`, so they never test
`model_type`. Every family supported today is a pre-norm decoder with the same projection names
(LLaMA's layout); an adapter says where the blocks live and which per-family details matter
(biases that the stock config can express, per-head norms that must be left alone).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class BlockParts:
    """The modules of one decoder block that pruning touches."""

    attention: nn.Module
    q_proj: nn.Linear
    k_proj: nn.Linear
    v_proj: nn.Linear
    o_proj: nn.Linear
    post_attention_norm: nn.Module  # N2: the norm in front of the FFN
    mlp: nn.Module  # F: the FFN whose output is added to the residual stream
    gate_proj: nn.Linear
    up_proj: nn.Linear
    down_proj: nn.Linear


class FamilyAdapter:
    """Base adapter for LLaMA-layout decoders (q/k/v/o + gated FFN, pre-norm, RoPE)."""

    model_types: tuple[str, ...] = ()
    family: str = ""
    # Names of the stock config flags that add biases; None where the stock class cannot have one.
    o_proj_bias_flag: str | None = None
    down_proj_bias_flag: str | None = None

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.model.layers

    def embedding_parameters(self, model: nn.Module) -> int:
        """Parameters outside the decoder blocks (embeddings, final norm, untied head)."""
        blocks = sum(p.numel() for p in self.blocks(model).parameters())
        return sum(p.numel() for p in model.parameters()) - blocks

    def parts(self, block: nn.Module) -> BlockParts:
        attn, mlp = block.self_attn, block.mlp
        return BlockParts(
            attention=attn,
            q_proj=attn.q_proj,
            k_proj=attn.k_proj,
            v_proj=attn.v_proj,
            o_proj=attn.o_proj,
            post_attention_norm=block.post_attention_layernorm,
            mlp=mlp,
            gate_proj=mlp.gate_proj,
            up_proj=mlp.up_proj,
            down_proj=mlp.down_proj,
        )

    def head_dim(self, model: nn.Module) -> int:
        config = model.config
        return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    def widths(self, block: nn.Module, head_dim: int) -> tuple[int, int, int]:
        """(query heads, KV heads, FFN channels) of a block, read from its weights."""
        p = self.parts(block)
        return p.q_proj.out_features // head_dim, p.k_proj.out_features // head_dim, p.down_proj.in_features

    def set_attention_widths(self, block: nn.Module, num_heads: int, num_kv_heads: int) -> None:
        """Tell the attention module its new head counts after its projections were sliced."""
        attn = self.parts(block).attention
        attn.num_key_value_groups = num_heads // num_kv_heads
        # Some versions keep these too; keep them truthful where they exist.
        for name, value in (("num_heads", num_heads), ("num_key_value_heads", num_kv_heads)):
            if hasattr(attn, name):
                setattr(attn, name, value)

    def stock_bias_config(self, o_proj_bias: bool, down_proj_bias: bool) -> dict | None:
        """Config updates that let the stock class hold these output biases, or None if it cannot."""
        updates: dict = {}
        for wanted, flag in ((o_proj_bias, self.o_proj_bias_flag), (down_proj_bias, self.down_proj_bias_flag)):
            if wanted:
                if flag is None:
                    return None
                updates[flag] = True
        return updates

    def check_supported(self, model: nn.Module) -> None:
        """Raise ValueError for a variant of the family that this adapter does not handle."""
        config = model.config
        if config.num_attention_heads % config.num_key_value_heads:
            raise ValueError("num_attention_heads is not a multiple of num_key_value_heads")

    @torch.no_grad()
    def zero_bias_like(self, linear: nn.Linear) -> None:
        if linear.bias is None:
            linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=linear.weight.dtype,
                                                   device=linear.weight.device))
