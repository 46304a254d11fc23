"""Block reconstruction: a few gradient steps on every weight of a cut block, after its closed-form refit.

The refit repairs o_proj and down_proj by least squares; the other weights of the block (q/k/v, gate/up, the
norms) stay as the dense model had them although their consumers changed. Here the whole cut block is trained,
by Adam with a cosine schedule, one calibration batch a step, so that its output on the calibration activations
it receives (the pruned model's stream, in sequential mode) matches the dense block's output on the same
activations: the refit's own target, so the block only learns back what its own cut lost. The loss is the
output error relative to what the dense block adds to its input (`||f(x) - y||² / ||y - x||²`), so every block
trains at the same scale.

The first batches (a sixteenth of them, at least one) are held out: the block's relative error on them is
measured before and after, and a block whose held-out error does not fall keeps its weights from before, so the
stage never makes a block worse on text it did not train on. Training runs on a float32 copy of the block,
outside any autocast, whatever the checkpoint's dtype; the trained weights are copied back in that dtype.

Measured on SmolLM2 (docs/results.md §11, "Block reconstruction in the prune"): better without training at 20% and
50% on every text (at 30% too, in the probe that preceded it), more the more is cut, with the prune taking
1.7-2.2× its time; after 30 minutes of LoRA recovery in all, a tie. So it is an option (`--reconstruct`), not the
default.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from llm_bip.activations import BlockInputs, full_precision
from llm_bip.errors import LlmBipError

HELD_OUT_SHARE = 16  # one batch in this many is held out (at least one)


@dataclass(frozen=True)
class Reconstruction:
    """Settings of the stage: Adam's peak rate and the passes over the training batches, per block."""

    lr: float = 1e-3
    epochs: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.lr, int | float) or not 0 < self.lr < 1:
            raise LlmBipError(f"reconstruction learning rate {self.lr!r}: give a positive rate below 1, e.g. 1e-3")
        if not isinstance(self.epochs, int | float) or not 0 < self.epochs <= 16:
            raise LlmBipError(f"reconstruction epochs {self.epochs!r}: give the passes over the calibration batches "
                              "per block, in (0, 16], e.g. 1")


def split_batches(num_batches: int) -> tuple[list[int], list[int]]:
    """The held-out batches (the first sixteenth, at least one) and the training batches (the rest)."""
    if num_batches < 2:
        raise LlmBipError(f"block reconstruction holds one calibration batch out and trains on the others, and the "
                          f"calibration has {num_batches}: give more samples (--num-samples) or a smaller "
                          "--batch-size")
    held = max(1, num_batches // HELD_OUT_SHARE)
    return list(range(held)), list(range(held, num_batches))


def _out(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _float(kwargs: dict) -> dict:
    return {k: _as_float(v) for k, v in kwargs.items()}


def _as_float(value):
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.float()
    if isinstance(value, tuple):
        return tuple(_as_float(v) for v in value)
    return value


@torch.no_grad()
def relative_error(block: nn.Module, inputs: list[torch.Tensor], targets: list[torch.Tensor], kwargs: list[dict],
                   batches: list[int]) -> float:
    """||block(x) - y||² / ||y - x||² summed over `batches`: the output error as a share of what the dense block
    adds to its input."""
    num = den = 0.0
    for i in batches:
        x, y = inputs[i].float(), targets[i].float()
        num += (_out(block, x, _float(kwargs[i])).float() - y).pow(2).sum().item()
        den += (y - x).pow(2).sum().item()
    return num / max(den, 1e-30)


def train_block(block: nn.Module, inputs: list[torch.Tensor], targets: list[torch.Tensor], kwargs: list[dict],
                train: list[int], settings: Reconstruction, seed: int) -> int:
    """Adam with a cosine schedule on every parameter of `block` (float32), one batch a step, in an order drawn
    from `seed`; returns the number of steps."""
    params = list(block.parameters())
    for p in params:
        p.requires_grad_(True)
    steps = max(1, int(settings.epochs * len(train)))
    opt = torch.optim.Adam(params, lr=settings.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < steps:
        order += [train[j] for j in torch.randperm(len(train), generator=generator).tolist()]
    with torch.enable_grad():
        for i in order[:steps]:
            x, y = inputs[i].float(), targets[i].float()
            loss = (_out(block, x, _float(kwargs[i])) - y).pow(2).mean() / (y - x).pow(2).mean().clamp_min(1e-30)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
    for p in params:
        p.requires_grad_(False)
    return steps


def reconstruct_block(block: nn.Module, inputs: BlockInputs, targets: BlockInputs, layer: int,
                      settings: Reconstruction, seed: int = 0) -> dict:
    """Train the cut `block` towards `targets` (the dense block's outputs on `inputs`), keeping the result only
    where its held-out error falls; returns what was done, for the pruning record."""
    started = time.perf_counter()
    kwargs = inputs.kwargs_for(layer)
    held, train = split_batches(len(inputs.hidden))
    with full_precision():
        trained = copy.deepcopy(block).float()
        before = relative_error(trained, inputs.hidden, targets.hidden, kwargs, held)
        steps = train_block(trained, inputs.hidden, targets.hidden, kwargs, train, settings, seed + layer)
        after = relative_error(trained, inputs.hidden, targets.hidden, kwargs, held)
    kept = math.isfinite(after) and after < before
    if kept:
        with torch.no_grad():
            for mine, new in zip(block.parameters(), trained.parameters(), strict=True):
                mine.copy_(new.to(mine.dtype))
    return {"held_out_error_before": float(f"{before:.6g}"), "held_out_error_after": float(f"{after:.6g}"),
            "trained_weights_kept": kept, "steps": steps, "seconds": round(time.perf_counter() - started, 2)}
