"""The pruning pipeline, one way through: calibrate → score → allocate → select → cut → compensate.

`score` runs the model once (block by block) and returns a `ScoreTable`; `plan` turns a table into a
`PruningPlan` without the model; `prune` does both and cuts, either in parallel mode (blocks scored on
the dense model's activations) or sequentially (each block scored, cut and compensated on the outputs
of the already-pruned blocks before it).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace

import torch
from tqdm.auto import tqdm

from llm_bip.allocation import ALLOCATIONS, AllocationConfig, allocate
from llm_bip.block_loop import BlockInputs, capture_block_inputs, run_block
from llm_bip.compensation import add_output_bias, bias_shift, refit_weight
from llm_bip.errors import LlmBipError
from llm_bip.loading import LoadedModel
from llm_bip.params import block_costs, count_parameters
from llm_bip.plan import GQA_MODES, BlockPlan, BlockWidths, PruningPlan, select
from llm_bip.score_table import ScoreTable, model_fingerprint
from llm_bip.scoring import Scorer, make_scorer
from llm_bip.scoring.base import BlockGeometry
from llm_bip.stats import BlockStats, StatsRequest, collect_block_stats
from llm_bip.surgery import cut_block, head_columns
from llm_bip.two_stream import prune_block_two_stream

log = logging.getLogger(__name__)

CALIBRATION_MODES = ("parallel", "sequential")
COMPENSATIONS = ("none", "bias", "refit")
RATIO_OF = ("non-embedding", "total")
REFIT_TARGETS = ("layer", "dense")


@dataclass(frozen=True)
class PruneConfig:
    """Everything that decides the pruned model, recorded in its pruning record."""

    method: str = "llm-bip"
    ratio: float = 0.2
    ratio_of: str = "non-embedding"
    allocation: str = "uniform"
    gqa_mode: str = "kv-groups"
    prunable_layers: tuple[int, ...] | None = None
    round_to: int = 1
    # Defaults measured on SmolLM2-135M (docs/results.md): heads cost far more quality per parameter
    # than FFN channels, so the uniform default takes channels first (heads only once channels run
    # out); sequential calibration with a least-squares refit beats parallel and bias compensation.
    head_ratio: float | None = 0.0
    max_block_ratio: float = 0.9
    calibration_mode: str = "sequential"
    compensation: str = "refit"
    lipschitz: str = "jvp"
    refit_damping: float = 0.01  # down_proj's ridge, relative to each input's energy
    attn_refit_damping: float = 1.0  # o_proj's ridge: its LS fit overfits the calibration text at 0.01
    refit_target: str = "layer"  # sequential refit towards the block's own output, or the dense model's
    seed: int = 0

    def validate(self) -> None:
        if not 0 <= self.ratio < 1:
            raise LlmBipError(f"ratio {self.ratio} is outside [0, 1): give the fraction of parameters to remove, e.g. 0.2")
        for value, allowed, what in (
            (self.ratio_of, RATIO_OF, "ratio-of"), (self.allocation, ALLOCATIONS, "allocation"),
            (self.gqa_mode, GQA_MODES, "gqa-mode"), (self.calibration_mode, CALIBRATION_MODES, "calibration mode"),
            (self.compensation, COMPENSATIONS, "compensation"), (self.refit_target, REFIT_TARGETS, "refit target"),
        ):
            if value not in allowed:
                raise LlmBipError(f"unknown {what} '{value}': use one of {', '.join(allowed)}")
        if self.round_to < 1:
            raise LlmBipError("round-to must be a positive integer")
        if self.head_ratio is not None and not 0 <= self.head_ratio < 1:
            raise LlmBipError("head-ratio must be in [0, 1)")

    def allocation_config(self) -> AllocationConfig:
        return AllocationConfig(
            strategy=self.allocation, gqa_mode=self.gqa_mode, prunable_layers=self.prunable_layers,
            round_to=self.round_to, head_ratio=self.head_ratio, max_block_ratio=self.max_block_ratio,
        )

    def scorer(self) -> Scorer:
        # With bias compensation next, a structure costs its block-output change after compensation.
        return make_scorer(self.method, lipschitz=self.lipschitz, seed=self.seed, centered=self.compensation == "bias")


@dataclass
class PruneResult:
    plan: PruningPlan
    report: dict
    scores: ScoreTable | None = None
    timings: dict = field(default_factory=dict)


def geometry(loaded: LoadedModel, layer: int) -> BlockGeometry:
    head_dim = loaded.adapter.head_dim(loaded.model)
    heads, kv, channels = loaded.adapter.widths(loaded.adapter.blocks(loaded.model)[layer], head_dim)
    return BlockGeometry(layer, head_dim, heads, kv, channels)


def _costs(loaded: LoadedModel):
    head_dim = loaded.adapter.head_dim(loaded.model)
    return [block_costs(loaded.adapter, b, head_dim) for b in loaded.adapter.blocks(loaded.model)]


def _progress(iterable, desc: str, total: int | None = None, show: bool = True):
    return tqdm(iterable, desc=desc, total=total, disable=not show, unit="block", leave=False)


@torch.no_grad()
def score(
    loaded: LoadedModel, scorer: Scorer, samples: torch.Tensor, batch_size: int = 8,
    calibration: dict | None = None, progress: bool = True,
) -> ScoreTable:
    """Score every block on the dense model's activations (one forward pass per block)."""
    start = time.perf_counter()
    model, adapter = loaded.model, loaded.adapter
    scorer.prepare(loaded, samples, batch_size)
    inputs = capture_block_inputs(model, adapter, samples, batch_size)
    request = scorer.stats_request()
    table = []
    for layer, block in enumerate(_progress(adapter.blocks(model), f"scoring ({scorer.name})", show=progress)):
        g = geometry(loaded, layer)
        stats, inputs = collect_block_stats(block, adapter.parts(block), inputs, request, layer, g.group_width)
        table.append(scorer.score_block(adapter.parts(block), stats, g))
    return ScoreTable(
        scores=table, costs=_costs(loaded), fingerprint=model_fingerprint(model, adapter), method=scorer.name,
        options=scorer.options(), calibration=calibration or {}, comparable_units=scorer.comparable_units,
        seconds=time.perf_counter() - start,
    )


def target_parameters(loaded_or_counts, config: PruneConfig) -> int:
    counts = loaded_or_counts
    base = counts["total"] if config.ratio_of == "total" else counts["non_embedding"]
    return round(config.ratio * base)


def counts_from_table(table: ScoreTable, embedding: int) -> dict[str, int]:
    blocks = sum(c.total(c.num_heads, c.num_kv_heads, c.channels) for c in table.costs)
    return {"total": blocks + embedding, "embedding": embedding, "non_embedding": blocks}


def plan_widths(table_costs, target: int, config: PruneConfig, table: ScoreTable | None) -> list[BlockWidths]:
    config.validate()
    alloc = config.allocation_config()
    if alloc.strategy != "uniform" and table is not None and not table.comparable_units:
        log.warning("%s scores are not in one unit for heads and channels; %s allocation compares them anyway",
                    table.method, alloc.strategy)
    return allocate(table_costs, target, alloc, table.scores if table is not None else None)


def plan(table: ScoreTable, config: PruneConfig, embedding_parameters: int) -> PruningPlan:
    """A plan from saved scores alone: allocate widths, then keep the best structures in each block."""
    counts = counts_from_table(table, embedding_parameters)
    target = target_parameters(counts, config)
    widths = plan_widths(table.costs, target, config, table)
    blocks = [
        select(s.heads, s.groups, s.channels, w, config.gqa_mode, layer)
        for layer, (s, w) in enumerate(zip(table.scores, widths, strict=True))
    ]
    return PruningPlan(blocks=blocks, meta=_plan_meta(table.costs, widths, counts, target, config))


def _plan_meta(costs, widths: list[BlockWidths], counts: dict, target: int, config: PruneConfig) -> dict:
    after_blocks = sum(c.total(w.num_heads, w.num_kv_heads, w.channels) for c, w in zip(costs, widths, strict=True))
    removed = counts["non_embedding"] - after_blocks
    return {
        "config": _config_json(config),
        "target_removed": target,
        "removed": removed,
        "parameters_before": counts,
        "parameters_after": {
            "total": counts["total"] - removed, "embedding": counts["embedding"], "non_embedding": after_blocks,
        },
        "removed_fraction": {
            "total": removed / counts["total"], "non_embedding": removed / counts["non_embedding"],
        },
        "ratio_means": f"fraction of {config.ratio_of} parameters",
    }


def _config_json(config: PruneConfig) -> dict:
    data = asdict(config)
    data["prunable_layers"] = list(config.prunable_layers) if config.prunable_layers is not None else None
    return data


def prune(
    loaded: LoadedModel, config: PruneConfig, samples: torch.Tensor, batch_size: int = 8,
    calibration: dict | None = None, scores: ScoreTable | None = None, progress: bool = True,
) -> PruneResult:
    """Score (unless `scores` are given), plan, cut and compensate `loaded.model` in place."""
    config.validate()
    model, adapter = loaded.model, loaded.adapter
    scorer = config.scorer()
    timings: dict[str, float] = {}
    counts = count_parameters(model, adapter)
    costs = _costs(loaded)
    target = target_parameters(counts, config)
    start = time.perf_counter()

    sequential = config.calibration_mode == "sequential"
    needs_table = scores is None and (not sequential or config.allocation != "uniform")
    if scores is not None:
        scores.check_model(model, adapter)
    elif needs_table:
        scores = score(loaded, scorer, samples, batch_size, calibration, progress)
        timings["score"] = scores.seconds
    widths = plan_widths(costs, target, config, scores)  # fails fast, before any cutting

    head_dim = adapter.head_dim(model)
    blocks = adapter.blocks(model)
    if not sequential and config.compensation != "refit":
        plan_ = plan(scores, config, counts["embedding"])
        for layer, block in enumerate(blocks):
            bp = plan_.blocks[layer]
            if config.compensation == "bias":
                _bias_compensate(loaded, block, bp, scores.scores[layer].attn_mean, scores.scores[layer].ffn_mean)
            cut_block(adapter, block, bp, head_dim)
    else:
        plan_blocks = _cut_loop(loaded, config, scorer, samples, batch_size, widths, scores, progress)
        plan_ = PruningPlan(blocks=plan_blocks, meta=_plan_meta(costs, widths, counts, target, config))
    timings["prune_total"] = time.perf_counter() - start
    plan_.meta["calibration"] = calibration or {}
    plan_.meta["method"] = scorer.name
    plan_.meta["scorer_options"] = scorer.options()
    after = count_parameters(model, adapter)
    if after["total"] != plan_.meta["parameters_after"]["total"] and config.compensation == "none":
        raise AssertionError(f"parameter accounting is off: {after} vs {plan_.meta['parameters_after']}")
    plan_.meta["parameters_after"] = after  # exact, including any compensation biases
    report = dict(plan_.meta)
    report["timings_seconds"] = timings
    return PruneResult(plan=plan_, report=report, scores=scores, timings=timings)


def _cut_loop(
    loaded: LoadedModel, config: PruneConfig, scorer: Scorer, samples: torch.Tensor, batch_size: int,
    widths: list[BlockWidths], table: ScoreTable | None, progress: bool,
) -> list[BlockPlan]:
    """Walk the blocks once more: gather statistics on the current inputs, pick (sequential: re-score)
    the kept structures, cut, compensate, and pass the inputs on: through the pruned block when
    sequential, through the dense one when parallel."""
    model, adapter = loaded.model, loaded.adapter
    sequential = config.calibration_mode == "sequential"
    head_dim = adapter.head_dim(model)
    inputs: BlockInputs = capture_block_inputs(model, adapter, samples, batch_size)
    plans = []
    if sequential and config.compensation == "refit" and config.refit_target == "dense":
        dense_inputs = inputs
        for layer, block in enumerate(_progress(adapter.blocks(model), "pruning (sequential, dense targets)", show=progress)):
            bp, inputs, dense_inputs = prune_block_two_stream(
                loaded, block, geometry(loaded, layer), inputs, dense_inputs, scorer, widths[layer],
                config.gqa_mode, config.attn_refit_damping, config.refit_damping,
            )
            plans.append(bp)
        return plans
    desc = "pruning (sequential)" if sequential else "pruning"
    for layer, block in enumerate(_progress(adapter.blocks(model), desc, show=progress)):
        parts = adapter.parts(block)
        g = geometry(loaded, layer)
        cuts_heads = widths[layer].num_heads < g.num_heads
        block_scorer = scorer if cuts_heads else scorer.channels_only()
        block_request = block_scorer.stats_request() if sequential else StatsRequest()
        if config.compensation == "refit":
            block_request = block_request.union(StatsRequest(ffn_gram=True, full_attn_gram=cuts_heads))
        stats, dense_out = collect_block_stats(block, parts, inputs, block_request, layer, g.group_width)
        s = block_scorer.score_block(parts, stats, g) if sequential else table.scores[layer]
        bp = select(s.heads, s.groups, s.channels, widths[layer], config.gqa_mode, layer)
        if config.compensation == "bias":
            _bias_compensate(loaded, block, bp, stats.attn_mean, stats.ffn_mean)
        elif config.compensation == "refit":
            _refit(loaded, block, bp, stats, config.attn_refit_damping, config.refit_damping)
        cut_block(adapter, block, bp, head_dim)
        plans.append(bp)
        inputs = run_block(block, inputs, layer=layer) if sequential else dense_out
    return plans


def _removed_any(keep: list[int], size: int) -> bool:
    return len(keep) < size


def _bias_compensate(loaded: LoadedModel, block, bp: BlockPlan, attn_mean: torch.Tensor, ffn_mean: torch.Tensor) -> None:
    adapter = loaded.adapter
    parts = adapter.parts(block)
    head_dim = adapter.head_dim(loaded.model)
    cols = head_columns(bp.keep_heads, head_dim)
    if _removed_any(cols.tolist(), parts.o_proj.in_features):
        add_output_bias(adapter, parts.o_proj, bias_shift(parts.o_proj.weight, attn_mean, cols))
    keep = torch.tensor(bp.keep_channels, dtype=torch.long)
    if _removed_any(bp.keep_channels, parts.down_proj.in_features):
        add_output_bias(adapter, parts.down_proj, bias_shift(parts.down_proj.weight, ffn_mean, keep))


@torch.no_grad()
def _refit(loaded: LoadedModel, block, bp: BlockPlan, stats: BlockStats, attn_damping: float, damping: float) -> None:
    """Least-squares refit of o_proj and down_proj (with an intercept) on the kept inputs. The cut
    that follows keeps exactly those columns."""
    adapter = loaded.adapter
    parts = adapter.parts(block)
    head_dim = adapter.head_dim(loaded.model)
    n = stats.tokens
    for linear, keep, gram, mean, ridge in (
        (parts.o_proj, head_columns(bp.keep_heads, head_dim), stats.attn_gram, stats.attn_mean, attn_damping),
        (parts.down_proj, torch.tensor(bp.keep_channels, dtype=torch.long), stats.ffn_gram, stats.ffn_mean, damping),
    ):
        if not _removed_any(keep.tolist(), linear.in_features):
            continue
        if linear is parts.o_proj and stats.attn_gram_block:
            raise AssertionError("a refit of o_proj needs the full Gram matrix of its input")
        weight, bias = refit_weight(linear.weight, gram / n, keep, mean, ridge)
        full = linear.weight.detach().clone()
        full[:, keep] = weight.to(full.dtype)
        linear.weight.copy_(full)
        add_output_bias(adapter, linear, bias)


def widths_of(loaded: LoadedModel) -> list[dict]:
    head_dim = loaded.adapter.head_dim(loaded.model)
    out = []
    for block in loaded.adapter.blocks(loaded.model):
        heads, kv, channels = loaded.adapter.widths(block, head_dim)
        out.append({"num_attention_heads": heads, "num_key_value_heads": kv, "intermediate_size": channels})
    return out


__all__ = ["CALIBRATION_MODES", "COMPENSATIONS", "PruneConfig", "PruneResult", "plan", "prune", "replace", "score"]
