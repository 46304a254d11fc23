"""Settings of a LoRA recovery run; defaults follow LLM-Pruner's published recipe."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm_bip.errors import LlmBipError

# Fields that only change what is logged or when the run stops, not the numbers it computes: a resumed run
# may change them, every other field must match the checkpoint or the continuation would not be exact.
RESUMABLE_FIELDS = frozenset({"max_time_s", "eval_steps", "save_steps", "progress_bar"})

# What is trained: LoRA adapters merged at the end (LLM-Pruner's recipe), or every weight of the model.
TRAINERS = ("lora", "full")
# LoraRecoveryConfig fields that only mean something to the LoRA trainer.
LORA_ONLY_FIELDS = ("lora_r", "lora_alpha", "lora_dropout", "target_modules")

# Named starting points for a LoRA run (`recover --recipe`, `LoraRecoveryConfig.recipe`); flags change them further.
# time-budget: what measured best for 30 minutes of LoRA on plain text on a 2-core CPU, each choice against the one
# before it (docs/results.md §11): rank 32 without the adapters' dropout (a third of a CPU step), lr 1e-3, one
# epoch, the schedule fitted to the time limit, and 1,024-token sequences at the tokens per step of 8 x 256.
RECIPES: dict[str, dict[str, Any]] = {
    "llm-pruner": {},
    "time-budget": {
        "lora_r": 32,
        "lora_alpha": 64,
        "lora_dropout": 0.0,
        "learning_rate": 1e-3,
        "num_epochs": 1,
        "batch_size": 2,
        "micro_batch_size": 1,
        "cutoff_len": 1024,
        "warmup_steps": 10,
        "val_set_size": 16,
        "max_time_s": 1800.0,
        "schedule_to_time": True,
    },
}


@dataclass
class LoraRecoveryConfig:
    """LoRA fine-tuning settings (LLM-Pruner: r 8, alpha 16, dropout 0.05, lr 1e-4, 2 epochs, batch 64, cutoff 256).

    `batch_size` is the number of examples per optimizer step, reached by gradient accumulation over
    micro-batches of `micro_batch_size`. `max_steps` caps the run and, as in Hugging Face's Trainer, sets the
    length of the learning-rate schedule; `max_time_s` only stops the run (the schedule is unchanged, so a
    resumed run continues it exactly), unless `schedule_to_time`: then the schedule ends when the time is up, as
    far as the measured pace of the run's steps tells (`recovery.schedule.TimeFit`: fitted after the first steps
    and again as the run goes; the fits are kept in the checkpoint, which a resumed run continues from). Full
    fine-tuning (`recover(..., trainer="full")`) uses every field but the LoRA-only ones (`LORA_ONLY_FIELDS`),
    which must then keep their defaults.
    """

    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    # None: the projections the model family's adapter names (`FamilyAdapter.lora_target_modules`).
    target_modules: tuple[str, ...] | None = None
    learning_rate: float = 1e-4
    num_epochs: int = 2
    batch_size: int = 64
    micro_batch_size: int = 4
    cutoff_len: int = 256
    warmup_steps: int = 100
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    val_set_size: int = 2000
    train_on_inputs: bool = False
    max_steps: int | None = None
    max_time_s: float | None = None
    schedule_to_time: bool = False
    eval_steps: int | None = 100
    save_steps: int = 200
    gradient_checkpointing: bool = False
    seed: int = 42
    progress_bar: bool = True

    def __post_init__(self) -> None:
        if self.target_modules is not None:
            self.target_modules = tuple(self.target_modules)
        positive = {
            "lora_r": self.lora_r,
            "lora_alpha": self.lora_alpha,
            "num_epochs": self.num_epochs,
            "batch_size": self.batch_size,
            "micro_batch_size": self.micro_batch_size,
            "cutoff_len": self.cutoff_len,
            "save_steps": self.save_steps,
        }
        for name, value in positive.items():
            if value < 1:
                raise LlmBipError(f"LoRA recovery: {name} must be at least 1, got {value}")
        if self.cutoff_len < 2:
            raise LlmBipError(f"LoRA recovery: cutoff_len must be at least 2 tokens, got {self.cutoff_len}")
        if self.batch_size % self.micro_batch_size:
            raise LlmBipError(
                f"LoRA recovery: batch_size {self.batch_size} must be a multiple of "
                f"micro_batch_size {self.micro_batch_size}"
            )
        if not 0.0 <= self.lora_dropout < 1.0:
            raise LlmBipError(f"LoRA recovery: lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.learning_rate <= 0:
            raise LlmBipError(f"LoRA recovery: learning_rate must be positive, got {self.learning_rate}")
        if self.max_steps is not None and self.max_steps < 1:
            raise LlmBipError(f"LoRA recovery: max_steps must be at least 1, got {self.max_steps}")
        if self.max_time_s is not None and self.max_time_s < 0:
            raise LlmBipError(f"LoRA recovery: max_time_s must not be negative, got {self.max_time_s}")
        if self.schedule_to_time and self.max_time_s is None:
            raise LlmBipError(
                "LoRA recovery: schedule_to_time (--schedule-to-time) needs max_time_s (--max-time), the time "
                "the schedule is fitted to"
            )
        if self.eval_steps is not None and self.eval_steps < 1:
            raise LlmBipError(f"LoRA recovery: eval_steps must be at least 1 or None, got {self.eval_steps}")
        if self.val_set_size < 0 or self.warmup_steps < 0:
            raise LlmBipError("LoRA recovery: val_set_size and warmup_steps must not be negative")
        if self.target_modules is not None and not self.target_modules:
            raise LlmBipError("LoRA recovery: target_modules must name at least one module")

    @property
    def gradient_accumulation_steps(self) -> int:
        return self.batch_size // self.micro_batch_size

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["target_modules"] = list(self.target_modules) if self.target_modules is not None else None
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n", encoding="utf-8")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LoraRecoveryConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise LlmBipError(
                f"LoRA recovery config: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return cls(**values)

    @classmethod
    def recipe(cls, name: str) -> LoraRecoveryConfig:
        """The settings of a named recipe (`RECIPES`); "llm-pruner" is the defaults."""
        if name not in RECIPES:
            raise LlmBipError(f"unknown recovery recipe {name!r}; known: {', '.join(RECIPES)}")
        return cls(**RECIPES[name])

    @classmethod
    def load(cls, path: str | Path) -> LoraRecoveryConfig:
        try:
            values = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise LlmBipError(f"LoRA recovery config file not found: {path}") from None
        except json.JSONDecodeError as e:
            raise LlmBipError(f"LoRA recovery config {path} is not valid JSON: {e}") from None
        if not isinstance(values, dict):
            raise LlmBipError(f"LoRA recovery config {path} must be a JSON object")
        return cls.from_dict(values)

    def differences(self, other: LoraRecoveryConfig) -> list[str]:
        """Names of fields that differ and would change the numbers of a resumed run."""
        mine, theirs = self.to_dict(), other.to_dict()
        return sorted(k for k in mine if k not in RESUMABLE_FIELDS and mine[k] != theirs[k])


@dataclass(frozen=True)
class DistillConfig:
    """Logit distillation from the dense model (the teacher): how its next-token distributions are used.

    The loss at each trained position is `alpha * temperature**2 * KL(teacher || student)` at `temperature`,
    plus `(1 - alpha)` times the usual cross-entropy on the data's next token: `alpha` 1 is pure distillation.
    The `temperature**2` factor keeps the KL term's gradients the same size whatever the temperature (Hinton et
    al.), so alpha means the same thing at every temperature. `top_k` is used only by a teacher cache: how many
    of the teacher's most likely tokens are stored per position (the rest of its mass is kept as one bucket).
    """

    alpha: float = 1.0
    temperature: float = 1.0
    top_k: int = 64

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha <= 1.0:
            raise LlmBipError(
                f"distillation: alpha (the weight of the KL term) must be in (0, 1], got {self.alpha}; "
                "without a KL term there is nothing to distil: train without a teacher"
            )
        if not self.temperature > 0.0 or self.temperature == float("inf"):
            raise LlmBipError(f"distillation: temperature must be a positive number, got {self.temperature}")
        if self.top_k < 1:
            raise LlmBipError(f"distillation: top_k must be at least 1, got {self.top_k}")

    @property
    def kind(self) -> str:
        """The objective's name: "distill" (KL only) or "mixed" (KL and the language-model loss)."""
        return "distill" if self.alpha == 1.0 else "mixed"
