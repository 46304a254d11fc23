"""Qwen2 / Qwen2.5: biases on q/k/v (sliced with their rows), none on o_proj or the FFN."""

from llm_bip.adapters.base import FamilyAdapter


class Qwen2Adapter(FamilyAdapter):
    model_types = ("qwen2",)
    family = "qwen2"
    layer_count_fields = ("max_window_layers",)
