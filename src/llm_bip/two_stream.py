"""Sequential pruning against the dense model's own block outputs (error correction).

Plain sequential calibration refits each block to reproduce *its own* dense output on the pruned
inputs, so the error that upstream pruning put into the residual stream is carried on. Here the
dense and the pruned activations travel side by side, and each block's o_proj and down_proj are
refit so that the pruned block's output matches the *dense model's* output of that block: the
block-output criterion of the score, applied to the repair. Per block:

1. dense stream: run the block on the dense inputs; keep h_d (residual after attention) and y_d;
2. pruned stream: run the uncut block on the pruned inputs, gather statistics, score, select;
3. refit o_proj on the kept heads towards t = h_d - x_p, cut the attention;
4. run attention-cut block on the pruned inputs; refit down_proj on the kept channels towards
   t = y_d - h_p, cut the FFN, and form the pruned block's output from what was captured.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llm_bip.block_loop import BlockInputs, run_block
from llm_bip.compensation import add_output_bias, solve_refit
from llm_bip.loading import LoadedModel
from llm_bip.plan import BlockPlan, BlockWidths, select
from llm_bip.scoring.base import BlockGeometry, Scorer
from llm_bip.stats import collect_block_stats
from llm_bip.surgery import cut_block, head_columns


class _Capture:
    """Forward pre-hook that keeps a module's input for every batch."""

    def __init__(self, module: nn.Module) -> None:
        self.values: list[torch.Tensor] = []
        self.handle = module.register_forward_pre_hook(lambda _m, args: self.values.append(args[0]))

    def close(self) -> list[torch.Tensor]:
        self.handle.remove()
        return self.values


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1]).float()


@torch.no_grad()
def prune_block_two_stream(
    loaded: LoadedModel, block: nn.Module, geometry: BlockGeometry, inputs_p: BlockInputs, inputs_d: BlockInputs,
    scorer: Scorer, widths: BlockWidths, gqa_mode: str, attn_damping: float, damping: float,
) -> tuple[BlockPlan, BlockInputs, BlockInputs]:
    adapter, layer = loaded.adapter, geometry.layer
    parts = adapter.parts(block)

    capture = _Capture(parts.post_attention_norm)
    next_d = run_block(block, inputs_d, layer=layer)
    h_dense = capture.close()

    capture = _Capture(parts.o_proj)
    stats, _ = collect_block_stats(block, parts, inputs_p, scorer.stats_request(), layer)
    o_pruned = capture.close()
    scores = scorer.score_block(parts, stats, geometry)
    plan = select(scores.heads, scores.groups, scores.channels, widths, gqa_mode, layer)

    head_dim = geometry.head_dim
    cols = head_columns(plan.keep_heads, head_dim)
    if len(plan.keep_heads) < geometry.num_heads:
        n = stats.tokens
        cross = torch.zeros(parts.o_proj.out_features, len(cols))
        target_sum = torch.zeros(parts.o_proj.out_features)
        for o, h_d, x_p in zip(o_pruned, h_dense, inputs_p.hidden, strict=True):
            target = _flat(h_d) - _flat(x_p)  # what the attention output must add to reach the dense stream
            cross += target.T @ _flat(o)[:, cols]
            target_sum += target.sum(0)
        weight, bias = solve_refit(cross / n, stats.attn_gram[cols][:, cols] / n, parts.o_proj.weight.float()[:, cols],
                                   stats.attn_mean[cols], target_sum / n, attn_damping)
        full = parts.o_proj.weight.detach().clone()
        full[:, cols] = weight.to(full.dtype)
        parts.o_proj.weight.copy_(full)
        add_output_bias(adapter, parts.o_proj, bias - (parts.o_proj.bias.float() if parts.o_proj.bias is not None else 0))
    del o_pruned
    all_channels = list(range(geometry.channels))
    cut_block(adapter, block, BlockPlan(layer, plan.keep_heads, plan.keep_kv_heads, all_channels), head_dim)

    parts = adapter.parts(block)
    capture_h, capture_a = _Capture(parts.post_attention_norm), _Capture(parts.down_proj)
    run_block(block, inputs_p, layer=layer)
    h_pruned, a_pruned = capture_h.close(), capture_a.close()
    keep = torch.tensor(plan.keep_channels, dtype=torch.long)
    if len(plan.keep_channels) < geometry.channels:
        gram = torch.zeros(len(keep), len(keep))
        cross = torch.zeros(parts.down_proj.out_features, len(keep))
        a_sum, target_sum, n = torch.zeros(len(keep)), torch.zeros(parts.down_proj.out_features), 0
        for a, h_p, y_d in zip(a_pruned, h_pruned, next_d.hidden, strict=True):
            a_s = _flat(a)[:, keep]
            target = _flat(y_d) - _flat(h_p)
            gram += a_s.T @ a_s
            cross += target.T @ a_s
            a_sum += a_s.sum(0)
            target_sum += target.sum(0)
            n += a_s.shape[0]
        old_bias = parts.down_proj.bias.float() if parts.down_proj.bias is not None else 0
        weight, bias = solve_refit(cross / n, gram / n, parts.down_proj.weight.float()[:, keep], a_sum / n,
                                   target_sum / n, damping)
        full = parts.down_proj.weight.detach().clone()
        full[:, keep] = weight.to(full.dtype)
        parts.down_proj.weight.copy_(full)
        add_output_bias(adapter, parts.down_proj, bias - old_bias)
    heads_now = list(range(len(plan.keep_heads)))
    kv_now = list(range(len(plan.keep_kv_heads)))
    cut_block(adapter, block, BlockPlan(layer, heads_now, kv_now, plan.keep_channels), head_dim)

    # The pruned block's output from what was captured: y = h + down(a_S), no third pass.
    parts = adapter.parts(block)
    outputs = []
    for a, h_p in zip(a_pruned, h_pruned, strict=True):
        ffn = F.linear(a[..., keep].to(parts.down_proj.weight.dtype), parts.down_proj.weight, parts.down_proj.bias)
        outputs.append((h_p.float() + ffn.float()).to(h_p.dtype))
    return plan, BlockInputs(hidden=outputs, kwargs=inputs_p.kwargs), next_d
