"""Hugging Face classes for pruned models whose blocks have different widths.

This file is self-contained (torch and transformers only) because `save` copies it next to the
weights: `from_pretrained(dir, trust_remote_code=True)` then works from the directory alone, and
importing `llm_bip` registers the same classes so the flag is not needed at all.

A pruned config is the family's stock config plus `layer_widths`: per block the number of query
heads, KV heads and FFN channels, and whether o_proj / down_proj carry a bias (from compensation).
The model is the stock model with each block's projections rebuilt at those widths (Phi-3's fused
qkv_proj and gate_up_proj included).
"""

from __future__ import annotations

from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
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


class AttentionConfig:
    """The model config as one attention module reads it, with that block's own query-head count.

    Phi-3's attention splits its fused qkv_proj at `self.config.num_attention_heads * head_dim`, read
    from the model-wide config; a block pruned to other widths gets this view instead. Everything else
    (the attention implementation the model is switched to, the sliding window) is read through from
    the model's config, so it never goes stale."""

    def __init__(self, config, num_attention_heads: int) -> None:
        self.__dict__.update(_config=config, num_attention_heads=num_attention_heads)

    def __getattr__(self, name: str):
        if name.startswith("__") or name == "_config":  # copy/pickle probe these before __dict__ is filled
            raise AttributeError(name)
        return getattr(self._config, name)

    def __setattr__(self, name: str, value) -> None:
        if name == "num_attention_heads":
            self.__dict__[name] = value
        else:
            setattr(self._config, name, value)


def set_phi3_attention_heads(attn: nn.Module, heads: int, kv_heads: int) -> None:
    """Make a Phi-3 attention split its (cut) fused qkv_proj into `heads` query and `kv_heads` KV heads."""
    attn.num_key_value_heads = kv_heads
    attn.num_key_value_groups = heads // kv_heads
    config = getattr(attn.config, "_config", attn.config)
    attn.config = config if heads == config.num_attention_heads else AttentionConfig(config, heads)


def _resize_phi3_blocks(model: nn.Module, config) -> None:
    """Phi-3: qkv_proj holds q, k and v rows, gate_up_proj gate then up rows."""
    widths = getattr(config, "layer_widths", None) or []
    hidden, head_dim = config.hidden_size, config.head_dim
    for block, width in zip(model.model.layers, widths, strict=True):
        attn, mlp = block.self_attn, block.mlp
        heads, kv_heads, channels = width["num_attention_heads"], width["num_key_value_heads"], width["intermediate_size"]
        attn.qkv_proj = nn.Linear(hidden, (heads + 2 * kv_heads) * head_dim, bias=attn.qkv_proj.bias is not None)
        attn.o_proj = nn.Linear(heads * head_dim, hidden, bias=bool(width.get("o_proj_bias", False)))
        set_phi3_attention_heads(attn, heads, kv_heads)
        mlp.gate_up_proj = nn.Linear(hidden, 2 * channels, bias=mlp.gate_up_proj.bias is not None)
        mlp.down_proj = nn.Linear(channels, hidden, bias=bool(width.get("down_proj_bias", False)))


def _pruned_classes(family: str, config_cls: type, model_cls: type, resize=_resize_blocks) -> tuple[type, type]:
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
            resize(self, config)
            self.post_init()

    name = {"llama": "Llama", "mistral": "Mistral", "phi3": "Phi3", "qwen2": "Qwen2", "qwen3": "Qwen3",
            "gemma2": "Gemma2", "gemma3_text": "Gemma3Text"}[family]
    PrunedConfig.__name__ = PrunedConfig.__qualname__ = f"LlmBip{name}Config"
    PrunedForCausalLM.__name__ = PrunedForCausalLM.__qualname__ = f"LlmBip{name}ForCausalLM"
    return PrunedConfig, PrunedForCausalLM


LlmBipLlamaConfig, LlmBipLlamaForCausalLM = _pruned_classes("llama", LlamaConfig, LlamaForCausalLM)
LlmBipMistralConfig, LlmBipMistralForCausalLM = _pruned_classes("mistral", MistralConfig, MistralForCausalLM)
LlmBipPhi3Config, LlmBipPhi3ForCausalLM = _pruned_classes("phi3", Phi3Config, Phi3ForCausalLM, _resize_phi3_blocks)
LlmBipQwen2Config, LlmBipQwen2ForCausalLM = _pruned_classes("qwen2", Qwen2Config, Qwen2ForCausalLM)
LlmBipQwen3Config, LlmBipQwen3ForCausalLM = _pruned_classes("qwen3", Qwen3Config, Qwen3ForCausalLM)
LlmBipGemma2Config, LlmBipGemma2ForCausalLM = _pruned_classes("gemma2", Gemma2Config, Gemma2ForCausalLM)
LlmBipGemma3TextConfig, LlmBipGemma3TextForCausalLM = _pruned_classes("gemma3_text", Gemma3TextConfig, Gemma3ForCausalLM)

PRUNED_CLASSES: dict[str, tuple[type, type]] = {
    "llama": (LlmBipLlamaConfig, LlmBipLlamaForCausalLM),
    "mistral": (LlmBipMistralConfig, LlmBipMistralForCausalLM),
    "phi3": (LlmBipPhi3Config, LlmBipPhi3ForCausalLM),
    "qwen2": (LlmBipQwen2Config, LlmBipQwen2ForCausalLM),
    "qwen3": (LlmBipQwen3Config, LlmBipQwen3ForCausalLM),
    "gemma2": (LlmBipGemma2Config, LlmBipGemma2ForCausalLM),
    "gemma3_text": (LlmBipGemma3TextConfig, LlmBipGemma3TextForCausalLM),
}

for _config_cls, _model_cls in PRUNED_CLASSES.values():
    try:
        AutoConfig.register(_config_cls.model_type, _config_cls)
        AutoModelForCausalLM.register(_config_cls, _model_cls)
    except ValueError:  # already registered (the file is loaded both as llm_bip's and as remote code)
        pass
