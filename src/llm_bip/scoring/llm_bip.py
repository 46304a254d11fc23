"""LLM-BIP: importance = influence on the block's own output, in one forward pass (METHOD.md).

FFN channel k (exact):  ||W_down[:, k]|| · ||a_k||  over the calibration tokens.
Head h (bound):         (1 + L) · ||W_o[:, cols(h)] o_h||_F, a KV group by summing its heads first.
L variants: "none" (L = 0), "jvp" (power iteration on a token sample, the RMS of the per-token
spectral norms), and "exact", the reference: the true ||Δy|| of removing each head on the sample.

`centered`: the block-output change of removing a structure *and* adding its mean contribution
back as a bias, which is what bias compensation does next: the same norms over the centered inputs
(a − mean, o − mean). A channel whose output is nearly constant costs nothing once compensated.
"""

from __future__ import annotations

import torch

from llm_bip.adapters import BlockParts
from llm_bip.scoring.base import BlockGeometry, BlockScores, Scorer, head_output_norms
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
        w_o = parts.o_proj.weight.float()
        ffn_sq, attn_gram = stats.ffn_sq, stats.attn_gram
        if self.centered:
            ffn_sq = stats.tokens * stats.ffn_var
            attn_gram = attn_gram - stats.tokens * torch.outer(stats.attn_mean, stats.attn_mean)
        channels = parts.down_proj.weight.float().norm(dim=0) * ffn_sq.sqrt()
        heads = head_output_norms(w_o, attn_gram, hd, 1)
        groups = head_output_norms(w_o, attn_gram, hd, geometry.group_size)
        lipschitz = 0.0
        if self.lipschitz == "jvp":
            sigma = jvp_power_iteration(parts.post_attention_norm, parts.mlp, stats.residual_sample,
                                        self.iterations, self.seed + geometry.layer)
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

        def change(cols: slice) -> torch.Tensor:
            u = o[:, cols] @ w_o[:, cols].T
            return exact_output_change(parts.post_attention_norm, parts.mlp, h, u).norm() * scale

        heads = torch.stack([change(slice(i * hd, (i + 1) * hd)) for i in range(geometry.num_heads)])
        gw = hd * geometry.group_size
        groups = torch.stack([change(slice(g * gw, (g + 1) * gw)) for g in range(geometry.num_kv_heads)])
        return heads, groups
