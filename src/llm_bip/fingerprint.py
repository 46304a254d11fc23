"""A model's fingerprint: architecture, widths and a checksum of a few weights.

Scores, plans and resumable runs carry it, so they are never applied to another model. The checksum
reads the weights rounded to bfloat16, so the same checkpoint gives the same fingerprint whether it is
loaded in float32, bfloat16 or float16, in memory or streamed block by block.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from llm_bip.adapters import FamilyAdapter
from llm_bip.widths import BlockWidths


def weights_checksum(weight: torch.Tensor) -> str:
    return f"{float(weight.detach().to(torch.bfloat16).double().abs().sum()):.9e}"


def fingerprint(model_type: str, hidden_size: int, widths: list[BlockWidths], first_o_proj: torch.Tensor,
                last_down_proj: torch.Tensor) -> str:
    digest = hashlib.sha256()
    digest.update(f"{model_type}|{hidden_size}|{len(widths)}".encode())
    for w in widths:
        digest.update(f"{w.num_heads},{w.num_kv_heads},{w.channels}".encode())
    digest.update(weights_checksum(first_o_proj).encode())
    digest.update(weights_checksum(last_down_proj).encode())
    return digest.hexdigest()[:16]


def model_fingerprint(model: nn.Module, adapter: FamilyAdapter) -> str:
    blocks = adapter.blocks(model)
    return fingerprint(model.config.model_type, model.config.hidden_size, [adapter.widths(b) for b in blocks],
                       adapter.parts(blocks[0]).o_proj.weight, adapter.parts(blocks[-1]).down_proj.weight)


def fingerprint_of(loaded) -> str:
    """The fingerprint of a loaded model, in memory or streamed (then two weights are read from disk)."""
    if not loaded.streamed:
        return model_fingerprint(loaded.model, loaded.adapter)
    adapter, config = loaded.adapter, loaded.model.config
    first = adapter.block_prefix(0) + adapter.o_proj_name + ".weight"
    last = adapter.block_prefix(adapter.num_blocks - 1) + adapter.down_proj_name + ".weight"
    tensors = loaded.checkpoint.tensors([first, last], dtype=None)
    return fingerprint(config.model_type, config.hidden_size, [adapter.widths(b) for b in adapter.blocks(loaded.model)],
                       tensors[first], tensors[last])
