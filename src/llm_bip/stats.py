"""Activation statistics of one block, gathered by hooks during one forward pass of the block.

Every scorer and compensator reads the same few sufficient statistics, so one pass serves them all:
the Gram matrix and mean of o_proj's input (per-head norms of the attention output, FLAP's
variance, bias compensation, refit; scorers need only its KV-group diagonal blocks, a third of the
work, so the full matrix is computed only when a refit of o_proj asks for it), per-channel sums and
squares of down_proj's input (the exact FFN score), optionally down_proj's full Gram (refit), the block
output energy and how far the output is from the input (the block score of `depth.py`, for a score
table), a small token sample of the FFN's residual input for the Lipschitz estimate, and, for the block
loop's next pass, every token's FFN residual input.

Where a norm sits on a sub-layer's output (Gemma 2/3: `BlockParts.attn_output_norm`, `ffn_output_norm`),
the block output sees o_proj's output u_t through it: to first order a change d_t of u_t moves the
block output by g ⊙ d_t / r_t (g the norm's elementwise scale, r_t = rms(u_t)). So every statistic of
that projection's input is weighted per token by w_t = 1 / r_t², normalised to mean 1 (the weighted
sums are rescaled by n / Σw, `tokens` stays the token count), and mean(w) is kept as `attn_gain_sq` /
`ffn_gain_sq`: scorers then measure block-output change (docs/method.md), and the refit becomes the
least-squares fit of what the norm sees, weighted as the norm weighs it. Without such a norm w_t = 1.
"""

from __future__ import annotations

import contextlib
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
    # The block output energy and skip change (a score table's block scores and output norms): a pass that
    # builds no table skips them.
    block_energies: bool = False
    # Keep every token's FFN input (the residual stream after attention): where the attention stays as it
    # is, the pruned block's outputs follow from them without running the attention again.
    ffn_inputs: bool = False

    def union(self, other: StatsRequest) -> StatsRequest:
        return StatsRequest(
            ffn_gram=self.ffn_gram or other.ffn_gram,
            full_attn_gram=self.full_attn_gram or other.full_attn_gram,
            residual_sample=max(self.residual_sample, other.residual_sample),
            seed=self.seed,
            block_energies=self.block_energies or other.block_energies,
            ffn_inputs=self.ffn_inputs or other.ffn_inputs,
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
    # Only where requested (`StatsRequest.block_energies`), else None:
    output_sq: float | None = None  # sum over tokens of ||block output||^2
    skip_sq: float | None = None  # sum over tokens of ||block output - block input||^2 (what skipping it changes)
    residual_sample: torch.Tensor | None = None  # [S, hidden] FFN residual input h
    attn_in_sample: torch.Tensor | None = None  # [S, d_attn] o_proj inputs of the same tokens (unweighted)
    ffn_inputs: list[torch.Tensor] | None = None  # each batch's FFN residual input, where requested
    # mean over tokens of 1 / rms(sub-layer output)^2 where a norm follows o_proj / down_proj (else 1): the
    # attn_* / ffn_* statistics above are weighted by it per token, normalised to mean 1
    attn_gain_sq: float = 1.0
    ffn_gain_sq: float = 1.0
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
    stats = BlockStats(ffn_inputs=[] if request.ffn_inputs else None)
    if request.block_energies:
        stats.output_sq = stats.skip_sq = 0.0
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

    weight_sums = {"attn": 0.0, "ffn": 0.0}

    @float32
    def on_o_proj(_m, args, out):
        exact = args[0].dtype == torch.bfloat16 and parts.attn_output_norm is None
        x = args[0].reshape(-1, args[0].shape[-1]).float()
        stats.tokens += x.shape[0]
        if per_batch_sample:
            idx = torch.randperm(x.shape[0], generator=generator)[:per_batch_sample]
            pending["idx"] = idx
            stats.attn_in_sample = _cat(stats.attn_in_sample, x[idx])
        x, root = _weighted(x, out, parts.attn_output_norm, weight_sums, "attn")
        stats.attn_sum = _add(stats.attn_sum, _weighted_sum(x, root))
        stats.attn_gram = _accumulate_gram(stats.attn_gram, x, block_width, exact)

    def on_post_norm(_m, args):
        if request.ffn_inputs:  # the very tensor the block adds the FFN's output to: no copy, no rounding
            stats.ffn_inputs.append(inputs.keep(args[0]))
        if per_batch_sample:
            h = args[0].reshape(-1, args[0].shape[-1]).float()
            stats.residual_sample = _cat(stats.residual_sample, h[pending["idx"]])

    @float32
    def on_down_proj(_m, args, out):
        exact = args[0].dtype == torch.bfloat16 and parts.ffn_output_norm is None
        a, root = _weighted(args[0].reshape(-1, args[0].shape[-1]).float(), out, parts.ffn_output_norm, weight_sums,
                            "ffn")
        stats.ffn_sum = _add(stats.ffn_sum, _weighted_sum(a, root))
        stats.ffn_sq = _add(stats.ffn_sq, (a * a).sum(0))
        if request.ffn_gram:
            stats.ffn_gram = _accumulate_gram(stats.ffn_gram, a, 0, exact)

    def on_block_out(_m, args, out):
        skip, energy = skip_energies(args[0], out[0] if isinstance(out, tuple) else out)
        stats.skip_sq += skip
        stats.output_sq += energy

    handles = [
        parts.o_proj.register_forward_hook(on_o_proj),
        parts.post_attention_norm.register_forward_pre_hook(on_post_norm),
        parts.down_proj.register_forward_hook(on_down_proj),
    ]
    if request.block_energies:
        handles.append(block.register_forward_hook(on_block_out))
    try:
        outputs = run_block(block, inputs, layer=layer, keep_outputs=keep_outputs)
    finally:
        for h in handles:
            h.remove()
    with full_precision():
        stats.attn_gain_sq = _normalise(stats, weight_sums["attn"], parts.attn_output_norm, ("attn_sum", "attn_gram"))
        stats.ffn_gain_sq = _normalise(stats, weight_sums["ffn"], parts.ffn_output_norm,
                                       ("ffn_sum", "ffn_sq", "ffn_gram"))
    return stats, outputs


def norm_eps(norm: nn.Module) -> float:
    """The epsilon of an RMSNorm (its attribute is `eps` or `variance_epsilon`, by family)."""
    return float(getattr(norm, "eps", getattr(norm, "variance_epsilon", 1e-6)))


@torch.no_grad()
def norm_scale(norm: nn.Module) -> torch.Tensor:
    """The elementwise scale g of an RMSNorm, N(u) = g ⊙ u / rms(u), read off its output for a vector of
    ones (so Gemma's (1 + weight) and LLaMA's weight both come out right)."""
    weight = norm.weight  # float32 ones: the norms compute in float32 and return the input's dtype
    ones = torch.ones(1, weight.shape[0], dtype=torch.float32, device=weight.device)
    return (norm(ones).float() * (1 + norm_eps(norm)) ** 0.5).reshape(-1)


def token_weights(out: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """w_t = 1 / rms(u_t)^2 of the sub-layer outputs u that `norm` normalises (float32, flat over tokens)."""
    u = out.reshape(-1, out.shape[-1]).float()
    return 1.0 / (u.pow(2).mean(-1) + norm_eps(norm))


def _weighted(x: torch.Tensor, out: torch.Tensor, norm: nn.Module | None, sums: dict,
              key: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(x_t · sqrt(w_t), sqrt(w_t)): sums of squares and Gram products of the first are the weighted ones.
    Where no norm follows, (x, None)."""
    if norm is None:
        return x, None
    w = token_weights(out, norm).to(x.device)
    sums[key] += float(w.double().sum())
    root = w.sqrt()
    return x * root[:, None], root


def _weighted_sum(scaled: torch.Tensor, root: torch.Tensor | None) -> torch.Tensor:
    """Σ_t w_t x_t from the scaled x_t · sqrt(w_t)."""
    return scaled.sum(0) if root is None else root @ scaled


def _normalise(stats: BlockStats, weight_sum: float, norm: nn.Module | None, fields: tuple[str, ...]) -> float:
    """Rescale the weighted statistics so that the weights average 1 over the tokens; returns mean(w)."""
    if norm is None or not stats.tokens:
        return 1.0
    mean = weight_sum / stats.tokens
    for name in fields:
        value = getattr(stats, name)
        if value is not None:
            value.div_(mean)
    return mean


def _accumulate_gram(total: torch.Tensor | None, x: torch.Tensor, block_width: int,
                     bf16_exact: bool = False) -> torch.Tensor:
    """total + x^T x in float32, in place (a Gram matrix can be the largest tensor of a block's pass).

    With `bf16_exact` (x holds bfloat16 values, as activations computed in bf16 do), the products run on
    bf16 matrix units with float32 accumulation and a float32 result: every product of two bf16 values is
    exact in float32, so the result equals the float32 one up to summation order, at a third of the time
    on AMX. (What broke Qwen's refit was rounding each batch's *result* to bf16; nothing is rounded here.)"""
    with _bf16_products(bf16_exact):
        if total is None:
            return _gram(x, block_width)
        if not block_width or block_width == x.shape[1]:
            return total.addmm_(x.T, x)
        return total.add_(_gram(x, block_width))


@contextlib.contextmanager
def _bf16_products(enabled: bool):
    before = torch.get_float32_matmul_precision()
    if enabled:
        torch.set_float32_matmul_precision("medium")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def _gram(x: torch.Tensor, block_width: int) -> torch.Tensor:
    """x^T x, or only its diagonal blocks of `block_width` columns (as a full matrix, zero elsewhere)."""
    if not block_width or block_width == x.shape[1]:
        return x.T @ x
    blocks = x.reshape(x.shape[0], -1, block_width).transpose(0, 1)  # [groups, tokens, width]
    return torch.block_diag(*(blocks.transpose(1, 2) @ blocks))


def _cat(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    return b if a is None else torch.cat([a, b])
