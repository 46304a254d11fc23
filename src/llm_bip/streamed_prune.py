"""Pruning a model that never sits whole in memory, straight into its output directory, resumably.

The block loop runs over `StreamedBlocks`, which write each pruned block into its own shard of the
output as the loop finishes it (under its index in the output: blocks removed whole are never written,
and those after them move up); `PartialRun` records the loop's state after every block. At the end the
embeddings, head, config, tokenizer and record are added and the directory is renamed into place. The
disk space the output needs is checked before any long work.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from llm_bip.config import PruneConfig
from llm_bip.dtypes import dtype_name
from llm_bip.errors import LlmBipError
from llm_bip.fingerprint import fingerprint_of
from llm_bip.loading import LoadedModel
from llm_bip.outputs import check_output_dir, swap_into_place
from llm_bip.params import count_parameters
from llm_bip.pipeline import PruneResult, prune, target_parameters
from llm_bip.plan import PruningPlan
from llm_bip.resume import PartialRun, partial_dir, samples_checksum
from llm_bip.saving import STOCK_FORMAT, block_layout, finish_record, saved_config, write_model_files
from llm_bip.score_table import ScoreTable
from llm_bip.streaming import ShardWriter, StreamedBlocks, write_input_side, write_output_side

log = logging.getLogger(__name__)


def run_key(loaded: LoadedModel, config: PruneConfig, samples: torch.Tensor | None, calibration: dict | None,
            plan: PruningPlan | None, scores: ScoreTable | None, batch_size: int, save_dtype: torch.dtype) -> dict:
    """What decides a streamed run's result: a resume must match it exactly."""
    return {
        "model": {"fingerprint": fingerprint_of(loaded), "weights_dtype": str(loaded.dtype)},
        "calibration": {**(calibration or {}), "samples": samples_checksum(samples), "batch_size": batch_size},
        "options": {**config.to_json(), "plan": plan.fingerprint + str(len(plan.blocks)) if plan else None,
                    "plan_blocks": [b.widths.to_json() for b in plan.blocks] if plan else None,
                    "scores": scores.fingerprint + scores.method if scores else None,
                    "save_dtype": str(save_dtype)},
    }


def check_disk_space(loaded: LoadedModel, config: PruneConfig, out: Path, save_dtype: torch.dtype,
                     samples: torch.Tensor | None, plan: PruningPlan | None) -> int:
    """Refuse before any long work when the output cannot fit on its disk; returns the bytes needed."""
    counts = count_parameters(loaded.model, loaded.adapter)
    if plan is not None:
        kept = plan.meta.get("parameters_after", {}).get("total", counts["total"])
    else:
        kept = counts["total"] - (target_parameters(counts, config) or 0)  # without a ratio: at most all of it
    itemsize = torch.finfo(save_dtype).bits // 8
    activations = 0
    if samples is not None:
        activations = 2 * samples.numel() * loaded.model.config.hidden_size * torch.finfo(loaded.dtype).bits // 8
    need = int(kept * itemsize * 1.02) + activations
    anchor = out.parent
    while not anchor.exists():
        anchor = anchor.parent
    free = shutil.disk_usage(anchor).free
    existing = partial_dir(out)
    if existing.exists():
        free += sum(p.stat().st_size for p in existing.rglob("*") if p.is_file())
    if free < need:
        raise LlmBipError(f"the pruned model needs about {need / 2**30:.1f} GiB at {anchor}, but only "
                          f"{free / 2**30:.1f} GiB is free: free some space or choose another --output")
    return need


def prune_streamed(
    loaded: LoadedModel, config: PruneConfig, samples: torch.Tensor | None, out_dir: str | Path,
    calibration: dict | None = None, scores: ScoreTable | None = None, plan: PruningPlan | None = None,
    batch_size: int = 8, save_dtype: torch.dtype | None = None, resume: bool = False, overwrite: bool = False,
    progress: bool = True, record: dict | None = None, inputs: tuple = (),
) -> tuple[PruneResult, Path]:
    """Prune a streamed model block by block into `out_dir`; returns the result and the directory."""
    if not loaded.streamed:
        raise LlmBipError("prune_streamed needs a model loaded with streaming=True")
    out = check_output_dir(out_dir, overwrite, (loaded.source, *inputs))
    save_dtype = save_dtype or loaded.dtype
    check_disk_space(loaded, config, out, save_dtype, samples, plan)
    key = run_key(loaded, config, samples, calibration, plan, scores, batch_size, save_dtype)
    partial = PartialRun.find(out)
    state = None
    if partial is not None and resume:
        partial.check_key(key)
        state = partial.restore()
        log.info("resuming the interrupted run at block %d of %d", state.start, loaded.adapter.num_blocks)
    elif partial is not None and not overwrite:
        raise LlmBipError(f"an interrupted run of this output is in {partial.directory} (block {partial.next_layer} of "
                          f"{loaded.adapter.num_blocks} done): pass --resume to continue it, or --overwrite to start over")
    if state is None:
        partial = PartialRun.start(out, key)
    writer = ShardWriter(partial.directory, loaded.adapter.num_blocks + 2, save_dtype)
    blocks = StreamedBlocks(loaded, writer)
    if state is None:
        write_input_side(loaded, writer)
    finished_before = list(state.result.plans) if state is not None else []
    try:
        result = prune(loaded, config, samples, batch_size, calibration, scores, progress, fixed_plan=plan,
                       source=blocks, checkpoint=partial, resume=state, spill_dir=partial.directory)
    except KeyboardInterrupt:
        raise LlmBipError(f"interrupted: the blocks done so far are kept in {partial.directory}; rerun with --resume "
                          "to continue") from None
    written = writer.written()
    for layer, block_plan in enumerate(finished_before):  # after the loop: its widths were planned on the dense model
        blocks.replay(layer, block_plan, written)
    report = dict(record or {}, **result.report)
    report["streamed"] = True
    report.setdefault("model", loaded.source)  # the model card's base_model, as the in-memory save records it
    finish_output(loaded, writer, partial, report, save_dtype)
    swap_into_place(partial.directory, out)
    log.info("saved %s (streamed, %s)", out, report["saved_format"])
    return PruneResult(plan=result.plan, report=report, scores=result.scores, timings=result.timings), out


def finish_output(loaded: LoadedModel, writer: ShardWriter, partial: PartialRun, record: dict,
                  save_dtype: torch.dtype) -> None:
    """Head, index, config, tokenizer, model card and record beside the block shards: the same files and
    tensors the in-memory save writes."""
    adapter = loaded.adapter
    layout = block_layout(loaded.model, adapter)
    config, fmt, flags = saved_config(loaded.model.config, adapter, layout)
    written = writer.written()
    zero_biases = {}
    for layer in range(adapter.num_blocks):
        prefix = adapter.block_prefix(layer)
        for path in adapter.stock_bias_siblings(flags):
            if prefix + path + ".bias" not in written:
                zero_biases[prefix + path + ".bias"] = written[prefix + path + ".weight"][1][0]
    write_output_side(loaded, writer, zero_biases)
    writer.finish_index()
    partial.finish()
    config.dtype = save_dtype
    if fmt == STOCK_FORMAT:
        config.architectures = [type(loaded.model).__name__]
    write_model_files(partial.directory, config, fmt, loaded.tokenizer)
    generation = getattr(loaded.model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(partial.directory)
    counts, added = count_parameters(loaded.model, adapter), sum(zero_biases.values())
    record["parameters_after"] = {"total": counts["total"] + added, "embedding": counts["embedding"],
                                  "non_embedding": counts["non_embedding"] + added}  # on disk, zero biases included
    record["saved_dtype"] = dtype_name(save_dtype)
    finish_record(partial.directory, record, fmt, layout)
