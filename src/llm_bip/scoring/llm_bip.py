"""LLM-BIP: importance = influence on the block's own output, in one forward pass (METHOD.md).

FFN channel k (exact):  ||W_down[:, k]|| · ||a_k||  over the calibration tokens.
Head h (bound):         (1 + L) · ||W_o[:, cols(h)] o_h||_F, a KV group by summing its heads first.
L variants: "none" (L = 0), "jvp" (power iteration on a token sample, the RMS of the per-token
spectral norms), and "exact", the reference: the true ||Δy|| of removing each head on the sample.

Where a norm follows o_proj / down_proj (Gemma 2/3), the same norms are taken of what reaches the
block output to first order: W becomes diag(g) W and each token is weighted by 1 / rms(sub-layer
output)^2 (stats.py; docs/method.md, "Norms after the sub-layers"), and L is that of N3∘F∘N2.

`centered`: the block-output change of removing a structure *and* adding its mean contribution
back as a bias, which is what bias compensation does next: the same norms over the centered inputs
(a − mean, o − mean). A channel whose output is nearly constant costs nothing once compensated.
"""

from __future__ import annotations

import torch

from llm_bip.adapters import BlockParts
from llm_bip.scoring.base import BlockGeometry, BlockScores, Scorer, block_output_weight, head_output_norms
from llm_bip.scoring.lipschitz import exact_output_change, jvp_power_iteration
from llm_bip.stats import BlockStats, StatsRequest

LIPSCHITZ_VARIANTS = ("none", "jvp", "exact")


class LlmBipScorer(Scorer):
    name = "llm-bip"
    comparable_units = True

    def __init__(self, lipschitz: str = "jvp", sample_tokens: int = 256, iterations: int = 8, seed: int = 0,
                 centered: bool = False) -> None:
        if lipschitz not in LIPSCHITZ_VARIANTS:
            raise ValueError(f"lipschitz must be one of {LIPSCHITZ_VARIANTS}")
        self.lipschitz, self.sample_tokens, self.iterations, self.seed = lipschitz, sample_tokens, iterations, seed
        self.centered = centered

    def options(self) -> dict:
        return {"lipschitz": self.lipschitz, "lipschitz_sample_tokens": self.sample_tokens, "centered": self.centered}

    def channels_only(self) -> Scorer:
        # L scales head scores only; channel scores are exact without it.
        return LlmBipScorer("none", self.sample_tokens, self.iterations, self.seed, self.centered)

    def stats_request(self) -> StatsRequest:
        return StatsRequest(residual_sample=0 if self.lipschitz == "none" else self.sample_tokens, seed=self.seed)

    @torch.no_grad()
    def score_block(self, parts: BlockParts, stats: BlockStats, geometry: BlockGeometry) -> BlockScores:
        hd = geometry.head_dim
        w_o = block_output_weight(parts.o_proj, parts.attn_output_norm)
        w_down = block_output_weight(parts.down_proj, parts.ffn_output_norm)
        ffn_sq, attn_gram = stats.ffn_sq, stats.attn_gram
        if self.centered:
            ffn_sq = stats.tokens * stats.ffn_var
            attn_gram = attn_gram - stats.tokens * torch.outer(stats.attn_mean, stats.attn_mean)
        channels = w_down.norm(dim=0) * ffn_sq.sqrt() * stats.ffn_gain_sq**0.5
        heads = head_output_norms(w_o, attn_gram, hd, 1) * stats.attn_gain_sq**0.5
        groups = head_output_norms(w_o, attn_gram, hd, geometry.group_size) * stats.attn_gain_sq**0.5
        lipschitz = 0.0
        if self.lipschitz == "jvp":
            sigma = jvp_power_iteration(parts.post_attention_norm, parts.mlp, stats.residual_sample,
                                        self.iterations, self.seed + geometry.layer, parts.ffn_output_norm)
            lipschitz = float(sigma.pow(2).mean().sqrt())
            heads, groups = (1 + lipschitz) * heads, (1 + lipschitz) * groups
        elif self.lipschitz == "exact":
            heads, groups = self._exact(parts, stats, geometry)
        return self._scores(stats, heads, groups, channels, lipschitz)

    def _exact(self, parts: BlockParts, stats: BlockStats, geometry: BlockGeometry) -> tuple[torch.Tensor, torch.Tensor]:
        """True block-output change of removing each head / group, measured on the token sample and
        scaled to the full token count."""
        hd, w_o = geometry.head_dim, parts.o_proj.weight.float()
        o, h = stats.attn_in_sample, stats.residual_sample
        scale = (stats.tokens / o.shape[0]) ** 0.5

        attn_norm = parts.attn_output_norm
        if attn_norm is not None:  # what the attention adds to the residual is N(u) of its whole output u
            full = o @ w_o.T + (parts.o_proj.bias.float() if parts.o_proj.bias is not None else 0)
            added = attn_norm(full.to(attn_norm.weight.dtype)).float()

        def change(cols: slice) -> torch.Tensor:
            u = o[:, cols] @ w_o[:, cols].T
            if attn_norm is not None:
                u = added - attn_norm((full - u).to(attn_norm.weight.dtype)).float()
            return exact_output_change(parts.post_attention_norm, parts.mlp, h, u, parts.ffn_output_norm).norm() * scale

        heads = torch.stack([change(slice(i * hd, (i + 1) * hd)) for i in range(geometry.num_heads)])
        gw = hd * geometry.group_size
        groups = torch.stack([change(slice(g * gw, (g + 1) * gw)) for g in range(geometry.num_kv_heads)])
        return heads, groups
