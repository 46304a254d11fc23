"""Perplexity as the field reports it: non-overlapping windows of `seq_len` tokens over the test text
(non-empty lines joined by a blank line), exp of the mean window loss, in the compute dtype the caller
resolved (`dtypes.compute_dtype`)."""

from __future__ import annotations

import math
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from llm_bip.data import load_text, text_windows, tokenize
from llm_bip.dtypes import DTYPES
from llm_bip.errors import LlmBipError


def compute_context(model: nn.Module, dtype: str):
    """Run in `dtype` without touching the stored weights (autocast), so an fp32 model stays fp32."""
    param_dtype = next(model.parameters()).dtype
    if DTYPES[dtype] == param_dtype or DTYPES[dtype] == torch.float32:
        return nullcontext()
    device = next(model.parameters()).device.type
    return torch.autocast(device_type=device, dtype=DTYPES[dtype])


def window_batch_size(batch_size: int, seq_len: int) -> int:
    """`batch_size` counts windows of 2048; shorter windows batch about 512 tokens at a time."""
    return max(1, batch_size * 2048 // seq_len // 4) if seq_len < 2048 else batch_size


LOGIT_CHUNK = 512  # positions whose logits exist at once: [batch, 512, vocab] floats, not [batch, seq_len, vocab]


def output_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head on some positions' hidden states, upcast to float32 (and soft-capped where the family is):
    how every next-token distribution here is made (perplexity, distillation, block sensitivity)."""
    logits = model.get_output_embeddings()(hidden).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    return cap * torch.tanh(logits / cap) if cap else logits


def window_losses(model: nn.Module, hidden: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss of each window from the final hidden states, the logits made a chunk of
    positions at a time (at 2048 tokens a 49k vocabulary's full logits take 1.6 GB per 4 windows)."""
    total = torch.zeros(batch.shape[0], dtype=torch.float64, device=batch.device)
    for start in range(0, batch.shape[1] - 1, LOGIT_CHUNK):
        end = min(start + LOGIT_CHUNK, batch.shape[1] - 1)
        logits = output_logits(model, hidden[:, start:end])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, start + 1 : end + 1].reshape(-1),
                               reduction="none")
        total += loss.view(batch.shape[0], -1).double().sum(1)
    return total / (batch.shape[1] - 1)


@torch.no_grad()
def perplexity(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, source: str, seq_len: int = 2048,
    max_windows: int | None = None, batch_size: int = 1, dtype: str = "bfloat16", progress: bool = True,
    ids: torch.Tensor | None = None, bos_id: int | None = None,
) -> dict:
    """Perplexity of `model` on the test split of `source` (a name or a local text file); with `bos_id`,
    every window starts with that token (data.text_windows)."""
    if dtype not in DTYPES:
        raise LlmBipError(f"unknown dtype '{dtype}': use one of {', '.join(DTYPES)}")
    if ids is None:
        ids = tokenize(tokenizer, load_text(source, split="test"))
    data = text_windows(ids, seq_len, max_windows, bos_id, str(source))
    return {"source": str(source), **windows_perplexity(model, data, f"{source}@{seq_len}", batch_size, dtype, progress),
            **({"bos_per_window": True} if bos_id is not None else {})}


@torch.no_grad()
def windows_perplexity(model: nn.Module, data: torch.Tensor, label: str, batch_size: int = 1,
                       dtype: str = "bfloat16", progress: bool = True) -> dict:
    """Perplexity of `model` over the token windows `data` (windows x length): exp of the mean window loss."""
    if dtype not in DTYPES:
        raise LlmBipError(f"unknown dtype '{dtype}': use one of {', '.join(DTYPES)}")
    windows, seq_len = data.shape
    device = next(model.parameters()).device
    losses = []
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    with compute_context(model, dtype):
        for i in tqdm(range(0, windows, batch_size), desc=f"perplexity {label}", disable=not progress,
                      leave=False):
            batch = data[i : i + batch_size].to(device)
            hidden = model.base_model(batch, use_cache=False).last_hidden_state
            losses += window_losses(model, hidden, batch).tolist()
    model.train(was_training)
    mean = sum(losses) / len(losses)
    return {"seq_len": seq_len, "windows": windows, "tokens": windows * seq_len, "perplexity": math.exp(mean),
            "dtype": dtype, "seconds": time.perf_counter() - start}
