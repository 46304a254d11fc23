"""Whole-block removal (depth pruning): LLM-BIP's criterion applied to a whole block.

A pre-norm block adds its attention and FFN outputs to the residual stream, y = x + attn + ffn, so
skipping it passes x on where y went before: the change it makes to the residual stream is exactly
y - x. A block's score is that change relative to what the block outputs,

    score = Σ_t ||y_t - x_t||² / Σ_t ||y_t||²    (float32 sums over the calibration tokens),

which is 0 for a block that computes the identity and does not grow with the residual stream's norm
down the depth. Blocks are removed lowest score first. Sequentially (the default calibration mode)
one block is removed at a time and the remaining blocks are scored again on the activations of the
model without the blocks removed so far (from the removed block on: the blocks before it see the same
inputs, so their scores stand and the pass starts from the inputs the removed block received, kept from
the pass that scored it); in parallel mode (and from a saved score table) every block
is scored once on the dense model's activations.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from tqdm.auto import tqdm

from llm_bip.activations import BlockInputs, full_precision, run_block
from llm_bip.adapters import FamilyAdapter
from llm_bip.errors import LlmBipError

CRITERION = "sum ||block(x) - x||^2 / sum ||block(x)||^2 over the calibration tokens (relative change of the " \
            "residual stream when the block is skipped)"


def skip_energies(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Σ_t ||y_t - x_t||² and Σ_t ||y_t||² of one batch (block input x, output y), in float32."""
    with full_precision():
        x, y = x.float(), y.float()
        change = y - x
        return float((change * change).sum()), float((y * y).sum())


def block_score(skip_sq: float, output_sq: float) -> float:
    """The block score from its summed energies (0 for an identity block)."""
    if output_sq > 0:
        return skip_sq / output_sq
    return 0.0 if skip_sq == 0 else math.inf


def lowest(scores: dict[int, float], n: int) -> list[int]:
    """The `n` layers of lowest score; ties go to the lower index, so choices are deterministic."""
    return sorted(scores, key=lambda layer: (scores[layer], layer))[:n]


def choice(removed: list[int], order: list[tuple[int, float]], scores: list[float | None], mode: str) -> dict:
    """What the record says about the blocks removed (`removed` sorted; `order`: (layer, score) as removed)."""
    return {"removed": sorted(removed), "criterion": CRITERION, "mode": mode,
            "order": [{"layer": layer, "score": score} for layer, score in order], "scores": scores}


def choose_from_scores(scores: list[float], n: int, candidates: Iterable[int], mode: str) -> dict:
    """Remove the `n` candidates of lowest score (scores of every block, measured once)."""
    pool = {layer: scores[layer] for layer in candidates}
    picked = lowest(pool, n)
    return choice(picked, [(layer, scores[layer]) for layer in picked],
                  [scores[i] if i in pool else None for i in range(len(scores))], mode)


@torch.no_grad()
def measure(source, adapter: FamilyAdapter, inputs: BlockInputs, removed: Iterable[int], wanted: Iterable[int],
            progress: bool = False, start: int = 0,
            scored: Callable[[int, float, BlockInputs], None] | None = None) -> dict[int, float]:
    """Block scores of the `wanted` layers (none before `start`) on the activations of the model without the
    `removed` blocks (`inputs`: what block `start` receives). Blocks come from a `block_loop.BlockSource` and
    are given back. `scored(layer, score, inputs)` is told each score with the inputs that block received."""
    removed, wanted = set(removed), set(wanted)
    if not wanted:
        return {}
    if min(wanted) < start:
        raise ValueError(f"block {min(wanted)} cannot be scored by a pass that starts at block {start}")
    last = max(wanted)
    scores: dict[int, float] = {}
    for layer in tqdm(range(start, last + 1), desc="block scores", disable=not progress, unit="block",
                      initial=start, total=last + 1, leave=False):
        if layer in removed:
            continue  # a skipped block passes its inputs on unchanged
        block = source.load(layer)
        sums = [0.0, 0.0]

        def on_output(_module, args, out, sums=sums):
            skip, energy = skip_energies(args[0], out[0] if isinstance(out, tuple) else out)
            sums[0] += skip
            sums[1] += energy

        handle = block.register_forward_hook(on_output) if layer in wanted else None
        try:
            outputs = run_block(block, inputs, layer=layer, keep_outputs=layer < last)
        finally:
            if handle is not None:
                handle.remove()
        source.done(layer, block)
        if layer in wanted:
            scores[layer] = block_score(*sums)
            if scored is not None:
                scored(layer, scores[layer], inputs)
        inputs = outputs
    return scores


def choose_by_measuring(source, adapter: FamilyAdapter, inputs: BlockInputs, n: int, candidates: list[int],
                        sequential: bool, progress: bool = False) -> dict:
    """Choose `n` blocks to remove by measuring their scores: once on the dense model (parallel), or one
    block at a time (sequential: after each removal, the blocks after it are scored again on the
    activations of the model without it; the blocks before it see the same inputs and keep their scores).

    A sequential pass starts at the block removed last, from the inputs it received in the pass that scored
    it (with it gone they are what the next block receives): the pass keeps the inputs of its lowest-scoring
    block so far, one more set of calibration activations alive. Where the block removed was scored in an
    earlier pass, the next pass starts from block 0."""
    if n > len(candidates):
        raise LlmBipError(f"cannot remove {n} blocks: only {len(candidates)} may be removed")
    num_blocks = adapter.num_blocks
    removed: list[int] = []
    order: list[tuple[int, float]] = []
    known: dict[int, float] = {}
    first: list[float | None] | None = None
    start, handoff = 0, [inputs]  # where the next pass starts and what that block receives (held only until then)
    for _round in range(n if sequential else 1):
        pending = [layer for layer in candidates if layer not in removed and layer not in known]
        kept: list[tuple[float, int, BlockInputs]] = []  # this pass's lowest-scoring block so far, its inputs

        def keep_lowest(layer: int, score: float, layer_inputs: BlockInputs, kept=kept) -> None:
            if not kept or (score, layer) < kept[0][:2]:  # lowest()'s order: score, then the lower index
                kept[:] = [(score, layer, layer_inputs)]

        known.update(measure(source, adapter, handoff.pop(), removed, pending, progress, start,
                             keep_lowest if sequential else None))
        if first is None:
            first = [known.get(i) for i in range(num_blocks)]
        picked = lowest({layer: s for layer, s in known.items() if layer not in removed}, 1 if sequential else n)
        removed += picked
        order += [(layer, known[layer]) for layer in picked]
        if sequential:
            known = {layer: s for layer, s in known.items() if layer < picked[0]}
            start, handoff = (picked[0], [kept[0][2]]) if kept and kept[0][1] == picked[0] else (0, [inputs])
    mode = ("sequential (one block at a time, the rest scored again without it)" if sequential
            else "parallel (dense activations)")
    return choice(removed, order, first, mode)
