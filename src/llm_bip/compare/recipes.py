"""The comparison's recipes: each method as its source runs it, and the comparison's own settings."""

from __future__ import annotations

from dataclasses import dataclass, replace

from llm_bip.allocation import ALLOCATIONS
from llm_bip.config import RATIO_OF, PruneConfig
from llm_bip.dtypes import COMPUTE_DTYPES
from llm_bip.errors import LlmBipError
from llm_bip.plan import GQA_MODES
from llm_bip.scoring import SCORERS

# LLM-Pruner keeps the first 4 and last 2 of LLaMA-7B's 32 layers dense; the same fractions of any depth.
LLM_PRUNER_DENSE_EDGES = (4 / 32, 2 / 32)


@dataclass(frozen=True)
class Recipe:
    """A method as the comparison runs it: a scorer, an allocator of `allocation.ALLOCATIONS`, a
    compensation and a calibration mode; `dense_edges` keeps fractions of the first and last layers
    dense, as LLM-Pruner's layer range does."""

    name: str
    method: str
    allocation: str = "uniform"
    compensation: str = "none"
    calibration_mode: str = "parallel"
    dense_edges: tuple[float, float] | None = None
    # The baselines' sources prune heads and channels by the same fraction (None); llm-bip's default
    # takes FFN channels first (0.0), as its measured default.
    head_ratio: float | None = None
    overrides: tuple[tuple[str, object], ...] = ()

    def config(self, ratio: float, num_layers: int, ratio_of: str, gqa_mode: str, seed: int) -> PruneConfig:
        layers = None
        if self.dense_edges is not None:
            start = round(self.dense_edges[0] * num_layers)
            layers = tuple(range(start, num_layers - round(self.dense_edges[1] * num_layers)))
        base = PruneConfig(
            method=self.method, ratio=ratio, ratio_of=ratio_of, gqa_mode=gqa_mode, prunable_layers=layers,
            allocation=self.allocation,
            compensation=self.compensation, calibration_mode=self.calibration_mode, seed=seed,
            head_ratio=self.head_ratio,
        )
        return replace(base, **dict(self.overrides))

    @property
    def sequential(self) -> bool:
        return dict(self.overrides).get("calibration_mode", self.calibration_mode) == "sequential"


def _default_recipe(name: str, **changes) -> Recipe:
    d = PruneConfig()
    recipe = Recipe(name, d.method, d.allocation, d.compensation, d.calibration_mode, head_ratio=d.head_ratio)
    return replace(recipe, **changes)


RECIPES: dict[str, Recipe] = {
    "llm-bip": _default_recipe("llm-bip"),  # whatever PruneConfig's defaults are
    "llm-bip+bias": _default_recipe("llm-bip+bias", compensation="bias"),
    "llm-bip-nocomp": _default_recipe("llm-bip-nocomp", compensation="none"),
    "flap": Recipe("flap", "flap", allocation="flap", compensation="bias"),
    "wanda-sp": Recipe("wanda-sp", "wanda-sp", calibration_mode="sequential"),
    "taylor": Recipe("taylor", "taylor", dense_edges=LLM_PRUNER_DENSE_EDGES),
    "taylor-vector": Recipe("taylor-vector", "taylor-vector", dense_edges=LLM_PRUNER_DENSE_EDGES),
    "magnitude": Recipe("magnitude", "magnitude"),
    "random": Recipe("random", "random"),
}
DEFAULT_METHODS = ("llm-bip", "flap", "wanda-sp", "taylor", "magnitude", "random")

# Overrides a method spec may carry, and how to read their values.
_OVERRIDES = {
    "allocation": str, "compensation": str, "calibration-mode": str, "lipschitz": str, "gqa-mode": str,
    "head-ratio": float, "round-to": int, "max-block-ratio": float, "layers": str, "selection": str,
    "refit-damping": float, "attn-refit-damping": float,
}


def parse_method(spec: str) -> Recipe:
    """'name' or 'name:key=value,key=value' → a recipe; fails with the known names and keys."""
    name, _, rest = spec.partition(":")
    if name not in RECIPES:
        raise LlmBipError(f"unknown method '{name}': choose from {', '.join(RECIPES)}")
    recipe = replace(RECIPES[name], name=spec)
    overrides: dict[str, object] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key not in _OVERRIDES:
            raise LlmBipError(f"method '{spec}': '{item}' is not key=value with a key of {', '.join(_OVERRIDES)}")
        try:
            parsed = _OVERRIDES[key](value)
        except ValueError:
            raise LlmBipError(f"method '{spec}': {key} needs a {_OVERRIDES[key].__name__}, not '{value}'") from None
        if key == "allocation":
            recipe = replace(recipe, allocation=parsed)
            if parsed not in ALLOCATIONS:
                raise LlmBipError(f"method '{spec}': unknown allocation '{parsed}': use one of {', '.join(ALLOCATIONS)}")
        elif key == "layers":
            recipe = replace(recipe, dense_edges=None)
            overrides["prunable_layers"] = _layers(parsed, spec)
        else:
            overrides[key.replace("-", "_")] = parsed
    return replace(recipe, overrides=tuple(overrides.items()))


def _layers(text: str, spec: str) -> tuple[int, ...]:
    try:
        start, _, end = text.partition("-")
        return tuple(range(int(start), int(end))) if end else (int(start),)
    except ValueError:
        raise LlmBipError(f"method '{spec}': layers '{text}' is not a range like 4-28 (end exclusive)") from None


@dataclass(frozen=True)
class CompareConfig:
    methods: tuple[str, ...] = DEFAULT_METHODS
    ratios: tuple[float, ...] = (0.1, 0.2, 0.3, 0.5)
    eval_seq_lens: tuple[int, ...] = (128, 2048)
    eval_max_windows: int | None = None
    eval_max_tokens: int | None = None  # the same token budget at every length: windows = tokens // seq_len

    eval_batch_size: int = 4
    ratio_of: str = "non-embedding"
    gqa_mode: str = "kv-groups"
    batch_size: int = 8
    dtype: str = "auto"  # resolved against the model's weights and device when the comparison runs
    seed: int = 0

    def windows(self, seq_len: int) -> int | None:
        limits = [n for n in (self.eval_max_windows, self.eval_max_tokens and self.eval_max_tokens // seq_len) if n]
        return min(limits) if limits else None

    def recipes(self) -> list[Recipe]:
        """Every method parsed and every ratio checked: bad input fails here, before any long work."""
        if not self.methods:
            raise LlmBipError(f"no methods given: choose from {', '.join(RECIPES)}")
        recipes = [parse_method(m) for m in self.methods]
        if len({r.name for r in recipes}) != len(recipes):
            raise LlmBipError("a method is listed twice")
        if not self.ratios:
            raise LlmBipError("no ratios given")
        for ratio in self.ratios:
            if not (isinstance(ratio, int | float) and 0 <= ratio < 1):
                raise LlmBipError(f"ratio {ratio} is outside [0, 1): give fractions of parameters to remove, e.g. 0.2")
        if self.ratio_of not in RATIO_OF:
            raise LlmBipError(f"unknown ratio-of '{self.ratio_of}': use one of {', '.join(RATIO_OF)}")
        if self.gqa_mode not in GQA_MODES:
            raise LlmBipError(f"unknown GQA mode '{self.gqa_mode}': use one of {', '.join(GQA_MODES)}")
        if self.dtype not in COMPUTE_DTYPES:
            raise LlmBipError(f"unknown dtype '{self.dtype}': use one of {', '.join(COMPUTE_DTYPES)}")
        if not self.eval_seq_lens or any(n < 2 for n in self.eval_seq_lens):
            raise LlmBipError("evaluation sequence lengths must be at least 2 tokens")
        for recipe in recipes:
            config = recipe.config(self.ratios[0], 1, self.ratio_of, self.gqa_mode, self.seed)
            if recipe.method not in SCORERS:
                raise LlmBipError(f"method '{recipe.name}' needs scorer '{recipe.method}', which is not registered")
            try:
                replace(config, prunable_layers=None).validate()
            except LlmBipError as exc:
                raise LlmBipError(f"method '{recipe.name}': {exc}") from None
        return recipes
