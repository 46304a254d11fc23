"""Qwen3: per-head RMSNorm on q and k over head_dim. Pruning whole heads leaves those norms intact,
since they are shared by every head and never see the head count."""

from llm_bip.adapters.base import FamilyAdapter


class Qwen3Adapter(FamilyAdapter):
    model_types = ("qwen3",)
    family = "qwen3"
    layer_count_fields = ("max_window_layers",)
    o_proj_bias_flag = "attention_bias"  # also adds zero q/k/v biases, which the stock class accepts
