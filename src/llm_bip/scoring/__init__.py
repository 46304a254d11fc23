"""Scorers by name: every method is an interchangeable part behind `Scorer`."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from llm_bip.errors import LlmBipError
from llm_bip.scoring.base import BlockGeometry, BlockScores, Scorer
from llm_bip.scoring.flap import FlapScorer
from llm_bip.scoring.llm_bip import LIPSCHITZ_VARIANTS, LlmBipScorer
from llm_bip.scoring.simple import MagnitudeScorer, RandomScorer
from llm_bip.scoring.taylor import TaylorScorer
from llm_bip.scoring.wanda_sp import WandaSpScorer

SCORERS: dict[str, Callable[..., Scorer]] = {
    "llm-bip": LlmBipScorer,
    "magnitude": MagnitudeScorer,
    "random": RandomScorer,
    "flap": FlapScorer,
    "wanda-sp": WandaSpScorer,
    "taylor": TaylorScorer,
    "taylor-vector": partial(TaylorScorer, variant="vector"),
}


def make_scorer(name: str, **options) -> Scorer:
    if name not in SCORERS:
        raise LlmBipError(f"unknown method '{name}': choose from {', '.join(SCORERS)}")
    factory = SCORERS[name]
    import inspect

    accepted = inspect.signature(factory).parameters
    return factory(**{k: v for k, v in options.items() if k in accepted and v is not None})


__all__ = ["LIPSCHITZ_VARIANTS", "SCORERS", "BlockGeometry", "BlockScores", "Scorer", "make_scorer"]
