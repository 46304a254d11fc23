"""Scores of a whole model, saved once and re-planned to any ratio without running the model again.

The file is safetensors (no pickle): one tensor per block and structure, and a JSON header with the
model's fingerprint, the scorer and its options, the calibration, each block's parameter costs and its
block score (`depth.py`). Format /2 added the block scores; /1 files still load, and can re-plan widths
but not remove blocks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from llm_bip.adapters import FamilyAdapter
from llm_bip.errors import LlmBipError
from llm_bip.fingerprint import model_fingerprint
from llm_bip.params import BlockCosts
from llm_bip.scoring.base import BlockScores

SCORES_FORMAT = "llm-bip-scores/2"
READABLE_FORMATS = ("llm-bip-scores/1", SCORES_FORMAT)  # /1: no block scores


def is_scores_file(path: Path) -> bool:
    try:
        with safe_open(str(path), "pt") as handle:
            return json.loads((handle.metadata() or {}).get("llm_bip", "{}")).get("format", "").startswith("llm-bip-scores")
    except Exception:  # noqa: BLE001
        return False


@dataclass
class ScoreTable:
    scores: list[BlockScores]
    costs: list[BlockCosts]
    fingerprint: str
    method: str
    options: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)
    comparable_units: bool = False
    seconds: float = 0.0

    def save(self, path: str | Path) -> None:
        tensors = {f"layer.{i}.{name}": t.contiguous() for i, s in enumerate(self.scores) for name, t in s.tensors().items()}
        header = {
            "format": SCORES_FORMAT,
            "fingerprint": self.fingerprint,
            "method": self.method,
            "options": self.options,
            "calibration": self.calibration,
            "comparable_units": self.comparable_units,
            "seconds": self.seconds,
            "costs": [c.to_json() for c in self.costs],
            "blocks": [{"output_norm": s.output_norm, "tokens": s.tokens, "lipschitz": s.lipschitz,
                        "block_score": s.block_score} for s in self.scores],
        }
        from llm_bip.outputs import write_atomic

        write_atomic(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata={"llm_bip": json.dumps(header)}))

    @classmethod
    def load(cls, path: str | Path) -> ScoreTable:
        path = Path(path)
        if not path.is_file():
            raise LlmBipError(f"scores file {path} does not exist: run `llm-bip score` first")
        try:
            with safe_open(str(path), "pt") as handle:
                header = json.loads(handle.metadata()["llm_bip"])
            tensors = load_file(str(path))
        except Exception as exc:  # noqa: BLE001
            raise LlmBipError(f"{path} is not an llm-bip scores file ({type(exc).__name__}): run `llm-bip score` again") from None
        if header.get("format") not in READABLE_FORMATS:
            raise LlmBipError(f"{path} is not an {SCORES_FORMAT} file (format {header.get('format')!r}): "
                              "run `llm-bip score` again")
        scores = [
            BlockScores(
                heads=tensors[f"layer.{i}.heads"], groups=tensors[f"layer.{i}.groups"],
                channels=tensors[f"layer.{i}.channels"], attn_mean=tensors[f"layer.{i}.attn_mean"],
                ffn_mean=tensors[f"layer.{i}.ffn_mean"], **block,
            )
            for i, block in enumerate(header["blocks"])
        ]
        return cls(
            scores=scores, costs=[BlockCosts.from_json(c) for c in header["costs"]], fingerprint=header["fingerprint"],
            method=header["method"], options=header["options"], calibration=header["calibration"],
            comparable_units=header["comparable_units"], seconds=header.get("seconds", 0.0),
        )

    def block_scores(self) -> list[float]:
        """Every block's score (depth.py); a table made before blocks were scored has none."""
        if any(s.block_score is None for s in self.scores):
            raise LlmBipError("the scores file has no block scores (it was made before llm-bip-scores/2): score the "
                              "model again with `llm-bip score` to remove whole blocks")
        return [float(s.block_score) for s in self.scores]

    def check_model(self, model: nn.Module, adapter: FamilyAdapter, path: str = "scores") -> None:
        self.check_fingerprint(model_fingerprint(model, adapter), path)

    def check_fingerprint(self, fingerprint: str, path: str = "scores") -> None:
        if fingerprint != self.fingerprint:
            raise LlmBipError(
                f"{path} was computed on another model (fingerprint mismatch): score this model with `llm-bip score`"
            )
