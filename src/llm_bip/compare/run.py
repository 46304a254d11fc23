"""Running the comparison: every recipe at every ratio on fresh copies of the dense model, through `api`.

Scores are computed once per scorer (a `ScoreTable`) and re-planned for every ratio; recipes that
share a scorer share its table. Sequential recipes cannot reuse scores: they score while they prune,
once per ratio.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from llm_bip import api
from llm_bip.allocation import AllocationConfig, allocate
from llm_bip.compare.memory import PeakMemory
from llm_bip.compare.recipes import CompareConfig, Recipe
from llm_bip.compare.report import CompareResult, write_outputs
from llm_bip.config import PruneConfig
from llm_bip.dtypes import compute_dtype
from llm_bip.errors import LlmBipError
from llm_bip.loading import LoadedModel
from llm_bip.outputs import check_output_dir, staging_dir, swap_into_place
from llm_bip.params import count_parameters
from llm_bip.pipeline import costs_of, target_parameters
from llm_bip.score_table import ScoreTable
from llm_bip.scoring.taylor import check_gradient_memory

log = logging.getLogger(__name__)


def _fresh(loaded: LoadedModel) -> LoadedModel:
    return LoadedModel(copy.deepcopy(loaded.model), loaded.tokenizer, loaded.adapter, loaded.source)


def check_runnable(loaded: LoadedModel, recipes: list[Recipe], config: CompareConfig, samples_shape) -> None:
    """The compute dtype applies, every (method, ratio) can be planned on this model, and gradient methods fit."""
    compute_dtype(config.dtype, loaded.dtype, loaded.device)  # e.g. float32 asked of bf16 weights: before calibration
    blocks = loaded.adapter.blocks(loaded.model)
    costs = costs_of(loaded)
    counts = count_parameters(loaded.model, loaded.adapter)
    for recipe in recipes:
        if recipe.method.startswith("taylor"):
            check_gradient_memory(loaded, min(config.batch_size, samples_shape[0]), samples_shape[1])
        for ratio in config.ratios:
            c = recipe.config(ratio, len(blocks), config.ratio_of, config.gqa_mode, config.seed)
            if c.prunable_layers is not None and any(not 0 <= i < len(blocks) for i in c.prunable_layers):
                raise LlmBipError(f"method '{recipe.name}': layers {c.prunable_layers} do not exist in this "
                                  f"{len(blocks)}-layer model")
            alloc = AllocationConfig(strategy="uniform", gqa_mode=c.gqa_mode, prunable_layers=c.prunable_layers)
            try:
                allocate(costs, target_parameters(counts, c), alloc)  # the same bound every allocator has
            except LlmBipError as exc:
                raise LlmBipError(f"method '{recipe.name}' at ratio {ratio}: {exc}") from None


def _scorer_key(config: PruneConfig) -> tuple:
    scorer = config.scorer()
    return scorer.name, json.dumps(scorer.options(), sort_keys=True)


def _scorer_options(config: PruneConfig) -> dict:
    """The options `api.score` needs to build the same scorer as `config.scorer()`."""
    return {"lipschitz": config.lipschitz, "seed": config.seed, "centered": config.compensation == "bias"}


def _evaluate(lm: LoadedModel, eval_ids: dict[str, torch.Tensor], config: CompareConfig, progress: bool) -> dict:
    results = api.evaluate(lm, list(eval_ids), config.eval_seq_lens, config.windows, config.eval_batch_size,
                           config.dtype, progress, tokenized=eval_ids)
    return {key: r["perplexity"] for key, r in results.items()}


def compare(
    loaded: LoadedModel, samples: torch.Tensor, config: CompareConfig, eval_ids: dict[str, torch.Tensor],
    out_dir: str | Path, calibration: dict | None = None, progress: bool = True,
) -> CompareResult:
    """Run every method at every ratio on copies of `loaded` (left dense), evaluate, write the outputs.

    `eval_ids`: evaluation texts, already tokenized, by name ("wikitext2", "wiki.test", ...).
    """
    recipes = config.recipes()
    check_runnable(loaded, recipes, config, tuple(samples.shape))
    config = dataclasses.replace(config, dtype=compute_dtype(config.dtype, loaded.dtype, loaded.device))  # as reported
    out = check_output_dir(out_dir, overwrite=True, what="compare output")  # an empty or earlier comparison only
    num_layers = loaded.adapter.num_blocks
    before = count_parameters(loaded.model, loaded.adapter)

    dense_ppl = _evaluate(loaded, eval_ids, config, progress)
    rows: list[dict] = []
    costs: list[dict] = []
    tables: dict[tuple, tuple[ScoreTable, dict]] = {}
    bar = tqdm(total=len(recipes) * len(config.ratios), desc="compare", unit="run", disable=not progress)
    for recipe in recipes:
        cost = {"method": recipe.name, "score_seconds": 0.0, "peak_memory_mib": 0.0, "peak_rss_mib": 0.0,
                "scored": "once, re-planned per ratio", "memory_measure": ""}
        table = None
        if not recipe.sequential:
            key = _scorer_key(recipe.config(0.0, num_layers, config.ratio_of, config.gqa_mode, config.seed))
            if key not in tables:
                scorer = recipe.config(0.0, num_layers, config.ratio_of, config.gqa_mode, config.seed).scorer()
                with PeakMemory() as mem:
                    start = time.perf_counter()
                    t = api.score(loaded, samples, scorer.name, calibration, config.batch_size, config.dtype, progress,
                                  **_scorer_options(recipe.config(0.0, num_layers, config.ratio_of, config.gqa_mode,
                                                                  config.seed)))
                    seconds = time.perf_counter() - start
                tables[key] = (t, {"score_seconds": seconds, "peak_memory_mib": mem.added / 2**20,
                                   "peak_rss_mib": mem.peak / 2**20, "memory_measure": mem.how, "owner": recipe.name})
            table, measured = tables[key]
            cost.update({k: v for k, v in measured.items() if k != "owner"})
            if measured["owner"] != recipe.name:
                cost["scored"] = f"shares the scores of {measured['owner']}"
        else:
            cost["scored"] = "while pruning, once per ratio (sequential): mean over ratios"
        seq_seconds, seq_peak, seq_rss = [], 0.0, 0.0
        for ratio in config.ratios:
            prune_config = recipe.config(ratio, num_layers, config.ratio_of, config.gqa_mode, config.seed)
            bar.set_postfix_str(f"{recipe.name} @ {ratio:g}")
            row = {"method": recipe.name, "ratio": ratio, "error": ""}
            lm = _fresh(loaded)
            try:
                with PeakMemory() as mem:
                    start = time.perf_counter()
                    api.prune(lm, prune_config, samples, calibration, table, config.batch_size, config.dtype, progress)
                    row["prune_seconds"] = time.perf_counter() - start
                if recipe.sequential:
                    seq_seconds.append(row["prune_seconds"])
                    seq_peak, seq_rss = max(seq_peak, mem.added / 2**20), max(seq_rss, mem.peak / 2**20)
                    cost["memory_measure"] = mem.how
                after = count_parameters(lm.model, lm.adapter)
                row.update(_sizes(before, after))
                row["perplexity"] = _evaluate(lm, eval_ids, config, progress)
            except LlmBipError as exc:  # one infeasible run should not lose the others
                row.update({"error": str(exc), "perplexity": {}, "prune_seconds": math.nan})
                log.warning("%s at ratio %g failed: %s", recipe.name, ratio, exc)
            rows.append(row)
            del lm  # frees the copy at once (reference count): one copy alive at a time
            bar.update(1)
        if recipe.sequential and seq_seconds:
            cost.update({"score_seconds": sum(seq_seconds) / len(seq_seconds), "peak_memory_mib": seq_peak,
                         "peak_rss_mib": seq_rss})
        costs.append(cost)
    bar.close()

    dense = {"method": "dense", "ratio": 0.0, "perplexity": dense_ppl, **_sizes(before, before)}
    result = CompareResult(rows=rows, costs=costs, dense=dense)
    with staging_dir(out) as tmp:
        written = write_outputs(result, tmp, config, {"model": loaded.source, "calibration": calibration or {}})
        swap_into_place(tmp, out)
    result.files = {kind: str(out / Path(path).name) for kind, path in written.items()}
    return result


def _sizes(before: dict, after: dict) -> dict:
    removed = before["total"] - after["total"]
    return {
        "parameters": after["total"], "non_embedding_parameters": after["non_embedding"],
        "removed_non_embedding": removed / before["non_embedding"], "removed_total": removed / before["total"],
    }
