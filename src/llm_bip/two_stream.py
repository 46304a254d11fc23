"""Refit towards the dense model's own block outputs (error correction), a compensator of the block loop.

Plain refit makes each block reproduce *its own* dense output on the pruned inputs, so the error that
upstream pruning put into the residual stream is carried on. Here the dense activations travel beside
the pruned ones, and each block's o_proj and down_proj are refit so that the pruned block's output
matches the *dense model's* output of that block. Per block (sequential calibration only):

1. `start_block`: run the uncut block on the dense stream; keep h_d (residual after attention) and y_d;
2. refit o_proj's kept columns towards t = h_d - x_p (what the attention output must add to the pruned
   stream x_p to reach the dense one); zero the removed heads' columns, so the block computes as cut;
3. run that block on the pruned inputs; refit down_proj's kept columns towards t = y_d - h_p.

A block that depth pruning removes still runs on the dense stream (the pruned one skips it), so the
next kept blocks are refit towards the dense model's outputs, removed blocks included.

Cross terms are accumulated batch by batch in hooks, so no per-token activations are kept.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from llm_bip.activations import full_precision, run_block
from llm_bip.compensation import Compensator, add_output_bias, solve_refit
from llm_bip.stats import StatsRequest
from llm_bip.surgery import head_columns

log = logging.getLogger(__name__)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1]).float()


class _PerBatch:
    """A forward pre-hook that calls `fn(batch_index, input)` for each batch of a `run_block` pass."""

    def __init__(self, module: nn.Module, fn) -> None:
        self.index = 0

        def hook(_m, args):
            with full_precision():  # accumulations in float32 inside the pass's bf16 autocast
                fn(self.index, args[0])
            self.index += 1

        self.handle = module.register_forward_pre_hook(hook)

    def close(self) -> None:
        self.handle.remove()


class DenseTargetRefit(Compensator):
    name = "refit-dense"
    reads_removed_blocks = True

    def __init__(self, attn_damping: float = 1.0, damping: float = 0.01) -> None:
        self.attn_damping, self.damping = attn_damping, damping
        self.dense: list[torch.Tensor] | None = None  # the dense stream entering the current block
        self.h_dense: list[torch.Tensor] = []
        self.y_dense: list[torch.Tensor] = []

    def stats_request(self, geometry, target, tokens: int) -> StatsRequest:
        return StatsRequest(full_attn_gram=geometry.num_heads > target.num_heads)

    def needs_activations(self, has_table: bool) -> bool:
        return True

    def start_block(self, adapter, block, layer, inputs) -> None:
        dense = inputs.with_hidden(self.dense if self.dense is not None else inputs.hidden)
        h: list[torch.Tensor] = []
        capture = _PerBatch(adapter.parts(block).post_attention_norm, lambda _i, x: h.append(x))
        try:
            self.y_dense = run_block(block, dense, layer=layer).hidden
        finally:
            capture.close()
        self.h_dense = h

    @torch.no_grad()
    def compensate(self, adapter, block, plan, stats, inputs) -> dict:
        parts = adapter.parts(block)
        done = {}
        cols = head_columns(plan.keep_heads, adapter.head_dim)
        n = stats.tokens
        if len(cols) < parts.o_proj.in_features:
            if n <= len(cols):
                done["o_proj"] = f"plain cut: {n} tokens for {len(cols)} inputs"
            else:
                cross = torch.zeros(parts.o_proj.out_features, len(cols))
                target_sum = torch.zeros(parts.o_proj.out_features)

                def on_o(i, o):
                    nonlocal cross, target_sum
                    target = _flat(self.h_dense[i]) - _flat(inputs.hidden[i])
                    cross += target.T.cpu() @ _flat(o)[:, cols.to(o.device)].cpu()
                    target_sum += target.sum(0).cpu()

                hook = _PerBatch(parts.o_proj, on_o)
                try:
                    run_block(block, inputs, layer=plan.layer, keep_outputs=False)
                finally:
                    hook.close()
                weight, bias = solve_refit(cross / n, stats.attn_gram[cols][:, cols] / n,
                                           parts.o_proj.weight.float()[:, cols.to(parts.o_proj.weight.device)].cpu(),
                                           stats.attn_mean[cols], target_sum / n, self.attn_damping)
                self._write(adapter, parts.o_proj, cols, weight, bias)
                done["o_proj"] = "refit to dense"
            removed = torch.ones(parts.o_proj.in_features, dtype=torch.bool)
            removed[cols] = False
            parts.o_proj.weight[:, removed.to(parts.o_proj.weight.device)] = 0  # the block now computes as cut

        keep = torch.tensor(plan.keep_channels, dtype=torch.long)
        if len(keep) < parts.down_proj.in_features:
            if n <= len(keep):
                done["down_proj"] = f"plain cut: {n} tokens for {len(keep)} inputs"
                return done
            out = parts.down_proj.out_features
            acc = {"gram": torch.zeros(len(keep), len(keep)), "cross": torch.zeros(out, len(keep)),
                   "a_sum": torch.zeros(len(keep)), "t_sum": torch.zeros(out), "n": 0}
            h_pruned: dict[int, torch.Tensor] = {}

            def on_norm(i, h):
                h_pruned[i] = h

            def on_down(i, a):
                a_s = _flat(a)[:, keep.to(a.device)].cpu()
                target = (_flat(self.y_dense[i]) - _flat(h_pruned.pop(i))).cpu()
                acc["gram"] += a_s.T @ a_s
                acc["cross"] += target.T @ a_s
                acc["a_sum"] += a_s.sum(0)
                acc["t_sum"] += target.sum(0)
                acc["n"] += a_s.shape[0]

            hooks = [_PerBatch(parts.post_attention_norm, on_norm), _PerBatch(parts.down_proj, on_down)]
            try:
                run_block(block, inputs, layer=plan.layer, keep_outputs=False)
            finally:
                for hook in hooks:
                    hook.close()
            m = acc["n"]
            weight, bias = solve_refit(acc["cross"] / m, acc["gram"] / m,
                                       parts.down_proj.weight.float()[:, keep.to(parts.down_proj.weight.device)].cpu(),
                                       acc["a_sum"] / m, acc["t_sum"] / m, self.damping)
            self._write(adapter, parts.down_proj, keep, weight, bias)
            done["down_proj"] = "refit to dense"
        return done

    def finish_block(self) -> None:
        self.dense, self.h_dense, self.y_dense = self.y_dense, [], []

    def skip_block(self, adapter, block, layer, inputs) -> None:
        self.start_block(adapter, block, layer, inputs)  # the dense stream goes through the removed block
        self.finish_block()

    @staticmethod
    def _write(adapter, linear: nn.Linear, kept: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> None:
        """Kept columns get the refit weights; the bias becomes the fitted intercept (the target already
        holds the layer's old bias)."""
        full = linear.weight.detach().clone()
        full[:, kept.to(full.device)] = weight.to(full.dtype).to(full.device)
        linear.weight.copy_(full)
        old = linear.bias.detach().float().cpu() if linear.bias is not None else 0
        add_output_bias(adapter, linear, bias - old)

    def state(self) -> dict[str, torch.Tensor]:
        return {f"dense.{i}": t for i, t in enumerate(self.dense or [])}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        keys = sorted((k for k in tensors if k.startswith("dense.")), key=lambda k: int(k.split(".")[1]))
        self.dense = [tensors[k] for k in keys] or None
