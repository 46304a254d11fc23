"""`PruneConfig`: everything that decides the pruned model, written once with its defaults.

The CLI, the API and `compare` all take their defaults from here, and every check of a configuration
happens in `validate` (plus `validate_for` against a model's depth).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from llm_bip.adapters import FamilyAdapter
from llm_bip.allocation import ALLOCATIONS, AllocationConfig
from llm_bip.compensation import COMPENSATIONS, BiasCompensation, Compensator, RefitCompensation
from llm_bip.errors import LlmBipError
from llm_bip.plan import GQA_MODES
from llm_bip.reconstruction import Reconstruction
from llm_bip.scoring import LIPSCHITZ_VARIANTS, SCORERS, Scorer, make_scorer

CALIBRATION_MODES = ("parallel", "sequential")
RATIO_OF = ("non-embedding", "total")
REFIT_TARGETS = ("layer", "dense")
SELECTIONS = ("scores", "refit-aware")
INTERCEPTS = ("auto", "always", "never")


FITTED_EXPONENT_WITH_REFIT = ("a fitted sensitivity exponent's two trials zero the channels; they cannot also "
                              "refit: drop --sensitivity-refit-samples or give a number as --sensitivity-exponent")


@dataclass(frozen=True)
class PruneConfig:
    """Everything that decides the pruned model, recorded in its pruning record."""

    method: str = "llm-bip"
    # The total fraction of parameters to remove (of `ratio_of`), whole blocks included: the blocks that
    # depth pruning removes count towards it, and the rest is taken by width from the remaining blocks.
    # None: no width pruning, only the blocks `depth_ratio` / `remove_blocks` name.
    ratio: float | None = 0.2
    ratio_of: str = "non-embedding"
    allocation: str = "uniform"
    gqa_mode: str = "kv-groups"
    prunable_layers: tuple[int, ...] | None = None
    # Kept FFN widths rounded down to a multiple of this; "auto": to a width the device's own timing of the
    # FFN shows clearly faster, where one lies close below (speed/rounding.py).
    round_to: int | str = 1
    # Defaults measured on SmolLM2-135M (docs/results.md): heads cost far more quality per parameter
    # than FFN channels, so the uniform default takes channels first (heads only once channels run
    # out); sequential calibration with a least-squares refit beats parallel and bias compensation.
    # "auto" (sensitivity allocation only): heads go where their measured end-to-end cost is below that of the
    # channels they spare (sensitivity.py measures one head unit per block besides the channels).
    head_ratio: float | str | None = 0.0
    max_block_ratio: float = 0.9
    # Sensitivity allocation: calibration samples each block's trial cut is measured on (sensitivity.py), and
    # the most of a block's channels it may remove (0.9 lost to uniform at 50% on SmolLM2, 0.75 won).
    sensitivity_samples: int = 8
    sensitivity_cap: float = 0.75
    # How a block's KL grows with the fraction it loses (KL ∝ f^exponent), from which the allocation follows;
    # "fit": each block's own, from a second trial at half the cut.
    sensitivity_exponent: float | str = 2.0
    # Calibration samples (after the measured ones) that each channel trial's down_proj refit is fit on, so the
    # trial cuts as the prune does; 0: trials zero the channels without a refit.
    sensitivity_refit_samples: int = 0
    calibration_mode: str = "sequential"
    compensation: str = "refit"
    lipschitz: str = "jvp"
    refit_damping: float = 0.01  # down_proj's ridge, relative to each input's energy
    attn_refit_damping: float = 1.0  # o_proj's ridge: its LS fit overfits the calibration text at 0.01
    refit_target: str = "layer"  # sequential refit towards the block's own output, or the dense model's
    # "scores": keep the highest-scoring structures, then refit; "refit-aware": remove the structures
    # whose block-output change after the refit of the rest is smallest (optimal brain surgeon).
    selection: str = "scores"
    # The refit's output bias (intercept): "auto" fits one only where the family's stock config can hold it
    # (so a uniform prune saves in the stock format); "always" / "never".
    refit_intercept: str = "auto"
    # Depth pruning (depth.py): remove this fraction of the model's blocks (rounded half up), or this many,
    # lowest block score first, from the prunable layers.
    depth_ratio: float = 0.0
    remove_blocks: int = 0
    # Block reconstruction (reconstruction.py): after its refit, each cut block is trained towards the dense
    # block's outputs by Adam at this peak rate, for this many passes over the calibration batches. Off by
    # default: better at 20% and 50% on SmolLM2 without training, with the prune taking 1.7-2.2x its time.
    reconstruct: bool = False
    reconstruct_lr: float = 1e-3
    reconstruct_epochs: float = 1.0
    seed: int = 0

    def validate(self) -> PruneConfig:
        if self.ratio is not None and (not isinstance(self.ratio, int | float) or not 0 <= self.ratio < 1):
            raise LlmBipError(f"ratio {self.ratio} is outside [0, 1): give the fraction of parameters to remove, e.g. 0.2")
        if not isinstance(self.depth_ratio, int | float) or not 0 <= self.depth_ratio < 1:
            raise LlmBipError(f"depth ratio {self.depth_ratio} is outside [0, 1): give the fraction of blocks to remove, "
                              "e.g. 0.25")
        if not isinstance(self.remove_blocks, int) or self.remove_blocks < 0:
            raise LlmBipError(f"remove-blocks {self.remove_blocks}: give a number of blocks, e.g. 4")
        if self.depth_ratio and self.remove_blocks:
            raise LlmBipError("--depth-ratio and --remove-blocks both say how many blocks to remove: give one of them")
        if self.ratio is None and not self.removes_blocks:
            raise LlmBipError("nothing to prune: give a ratio, or blocks to remove (--depth-ratio / --remove-blocks)")
        if self.method not in SCORERS:
            raise LlmBipError(f"unknown method '{self.method}': choose from {', '.join(SCORERS)}")
        for value, allowed, what in (
            (self.ratio_of, RATIO_OF, "ratio-of"), (self.allocation, ALLOCATIONS, "allocation"),
            (self.gqa_mode, GQA_MODES, "gqa-mode"), (self.calibration_mode, CALIBRATION_MODES, "calibration mode"),
            (self.compensation, COMPENSATIONS, "compensation"), (self.refit_target, REFIT_TARGETS, "refit target"),
            (self.lipschitz, LIPSCHITZ_VARIANTS, "lipschitz"), (self.selection, SELECTIONS, "selection"),
            (self.refit_intercept, INTERCEPTS, "refit intercept"),
        ):
            if value not in allowed:
                raise LlmBipError(f"unknown {what} '{value}': use one of {', '.join(allowed)}")
        if not isinstance(self.sensitivity_samples, int) or self.sensitivity_samples < 1:
            raise LlmBipError(f"sensitivity samples {self.sensitivity_samples!r}: give a positive number, e.g. 8")
        if not isinstance(self.sensitivity_cap, int | float) or not 0 < self.sensitivity_cap < 1:
            raise LlmBipError(f"sensitivity cap {self.sensitivity_cap!r} is outside (0, 1): give the most of a block's "
                              "channels it may remove, e.g. 0.75")
        if self.sensitivity_exponent != "fit" and (not isinstance(self.sensitivity_exponent, int | float)
                                                   or not 1 < self.sensitivity_exponent <= 4):
            raise LlmBipError(f"sensitivity exponent {self.sensitivity_exponent!r} is outside (1, 4]: give how a "
                              "block's KL grows with the fraction of it removed, e.g. 2 (quadratic), or 'fit'")
        if self.sensitivity_exponent == "fit" and self.sensitivity_refit_samples:
            raise LlmBipError(FITTED_EXPONENT_WITH_REFIT)
        if not isinstance(self.sensitivity_refit_samples, int) or self.sensitivity_refit_samples < 0:
            raise LlmBipError(f"sensitivity refit samples {self.sensitivity_refit_samples!r}: give a number of "
                              "calibration samples, e.g. 64 (0: trials without a refit)")
        if self.sensitivity_refit_samples and (self.compensation != "refit" or self.refit_target != "layer"):
            raise LlmBipError("sensitivity refit samples cannot apply: the trials refit as the prune does, and this "
                              "prune does not refit towards the block's own output; use --compensation refit "
                              "--refit-target layer, or drop --sensitivity-refit-samples")
        if self.round_to != "auto" and (not isinstance(self.round_to, int) or self.round_to < 1):
            raise LlmBipError(f"round-to {self.round_to!r}: give a positive integer, or auto")
        if self.head_ratio == "auto":
            if self.allocation != "sensitivity":
                raise LlmBipError("head-ratio auto takes heads by their measured end-to-end cost: add --allocation "
                                  "sensitivity, or give a fraction")
        elif self.head_ratio is not None and (not isinstance(self.head_ratio, int | float)
                                              or not 0 <= self.head_ratio < 1):
            raise LlmBipError("head-ratio must be in [0, 1) (or 'same', or 'auto' with --allocation sensitivity)")
        if self.prunable_layers is not None and (not self.prunable_layers or min(self.prunable_layers) < 0):
            raise LlmBipError(f"layers {list(self.prunable_layers)}: give block indices from 0, e.g. 4-28")
        if self.selection == "refit-aware" and (self.compensation != "refit" or self.refit_target != "layer"):
            raise LlmBipError("selection refit-aware chooses by the cost after the refit: it needs --compensation refit "
                              "(with --refit-target layer)")
        if self.refit_target == "dense" and (self.compensation != "refit" or self.calibration_mode != "sequential"):
            raise LlmBipError("refit-target dense needs --compensation refit and --calibration-mode sequential")
        if self.method.startswith("taylor") and self.calibration_mode == "sequential":
            raise LlmBipError(f"{self.method} scores come from one gradient pass over the dense model: use "
                              "--calibration-mode parallel")
        if self.allocation == "flap" and self.round_to != 1:
            raise LlmBipError("flap allocation does not round widths: use round-to 1")
        self.reconstruction_settings()  # checks the rate and the passes
        if self.reconstruct and self.ratio is None:
            raise LlmBipError("--reconstruct trains the blocks that width pruning cut, and this prune removes whole "
                              "blocks only: give --ratio, or drop --reconstruct")
        return self

    def validate_for(self, num_blocks: int) -> PruneConfig:
        """Checks that need the model's depth (known from its config, before any weights are read)."""
        self.validate()
        if self.prunable_layers is not None and max(self.prunable_layers) >= num_blocks:
            raise LlmBipError(f"layers {_span(self.prunable_layers)} do not exist: the model has {num_blocks} blocks "
                              f"(0-{num_blocks}, end exclusive)")
        n = self.blocks_to_remove(num_blocks)
        if self.depth_ratio and not n:
            raise LlmBipError(f"depth ratio {self.depth_ratio} of {num_blocks} blocks removes no block: give at least "
                              f"{0.5 / num_blocks:.3g}, or --remove-blocks")
        if n >= num_blocks:
            raise LlmBipError(f"removing {n} of the model's {num_blocks} blocks leaves none: remove at most "
                              f"{num_blocks - 1}")
        candidates = self.depth_candidates(num_blocks)
        if n > len(candidates):
            raise LlmBipError(f"cannot remove {n} blocks from layers {_span(tuple(candidates))} ({len(candidates)} "
                              "blocks): remove fewer or widen --layers")
        return self

    @property
    def rounds_by_timing(self) -> bool:
        return self.round_to == "auto"

    @property
    def removes_blocks(self) -> bool:
        return bool(self.depth_ratio or self.remove_blocks)

    def blocks_to_remove(self, num_blocks: int) -> int:
        """How many whole blocks go: `remove_blocks`, or `depth_ratio` of the model's blocks rounded half up."""
        if self.remove_blocks:
            return self.remove_blocks
        return math.floor(self.depth_ratio * num_blocks + 0.5)

    def depth_candidates(self, num_blocks: int) -> list[int]:
        """The blocks depth pruning may remove: the prunable layers."""
        return sorted(self.prunable_layers) if self.prunable_layers is not None else list(range(num_blocks))

    def allocation_config(self) -> AllocationConfig:
        return AllocationConfig(
            strategy=self.allocation, gqa_mode=self.gqa_mode, prunable_layers=self.prunable_layers,
            round_to=1 if self.rounds_by_timing else self.round_to,  # auto rounds the allocated widths later
            head_ratio=self.head_ratio, max_block_ratio=self.max_block_ratio,
            sensitivity_cap=self.sensitivity_cap,
        )

    def scorer(self) -> Scorer:
        # With bias compensation next, a structure costs its block-output change after compensation.
        return make_scorer(self.method, lipschitz=self.lipschitz, seed=self.seed, centered=self.compensation == "bias")

    def compensator(self, adapter: FamilyAdapter | None = None) -> Compensator:
        if self.compensation == "bias":
            return BiasCompensation()
        if self.compensation == "refit":
            if self.refit_target == "dense":
                from llm_bip.two_stream import DenseTargetRefit

                if adapter is not None and adapter.has_output_norms:
                    raise LlmBipError(f"--refit-target dense is not supported for {adapter.family}: a norm follows "
                                      "o_proj and down_proj there, so the dense residual stream is no target for "
                                      "their outputs; use --refit-target layer (the default)")

                return DenseTargetRefit(self.attn_refit_damping, self.refit_damping)
            return RefitCompensation(self.attn_refit_damping, self.refit_damping, self.intercepts(adapter),
                                     refit_aware=self.selection == "refit-aware")
        return Compensator()

    def intercepts(self, adapter: FamilyAdapter | None) -> dict[str, bool]:
        """Whether the refit of o_proj / down_proj fits an output bias."""
        if self.refit_intercept != "auto" or adapter is None:
            return {p: self.refit_intercept != "never" for p in ("o_proj", "down_proj")}
        return {p: adapter.can_hold_output_bias(p) for p in ("o_proj", "down_proj")}

    def reconstruction(self) -> Reconstruction | None:
        """The reconstruction stage's settings, or None when it is off."""
        return self.reconstruction_settings() if self.reconstruct else None

    def reconstruction_settings(self) -> Reconstruction:
        return Reconstruction(self.reconstruct_lr, self.reconstruct_epochs)

    @property
    def sequential(self) -> bool:
        return self.calibration_mode == "sequential"

    def to_json(self) -> dict:
        data = asdict(self)
        data["prunable_layers"] = list(self.prunable_layers) if self.prunable_layers is not None else None
        return data


def _span(layers: tuple[int, ...]) -> str:
    return f"{min(layers)}-{max(layers) + 1}" if list(layers) == list(range(min(layers), max(layers) + 1)) else str(list(layers))
