"""The pruning pipeline, one way through: calibrate → score → allocate → select → compensate → cut.

`score` walks the blocks once and returns a `ScoreTable`; `plan` turns a table into a `PruningPlan`
without the model; `prune` allocates widths and walks the blocks once more through the one block loop
(`block_loop.prune_blocks`), which scores (sequentially: on the outputs of the already pruned blocks),
selects, compensates and cuts each block in turn.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llm_bip.activations import BlockInputs, DiskSpill, capture_block_inputs
from llm_bip.allocation import allocate
from llm_bip.block_loop import BlockSource, Checkpoint, InMemoryBlocks, LoopResult, Selection, prune_blocks
from llm_bip.compensation import Compensator
from llm_bip.config import PruneConfig
from llm_bip.devices import free_memory_bytes, out_of_memory_is_an_error
from llm_bip.errors import LlmBipError
from llm_bip.fingerprint import fingerprint_of
from llm_bip.loading import LoadedModel
from llm_bip.params import BlockCosts, block_costs, count_parameters, counts_from_costs
from llm_bip.plan import BlockPlan, PruningPlan, select
from llm_bip.score_table import ScoreTable
from llm_bip.scoring import Scorer
from llm_bip.scoring.base import BlockGeometry
from llm_bip.widths import BlockWidths

log = logging.getLogger(__name__)

RECORD_FORMAT = "llm-bip-record/1"


@dataclass
class PruneResult:
    plan: PruningPlan
    report: dict
    scores: ScoreTable | None = None
    timings: dict = field(default_factory=dict)


def geometry(loaded: LoadedModel, layer: int) -> BlockGeometry:
    """Block `layer`'s geometry, for a scorer called outside the loop."""
    adapter = loaded.adapter
    return BlockGeometry(layer, adapter.head_dim, adapter.widths(adapter.blocks(loaded.model)[layer]))


def costs_of(loaded: LoadedModel) -> list[BlockCosts]:
    return [block_costs(loaded.adapter, b) for b in loaded.adapter.blocks(loaded.model)]


def target_parameters(counts: dict, config: PruneConfig) -> int:
    base = counts["total"] if config.ratio_of == "total" else counts["non_embedding"]
    return round(config.ratio * base)


def plan_widths(costs: list[BlockCosts], target: int, config: PruneConfig, table: ScoreTable | None) -> list[BlockWidths]:
    alloc = config.allocation_config()
    if alloc.strategy != "uniform" and table is not None and not table.comparable_units:
        log.warning("%s scores are not in one unit for heads and channels; %s allocation compares them anyway",
                    table.method, alloc.strategy)
    return allocate(costs, target, alloc, table.scores if table is not None else None)


def _keep_all(costs: list[BlockCosts]) -> list[BlockWidths]:
    return [c.widths for c in costs]


@dataclass
class Resume:
    """Where an interrupted run stopped: the next block, the loop's result so far, and (if the run
    passes activations on) the hidden states entering that block."""

    start: int
    result: LoopResult
    hidden: list[torch.Tensor] | None
    compensator_state: dict[str, torch.Tensor] = field(default_factory=dict)


def blocks_of(loaded: LoadedModel) -> BlockSource:
    """The model's blocks: in memory, or read from the checkpoint one at a time (streamed, not written)."""
    if loaded.streamed:
        from llm_bip.streaming import StreamedBlocks

        return StreamedBlocks(loaded)
    return InMemoryBlocks(loaded.model, loaded.adapter)


def activation_spill(loaded: LoadedModel, samples: torch.Tensor, directory: Path | None) -> DiskSpill | None:
    """Disk-backed activations when the calibration activations (in and out of a block) would take
    over a quarter of the free memory."""
    itemsize = torch.finfo(loaded.dtype).bits // 8
    need = 2 * samples.numel() * loaded.model.config.hidden_size * itemsize
    free = free_memory_bytes(torch.device("cpu"))
    if loaded.device.type != "cpu" or free is None or need <= free / 4:
        return None
    directory = directory or Path(tempfile.gettempdir())
    log.info("the calibration activations take %.1f GiB of %.1f GiB free: keeping them in files under %s",
             need / 2**30, free / 2**30, directory)
    return DiskSpill(directory)


def walk(loaded: LoadedModel, samples: torch.Tensor | None, batch_size: int, selection: Selection,
         compensator: Compensator, source: BlockSource | None = None, progress: bool = True,
         checkpoint: Checkpoint | None = None, resume: Resume | None = None,
         spill_dir: Path | None = None) -> LoopResult:
    """Run the one block loop over `loaded`, with calibration activations if anything needs them."""
    needs_activations = selection.scores_in_loop() or compensator.needs_activations(selection.table is not None)
    inputs = None
    if needs_activations:
        if samples is None:
            raise LlmBipError("this prune needs calibration samples")
        if selection.scores_in_loop():
            if loaded.streamed and type(selection.scorer).prepare is not Scorer.prepare:
                raise LlmBipError(f"{selection.scorer.name} needs a gradient pass over the whole model, which "
                                  "streaming cannot hold: use llm-bip, flap, wanda-sp, magnitude or random")
            selection.scorer.prepare(loaded, samples, batch_size)  # e.g. Taylor's gradient pass
        with out_of_memory_is_an_error(loaded.device, "catching the calibration activations"):
            if loaded.streamed:
                from llm_bip.streaming import input_side

                input_side(loaded, present=True)
            inputs = capture_block_inputs(loaded.model, loaded.adapter, samples, batch_size,
                                          activation_spill(loaded, samples, spill_dir))
        if loaded.streamed:
            input_side(loaded, present=False)
    start, result = 0, None
    if resume is not None:
        start, result = resume.start, resume.result
        if inputs is not None:
            keep = inputs.spill.keep if inputs.spill else (lambda t: t)
            inputs = BlockInputs([keep(h.to(loaded.device)) for h in resume.hidden], inputs.kwargs, inputs.spill)
    with out_of_memory_is_an_error(loaded.device, "pruning"):
        return prune_blocks(source or blocks_of(loaded), loaded.adapter, inputs, selection, compensator, start,
                            result, checkpoint, progress)


@torch.no_grad()
def score(
    loaded: LoadedModel, scorer: Scorer, samples: torch.Tensor, batch_size: int = 8,
    calibration: dict | None = None, progress: bool = True,
) -> ScoreTable:
    """Score every block on the dense model's activations: the block loop with every structure kept."""
    start = time.perf_counter()
    costs = costs_of(loaded)
    fingerprint = fingerprint_of(loaded)
    selection = Selection(widths=_keep_all(costs), scorer=scorer, sequential=False)
    result = walk(loaded, samples, batch_size, selection, Compensator(), progress=progress)
    return ScoreTable(
        scores=result.scores, costs=costs, fingerprint=fingerprint, method=scorer.name, options=scorer.options(),
        calibration=calibration or {}, comparable_units=scorer.comparable_units, seconds=time.perf_counter() - start,
    )


def plan(table: ScoreTable, config: PruneConfig, embedding_parameters: int) -> PruningPlan:
    """A plan from saved scores alone: allocate widths, then keep the best structures in each block."""
    config.validate_for(len(table.costs))
    counts = counts_from_costs(table.costs, embedding_parameters)
    target = target_parameters(counts, config)
    widths = plan_widths(table.costs, target, config, table)
    blocks = [
        select(s.heads, s.groups, s.channels, w, config.gqa_mode, layer)
        for layer, (s, w) in enumerate(zip(table.scores, widths, strict=True))
    ]
    meta = plan_meta(table.costs, widths, counts, target)
    meta.update(config=config.to_json(), method=table.method, scorer_options=table.options, calibration=table.calibration)
    return PruningPlan(blocks=blocks, meta=meta, fingerprint=table.fingerprint)


def plan_meta(costs: list[BlockCosts], widths: list[BlockWidths], counts: dict, target: int | None) -> dict:
    after_blocks = sum(c.total(w) for c, w in zip(costs, widths, strict=True))
    removed = counts["non_embedding"] - after_blocks
    return {
        "target_removed": target,
        "removed": removed,
        "parameters_before": counts,
        "parameters_after": {
            "total": counts["total"] - removed, "embedding": counts["embedding"], "non_embedding": after_blocks,
        },
        "removed_fraction": {"total": removed / counts["total"], "non_embedding": removed / counts["non_embedding"]},
    }


def check_scores_apply(scores: ScoreTable, config: PruneConfig) -> None:
    """Saved scores must be this method's, with these options, and must be used by this recipe."""
    scorer = config.scorer()
    if scores.method != scorer.name or scores.options != scorer.options():
        raise LlmBipError(f"the scores file holds {scores.method} scores with {scores.options}, but this prune asks "
                          f"for {scorer.name} with {scorer.options()}: score again with these options or drop --scores")
    if config.sequential and config.allocation == "uniform":
        raise LlmBipError("--scores does nothing here: sequential calibration re-scores every block on the pruned "
                          "model's activations, and uniform allocation needs no scores; pass --calibration-mode "
                          "parallel to prune from the saved scores, or drop --scores")


def prune(
    loaded: LoadedModel, config: PruneConfig, samples: torch.Tensor | None, batch_size: int = 8,
    calibration: dict | None = None, scores: ScoreTable | None = None, progress: bool = True,
    fixed_plan: PruningPlan | None = None, source: BlockSource | None = None, checkpoint: Checkpoint | None = None,
    resume: Resume | None = None, spill_dir: Path | None = None,
) -> PruneResult:
    """Score (unless `scores` are given), allocate, select, compensate and cut `loaded.model` in place.

    With `fixed_plan`, its selections are applied as they are (the structure-deciding fields of
    `config` are not used); compensation and calibration mode still apply. With `scores` (parallel
    mode), no scoring pass runs; with sequential calibration and an adaptive allocation they decide the
    widths only, and every block is re-scored on the pruned model's activations."""
    config.validate_for(loaded.adapter.num_blocks)
    model, adapter = loaded.model, loaded.adapter
    started = time.perf_counter()
    timings: dict[str, float] = {}
    fingerprint = fingerprint_of(loaded)
    costs = costs_of(loaded)
    counts = count_parameters(model, adapter)
    scorer = config.scorer()
    if fixed_plan is not None:
        fixed_plan.check_model(fingerprint, "the plan")
        widths, target = [b.widths for b in fixed_plan.blocks], None
        if len(widths) != adapter.num_blocks:
            raise LlmBipError(f"the plan has {len(widths)} blocks but the model has {adapter.num_blocks}")
        selection = Selection(gqa_mode=config.gqa_mode, widths=widths, fixed=fixed_plan.blocks,
                              sequential=config.sequential)
        how = "saved plan"
    else:
        target = target_parameters(counts, config)
        if scores is not None:
            scores.check_fingerprint(fingerprint, "the scores file")
            check_scores_apply(scores, config)
            how = "saved scores" + (" (allocation only; blocks re-scored sequentially)" if config.sequential else "")
        elif config.allocation != "uniform":
            scores = score(loaded, scorer, samples, batch_size, calibration, progress)  # adaptive needs every score first
            timings["score"] = scores.seconds
            how = f"{scorer.name} scores ({config.calibration_mode})"
        else:
            how = f"{scorer.name} scores ({config.calibration_mode})"
        widths = plan_widths(costs, target, config, scores)  # fails fast, before any cutting
        selection = Selection(gqa_mode=config.gqa_mode, widths=widths, scorer=scorer,
                              table=None if config.sequential else scores, sequential=config.sequential)
    compensator = config.compensator(loaded.adapter)
    start = time.perf_counter()
    if resume is not None:
        compensator.load_state(resume.compensator_state)
    result = walk(loaded, samples, batch_size, selection, compensator, source, progress, checkpoint, resume, spill_dir)
    timings["prune"] = time.perf_counter() - start
    timings["total"] = time.perf_counter() - started
    blocks: list[BlockPlan] = result.plans
    meta = plan_meta(costs, [b.widths for b in blocks], counts, target)
    meta.update(method=scorer.name if fixed_plan is None else None, scorer_options=scorer.options() if fixed_plan is None else None,
                calibration=calibration or {})
    plan_ = PruningPlan(blocks=blocks, meta=dict(meta, config=config.to_json()), fingerprint=fingerprint)
    report = {
        "format": RECORD_FORMAT,
        **meta,
        "config": config.to_json() if fixed_plan is None else _applied_config(config),
        "selection": how,
        "calibration_mode": config.calibration_mode if result.inputs is not None else "none (no forward pass needed)",
        "compensation": {"method": compensator.name, "blocks": result.compensation},
        "source_fingerprint": fingerprint,
        "timings_seconds": timings,
    }
    if fixed_plan is not None:
        report["applied_plan"] = {"fingerprint": fixed_plan.fingerprint, "meta": fixed_plan.meta}
    report["parameters_after"] = count_parameters(model, adapter)  # exact, compensation biases included
    report["plan"] = plan_.to_json()["blocks"]
    return PruneResult(plan=plan_, report=report, scores=scores, timings=timings)


def _applied_config(config: PruneConfig) -> dict:
    """What of the config applies on top of a saved plan."""
    return {k: v for k, v in config.to_json().items()
            if k in ("calibration_mode", "compensation", "refit_damping", "attn_refit_damping", "refit_target",
                     "refit_intercept", "seed")}


def widths_of(loaded: LoadedModel) -> list[BlockWidths]:
    return [loaded.adapter.widths(b) for b in loaded.adapter.blocks(loaded.model)]
