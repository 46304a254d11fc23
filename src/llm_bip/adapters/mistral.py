"""Mistral: LLaMA layout, no biases anywhere (the stock class has no flag for them)."""

from llm_bip.adapters.base import FamilyAdapter


class MistralAdapter(FamilyAdapter):
    model_types = ("mistral",)
    family = "mistral"
