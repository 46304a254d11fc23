"""LLaMA 1/2/3, Vicuna, SmolLM2: q/k/v/o with optional `attention_bias`, gated FFN with `mlp_bias`."""

from llm_bip.adapters.base import FamilyAdapter


class LlamaAdapter(FamilyAdapter):
    model_types = ("llama",)
    family = "llama"
    # The stock class can hold output biases, at the price of zero biases on q/k/v (gate/up).
    o_proj_bias_flag = "attention_bias"
    down_proj_bias_flag = "mlp_bias"
