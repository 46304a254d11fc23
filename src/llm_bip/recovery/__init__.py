"""LoRA recovery fine-tuning of pruned models (LLM-Pruner's recipe by default)."""

from llm_bip.recovery.config import LoraRecoveryConfig
from llm_bip.recovery.data import DEFAULT_DATASET, alpaca_prompt, load_recovery_data
from llm_bip.recovery.lora import recover

__all__ = ["DEFAULT_DATASET", "LoraRecoveryConfig", "alpaca_prompt", "load_recovery_data", "recover"]
