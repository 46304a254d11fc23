"""Model-family adapters: the only place that knows family specifics."""

from __future__ import annotations

from llm_bip.adapters.base import BlockParts, FamilyAdapter
from llm_bip.adapters.gemma import Gemma2Adapter, Gemma3TextAdapter
from llm_bip.adapters.llama import LlamaAdapter
from llm_bip.adapters.mistral import MistralAdapter
from llm_bip.adapters.phi3 import Phi3Adapter
from llm_bip.adapters.qwen2 import Qwen2Adapter
from llm_bip.adapters.qwen3 import Qwen3Adapter
from llm_bip.errors import LlmBipError

ADAPTERS: tuple[type[FamilyAdapter], ...] = (LlamaAdapter, MistralAdapter, Qwen2Adapter, Qwen3Adapter, Phi3Adapter,
                                          Gemma2Adapter, Gemma3TextAdapter)
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(t for a in ADAPTERS for t in a.model_types)


def base_model_type(config) -> str:
    """The stock family of a config; pruned non-uniform configs record it as `base_model_type`."""
    return getattr(config, "base_model_type", None) or config.model_type


def adapter_for(model_or_config) -> FamilyAdapter:
    """The adapter of a model (or of a config, before any weights are read)."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = base_model_type(config)
    for adapter_cls in ADAPTERS:
        if model_type in adapter_cls.model_types:
            adapter = adapter_cls(config)
            try:
                adapter.check_supported()
            except ValueError as exc:
                raise LlmBipError(f"unsupported {model_type} variant: {exc}") from None
            return adapter
    raise LlmBipError(
        f"unsupported architecture '{model_type}': llm-bip supports {', '.join(SUPPORTED_MODEL_TYPES)} "
        "(LLaMA 1/2/3, Vicuna, SmolLM2, Mistral, Qwen2, Qwen3, Phi-3/Phi-4 with fused qkv and gate/up projections, "
        "Gemma 2, Gemma 3 text models)"
    )


__all__ = ["ADAPTERS", "SUPPORTED_MODEL_TYPES", "BlockParts", "FamilyAdapter", "adapter_for", "base_model_type"]
