"""Training checkpoints for recovery runs: everything needed to continue a run bit for bit.

`<checkpoint_dir>/checkpoint/` holds the trained weights (`adapter.safetensors` for LoRA, the float32 master
weights `weights.safetensors` for full fine-tuning), the optimizer and scheduler states, every random
generator's state, the data order of each epoch and `state.json` (step, config, trainer, objective, loss curve
so far, data and model fingerprints). Only the latest checkpoint is kept; it is written to a temporary folder
and renamed into place, so an interrupted save never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from llm_bip.errors import LlmBipError

CHECKPOINT_NAME = "checkpoint"
# The trained weights' file, by trainer (checkpoints from before full fine-tuning existed are LoRA ones).
WEIGHTS_FILES = {"lora": "adapter.safetensors", "full": "weights.safetensors"}
_FILES = ("optimizer.pt", "scheduler.pt", "rng.pt", "data_order.pt", "state.json")


@dataclass
class TrainingState:
    """What a checkpoint restores besides tensors: JSON-friendly values only."""

    step: int
    config: dict[str, Any]
    data_fingerprint: str
    model_signature: str
    train_loss: list[dict[str, float]]
    eval_history: list[dict[str, float]]
    eval_before: dict[str, float] | None
    train_time_s: float
    tokens_trained: int
    python_rng: Any = None
    numpy_rng: Any = None
    trainer: str = "lora"
    # The objective's description (`LmObjective.describe()` / `DistillObjective.describe()`); None: "lm".
    objective: dict[str, Any] | None = None
    # How the run's length was fitted to its time budget (`schedule.TimeFit`, one entry a fit); None: no budget
    # to fit to.
    time_fit: list[dict[str, Any]] | None = None


def checkpoint_path(checkpoint_dir: Path) -> Path:
    return Path(checkpoint_dir) / CHECKPOINT_NAME


def has_checkpoint(checkpoint_dir: Path) -> bool:
    return (checkpoint_path(checkpoint_dir) / "state.json").is_file()


def save_checkpoint(
    checkpoint_dir: Path,
    state: TrainingState,
    trainable: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    data_order: list[torch.Tensor],
    rng: dict[str, Any],
) -> Path:
    """Write the checkpoint; `rng` comes from `capture_rng` at the step boundary being saved."""
    checkpoint_dir = Path(checkpoint_dir)
    final = checkpoint_path(checkpoint_dir)
    tmp = checkpoint_dir / (CHECKPOINT_NAME + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(
        {k: v.detach().contiguous().cpu() for k, v in trainable.items()},
        str(tmp / WEIGHTS_FILES[state.trainer]),
    )
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save({k: v for k, v in rng.items() if k in ("torch", "cuda")}, tmp / "rng.pt")
    torch.save(data_order, tmp / "data_order.pt")
    state.python_rng = rng["python"]
    state.numpy_rng = rng["numpy"]
    (tmp / "state.json").write_text(json.dumps(state.__dict__, indent=1) + "\n", encoding="utf-8")
    old = checkpoint_dir / (CHECKPOINT_NAME + ".old")
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old)
    return final


@dataclass
class LoadedCheckpoint:
    state: TrainingState
    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: dict[str, Any]
    data_order: list[torch.Tensor]


def load_checkpoint(checkpoint_dir: Path) -> LoadedCheckpoint:
    path = checkpoint_path(checkpoint_dir)
    missing = [f for f in _FILES if not (path / f).is_file()]
    if missing:
        if not path.exists():
            raise LlmBipError(f"no checkpoint to resume from in {checkpoint_dir} (expected {path})")
        raise LlmBipError(f"checkpoint {path} is incomplete (missing {', '.join(missing)}); start a new run")
    try:
        state = TrainingState(**json.loads((path / "state.json").read_text(encoding="utf-8")))
    except (json.JSONDecodeError, TypeError) as e:
        raise LlmBipError(f"checkpoint {path}/state.json is unreadable ({e}); start a new run") from None
    weights = path / WEIGHTS_FILES.get(state.trainer, "")
    if state.trainer not in WEIGHTS_FILES or not weights.is_file():
        raise LlmBipError(
            f"checkpoint {path} is incomplete (no weights of trainer '{state.trainer}'); start a new run"
        )
    return LoadedCheckpoint(
        state=state,
        trainable=load_file(str(weights)),
        optimizer=torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True),
        scheduler=torch.load(path / "scheduler.pt", map_location="cpu", weights_only=True),
        rng=torch.load(path / "rng.pt", map_location="cpu", weights_only=True),
        data_order=torch.load(path / "data_order.pt", map_location="cpu", weights_only=True),
    )


def restore_tensors(saved: dict[str, torch.Tensor], targets: dict[str, torch.Tensor], kind: str, mismatch: str) -> None:
    """Copy a checkpoint's tensors into the trainer's (`kind`: what one is called in a message), refusing a
    checkpoint whose names (`mismatch` says so) or shapes differ: one check for both trainers."""
    if set(saved) != set(targets):
        raise LlmBipError(f"cannot resume: {mismatch}")
    with torch.no_grad():
        for name, target in targets.items():
            if saved[name].shape != target.shape:
                raise LlmBipError(f"cannot resume: {kind} {name} has shape {tuple(saved[name].shape)} in the checkpoint")
            target.copy_(saved[name])


def capture_rng() -> dict[str, Any]:
    """Every random generator's state, taken at an optimizer-step boundary."""
    rng: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": _json_python_rng(random.getstate()),
        "numpy": _json_numpy_rng(np.random.get_state()),
    }
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def restore_rng(ckpt: LoadedCheckpoint) -> None:
    torch.set_rng_state(ckpt.rng["torch"])
    if "cuda" in ckpt.rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt.rng["cuda"])
    if ckpt.state.python_rng is not None:
        version, internal, gauss = ckpt.state.python_rng
        random.setstate((version, tuple(internal), gauss))
    if ckpt.state.numpy_rng is not None:
        name, keys, pos, has_gauss, cached = ckpt.state.numpy_rng
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def _json_python_rng(state: tuple[Any, ...]) -> list[Any]:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _json_numpy_rng(state: Any) -> list[Any]:
    name, keys, pos, has_gauss, cached = state
    return [name, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)]
