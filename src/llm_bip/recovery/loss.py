"""Padding of examples into batches and the token-level causal-LM loss, always computed in fp32."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from llm_bip.recovery.data import IGNORE_INDEX, Example


def collate(examples: Sequence[Example], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded input ids, attention mask and labels (padding is ignored by the loss)."""
    width = max(len(ex.input_ids) for ex in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex.input_ids)
        ids[row, :n] = torch.tensor(ex.input_ids)
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(ex.labels)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def summed_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of next-token cross-entropies over the labelled tokens of `batch`, in fp32.

    The logits are upcast before the softmax: a bf16/fp16 loss is too coarse for the small
    differences LoRA on a pruned model has to learn.
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )


@torch.no_grad()
def evaluate_loss(
    model: nn.Module, examples: Sequence[Example], micro_batch_size: int, pad_id: int, device: torch.device
) -> dict[str, float]:
    """Token-weighted mean loss and perplexity on held-out examples (dropout off)."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    for start in range(0, len(examples), micro_batch_size):
        chunk = examples[start : start + micro_batch_size]
        total += summed_loss(model, collate(chunk, pad_id, device)).item()
        tokens += sum(ex.n_targets for ex in chunk)
    model.train(was_training)
    loss = total / max(tokens, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "tokens": tokens}
