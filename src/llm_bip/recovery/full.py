"""The full fine-tuning trainer: every weight of the (pruned) model is trained, in place.

The weights keep their dtype. Where they are bfloat16 or float16, AdamW runs on float32 master copies: a
bf16 weight has 8 significant bits, so an update smaller than about 1/256 of the weight (lr 1e-4 times an
Adam step of order 1, against weights of order 1e-2) would round away to nothing and training would stall;
AdamW's moment estimates would lose precision the same way. Each micro-batch's half-precision gradients are
added into float32 master gradients (so accumulation over micro-batches is float32 too), clipping and the
optimizer step work on the masters, and after each step the masters are rounded into the model's weights.
float32 weights are their own masters. Checkpoints hold the masters, so a resumed run continues exactly.
"""

from __future__ import annotations

import hashlib
import json

import torch
from transformers import PreTrainedModel

from llm_bip.recovery.checkpoint import restore_tensors


class FullTrainer:
    """Trains all parameters; `trainable` (what the optimizer steps and checkpoints hold) are float32."""

    name = "full"
    weights_file = "weights.safetensors"

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        self.params: dict[str, torch.nn.Parameter] = {}
        self.trainable: dict[str, torch.Tensor] = {}
        self._requires_grad: dict[str, bool] = {}

    def signature(self) -> str:
        """Names, shapes and a sample of every weight: a resumed run must start from the same model."""
        entries = []
        for name, p in self.model.named_parameters():
            flat = p.detach().flatten()
            sample = flat[:: max(1, flat.numel() // 64)][:64].float().cpu()
            entries.append([name, list(p.shape), str(p.dtype), sample.tolist()])
        return hashlib.sha256(json.dumps([type(self.model).__name__, entries]).encode()).hexdigest()

    def setup(self) -> None:
        # named_parameters() lists a tied weight (embedding = LM head) once, so it gets one master.
        self.params = dict(self.model.named_parameters())
        for name, p in self.params.items():
            self._requires_grad[name] = p.requires_grad
            p.requires_grad_(True)
            if p.dtype == torch.float32:
                self.trainable[name] = p
            else:
                self.trainable[name] = p.detach().float().clone().requires_grad_(True)

    def after_backward(self) -> None:
        """Move half-precision gradients into the float32 masters' (and free them)."""
        for name, p in self.params.items():
            master = self.trainable[name]
            if master is p or p.grad is None:
                continue
            if master.grad is None:
                master.grad = p.grad.float()
            else:
                master.grad.add_(p.grad.float())
            p.grad = None

    @torch.no_grad()
    def after_step(self) -> None:
        """Round the updated masters into the model's half-precision weights."""
        for name, p in self.params.items():
            master = self.trainable[name]
            if master is not p:
                p.copy_(master)

    def load(self, saved: dict[str, torch.Tensor]) -> None:
        restore_tensors(saved, self.trainable, "weight", "the checkpoint's weights do not match this model's parameters")
        self.after_step()

    def finish(self) -> PreTrainedModel:
        """The trained model itself (its parameters' requires_grad flags as they were given)."""
        for name, p in self.params.items():
            p.grad = None
            p.requires_grad_(self._requires_grad[name])
        return self.model
