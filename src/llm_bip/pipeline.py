"""The pruning pipeline, one way through: calibrate → score → allocate → select → compensate → cut.

`score` walks the blocks once and returns a `ScoreTable`; `plan` turns a table into a `PruningPlan`
without the model; `prune` chooses the blocks to remove whole (if any: `depth.py`), allocates widths
over the rest and walks the blocks once more through the one block loop (`block_loop.prune_blocks`),
which scores (sequentially: on the outputs of the already pruned blocks), selects, compensates and cuts
each block in turn, skipping the removed ones; they are deleted from the model at the end.

The ratio is the total fraction removed: the removed blocks' parameters count towards it, and width
pruning takes the rest from the remaining prunable blocks.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llm_bip.activations import BlockInputs, DiskSpill, capture_block_inputs
from llm_bip.allocation import allocate, head_units, widths_after
from llm_bip.block_loop import BlockSource, Checkpoint, InMemoryBlocks, LoopResult, Selection, prune_blocks
from llm_bip.compensation import Compensator
from llm_bip.config import PruneConfig
from llm_bip.depth import choose_by_measuring, choose_from_scores
from llm_bip.devices import free_memory_bytes, out_of_memory_is_an_error
from llm_bip.errors import LlmBipError
from llm_bip.fingerprint import fingerprint_of
from llm_bip.loading import LoadedModel
from llm_bip.params import BlockCosts, block_costs, count_parameters, counts_from_costs
from llm_bip.plan import BlockPlan, PruningPlan, select
from llm_bip.reconstruction import Reconstruction, split_batches
from llm_bip.score_table import ScoreTable
from llm_bip.scoring import Scorer
from llm_bip.scoring.base import BlockGeometry
from llm_bip.sensitivity import SENSITIVITY_NEEDS_MEMORY, Sensitivity, measure_blocks
from llm_bip.speed.rounding import Timer, round_widths
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


def target_parameters(counts: dict, config: PruneConfig) -> int | None:
    """Parameters to remove in all (None: only whole blocks, as many as they hold)."""
    if config.ratio is None:
        return None
    return round(config.ratio * _ratio_base(counts, config))


def _ratio_base(counts: dict, config: PruneConfig) -> int:
    return counts["total"] if config.ratio_of == "total" else counts["non_embedding"]


def depth_parameters(costs: list[BlockCosts], removed: list[int]) -> int:
    """Parameters of whole blocks (everything in them)."""
    return sum(costs[layer].total(costs[layer].widths) for layer in removed)


def width_target(costs: list[BlockCosts], removed: list[int], target: int | None, counts: dict,
                 config: PruneConfig) -> int:
    """What width pruning must remove once `removed` blocks are gone: the rest of the target (0 without a
    ratio). Depth alone beyond the ratio is an error."""
    if target is None:
        return 0
    depth = depth_parameters(costs, removed)
    if depth > target:
        base = _ratio_base(counts, config)
        raise LlmBipError(
            f"removing {len(removed)} block(s) takes {depth:,} parameters ({depth / base:.2%} of {config.ratio_of} "
            f"parameters), more than --ratio {config.ratio} removes in all ({target:,}): the ratio counts the removed "
            f"blocks too, so raise it to at least {math.ceil(depth / base * 1000) / 1000}, remove fewer blocks, or "
            "leave --ratio out to remove only the blocks"
        )
    return target - depth


def check_depth_fits(costs: list[BlockCosts], target: int | None, counts: dict, config: PruneConfig) -> None:
    """Fail fast, before any pass: even the cheapest blocks that could be removed exceed the ratio."""
    n = config.blocks_to_remove(len(costs))
    if n:
        candidates = config.depth_candidates(len(costs))
        cheapest = sorted(candidates, key=lambda layer: depth_parameters(costs, [layer]))[:n]
        width_target(costs, cheapest, target, counts, config)


def check_depth(loaded: LoadedModel, config: PruneConfig) -> None:
    """The depth checks that need the model's shapes (not its activations): the number of blocks to remove,
    and whether even the cheapest of them fit the ratio."""
    config.validate_for(loaded.adapter.num_blocks)
    counts = count_parameters(loaded.model, loaded.adapter)
    check_depth_fits(costs_of(loaded), target_parameters(counts, config), counts, config)


def plan_widths(costs: list[BlockCosts], target: int, config: PruneConfig, table: ScoreTable | None,
                removed: Sequence[int] = (), sensitivity: Sensitivity | None = None) -> list[BlockWidths]:
    """Widths of every block that remove `target` parameters from the prunable blocks not in `removed`
    (whose widths stay as they are)."""
    alloc = config.allocation_config()
    if removed or target == 0:
        if target == 0:
            return _keep_all(costs)
        layers = alloc.prunable_layers if alloc.prunable_layers is not None else range(len(costs))
        remaining = tuple(i for i in layers if i not in removed)
        if not remaining:
            raise LlmBipError(f"no prunable block is left to take the other {target:,} parameters once blocks "
                              f"{list(removed)} are removed: widen --layers, remove fewer blocks or lower --ratio")
        alloc = dataclasses.replace(alloc, prunable_layers=remaining)
    if alloc.strategy != "uniform" and table is not None and not table.comparable_units:
        log.warning("%s scores are not in one unit for heads and channels; %s allocation compares them anyway",
                    table.method, alloc.strategy)
    return allocate(costs, target, alloc, table.scores if table is not None else None,
                    sensitivity.curvature(config.sensitivity_exponent) if sensitivity is not None else None)


def measure_sensitivity(loaded: LoadedModel, costs: list[BlockCosts], target: int, config: PruneConfig,
                        samples: torch.Tensor | None, removed: Sequence[int], batch_size: int,
                        progress: bool) -> Sensitivity | None:
    """Each prunable block's end-to-end sensitivity (sensitivity.py), with a trial cut of the fraction of
    channels the uniform plan would take from it, and with head ratio "auto" of one head unit too; None where
    there is nothing to measure."""
    if samples is None:
        raise LlmBipError("sensitivity allocation measures each block on calibration samples: give them")
    uniform = plan_widths(costs, target, _uniform_for(config), None, removed)
    measured = [i for i, (c, w) in enumerate(zip(costs, uniform, strict=True))
                if w.channels < c.widths.channels and i not in removed]
    if not measured:
        return None
    fraction = sum(1 - uniform[i].channels / costs[i].widths.channels for i in measured) / len(measured)
    head_trials = None
    if config.head_ratio == "auto":
        layers = config.prunable_layers if config.prunable_layers is not None else range(len(costs))
        head_trials = {}
        for i in layers:
            unit = head_units(costs[i], config.gqa_mode)
            if i not in removed and unit.count > 1:
                head_trials[i] = widths_after(costs[i], unit, 1, 0)
    refit = config.compensator(loaded.adapter) if config.sensitivity_refit_samples else None
    # A fitted exponent's second trial cuts half as much: the blocks the allocation spares lose less than the
    # uniform share, while those it takes more from are held by the cap close above it.
    low = fraction / 2 if config.sensitivity_exponent == "fit" else None
    return measure_blocks(loaded, samples, fraction, measured, list(removed), config.sensitivity_samples,
                          batch_size, progress, head_trials, config.gqa_mode, refit, config.sensitivity_refit_samples,
                          low)


def _uniform_for(config: PruneConfig) -> PruneConfig:
    """The uniform plan sensitivity allocation starts from (heads channels-first where 'auto' measures them)."""
    return dataclasses.replace(config, allocation="uniform",
                               head_ratio=0.0 if config.head_ratio == "auto" else config.head_ratio)


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


def catch_inputs(loaded: LoadedModel, samples: torch.Tensor, batch_size: int,
                 spill_dir: Path | None = None) -> BlockInputs:
    """The calibration activations entering block 0 (a streamed model's embedding is read and freed again)."""
    with out_of_memory_is_an_error(loaded.device, "catching the calibration activations"):
        if loaded.streamed:
            from llm_bip.streaming import input_side

            input_side(loaded, present=True)
        inputs = capture_block_inputs(loaded.model, loaded.adapter, samples, batch_size,
                                      activation_spill(loaded, samples, spill_dir))
    if loaded.streamed:
        input_side(loaded, present=False)
    return inputs


def walk(loaded: LoadedModel, samples: torch.Tensor | None, batch_size: int, selection: Selection,
         compensator: Compensator, source: BlockSource | None = None, progress: bool = True,
         checkpoint: Checkpoint | None = None, resume: Resume | None = None,
         spill_dir: Path | None = None, reconstruction: Reconstruction | None = None, seed: int = 0) -> LoopResult:
    """Run the one block loop over `loaded`, with calibration activations if anything needs them."""
    needs_activations = (selection.scores_in_loop() or compensator.needs_activations(selection.table is not None)
                         or reconstruction is not None)
    inputs = None
    if needs_activations:
        if samples is None:
            raise LlmBipError("this prune needs calibration samples")
        if selection.scores_in_loop():
            if loaded.streamed and type(selection.scorer).prepare is not Scorer.prepare:
                raise LlmBipError(f"{selection.scorer.name} needs a gradient pass over the whole model, which "
                                  "streaming cannot hold: use llm-bip, flap, wanda-sp, magnitude or random")
            selection.scorer.prepare(loaded, samples, batch_size)  # e.g. Taylor's gradient pass
        inputs = catch_inputs(loaded, samples, batch_size, spill_dir)
    start, result = 0, None
    if resume is not None:
        start, result = resume.start, resume.result
        if inputs is not None:
            inputs = inputs.with_hidden([inputs.keep(h.to(loaded.device)) for h in resume.hidden])
    with out_of_memory_is_an_error(loaded.device, "pruning"):
        return prune_blocks(source or blocks_of(loaded), loaded.adapter, inputs, selection, compensator, start,
                            result, checkpoint, progress, reconstruction, seed)


@torch.no_grad()
def score(
    loaded: LoadedModel, scorer: Scorer, samples: torch.Tensor, batch_size: int = 8,
    calibration: dict | None = None, progress: bool = True,
) -> ScoreTable:
    """Score every block on the dense model's activations: the block loop with every structure kept."""
    start = time.perf_counter()
    costs = costs_of(loaded)
    fingerprint = fingerprint_of(loaded)
    selection = Selection(widths=_keep_all(costs), scorer=scorer, sequential=False, scores_every_unit=True)
    result = walk(loaded, samples, batch_size, selection, Compensator(), progress=progress)
    return ScoreTable(
        scores=result.scores, costs=costs, fingerprint=fingerprint, method=scorer.name, options=scorer.options(),
        calibration=calibration or {}, comparable_units=scorer.comparable_units, seconds=time.perf_counter() - start,
    )


def plan(table: ScoreTable, config: PruneConfig, embedding_parameters: int) -> PruningPlan:
    """A plan from saved scores alone: remove the blocks of lowest block score (if asked), allocate widths
    over the rest, then keep the best structures in each block."""
    num_blocks = len(table.costs)
    config.validate_for(num_blocks)
    if config.rounds_by_timing:
        raise LlmBipError("round-to auto times the FFN on the device, which a plan from saved scores does not have: "
                          "prune the model with --round-to auto, or give a multiple")
    if config.allocation == "sensitivity":
        raise LlmBipError("sensitivity allocation measures the model itself with trial cuts, which a plan from saved "
                          "scores cannot: prune the model with --allocation sensitivity, or choose another allocation")
    counts = counts_from_costs(table.costs, embedding_parameters)
    target = target_parameters(counts, config)
    check_depth_fits(table.costs, target, counts, config)
    depth_choice = None
    if config.removes_blocks:
        depth_choice = choose_from_scores(table.block_scores(), config.blocks_to_remove(num_blocks),
                                          config.depth_candidates(num_blocks), "saved scores (dense activations)")
    removed = depth_choice["removed"] if depth_choice else []
    widths = plan_widths(table.costs, width_target(table.costs, removed, target, counts, config), config, table,
                         removed)
    blocks = [
        BlockPlan.remove(layer) if layer in removed else select(s.heads, s.groups, s.channels, w, config.gqa_mode, layer)
        for layer, (s, w) in enumerate(zip(table.scores, widths, strict=True))
    ]
    meta = plan_meta(table.costs, blocks, counts, target, depth_choice)
    meta.update(config=config.to_json(), method=table.method, scorer_options=table.options, calibration=table.calibration)
    return PruningPlan(blocks=blocks, meta=meta, fingerprint=table.fingerprint)


def plan_meta(costs: list[BlockCosts], blocks: list[BlockPlan], counts: dict, target: int | None,
              depth_choice: dict | None = None) -> dict:
    after_blocks = sum(0 if b.removed else c.total(b.widths) for c, b in zip(costs, blocks, strict=True))
    removed = counts["non_embedding"] - after_blocks
    return {
        "target_removed": target,
        "removed_blocks": [b.layer for b in blocks if b.removed],
        "depth": depth_choice,
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
    if config.sequential and config.allocation in ("uniform", "sensitivity"):
        raise LlmBipError(f"--scores does nothing here: sequential calibration re-scores every block on the pruned "
                          f"model's activations, and {config.allocation} allocation needs no scores; pass "
                          "--calibration-mode parallel to prune from the saved scores, or drop --scores")


def choose_blocks(loaded: LoadedModel, config: PruneConfig, samples: torch.Tensor | None, batch_size: int,
                  table: ScoreTable | None, progress: bool = True, spill_dir: Path | None = None) -> dict:
    """The blocks to remove whole (depth.choice): from the table's block scores in parallel mode, else
    measured on the calibration activations (sequentially one block at a time, or once on the dense model)."""
    num_blocks = loaded.adapter.num_blocks
    n, candidates = config.blocks_to_remove(num_blocks), config.depth_candidates(num_blocks)
    if not config.sequential and table is not None:
        return choose_from_scores(table.block_scores(), n, candidates, "saved scores (dense activations)")
    if samples is None:
        raise LlmBipError("removing blocks needs calibration samples to score them")
    inputs = catch_inputs(loaded, samples, batch_size, spill_dir)
    with out_of_memory_is_an_error(loaded.device, "scoring blocks"):
        return choose_by_measuring(blocks_of(loaded), loaded.adapter, inputs, n, candidates, config.sequential,
                                   progress)


def prune(
    loaded: LoadedModel, config: PruneConfig, samples: torch.Tensor | None, batch_size: int = 8,
    calibration: dict | None = None, scores: ScoreTable | None = None, progress: bool = True,
    fixed_plan: PruningPlan | None = None, source: BlockSource | None = None, checkpoint: Checkpoint | None = None,
    resume: Resume | None = None, spill_dir: Path | None = None, rounder: Timer | None = None,
) -> PruneResult:
    """Score (unless `scores` are given), remove blocks, allocate, select, compensate and cut `loaded.model`
    in place.

    With `fixed_plan`, its selections (and removed blocks) are applied as they are (the structure-deciding
    fields of `config` are not used); compensation and calibration mode still apply. With `scores`
    (parallel mode), no scoring pass runs; with sequential calibration and an adaptive allocation they
    decide the widths only, and every block is re-scored on the pruned model's activations (and blocks to
    remove are chosen by measuring them sequentially). Without a ratio (`config.ratio` None) only whole
    blocks go: nothing is cut inside the others, so nothing is compensated. With `config.round_to` "auto",
    `rounder` times the FFN at the widths it is asked (speed.rounding.device_timer)."""
    config.validate_for(loaded.adapter.num_blocks)
    if config.reconstruct and samples is not None:
        split_batches(math.ceil(len(samples) / batch_size))  # enough batches to hold one out, before any pass
    model, adapter = loaded.model, loaded.adapter
    started = time.perf_counter()
    timings: dict[str, float] = {}
    fingerprint = fingerprint_of(loaded)
    costs = costs_of(loaded)
    counts = count_parameters(model, adapter)
    scorer = config.scorer()
    compensator = config.compensator(loaded.adapter)
    rounding = measured = None
    if fixed_plan is not None:
        fixed_plan.check_model(fingerprint, "the plan")
        widths, target = [b.widths for b in fixed_plan.blocks], None
        if len(widths) != adapter.num_blocks:
            raise LlmBipError(f"the plan has {len(widths)} blocks but the model has {adapter.num_blocks}")
        removed = fixed_plan.removed_layers
        depth_choice = {"removed": removed, "mode": "saved plan"} if removed else None
        selection = Selection(gqa_mode=config.gqa_mode, widths=widths, fixed=fixed_plan.blocks,
                              sequential=config.sequential, depth=depth_choice)
        how = "saved plan"
    else:
        target = target_parameters(counts, config)
        check_depth_fits(costs, target, counts, config)  # before any pass
        widths_too = config.ratio is not None
        if config.rounds_by_timing:
            _check_rounding(widths_too, rounder)  # before any pass too
        if config.allocation == "sensitivity" and loaded.streamed:
            raise LlmBipError(SENSITIVITY_NEEDS_MEMORY)
        if scores is not None:
            scores.check_fingerprint(fingerprint, "the scores file")
            check_scores_apply(scores, config)
            how = "saved scores" + (" (allocation only; blocks re-scored sequentially)" if config.sequential else "")
        elif config.allocation not in ("uniform", "sensitivity") and widths_too:
            scores = score(loaded, scorer, samples, batch_size, calibration, progress)  # adaptive needs every score first
            timings["score"] = scores.seconds
            how = f"{scorer.name} scores ({config.calibration_mode})"
        else:
            how = f"{scorer.name} scores ({config.calibration_mode})"
        depth_choice = None
        if config.removes_blocks:
            if resume is not None and resume.result.depth:
                depth_choice = resume.result.depth  # what the interrupted run chose
            else:
                begun = time.perf_counter()
                depth_choice = choose_blocks(loaded, config, samples, batch_size, scores, progress, spill_dir)
                timings["block_scores"] = time.perf_counter() - begun
        removed = depth_choice["removed"] if depth_choice else []
        width_goal = width_target(costs, removed, target, counts, config)
        if config.allocation == "sensitivity" and widths_too:
            measured = measure_sensitivity(loaded, costs, width_goal, config, samples, removed, batch_size, progress)
            if measured is not None:
                timings["sensitivity"] = measured.seconds
        if measured is None and config.allocation == "sensitivity":
            config_for_widths = _uniform_for(config)  # no channel goes: nothing to spread
        else:
            config_for_widths = config
        widths = plan_widths(costs, width_goal, config_for_widths, scores, removed,
                             measured)  # fails fast, before any cutting
        if config.rounds_by_timing:
            widths, rounding = round_widths(widths, [c.widths for c in costs], rounder)
        if widths_too:
            selection = Selection(gqa_mode=config.gqa_mode, widths=widths, scorer=scorer,
                                  table=None if config.sequential else scores, sequential=config.sequential,
                                  depth=depth_choice)
        else:  # only whole blocks go: every other block is kept as it is
            how = "whole blocks only"
            selection = Selection(widths=widths, fixed=[BlockPlan.keep_all(i, w) for i, w in enumerate(widths)],
                                  sequential=config.sequential, depth=depth_choice)
            compensator = Compensator()
    start = time.perf_counter()
    if resume is not None:
        compensator.load_state(resume.compensator_state)
    result = walk(loaded, samples, batch_size, selection, compensator, source, progress, checkpoint, resume, spill_dir,
                  config.reconstruction(), config.seed)
    timings["prune"] = time.perf_counter() - start
    timings["total"] = time.perf_counter() - started
    blocks: list[BlockPlan] = result.plans
    adapter.remove_blocks(model, removed)  # after the loop: until then every block keeps its index
    meta = plan_meta(costs, blocks, counts, target, depth_choice)
    meta.update(method=scorer.name if fixed_plan is None else None, scorer_options=scorer.options() if fixed_plan is None else None,
                calibration=calibration or {})
    plan_ = PruningPlan(blocks=blocks, meta=dict(meta, config=config.to_json()), fingerprint=fingerprint)
    report = {
        "format": RECORD_FORMAT,
        **meta,
        "config": config.to_json() if fixed_plan is None else _applied_config(config),
        "selection": how,
        "calibration_mode": (config.calibration_mode if result.inputs is not None or "block_scores" in timings
                             else "none (no forward pass needed)"),
        "compensation": {"method": compensator.name, "blocks": result.compensation},
        "source_fingerprint": fingerprint,
        "timings_seconds": timings,
    }
    if config.reconstruct:
        report["reconstruction"] = summary = reconstruction_summary(config, result.compensation)
        log.info("block reconstruction: the trained weights kept in %d of %d blocks (the others' held-out error "
                 "did not fall), %.0f s", summary["blocks_kept"], summary["blocks_trained"], summary["seconds"])
    if rounding is not None:
        report["rounding"] = rounding
    if measured is not None:
        report["sensitivity"] = measured.to_json()
    if fixed_plan is not None:
        report["applied_plan"] = {"fingerprint": fixed_plan.fingerprint, "meta": fixed_plan.meta}
    report["parameters_after"] = count_parameters(model, adapter)  # exact, compensation biases included
    report["plan"] = plan_.to_json()["blocks"]
    return PruneResult(plan=plan_, report=report, scores=scores, timings=timings)


def _check_rounding(widths_too: bool, rounder: Timer | None) -> None:
    if not widths_too:
        raise LlmBipError("round-to auto rounds FFN widths, and this prune removes whole blocks only: give --ratio "
                          "(or drop --round-to)")
    if rounder is None:
        raise LlmBipError("round-to auto needs the device's timing of the FFN: prune through llm_bip.api.prune or "
                          "the CLI, or pass pipeline.prune a rounder (speed.rounding.device_timer)")


def reconstruction_summary(config: PruneConfig, blocks: list[dict]) -> dict:
    """The record's account of the reconstruction stage (each block's own is in its compensation entry)."""
    trained = [b["reconstruction"] for b in blocks if "reconstruction" in b]
    return {"lr": config.reconstruct_lr, "epochs": config.reconstruct_epochs,
            "target": "the dense block's outputs on the same inputs", "blocks_trained": len(trained),
            "blocks_kept": sum(t["trained_weights_kept"] for t in trained),
            "seconds": round(sum(t["seconds"] for t in trained), 1)}


def _applied_config(config: PruneConfig) -> dict:
    """What of the config applies on top of a saved plan."""
    return {k: v for k, v in config.to_json().items()
            if k in ("calibration_mode", "compensation", "refit_damping", "attn_refit_damping", "refit_target",
                     "refit_intercept", "reconstruct", "reconstruct_lr", "reconstruct_epochs", "seed")}


def widths_of(loaded: LoadedModel) -> list[BlockWidths]:
    return [loaded.adapter.widths(b) for b in loaded.adapter.blocks(loaded.model)]
