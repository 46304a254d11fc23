"""The LoRA trainer: adapters on a frozen (pruned) model, merged back into plain weights at the end.

Pruned models may have a different width in every layer; LoRA wraps each `nn.Linear` by its actual shape, so
nothing here reads widths from the config. The adapters are float32 whatever the base model's dtype.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import PreTrainedModel

from llm_bip.errors import LlmBipError
from llm_bip.recovery.checkpoint import restore_tensors
from llm_bip.recovery.config import LoraRecoveryConfig

# Re-exported: the schedule lived here before the trainers were split out (`llm_bip.recovery.lora` imports).
from llm_bip.recovery.schedule import effective_warmup  # noqa: F401


class LoraTrainer:
    """Trains LoRA adapters (float32) on the model's target projections; `finish` merges them."""

    name = "lora"
    weights_file = "adapter.safetensors"

    def __init__(self, model: PreTrainedModel, config: LoraRecoveryConfig) -> None:
        if isinstance(model, PeftModel):
            raise LlmBipError("the model already carries PEFT adapters: pass the plain (pruned) model")
        self.model = model
        self.config = with_targets(config, model)
        self.peft_model: PeftModel | None = None
        self.trainable: dict[str, torch.Tensor] = {}

    def signature(self) -> str:
        return model_signature(self.model, self.config.target_modules)

    def setup(self) -> None:
        """Wrap the model's target layers with adapters (in place: `self.model` runs them from now on)."""
        self.peft_model = get_peft_model(self.model, build_lora_config(self.config))
        self.trainable = {n: p for n, p in self.peft_model.named_parameters() if p.requires_grad}
        for p in self.trainable.values():
            if p.dtype != torch.float32:
                # Half-precision adapters on a pruned model diverge; the frozen base may stay bf16/fp16.
                p.data = p.data.float()

    def after_backward(self) -> None:
        """Gradients are already on the (float32) adapters."""

    def after_step(self) -> None:
        """The optimizer updated the adapters in place."""

    def load(self, saved: dict[str, torch.Tensor]) -> None:
        restore_tensors(saved, self.trainable, "adapter",
                        "the checkpoint's adapter weights do not match this model's LoRA layers")

    def finish(self) -> PreTrainedModel:
        """The model with the adapters merged into its weights: same class, same shapes, no PEFT modules."""
        return self.peft_model.merge_and_unload()


def with_targets(config: LoraRecoveryConfig, model: nn.Module) -> LoraRecoveryConfig:
    """The config with its LoRA target modules filled in from the model family's adapter where unset."""
    if config.target_modules is not None:
        return config
    from llm_bip.adapters import adapter_for

    return dataclasses.replace(config, target_modules=adapter_for(model).lora_target_modules)


def build_lora_config(config: LoraRecoveryConfig) -> LoraConfig:
    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def model_signature(model: nn.Module, target_modules: tuple[str, ...]) -> str:
    """A fingerprint of the LoRA target layers (names, shapes, a sample of weights).

    Also checks that every target module name exists, so a wrong name fails before any data is read.
    """
    layers = []
    found: set[str] = set()
    linear_names: set[str] = set()
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        leaf = name.rsplit(".", 1)[-1]
        linear_names.add(leaf)
        if leaf not in target_modules:
            continue
        found.add(leaf)
        weight = module.weight.detach().flatten()
        sample = weight[:: max(1, weight.numel() // 64)][:64].float().cpu()
        layers.append([name, list(module.weight.shape), sample.tolist()])
    missing = [t for t in target_modules if t not in found]
    if missing:
        raise LlmBipError(
            f"LoRA target module(s) {', '.join(missing)} not found in {type(model).__name__}; "
            f"its linear layers are named {', '.join(sorted(linear_names))}"
        )
    blob = json.dumps([type(model).__name__, layers]).encode()
    return hashlib.sha256(blob).hexdigest()
