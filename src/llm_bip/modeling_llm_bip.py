"""Hugging Face classes for pruned models whose blocks have different widths.

This file is self-contained (torch and transformers only) because `save` copies it next to the
weights: `from_pretrained(dir, trust_remote_code=True)` then works from the directory alone, and
importing `llm_bip` registers the same classes so the flag is not needed at all.

A pruned config is the family's stock config plus `layer_widths`: per block the number of query
heads, KV heads and FFN channels, and whether o_proj / down_proj carry a bias (from compensation).
The model is the stock model with each block's projections rebuilt at those widths.
"""

from __future__ import annotations

from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)


def _resize_blocks(model: nn.Module, config) -> None:
    widths = getattr(config, "layer_widths", None) or []
    hidden, head_dim = config.hidden_size, config.head_dim
    for block, width in zip(model.model.layers, widths, strict=True):
        attn, mlp = block.self_attn, block.mlp
        heads, kv_heads, channels = width["num_attention_heads"], width["num_key_value_heads"], width["intermediate_size"]
        qkv_bias = attn.q_proj.bias is not None
        attn.q_proj = nn.Linear(hidden, heads * head_dim, bias=qkv_bias)
        attn.k_proj = nn.Linear(hidden, kv_heads * head_dim, bias=attn.k_proj.bias is not None)
        attn.v_proj = nn.Linear(hidden, kv_heads * head_dim, bias=attn.v_proj.bias is not None)
        attn.o_proj = nn.Linear(heads * head_dim, hidden, bias=bool(width.get("o_proj_bias", False)))
        attn.num_key_value_groups = heads // kv_heads
        gate_up_bias = mlp.gate_proj.bias is not None
        mlp.gate_proj = nn.Linear(hidden, channels, bias=gate_up_bias)
        mlp.up_proj = nn.Linear(hidden, channels, bias=gate_up_bias)
        mlp.down_proj = nn.Linear(channels, hidden, bias=bool(width.get("down_proj_bias", False)))
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = channels


def _pruned_classes(family: str, config_cls: type, model_cls: type) -> tuple[type, type]:
    class PrunedConfig(config_cls):
        model_type = f"llm_bip_{family}"

        def __init__(self, layer_widths: list[dict] | None = None, **kwargs) -> None:
            kwargs.setdefault("base_model_type", family)
            self.layer_widths = layer_widths or []
            super().__init__(**kwargs)

        def validate_architecture(self) -> None:
            # Per-block head counts need not divide hidden_size: head_dim is stored explicitly.
            for width in self.layer_widths:
                if width["num_attention_heads"] % width["num_key_value_heads"]:
                    raise ValueError(f"bad layer width {width}: query heads must be a multiple of KV heads")

    class PrunedForCausalLM(model_cls):
        config_class = PrunedConfig

        def __init__(self, config) -> None:
            super().__init__(config)
            _resize_blocks(self, config)
            self.post_init()

    name = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}[family]
    PrunedConfig.__name__ = PrunedConfig.__qualname__ = f"LlmBip{name}Config"
    PrunedForCausalLM.__name__ = PrunedForCausalLM.__qualname__ = f"LlmBip{name}ForCausalLM"
    return PrunedConfig, PrunedForCausalLM


LlmBipLlamaConfig, LlmBipLlamaForCausalLM = _pruned_classes("llama", LlamaConfig, LlamaForCausalLM)
LlmBipMistralConfig, LlmBipMistralForCausalLM = _pruned_classes("mistral", MistralConfig, MistralForCausalLM)
LlmBipQwen2Config, LlmBipQwen2ForCausalLM = _pruned_classes("qwen2", Qwen2Config, Qwen2ForCausalLM)
LlmBipQwen3Config, LlmBipQwen3ForCausalLM = _pruned_classes("qwen3", Qwen3Config, Qwen3ForCausalLM)

PRUNED_CLASSES: dict[str, tuple[type, type]] = {
    "llama": (LlmBipLlamaConfig, LlmBipLlamaForCausalLM),
    "mistral": (LlmBipMistralConfig, LlmBipMistralForCausalLM),
    "qwen2": (LlmBipQwen2Config, LlmBipQwen2ForCausalLM),
    "qwen3": (LlmBipQwen3Config, LlmBipQwen3ForCausalLM),
}

for _config_cls, _model_cls in PRUNED_CLASSES.values():
    try:
        AutoConfig.register(_config_cls.model_type, _config_cls)
        AutoModelForCausalLM.register(_config_cls, _model_cls)
    except ValueError:  # already registered (the file is loaded both as llm_bip's and as remote code)
        pass
