"""Cutting: physically slice a block to the structures a plan keeps, and delete the blocks it removes
(through the adapter).

The result is a genuinely smaller dense model. `mask_plan` zeroes the same structures instead (a
removed block becomes the identity), the reference the tests compare the cut model against.
"""

from __future__ import annotations

import torch
from torch import nn

from llm_bip.adapters import FamilyAdapter
from llm_bip.errors import LlmBipError
from llm_bip.plan import BlockPlan, PruningPlan
from llm_bip.widths import BlockWidths


def head_columns(head_or_group: list[int], head_dim: int) -> torch.Tensor:
    """Indices of the q/o (or k/v) rows or columns that belong to these heads (or KV heads)."""
    return torch.tensor([h * head_dim + d for h in head_or_group for d in range(head_dim)], dtype=torch.long)


def check_block_plan(plan: BlockPlan, widths: BlockWidths) -> None:
    if not plan.keep_heads or not plan.keep_kv_heads or not plan.keep_channels:
        raise LlmBipError(f"plan for layer {plan.layer} removes every head or every channel: keep at least one")
    if (max(plan.keep_heads) >= widths.num_heads or max(plan.keep_kv_heads) >= widths.num_kv_heads
            or max(plan.keep_channels) >= widths.channels):
        raise LlmBipError(f"plan for layer {plan.layer} names structures the block does not have: was it made for another model?")
    group_size = widths.group_size
    per_group = {g: sum(1 for h in plan.keep_heads if h // group_size == g) for g in plan.keep_kv_heads}
    if set(h // group_size for h in plan.keep_heads) != set(plan.keep_kv_heads) or len(set(per_group.values())) != 1:
        raise LlmBipError(
            f"plan for layer {plan.layer} keeps heads that GQA cannot hold: every kept KV group must keep "
            "the same number of query heads, and no query head may outlive its KV group"
        )


def cut_block(adapter: FamilyAdapter, block: nn.Module, plan: BlockPlan) -> None:
    check_block_plan(plan, adapter.widths(block))
    head_dim = adapter.head_dim
    adapter.cut(block, head_columns(plan.keep_heads, head_dim), head_columns(plan.keep_kv_heads, head_dim),
                torch.tensor(plan.keep_channels, dtype=torch.long))


def check_plan_fits(adapter: FamilyAdapter, plan: PruningPlan) -> None:
    if len(plan.blocks) != adapter.num_blocks:
        raise LlmBipError(f"plan has {len(plan.blocks)} blocks but the model has {adapter.num_blocks}: "
                          "it was made for another model")


def apply_plan(model: nn.Module, adapter: FamilyAdapter, plan: PruningPlan) -> nn.Module:
    """Cut every block to its plan and delete the removed blocks, in place (no compensation, no fingerprint
    check: see `api.apply_plan`)."""
    check_plan_fits(adapter, plan)
    blocks = adapter.blocks(model)
    for block_plan in plan.blocks:
        if not block_plan.removed:
            cut_block(adapter, blocks[block_plan.layer], block_plan)
    adapter.remove_blocks(model, plan.removed_layers)
    return model


@torch.no_grad()
def mask_plan(model: nn.Module, adapter: FamilyAdapter, plan: PruningPlan) -> nn.Module:
    """Zero the inputs of o_proj / down_proj that the plan removes, and every output of a removed block's
    o_proj and down_proj, so it passes its input on (the dense reference of a cut)."""
    for block_plan in plan.blocks:
        block = adapter.blocks(model)[block_plan.layer]
        if block_plan.removed:
            parts = adapter.parts(block)
            for linear in (parts.o_proj, parts.down_proj):
                linear.weight.zero_()
                if linear.bias is not None:
                    linear.bias.zero_()
        else:
            mask_block(adapter, block, block_plan)
    return model


@torch.no_grad()
def mask_block(adapter: FamilyAdapter, block: nn.Module, plan: BlockPlan) -> None:
    """Zero the o_proj columns of removed heads and the down_proj columns of removed channels: the
    block then computes exactly what the cut block will."""
    parts, widths = adapter.parts(block), adapter.widths(block)
    kept_heads, kept_channels = set(plan.keep_heads), set(plan.keep_channels)
    dropped_heads = [h for h in range(widths.num_heads) if h not in kept_heads]
    parts.o_proj.weight[:, head_columns(dropped_heads, adapter.head_dim)] = 0
    dropped = [c for c in range(widths.channels) if c not in kept_channels]
    parts.down_proj.weight[:, torch.tensor(dropped, dtype=torch.long)] = 0
