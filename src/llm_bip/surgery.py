"""Cutting: physically slice a block's projections to the structures a plan keeps.

The result is a genuinely smaller dense model. `mask_plan` zeroes the same structures instead, the
reference the tests compare the cut model against.
"""

from __future__ import annotations

import torch
from torch import nn

from llm_bip.adapters import FamilyAdapter
from llm_bip.errors import LlmBipError
from llm_bip.plan import BlockPlan, PruningPlan


def head_columns(head_or_group: list[int], head_dim: int) -> torch.Tensor:
    """Indices of the q/o (or k/v) rows or columns that belong to these heads (or KV heads)."""
    return torch.tensor([h * head_dim + d for h in head_or_group for d in range(head_dim)], dtype=torch.long)


@torch.no_grad()
def _slice_linear(linear: nn.Linear, out_index: torch.Tensor | None = None, in_index: torch.Tensor | None = None) -> nn.Linear:
    weight = linear.weight
    if out_index is not None:
        weight = weight.index_select(0, out_index.to(weight.device))
    if in_index is not None:
        weight = weight.index_select(1, in_index.to(weight.device))
    bias = linear.bias
    if bias is not None and out_index is not None:
        bias = bias.index_select(0, out_index.to(bias.device))
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    new.weight.copy_(weight)
    if bias is not None:
        new.bias.copy_(bias)
    return new


def check_block_plan(plan: BlockPlan, num_heads: int, num_kv: int, channels: int) -> None:
    group_size = num_heads // num_kv
    if not plan.keep_heads or not plan.keep_kv_heads or not plan.keep_channels:
        raise LlmBipError(f"plan for layer {plan.layer} removes every head or every channel: keep at least one")
    if max(plan.keep_heads) >= num_heads or max(plan.keep_kv_heads) >= num_kv or max(plan.keep_channels) >= channels:
        raise LlmBipError(f"plan for layer {plan.layer} names structures the block does not have: was it made for another model?")
    per_group = {g: sum(1 for h in plan.keep_heads if h // group_size == g) for g in plan.keep_kv_heads}
    if set(h // group_size for h in plan.keep_heads) != set(plan.keep_kv_heads) or len(set(per_group.values())) != 1:
        raise LlmBipError(
            f"plan for layer {plan.layer} keeps heads that GQA cannot hold: every kept KV group must keep "
            "the same number of query heads, and no query head may outlive its KV group"
        )


def cut_block(adapter: FamilyAdapter, block: nn.Module, plan: BlockPlan, head_dim: int) -> None:
    parts = adapter.parts(block)
    num_heads, num_kv, channels = adapter.widths(block, head_dim)
    check_block_plan(plan, num_heads, num_kv, channels)
    q_rows, kv_rows = head_columns(plan.keep_heads, head_dim), head_columns(plan.keep_kv_heads, head_dim)
    ch = torch.tensor(plan.keep_channels, dtype=torch.long)
    attn, mlp = parts.attention, parts.mlp
    attn.q_proj = _slice_linear(parts.q_proj, out_index=q_rows)
    attn.k_proj = _slice_linear(parts.k_proj, out_index=kv_rows)
    attn.v_proj = _slice_linear(parts.v_proj, out_index=kv_rows)
    attn.o_proj = _slice_linear(parts.o_proj, in_index=q_rows)
    mlp.gate_proj = _slice_linear(parts.gate_proj, out_index=ch)
    mlp.up_proj = _slice_linear(parts.up_proj, out_index=ch)
    mlp.down_proj = _slice_linear(parts.down_proj, in_index=ch)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = len(plan.keep_channels)
    adapter.set_attention_widths(block, len(plan.keep_heads), len(plan.keep_kv_heads))


def apply_plan(model: nn.Module, adapter: FamilyAdapter, plan: PruningPlan) -> nn.Module:
    """Cut every block to its plan, in place."""
    head_dim = adapter.head_dim(model)
    blocks = adapter.blocks(model)
    if len(plan.blocks) != len(blocks):
        raise LlmBipError(f"plan has {len(plan.blocks)} blocks but the model has {len(blocks)}: it was made for another model")
    for block_plan in plan.blocks:
        cut_block(adapter, blocks[block_plan.layer], block_plan, head_dim)
    return model


@torch.no_grad()
def mask_plan(model: nn.Module, adapter: FamilyAdapter, plan: PruningPlan) -> nn.Module:
    """Zero the inputs of o_proj / down_proj that the plan removes (the dense reference of a cut)."""
    head_dim = adapter.head_dim(model)
    for block_plan in plan.blocks:
        parts = adapter.parts(adapter.blocks(model)[block_plan.layer])
        heads = parts.o_proj.in_features // head_dim
        dropped_heads = [h for h in range(heads) if h not in set(block_plan.keep_heads)]
        parts.o_proj.weight[:, head_columns(dropped_heads, head_dim)] = 0
        dropped = [c for c in range(parts.down_proj.in_features) if c not in set(block_plan.keep_channels)]
        parts.down_proj.weight[:, torch.tensor(dropped, dtype=torch.long)] = 0
    return model
