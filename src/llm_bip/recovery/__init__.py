"""Recovery fine-tuning of pruned models: LoRA (LLM-Pruner's recipe by default) or full fine-tuning, on the
LM loss or by distillation from the dense model."""

from llm_bip.recovery.config import DistillConfig, LoraRecoveryConfig
from llm_bip.recovery.data import DEFAULT_DATASET, alpaca_prompt, load_recovery_data
from llm_bip.recovery.teacher import Teacher
from llm_bip.recovery.train import recover

__all__ = [
    "DEFAULT_DATASET",
    "DistillConfig",
    "LoraRecoveryConfig",
    "Teacher",
    "alpaca_prompt",
    "load_recovery_data",
    "recover",
]
