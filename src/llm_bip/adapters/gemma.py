"""Gemma 2 and Gemma 3 (text): LLaMA's projections, with a norm on each sub-layer's output as well.

A Gemma block is

    h = x + N_attn_post(o_proj(attention(N_in(x))))
    y = h + N_ffn_post(down_proj(FFN(N_ffn_pre(h))))

so the norm in front of the FFN (the adapter's `post_attention_norm`, N2) is Gemma's
`pre_feedforward_layernorm`; Gemma's `post_attention_layernorm` is *not* N2 but the norm on the
attention output (`attn_output_norm`), and `post_feedforward_layernorm` the one on the FFN output
(`ffn_output_norm`). Scores and refits see o_proj's and down_proj's outputs through these norms
(stats.py; docs/method.md, "Norms after the sub-layers").

What else is Gemma's stays inside the stock modules and needs nothing here: RMSNorm with (1 + weight)
(the norm is always called, never read), the embedding scaled by sqrt(hidden), logit soft-capping,
query_pre_attn_scalar, Gemma 3's q_norm/k_norm over head_dim (shared by all heads, like Qwen3's),
head_dim independent of hidden_size. Sliding-window and full-attention layers (`layer_types`), and
Gemma 3's separate rotary embeddings for them, come from the model itself: the block loop gives every
block the mask and position embeddings the model gives it (activations.capture_block_inputs).

The small models have a single KV head: in kv-groups mode no head unit can go (the allocators keep
one per block), in query-heads mode query heads go and the KV head stays. `attention_bias` gives
q/k/v/o biases, so the stock config can hold a bias on o_proj but not on down_proj.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from llm_bip.adapters.base import BlockParts, FamilyAdapter


class _GemmaAdapter(FamilyAdapter):
    o_proj_bias_flag = "attention_bias"  # also gives q/k/v (zero) biases, which the stock class accepts
    has_output_norms = True
    bos_per_window = True  # Gemma is trained with BOS first and breaks without it (base.py)

    def parts(self, block: nn.Module) -> BlockParts:
        # LLaMA's projections; the norm in front of the FFN is Gemma's pre_feedforward_layernorm (its
        # post_attention_layernorm normalises the attention's output, as post_feedforward_layernorm the FFN's).
        return dataclasses.replace(
            super().parts(block), post_attention_norm=block.pre_feedforward_layernorm,
            attn_output_norm=block.post_attention_layernorm, ffn_output_norm=block.post_feedforward_layernorm,
        )


class Gemma2Adapter(_GemmaAdapter):
    model_types = ("gemma2",)
    family = "gemma2"


class Gemma3TextAdapter(_GemmaAdapter):
    """Gemma 3's language model (`Gemma3ForCausalLM`, what the 270M/1B checkpoints and Gemma 3 GGUF files
    load as); the multimodal `gemma3` wrapper is not supported."""

    model_types = ("gemma3_text",)
    family = "gemma3_text"
