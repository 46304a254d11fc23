"""A teacher's top-k next-token log-probabilities on disk, so later runs and resumes need no teacher in memory.

Layout of the directory: `cache.json` holds the key; `shard-NNNNN.safetensors` files hold, for up to
`SHARD_EXAMPLES` examples each, the rows of every trained position (the positions of the LM loss, in order):
`logprobs` [rows, k] float32, `indices` [rows, k] int32, `remainder` [rows] float32 (log-mass outside the top
k), with `example_ids` and `offsets` saying which rows are whose. Example ids number the training examples
first, then the held-out ones, as `load_recovery_data` splits them.

The key is everything the stored numbers depend on: the tokenized data (its fingerprint covers the text, the
tokenizer, the cut-off length, the split and which positions are trained), the cut-off length, the teacher's
identity, temperature, k, compute dtype and vocabulary. A directory whose key differs is refused, never
overwritten. Shards are written atomically as they are computed, so an interrupted build keeps what it had
finished, and a later run that needs more examples (more steps) adds shards for the missing ones only.
Size on disk: 8k + 4 bytes per trained position (516 bytes at k = 64).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from llm_bip.errors import LlmBipError
from llm_bip.evaluation.perplexity import output_logits
from llm_bip.outputs import write_atomic, write_text_atomic
from llm_bip.recovery.data import Example
from llm_bip.recovery.distill import (
    DISTILL_CHUNK,
    TopK,
    final_hidden,
    teacher_topk,
    trained_positions,
)
from llm_bip.recovery.loss import collate

CACHE_FORMAT = "llm-bip-teacher-topk-1"
KEY_FILE = "cache.json"
SHARD_EXAMPLES = 256


class TeacherCache:
    """An open cache directory whose key matched (or was just written)."""

    def __init__(self, directory: Path, key: dict[str, Any]) -> None:
        self.directory = directory
        self.key = key
        self.digest = key_digest(key)
        self._where: dict[int, tuple[Path, int, int]] = {}
        self._handles: dict[Path, Any] = {}
        self._index()

    @classmethod
    def open(cls, directory: str | Path, key: dict[str, Any]) -> TeacherCache:
        directory = Path(directory).expanduser()
        key_file = directory / KEY_FILE
        if key_file.is_file():
            try:
                stored = json.loads(key_file.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as e:
                raise LlmBipError(
                    f"teacher cache {directory}: {KEY_FILE} is unreadable ({e}); delete the directory"
                ) from None
            differ = [name for name in sorted(set(key) | set(stored)) if key.get(name) != stored.get(name)]
            if differ:
                raise LlmBipError(
                    f"teacher cache {directory} was made for another {', '.join(_describe(n) for n in differ)}: "
                    "pass another --teacher-cache directory (or delete this one)"
                )
        elif directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
            raise LlmBipError(
                f"--teacher-cache {directory} is not a teacher cache and not empty: pass a new or empty directory"
            )
        else:
            write_text_atomic(key_file, json.dumps(key, indent=1, sort_keys=True) + "\n")
        return cls(directory, key)

    def _index(self) -> None:
        for shard in sorted(self.directory.glob("shard-*.safetensors")):
            handle = safe_open(str(shard), framework="pt")
            if (handle.metadata() or {}).get("key") != self.digest:
                raise LlmBipError(
                    f"teacher cache shard {shard} belongs to another cache: delete the directory"
                )
            ids = handle.get_tensor("example_ids").tolist()
            offsets = handle.get_tensor("offsets").tolist()
            self._handles[shard] = handle
            for j, example in enumerate(ids):
                self._where[example] = (shard, offsets[j], offsets[j + 1])

    def __len__(self) -> int:
        return len(self._where)

    def missing(self, ids: Sequence[int]) -> list[int]:
        return sorted({i for i in ids if i not in self._where})

    def read(self, ids: Sequence[int], expected_rows: Sequence[int]) -> TopK:
        """The rows of `ids`' trained positions, concatenated in that order."""
        parts = []
        for example, rows in zip(ids, expected_rows, strict=True):
            if example not in self._where:
                raise LlmBipError(f"teacher cache {self.directory} has no entry for example {example}")
            shard, start, end = self._where[example]
            if end - start != rows:
                raise LlmBipError(f"teacher cache {self.directory} is corrupt (example {example}): delete it")
            handle = self._handles[shard]
            parts.append(
                TopK(
                    handle.get_slice("logprobs")[start:end],
                    handle.get_slice("indices")[start:end],
                    handle.get_slice("remainder")[start:end],
                )
            )
        return TopK.cat(parts)

    def write(self, ids: list[int], rows: list[TopK]) -> None:
        """One new shard holding `rows[j]` for example `ids[j]`."""
        number = len(self._handles)
        shard = self.directory / f"shard-{number:05d}.safetensors"
        while shard.exists():
            number += 1
            shard = self.directory / f"shard-{number:05d}.safetensors"
        offsets = [0]
        for r in rows:
            offsets.append(offsets[-1] + len(r))
        together = TopK.cat(rows)
        tensors = {
            "example_ids": torch.tensor(ids, dtype=torch.int64),
            "offsets": torch.tensor(offsets, dtype=torch.int64),
            "logprobs": together.logprobs.float().contiguous().cpu(),
            # int32 holds any vocabulary (int16 would not hold 49,152) at half the size of int64.
            "indices": together.indices.to(torch.int32).contiguous().cpu(),
            "remainder": together.remainder.float().contiguous().cpu(),
        }
        write_atomic(shard, lambda tmp: save_file(tensors, str(tmp), metadata={"key": self.digest}))
        handle = safe_open(str(shard), framework="pt")
        self._handles[shard] = handle
        for j, example in enumerate(ids):
            self._where[example] = (shard, offsets[j], offsets[j + 1])

    def fill(
        self,
        examples: dict[int, Example],
        teacher: nn.Module,
        top_k: int,
        temperature: float,
        micro_batch_size: int,
        pad_id: int,
        forward_context: Callable[[], AbstractContextManager],
        progress: bool = True,
    ) -> int:
        """Run the teacher on every example in `examples` that the cache lacks; returns how many."""
        todo = self.missing(list(examples))
        if not todo:
            return 0
        device = teacher.get_input_embeddings().weight.device
        was_training = teacher.training
        teacher.eval()
        bar = tqdm(total=len(todo), desc="teacher cache", unit="example", disable=not progress)
        try:
            for shard_start in range(0, len(todo), SHARD_EXAMPLES):
                shard_ids = todo[shard_start : shard_start + SHARD_EXAMPLES]
                rows: list[TopK] = []
                for start in range(0, len(shard_ids), micro_batch_size):
                    micro_ids = shard_ids[start : start + micro_batch_size]
                    rows += _teacher_rows(
                        teacher,
                        [examples[i] for i in micro_ids],
                        top_k,
                        temperature,
                        pad_id,
                        device,
                        forward_context,
                    )
                    bar.update(len(micro_ids))
                self.write(shard_ids, rows)
        finally:
            bar.close()
            teacher.train(was_training)
        return len(todo)


@torch.no_grad()
def _teacher_rows(
    teacher: nn.Module,
    examples: list[Example],
    top_k: int,
    temperature: float,
    pad_id: int,
    device: torch.device,
    forward_context: Callable[[], AbstractContextManager],
) -> list[TopK]:
    """Each example's TopK rows (one per trained position), computed from one batched teacher pass."""
    batch = collate(examples, pad_id, device)
    positions = trained_positions(batch)
    with forward_context():
        hidden = final_hidden(teacher, batch)[:, :-1]
    out = []
    for row, ex in enumerate(examples):
        selected = hidden[row][positions[row]]
        parts = []
        for start in range(0, selected.shape[0], DISTILL_CHUNK):
            with forward_context():
                logits = output_logits(teacher, selected[start : start + DISTILL_CHUNK])
            parts.append(teacher_topk(logits, top_k, temperature))
        rows = TopK.cat(parts)
        if len(rows) != ex.n_targets:
            raise LlmBipError(
                "internal error: teacher cache rows do not match the example's trained positions"
            )
        out.append(TopK(rows.logprobs.cpu(), rows.indices.cpu(), rows.remainder.cpu()))
    return out


def key_digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _describe(name: str) -> str:
    return {
        "data": "training text (or tokenizer, cut-off length or split)",
        "seq_len": "sequence length (cut-off)",
        "teacher": "teacher",
        "temperature": "temperature",
        "top_k": "top-k",
        "dtype": "compute dtype",
        "vocab": "vocabulary",
        "format": "cache format",
    }.get(name, name)
