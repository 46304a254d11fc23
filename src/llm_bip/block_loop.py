"""The one block loop (as in Wanda/SparseGPT's `lib/prune.py`): one block in, one block out.

Catch the inputs of block 0 once, then for each block: gather its statistics in one pass over the
calibration activations, score, select, compensate, cut, and pass the activations on (through the
pruned block when sequential, the dense one when parallel). Where the pruned block's attention is the
one the statistics pass ran (every head kept, nothing written into it), only its FFN sub-layer runs
again, on the residual stream the statistics pass kept: the same outputs, without the attention's
work. A block that depth pruning removes keeps nothing: sequentially its inputs go on unchanged, as
they will in the pruned model; in parallel mode it still runs, so the activations stay the dense
model's. Only one block's activations are alive at a time. Where the blocks come from and where they go is a `BlockSource`: the model in memory, or (for
models that do not fit) a checkpoint on disk, one block loaded, pruned, written and freed at a time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from llm_bip.activations import BlockInputs, full_precision, run_block, run_ffn_sublayer
from llm_bip.adapters import FamilyAdapter
from llm_bip.compensation import Compensator
from llm_bip.plan import BlockPlan, select
from llm_bip.reconstruction import Reconstruction, reconstruct_block
from llm_bip.score_table import ScoreTable
from llm_bip.scoring.base import BlockGeometry, BlockScores, Scorer
from llm_bip.stats import BlockStats, StatsRequest, collect_block_stats
from llm_bip.surgery import cut_block
from llm_bip.widths import BlockWidths

log = logging.getLogger(__name__)


class BlockSource(Protocol):
    """Where the loop gets each block and where it leaves it."""

    def load(self, layer: int) -> nn.Module:
        """The block, materialised on the compute device."""

    def done(self, layer: int, block: nn.Module) -> None:
        """The pruned block: keep it (in memory) or write and free it (streaming). A removed block that
        was loaded (for a compensator that reads it) is only given back, never kept."""

    def remove(self, layers: list[int]) -> None:
        """The blocks the plan removes, told once before the loop (blocks after them move up)."""


@dataclass
class InMemoryBlocks:
    model: nn.Module
    adapter: FamilyAdapter

    def load(self, layer: int) -> nn.Module:
        return self.adapter.blocks(self.model)[layer]

    def done(self, layer: int, block: nn.Module) -> None:
        pass

    def remove(self, layers: list[int]) -> None:
        pass  # deleted from the model once the loop is over (`pipeline.prune`), so indices hold until then


@dataclass
class Selection:
    """How the loop decides what each block keeps: a saved plan as it is, or scores at given widths
    (from a scorer run in the loop, or from a saved table in parallel mode)."""

    gqa_mode: str = "kv-groups"
    widths: list[BlockWidths] | None = None
    scorer: Scorer | None = None
    table: ScoreTable | None = None
    fixed: list[BlockPlan] | None = None
    sequential: bool = True
    depth: dict | None = None  # the blocks removed whole and why (depth.choice), or None
    # A scoring pass (pipeline.score): its table is what allocators compare heads and channels by, so every
    # block's head scores are complete (with L), also where this pass keeps every head.
    scores_every_unit: bool = False

    @property
    def removed(self) -> frozenset[int]:
        return frozenset(self.depth["removed"]) if self.depth else frozenset()

    def block_widths(self, layer: int) -> BlockWidths:
        return self.fixed[layer].widths if self.fixed is not None else self.widths[layer]

    def scores_in_loop(self) -> bool:
        """Scores come from the loop's own statistics (else from the saved table or plan)."""
        return self.fixed is None and (self.sequential or self.table is None)


@dataclass
class LoopResult:
    plans: list[BlockPlan] = field(default_factory=list)
    scores: list[BlockScores] = field(default_factory=list)  # what each block was selected with (if scored)
    compensation: list[dict] = field(default_factory=list)
    inputs: BlockInputs | None = None
    depth: dict | None = None  # the selection's depth choice (kept with a streamed run's state)


class Checkpoint(Protocol):
    """Persists the loop's state after each finished block, so a killed run can resume."""

    def save(self, layer: int, result: LoopResult, compensator: Compensator) -> None: ...


@torch.no_grad()
def prune_blocks(
    source: BlockSource, adapter: FamilyAdapter, inputs: BlockInputs | None, selection: Selection,
    compensator: Compensator, start: int = 0, result: LoopResult | None = None, checkpoint: Checkpoint | None = None,
    progress: bool = True, reconstruction: Reconstruction | None = None, seed: int = 0,
) -> LoopResult:
    """Walk the blocks from `start`: statistics → scores → select → compensate → cut → (reconstruct) → next
    inputs.

    `inputs` is None when nothing needs activations (a saved plan or parallel scores, with a
    compensation that needs none); then each block is only selected, compensated from the table's means
    and cut. With `reconstruction`, every cut block is then trained towards the dense block's outputs on the
    same inputs (reconstruction.py), and its compensation record says how that went."""
    if reconstruction is not None and inputs is None:
        raise ValueError("block reconstruction trains on the calibration activations: the loop needs inputs")
    result = result or LoopResult()
    result.depth = selection.depth
    removed = selection.removed
    source.remove(sorted(removed))
    mode = "sequential" if selection.sequential else "parallel"
    bar = tqdm(range(start, adapter.num_blocks), desc=f"pruning ({mode})", disable=not progress, unit="block",
               leave=False, initial=start, total=adapter.num_blocks)
    for layer in bar:
        if layer in removed:
            # Sequential: the block is skipped, its inputs go on unchanged, as in the pruned model. Parallel:
            # the activations stay the dense model's, so the block still runs (and is then dropped).
            dense = inputs is not None and not selection.sequential
            if dense or (inputs is not None and compensator.reads_removed_blocks):
                block = source.load(layer)
                if compensator.reads_removed_blocks:
                    compensator.skip_block(adapter, block, layer, inputs)
                if dense:
                    inputs = run_block(block, inputs, layer=layer)
                source.done(layer, block)
            result.plans.append(BlockPlan.remove(layer))
            result.compensation.append({"block": "removed"})
            result.inputs = inputs
            if checkpoint is not None:
                checkpoint.save(layer, result, compensator)
            continue
        block = source.load(layer)
        parts = adapter.parts(block)
        geometry = BlockGeometry(layer, adapter.head_dim, adapter.widths(block))
        target = selection.block_widths(layer)
        cuts_heads = target.num_heads < geometry.num_heads
        scorer = None
        if selection.scores_in_loop():
            scorer = selection.scorer if cuts_heads or selection.scores_every_unit else selection.scorer.channels_only()
        # Where every head stays, the pruned block's attention is the one the statistics pass runs, so the next
        # inputs follow from the FFN's residual inputs that pass keeps (`run_ffn_sublayer`), unless something
        # writes into the attention on the way (checked against this state).
        ffn_pass = inputs is not None and selection.sequential and not cuts_heads
        attention = _attention_state(adapter, block) if ffn_pass else None
        if inputs is None:
            stats = BlockStats.from_scores(selection.table.scores[layer]) if selection.table else BlockStats()
            dense_out = None
        else:
            compensator.start_block(adapter, block, layer, inputs)
            own = StatsRequest(block_energies=selection.scores_every_unit, ffn_inputs=ffn_pass)
            request = (scorer.stats_request() if scorer else StatsRequest()).union(
                compensator.stats_request(geometry, target, inputs.num_tokens)).union(own)
            # Sequential calibration passes the pruned block's outputs on, so the dense ones are kept only as
            # the target of a reconstruction.
            stats, dense_out = collect_block_stats(block, parts, inputs, request, layer, geometry.group_width,
                                                   keep_outputs=not selection.sequential or reconstruction is not None)
        if selection.fixed is not None:
            plan = selection.fixed[layer]
        else:
            if scorer is not None:
                with full_precision():  # scores in float32, even inside the forward passes' bf16 autocast
                    scores = scorer.score_block(parts, stats, geometry)
            else:
                scores = selection.table.scores[layer]
            result.scores.append(scores)
            plan = select(scores.heads, scores.groups, scores.channels, target, selection.gqa_mode, layer)
            plan = compensator.select(adapter, block, stats, plan, selection.gqa_mode)
        result.compensation.append(compensator.compensate(adapter, block, plan, stats, inputs))
        if plan.widths != geometry.widths:
            cut_block(adapter, block, plan)
            if reconstruction is not None:
                result.compensation[-1]["reconstruction"] = reconstruct_block(block, inputs, dense_out, layer,
                                                                              reconstruction, seed)
        if inputs is not None:
            if not selection.sequential:
                inputs = dense_out
            elif attention is not None and _attention_state(adapter, block) == attention:
                template, inputs = inputs.with_hidden([]), None  # this block's inputs are no longer needed
                result.inputs = None
                inputs = run_ffn_sublayer(adapter, block, stats.ffn_inputs, template, layer)
            else:
                if stats.ffn_inputs:
                    stats.ffn_inputs.clear()  # the attention changed after all: the whole block runs again
                inputs = run_block(block, inputs, layer=layer)
        del stats, dense_out
        compensator.finish_block()
        result.plans.append(plan)
        result.inputs = inputs
        source.done(layer, block)
        if checkpoint is not None:
            checkpoint.save(layer, result, compensator)
    bar.close()
    return result


def _attention_state(adapter: FamilyAdapter, block: nn.Module) -> list[tuple[str, int, int]] | None:
    """Identity and in-place version of every parameter of the block outside its FFN sub-layer: the same
    before and after compensation and cutting means its attention computes as it did in the statistics
    pass. None where the versions cannot be read (tensors made under inference mode): never equal."""
    parts = adapter.parts(block)
    ffn = {id(p) for module in (parts.post_attention_norm, parts.mlp, parts.ffn_output_norm) if module is not None
           for p in module.parameters()}
    try:
        return [(name, id(p), p._version) for name, p in block.named_parameters() if id(p) not in ffn]
    except RuntimeError:
        return None
