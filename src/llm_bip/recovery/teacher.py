"""The dense model a pruned model is distilled from: who it is, that it speaks the same vocabulary, its outputs.

A `Teacher` may hold its model or only know how to load it: with a teacher cache that already holds every
position a run needs, the model is never loaded. Its identity (what a teacher cache and a resumed run compare)
is the files it comes from (resolved path and total size of its weight files) or, for a model that exists
only in memory, a fingerprint of its weights.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from llm_bip.errors import LlmBipError
from llm_bip.evaluation.perplexity import output_logits
from llm_bip.recovery.distill import final_hidden, log_probs

# Files whose bytes identify a model's weights (and config) on disk.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")


@dataclass
class Teacher:
    """A teacher model, held or loadable; `identity` and `vocab_size` are known without loading it."""

    identity: dict[str, Any]
    vocab_size: int
    tokenizer: PreTrainedTokenizerBase | None = None
    loader: Callable[[], nn.Module] | None = None
    _model: nn.Module | None = field(default=None, repr=False)

    @classmethod
    def in_memory(
        cls, model: nn.Module, tokenizer: PreTrainedTokenizerBase | None = None, source: str | None = None
    ) -> Teacher:
        """A teacher already loaded. Identified by the files it was loaded from when `source` is a local path
        (so a later run may pass the path instead), else by a fingerprint of its weights; it must not be
        changed in memory between runs that share a teacher cache."""
        if source is not None and Path(source).expanduser().exists():
            identity = files_identity(Path(source).expanduser())
        else:
            identity = {"source": source or type(model).__name__, "fingerprint": weights_fingerprint(model)}
        return cls(identity, output_size(model), tokenizer, None, model)

    @property
    def source(self) -> str:
        return str(self.identity["source"])

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def model(self) -> nn.Module:
        if self._model is None:
            if self.loader is None:
                raise LlmBipError(f"the teacher {self.source} is neither in memory nor loadable")
            self._model = self.loader()
            if output_size(self._model) != self.vocab_size:
                raise LlmBipError(
                    f"the teacher {self.source} loaded with {output_size(self._model)} output tokens, but its "
                    f"config says {self.vocab_size}: the checkpoint is inconsistent"
                )
        return self._model

    def release(self) -> None:
        """Free a model this object loaded itself (one handed in stays with its owner)."""
        if self.loader is not None:
            self._model = None


def files_identity(path: Path) -> dict[str, Any]:
    """Resolved location and total size of the weight files of a model directory or .gguf file."""
    path = path.resolve()
    files = [path] if path.is_file() else [p for p in sorted(path.iterdir()) if p.suffix in _WEIGHT_SUFFIXES]
    return {"source": str(path), "bytes": sum(p.stat().st_size for p in files)}


def weights_fingerprint(model: nn.Module) -> str:
    """Names, shapes and a float64 sum of every parameter: two different models practically never agree."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            total = float(p.detach().abs().sum(dtype=torch.float64)) if p.device.type != "meta" else 0.0
            digest.update(f"{name}|{tuple(p.shape)}|{total:.12e}".encode())
    return digest.hexdigest()[:16]


def output_size(model: nn.Module) -> int:
    """The number of tokens the model's logits cover (the LM head's rows, padding rows included)."""
    return int(model.get_output_embeddings().weight.shape[0])


def vocab_digest(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of the token -> id map: equal for tokenizers that split text into the same ids."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]


def check_same_vocabulary(
    teacher: Teacher, student: nn.Module, tokenizer: PreTrainedTokenizerBase | None
) -> None:
    """Distillation compares distributions token by token: both models need the same token ids."""
    if teacher.vocab_size != output_size(student):
        raise LlmBipError(
            f"the teacher {teacher.source} predicts {teacher.vocab_size} tokens and the student "
            f"{output_size(student)}: distillation needs the same tokenizer and vocabulary (pass the dense model "
            "the student was pruned from)"
        )
    if teacher.tokenizer is not None and tokenizer is not None:
        if vocab_digest(teacher.tokenizer) != vocab_digest(tokenizer):
            raise LlmBipError(
                f"the teacher {teacher.source} has another tokenizer than the student (the same number of tokens, "
                "but different ones): distillation needs the same tokenizer (pass the dense model the student was "
                "pruned from)"
            )


class LiveTeacherRows:
    """The teacher's full log-probabilities for one batch's trained positions, made a chunk at a time.

    The teacher runs under no_grad in eval mode, in `forward_context` (the run's compute dtype), on its own
    device; only its final hidden states for the batch stay in memory, and each chunk of log-probabilities
    (float32) is moved to `device` for the loss.
    """

    def __init__(
        self,
        model: nn.Module,
        batch: dict[str, torch.Tensor],
        positions: torch.Tensor,
        temperature: float,
        device: torch.device,
        forward_context: Callable[[], AbstractContextManager] | None = None,
    ) -> None:
        self.model, self.temperature, self.device = model, temperature, device
        self.context = forward_context or nullcontext
        teacher_device = model.get_input_embeddings().weight.device
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), self.context():
                moved = {k: v.to(teacher_device) for k, v in batch.items()}
                self.hidden = final_hidden(model, moved)[:, :-1][positions.to(teacher_device)]
        finally:
            model.train(was_training)

    def __call__(self, start: int, end: int) -> torch.Tensor:
        with torch.no_grad(), self.context():
            logits = output_logits(self.model, self.hidden[start:end])
        return log_probs(logits, self.temperature).to(self.device)
