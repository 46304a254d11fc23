"""Phi-3 / Phi-3.5 / Phi-4(-mini): LLaMA's block with fused projections and no biases.

`self_attn.qkv_proj` holds the q rows, then the k rows, then the v rows; `mlp.gate_up_proj` the gate
rows, then the up rows (the forward splits it in two halves). Scoring reads q/k/v and gate/up as row
ranges of the fused weights (`LinearRows`); a cut slices each range with the kept rows and fuses them
again, the gate and up halves with the same channels in the same order. The stock attention splits
qkv_proj at the model config's `num_attention_heads * head_dim`, so a cut block gets a view of the
config with its own head count (`modeling_llm_bip.set_phi3_attention_heads`, shared with the classes
that load per-block widths). Partial rotary embeddings and LongRoPE act within a head: removing whole
heads leaves them as they are.

The stock config has no flag for output biases. Its RoPE check computes the rotary width as
`hidden_size // num_attention_heads` (not `head_dim`), so a LongRoPE model with heads removed fails
that check and is saved with per-block widths (which keep the dense head count in the config).
"""

from __future__ import annotations

import torch
from torch import nn

from llm_bip.adapters.base import BlockParts, FamilyAdapter, LinearRows, slice_linear
from llm_bip.modeling_llm_bip import set_phi3_attention_heads


class Phi3Adapter(FamilyAdapter):
    model_types = ("phi3",)
    family = "phi3"
    lora_target_modules = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")

    def parts(self, block: nn.Module) -> BlockParts:
        attn, mlp = block.self_attn, block.mlp
        qkv, gate_up = attn.qkv_proj, mlp.gate_up_proj
        kv = attn.num_key_value_heads * self.head_dim  # what the forward splits k and v by
        q = qkv.out_features - 2 * kv
        channels = gate_up.out_features // 2
        return BlockParts(
            attention=attn, q_proj=LinearRows(qkv, 0, q), k_proj=LinearRows(qkv, q, q + kv),
            v_proj=LinearRows(qkv, q + kv, q + 2 * kv), o_proj=attn.o_proj,
            post_attention_norm=block.post_attention_layernorm, mlp=mlp,
            gate_proj=LinearRows(gate_up, 0, channels), up_proj=LinearRows(gate_up, channels, 2 * channels),
            down_proj=mlp.down_proj,
        )

    @torch.no_grad()
    def cut(self, block: nn.Module, q_rows: torch.Tensor, kv_rows: torch.Tensor, channels: torch.Tensor) -> None:
        p = self.parts(block)
        attn, mlp = p.attention, p.mlp
        q, kv, width = p.q_proj.out_features, p.k_proj.out_features, p.gate_proj.out_features
        q_rows, kv_rows, channels = q_rows.long(), kv_rows.long(), channels.long()
        attn.qkv_proj = slice_linear(attn.qkv_proj, out_index=torch.cat([q_rows, q + kv_rows, q + kv + kv_rows]))
        attn.o_proj = slice_linear(p.o_proj, in_index=q_rows)
        mlp.gate_up_proj = slice_linear(mlp.gate_up_proj, out_index=torch.cat([channels, width + channels]))
        mlp.down_proj = slice_linear(p.down_proj, in_index=channels)
        set_phi3_attention_heads(attn, len(q_rows) // self.head_dim, len(kv_rows) // self.head_dim)
