"""Activation statistics of one block, gathered by hooks during one forward pass of the block.

Every scorer and compensator reads the same few sufficient statistics, so one pass serves them all:
the Gram matrix and mean of o_proj's input (per-head norms of the attention output, FLAP's
variance, bias compensation, refit; scorers need only its KV-group diagonal blocks, a third of the
work, so the full matrix is computed only when a refit of o_proj asks for it), per-channel sums and squares of down_proj's input (the exact FFN
score), optionally down_proj's full Gram (refit), the block output energy and how far the output is from
the input (the block score of `depth.py`), and a small token sample of
the FFN's residual input for the Lipschitz estimate.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from llm_bip.activations import BlockInputs, full_precision, run_block
from llm_bip.adapters import BlockParts
from llm_bip.depth import skip_energies


@dataclass(frozen=True)
class StatsRequest:
    ffn_gram: bool = False
    full_attn_gram: bool = False  # else only the diagonal blocks of one KV group's columns
    residual_sample: int = 0  # tokens of (FFN residual input, o_proj input) to keep, 0 = none
    seed: int = 0

    def union(self, other: StatsRequest) -> StatsRequest:
        return StatsRequest(
            ffn_gram=self.ffn_gram or other.ffn_gram,
            full_attn_gram=self.full_attn_gram or other.full_attn_gram,
            residual_sample=max(self.residual_sample, other.residual_sample),
            seed=self.seed,
        )


@dataclass
class BlockStats:
    tokens: int = 0
    attn_sum: torch.Tensor | None = None  # [d_attn] sum of o_proj inputs
    attn_gram: torch.Tensor | None = None  # [d_attn, d_attn] sum of x x^T over tokens
    attn_gram_block: int = 0  # width of its diagonal blocks when only those were computed (0: full)
    ffn_sum: torch.Tensor | None = None  # [channels]
    ffn_sq: torch.Tensor | None = None  # [channels] sum of squares
    ffn_gram: torch.Tensor | None = None  # [channels, channels], only when requested
    output_sq: float = 0.0  # sum over tokens of ||block output||^2
    skip_sq: float = 0.0  # sum over tokens of ||block output - block input||^2 (what skipping the block changes)
    residual_sample: torch.Tensor | None = None  # [S, hidden] FFN residual input h
    attn_in_sample: torch.Tensor | None = None  # [S, d_attn] o_proj inputs of the same tokens
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_scores(cls, scores) -> BlockStats:
        """The means a saved score table kept (enough for bias compensation without a forward pass)."""
        return cls(tokens=scores.tokens, attn_sum=scores.attn_mean * scores.tokens, ffn_sum=scores.ffn_mean * scores.tokens)

    @property
    def attn_mean(self) -> torch.Tensor:
        return self.attn_sum / self.tokens

    @property
    def ffn_mean(self) -> torch.Tensor:
        return self.ffn_sum / self.tokens

    @property
    def ffn_var(self) -> torch.Tensor:
        return (self.ffn_sq / self.tokens - self.ffn_mean**2).clamp_min(0)

    @property
    def attn_var(self) -> torch.Tensor:
        return (torch.diagonal(self.attn_gram) / self.tokens - self.attn_mean**2).clamp_min(0)


def _add(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    return b if a is None else a + b


@torch.no_grad()
def collect_block_stats(
    block: nn.Module, parts: BlockParts, inputs: BlockInputs, request: StatsRequest, layer: int = -1,
    group_width: int = 0, keep_outputs: bool = True,
) -> tuple[BlockStats, BlockInputs | None]:
    """One forward pass of `block` over the calibration inputs; returns its statistics and (unless
    `keep_outputs` is off, when the caller will not use them) its outputs.
    With `group_width` (head_dim x heads per KV group) and no request for the full attention Gram,
    only its diagonal blocks of that width are computed (the rest stays zero)."""
    stats = BlockStats()
    block_width = 0 if request.full_attn_gram else group_width
    stats.attn_gram_block = block_width
    generator = torch.Generator().manual_seed(request.seed + layer)
    pending: dict[str, torch.Tensor] = {}
    per_batch_sample = 0
    if request.residual_sample:
        per_batch_sample = max(1, request.residual_sample // max(1, len(inputs.hidden)))

    def float32(hook):
        """Statistics in float32 even inside the forward pass's bf16 autocast (which would otherwise run
        the Gram products in bf16)."""
        def wrapped(*args):
            with full_precision():
                return hook(*args)

        return wrapped

    @float32
    def on_o_proj(_m, args):
        x = args[0].reshape(-1, args[0].shape[-1]).float()
        stats.tokens += x.shape[0]
        stats.attn_sum = _add(stats.attn_sum, x.sum(0))
        stats.attn_gram = _accumulate_gram(stats.attn_gram, x, block_width)
        if per_batch_sample:
            idx = torch.randperm(x.shape[0], generator=generator)[:per_batch_sample]
            pending["idx"] = idx
            stats.attn_in_sample = _cat(stats.attn_in_sample, x[idx])

    def on_post_norm(_m, args):
        if per_batch_sample:
            h = args[0].reshape(-1, args[0].shape[-1]).float()
            stats.residual_sample = _cat(stats.residual_sample, h[pending["idx"]])

    @float32
    def on_down_proj(_m, args):
        a = args[0].reshape(-1, args[0].shape[-1]).float()
        stats.ffn_sum = _add(stats.ffn_sum, a.sum(0))
        stats.ffn_sq = _add(stats.ffn_sq, (a * a).sum(0))
        if request.ffn_gram:
            stats.ffn_gram = _accumulate_gram(stats.ffn_gram, a, 0)

    def on_block_out(_m, args, out):
        skip, energy = skip_energies(args[0], out[0] if isinstance(out, tuple) else out)
        stats.skip_sq += skip
        stats.output_sq += energy

    handles = [
        parts.o_proj.register_forward_pre_hook(on_o_proj),
        parts.post_attention_norm.register_forward_pre_hook(on_post_norm),
        parts.down_proj.register_forward_pre_hook(on_down_proj),
        block.register_forward_hook(on_block_out),
    ]
    try:
        outputs = run_block(block, inputs, layer=layer, keep_outputs=keep_outputs)
    finally:
        for h in handles:
            h.remove()
    return stats, outputs


def _accumulate_gram(total: torch.Tensor | None, x: torch.Tensor, block_width: int) -> torch.Tensor:
    """total + x^T x, in place (a Gram matrix can be the largest tensor of a block's pass)."""
    if total is None:
        return _gram(x, block_width)
    if not block_width or block_width == x.shape[1]:
        return total.addmm_(x.T, x)
    return total.add_(_gram(x, block_width))


def _gram(x: torch.Tensor, block_width: int) -> torch.Tensor:
    """x^T x, or only its diagonal blocks of `block_width` columns (as a full matrix, zero elsewhere)."""
    if not block_width or block_width == x.shape[1]:
        return x.T @ x
    blocks = x.reshape(x.shape[0], -1, block_width).transpose(0, 1)  # [groups, tokens, width]
    return torch.block_diag(*(blocks.transpose(1, 2) @ blocks))


def _cat(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    return b if a is None else torch.cat([a, b])
