"""A streamed prune that can be stopped (Ctrl-C, kill -9, power loss) and resumed from its last block.

The run writes into `.OUT.partial/` beside its output: the shards of the blocks it has finished, and
after each block (atomically, in this order) the activations entering the next block and `run.json`,
which names them, holds the plans and compensation records so far, the blocks chosen for removal, and
the run's key: the model's fingerprint, every option, and a checksum of the calibration samples.
`--resume` continues only a run with the same key, so it ends with exactly what an uninterrupted run
writes.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file

from llm_bip.block_loop import LoopResult
from llm_bip.compensation import Compensator
from llm_bip.errors import LlmBipError
from llm_bip.outputs import PARTIAL_MARKER
from llm_bip.pipeline import Resume
from llm_bip.plan import BlockPlan
from llm_bip.tensor_files import write_safetensors

PARTIAL_FORMAT = "llm-bip-partial/1"
RUN_FILE = "run.json"


def samples_checksum(samples: torch.Tensor | None) -> str | None:
    if samples is None:
        return None
    return hashlib.sha256(samples.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]


def partial_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


class PartialRun:
    """The Checkpoint of a streamed prune (see block_loop.Checkpoint)."""

    def __init__(self, directory: Path, state: dict) -> None:
        self.directory, self.state = directory, state

    @classmethod
    def find(cls, out: Path) -> PartialRun | None:
        directory = partial_dir(out)
        try:
            state = json.loads((directory / RUN_FILE).read_text())
        except (OSError, ValueError):
            return None
        if state.get("format") != PARTIAL_FORMAT or not (directory / PARTIAL_MARKER).exists():
            return None
        return cls(directory, state)

    @classmethod
    def start(cls, out: Path, key: dict) -> PartialRun:
        directory = partial_dir(out)
        if directory.exists():
            shutil.rmtree(directory)
        directory.mkdir(parents=True)
        (directory / PARTIAL_MARKER).write_text("an interrupted llm-bip run: resume it with --resume\n")
        run = cls(directory, {"format": PARTIAL_FORMAT, "key": key, "next_layer": 0, "plans": [], "compensation": [],
                              "inputs": None})
        run._write_state()
        return run

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)

    @property
    def next_layer(self) -> int:
        return self.state["next_layer"]

    def check_key(self, key: dict) -> None:
        """Refuse to continue a run of another model, with other options or other calibration data."""
        saved = self.state["key"]
        if saved == key:
            return
        what = {"model": "another model", "calibration": "other calibration data", "options": "other options"}
        for part in ("model", "calibration", "options"):
            if saved.get(part) != key.get(part):
                changed = _changes(saved.get(part), key.get(part))
                raise LlmBipError(f"cannot resume: the interrupted run in {self.directory} used {what[part]} "
                                  f"({changed}); rerun with the same ones, or pass --overwrite to start over")
        raise LlmBipError(f"cannot resume: the interrupted run in {self.directory} differs; pass --overwrite to start over")

    def save(self, layer: int, result: LoopResult, compensator: Compensator) -> None:
        """After block `layer` is written: the next block's inputs, then the state that names them."""
        tensors = {}
        if result.inputs is not None:
            tensors.update({f"hidden.{i}": h.detach().cpu().contiguous() for i, h in enumerate(result.inputs.hidden)})
        tensors.update({f"state.{k}": v.detach().cpu().contiguous() for k, v in compensator.state().items()})
        name = f"inputs-{layer + 1:05d}.safetensors"
        tmp = self.directory / (name + ".tmp")
        write_safetensors(tmp, tensors)
        tmp.replace(self.directory / name)
        previous = self.state.get("inputs")
        self.state.update(next_layer=layer + 1, inputs=name, plans=[asdict(p) for p in result.plans],
                          compensation=result.compensation, depth=result.depth)
        self._write_state()
        if previous and previous != name:
            (self.directory / previous).unlink(missing_ok=True)

    def restore(self) -> Resume:
        """Where to start, the loop's result so far, and the activations entering the next block."""
        result = LoopResult(plans=[BlockPlan(**p) for p in self.state["plans"]], compensation=self.state["compensation"],
                            depth=self.state.get("depth"))
        hidden, state = None, {}
        if self.state.get("inputs"):
            tensors = load_file(str(self.directory / self.state["inputs"]))
            keys = sorted((k for k in tensors if k.startswith("hidden.")), key=lambda k: int(k.split(".")[1]))
            hidden = [tensors[k] for k in keys] or None
            state = {k.removeprefix("state."): v for k, v in tensors.items() if k.startswith("state.")}
        return Resume(self.next_layer, result, hidden, state)

    def finish(self) -> None:
        """Drop the loop's state: what is left is the output."""
        (self.directory / RUN_FILE).unlink(missing_ok=True)
        for leftover in self.directory.glob("inputs-*.safetensors"):
            leftover.unlink()

    def _write_state(self) -> None:
        tmp = self.directory / (RUN_FILE + ".tmp")
        tmp.write_text(json.dumps(self.state, indent=1, default=str))
        tmp.replace(self.directory / RUN_FILE)


def _changes(saved, now) -> str:
    if isinstance(saved, dict) and isinstance(now, dict):
        diffs = [f"{k}: {saved.get(k)!r} then, {now.get(k)!r} now" for k in sorted(set(saved) | set(now))
                 if saved.get(k) != now.get(k)]
        return "; ".join(diffs[:4])
    return f"{saved!r} then, {now!r} now"
