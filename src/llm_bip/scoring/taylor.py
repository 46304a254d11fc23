"""LLM-Pruner's first-order Taylor importance (Ma et al., NeurIPS 2023; horseee/LLM-Pruner,
`LLMPruner/pruner/hf_llama_pruner.py` TaylorImportance with group reduction "sum").

Salience of a weight: s = W · dL/dW, L the language-modelling loss on the calibration samples.

- element1 (LLM-Pruner's `param_first`): sum over every weight of the group of |s|;
- vector (`vectorize`): for each weight vector of the group (a row of q/k/v/gate/up, a column of o/down)
  |sum of s over the vector|, summed over the group's vectors.

Groups (LLM-Pruner's dependency groups, GQA-aware): a query head = its q rows and o columns; a KV
group = its query heads plus its k and v rows; an FFN channel = its gate row, up row and down column.
Weights only (the source skips biases), no norms (q/k norms are shared by all heads).

Memory: one gradient pass over the whole model, but never a full set of gradient buffers. Only the
seven projection weights of each block require grad; a post-accumulate hook folds each weight's
gradient into per-row/column accumulators and drops it at once (a fused weight, Phi-3's qkv_proj or
gate_up_proj, gets one hook that folds each projection's rows of it). The samples go through in batches,
each loss weighted by its share of the tokens, so the vector variant (linear in the gradient) equals
the full-data gradient's; element1 takes |s| per batch, which equals LLM-Pruner's (one batch of 10
texts) when the samples fit one batch and is a sum over batches otherwise.
"""

from __future__ import annotations

import torch

from llm_bip.adapters import BlockParts
from llm_bip.adapters.base import weight_rows
from llm_bip.errors import LlmBipError
from llm_bip.scoring.base import BlockGeometry, BlockScores, Scorer
from llm_bip.stats import BlockStats

TAYLOR_VARIANTS = ("element1", "vector")
# Each projection and the axis its structures index: rows of the "in" projections, columns of o/down.
_PROJECTIONS = (("q", 1), ("k", 1), ("v", 1), ("o", 0), ("gate", 1), ("up", 1), ("down", 0))


def _weight_rows(parts: BlockParts, name: str) -> tuple[torch.nn.Parameter, slice]:
    return weight_rows(getattr(parts, f"{name}_proj"))


class TaylorScorer(Scorer):
    name = "taylor"

    def __init__(self, variant: str = "element1") -> None:
        if variant not in TAYLOR_VARIANTS:
            raise LlmBipError(f"unknown Taylor variant '{variant}': use one of {', '.join(TAYLOR_VARIANTS)}")
        self.variant = variant
        self.name = "taylor" if variant == "element1" else "taylor-vector"
        self._acc: list[dict[str, torch.Tensor]] | None = None

    def options(self) -> dict:
        return {"variant": self.variant}

    def prepare(self, loaded, samples: torch.Tensor, batch_size: int) -> None:
        """One gradient pass of the LM loss over `samples`, folded into per-structure accumulators."""
        model, adapter = loaded.model, loaded.adapter
        blocks = adapter.blocks(model)
        acc: list[dict[str, torch.Tensor]] = [{} for _ in blocks]
        was_grad = {p: p.requires_grad for p in model.parameters()}
        was_training = model.training
        handles = []

        def fold(layer: int, projections: list[tuple[str, int, slice]]):
            def hook(p: torch.Tensor) -> None:
                salience = p.detach().float() * p.grad.float()
                for name, axis, rows in projections:
                    s = salience[rows]
                    part = s.abs().sum(axis) if self.variant == "element1" else s.sum(axis)  # abs later: linear
                    acc[layer][name] = part if name not in acc[layer] else acc[layer][name] + part
                p.grad = None  # no gradient buffer outlives its own accumulation

            return hook

        try:
            for p in model.parameters():
                p.requires_grad_(False)
            for layer, block in enumerate(blocks):
                parts = adapter.parts(block)
                by_weight: dict[torch.nn.Parameter, list[tuple[str, int, slice]]] = {}
                for name, axis in _PROJECTIONS:
                    weight, rows = _weight_rows(parts, name)
                    by_weight.setdefault(weight, []).append((name, axis, rows))
                for weight, projections in by_weight.items():
                    weight.requires_grad_(True)
                    handles.append(weight.register_post_accumulate_grad_hook(fold(layer, projections)))
            model.eval()
            device = next(model.parameters()).device
            predicted = samples.shape[0] * (samples.shape[1] - 1)
            with torch.enable_grad():
                for start in range(0, samples.shape[0], batch_size):
                    batch = samples[start : start + batch_size].to(device)
                    loss = model(input_ids=batch, labels=batch, use_cache=False).loss
                    # Mean over all samples' tokens, batch by batch: weight each batch's mean by its share.
                    (loss.float() * (batch.shape[0] * (batch.shape[1] - 1) / predicted)).backward()
        finally:
            for h in handles:
                h.remove()
            for p, flag in was_grad.items():
                p.grad = None
                p.requires_grad_(flag)
            model.train(was_training)
        if self.variant == "vector":
            acc = [{k: v.abs() for k, v in a.items()} for a in acc]
        self._acc = acc

    @torch.no_grad()
    def score_block(self, parts: BlockParts, stats: BlockStats, geometry: BlockGeometry) -> BlockScores:
        if self._acc is None or geometry.layer >= len(self._acc) or not self._acc[geometry.layer]:
            raise LlmBipError(
                "taylor scores come from a gradient pass before the block loop (Scorer.prepare): score the "
                "model with parallel calibration (it has no sequential mode)"
            )
        a = self._acc[geometry.layer]
        hd = geometry.head_dim
        if a["q"].numel() != geometry.num_heads * hd or a["gate"].numel() != geometry.channels:
            raise LlmBipError("taylor accumulators do not match this block's widths: was the model cut after scoring?")
        heads = a["q"].reshape(geometry.num_heads, hd).sum(1) + a["o"].reshape(geometry.num_heads, hd).sum(1)
        kv = (a["k"] + a["v"]).reshape(geometry.num_kv_heads, hd).sum(1)
        groups = heads.reshape(geometry.num_kv_heads, geometry.group_size).sum(1) + kv
        channels = a["gate"] + a["up"] + a["down"]
        return self._scores(stats, heads, groups, channels)


def gradient_pass_bytes(loaded, batch_size: int, seq_len: int) -> int:
    """A deliberately generous estimate of the memory the gradient pass adds to the loaded model.

    Per token and block the backward keeps about a dozen hidden-size vectors (norms, residuals, q/k/v/o
    with RoPE copies), five intermediate-size ones (gate, up, activation, product, down input) and the
    attention probabilities (heads × seq_len) when the kernel materialises them, all counted as fp32
    even under bf16 autocast, which keeps both copies of some. The logits, their log-softmax and
    gradient cost three vocab-size fp32 vectors per token; autocast caches a bf16 copy of every weight
    that requires grad; one weight's gradient and salience live at a time.
    """
    config = loaded.model.config
    hidden, inter = config.hidden_size, config.intermediate_size
    heads, layers = config.num_attention_heads, config.num_hidden_layers
    tokens = batch_size * seq_len
    per_token_layer = 4 * (16 * hidden + 5 * inter + 2 * heads * seq_len)
    activations = tokens * layers * per_token_layer
    logits = 3 * 4 * tokens * config.vocab_size
    blocks = loaded.adapter.blocks(loaded.model)
    block_weights = sum(p.numel() for b in blocks for p in b.parameters())
    largest = max(p.numel() for b in blocks for p in b.parameters())
    return activations + logits + 2 * block_weights + 3 * 4 * largest


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), or None where that cannot be read."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_gradient_memory(loaded, batch_size: int, seq_len: int, headroom: float = 0.9) -> int:
    """Raise before any long work when the gradient pass cannot fit; returns the estimate in bytes."""
    need = gradient_pass_bytes(loaded, batch_size, seq_len)
    have = available_memory_bytes()
    if have is not None and need > headroom * have:
        raise LlmBipError(
            f"taylor's gradient pass needs about {need / 2**30:.1f} GiB for batches of {batch_size} × {seq_len} "
            f"tokens, but only {have / 2**30:.1f} GiB is available: lower --batch-size or --seq-len"
        )
    return need

