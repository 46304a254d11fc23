"""What a recovery run minimises: the language-model loss, or distillation from the dense model (maybe mixed).

An objective turns one micro-batch into accumulated gradients and summed losses, and evaluates held-out
examples; the training loop does not know which one it runs. Both count the same positions (the labelled
next tokens of `load_recovery_data`'s examples: every token of plain text, the response of instruction data
unless `train_on_inputs`), so a step's token count and normalisation are the same for every objective.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn

from llm_bip.evaluation.perplexity import output_logits
from llm_bip.recovery.config import DistillConfig
from llm_bip.recovery.data import Example
from llm_bip.recovery.distill import TeacherRows, distill_sums, final_hidden, trained_positions
from llm_bip.recovery.loss import collate, evaluate_loss, summed_loss
from llm_bip.recovery.teacher import LiveTeacherRows, Teacher
from llm_bip.recovery.teacher_cache import TeacherCache

ForwardContext = Callable[[], AbstractContextManager]


class LmObjective:
    """Next-token cross-entropy on the data (LLM-Pruner's recipe)."""

    def __init__(self, forward_context: ForwardContext | None = None) -> None:
        self.context = forward_context or nullcontext

    def describe(self) -> dict[str, Any]:
        return {"kind": "lm"}

    def train_micro(
        self, model: nn.Module, batch: dict[str, torch.Tensor], ids: Sequence[int], normalizer: int
    ) -> dict[str, float]:
        with self.context():
            loss = summed_loss(model, batch)
        # Normalised by the whole batch's token count: each token weighs the same however the batch is cut
        # into micro-batches.
        (loss / normalizer).backward()
        return {"loss": loss.item()}

    def evaluate(
        self,
        model: nn.Module,
        examples: Sequence[Example],
        ids: Sequence[int],
        micro_batch_size: int,
        pad_id: int,
        device: torch.device,
    ) -> dict[str, float]:
        with self.context():
            return evaluate_loss(model, examples, micro_batch_size, pad_id, device)


class DistillObjective:
    """alpha * T^2 * KL(teacher || student) + (1 - alpha) * cross-entropy, at every trained position.

    The teacher's distributions come from the teacher run on the fly (exact KL over the whole vocabulary), or
    from a `TeacherCache` of its top-k log-probabilities (the sparse KL of `distill.kl_topk_sum`).
    """

    def __init__(
        self,
        config: DistillConfig,
        teacher: Teacher,
        cache: TeacherCache | None = None,
        forward_context: ForwardContext | None = None,
        teacher_context: ForwardContext | None = None,
    ) -> None:
        self.config = config
        self.teacher = teacher
        self.cache = cache
        self.context = forward_context or nullcontext
        self.teacher_context = teacher_context or nullcontext

    def describe(self) -> dict[str, Any]:
        return describe_distillation(self.config, self.teacher, self.cache is not None)

    def _teacher_rows(
        self, batch: dict[str, torch.Tensor], positions: torch.Tensor, ids: Sequence[int]
    ) -> Callable[[int, int], TeacherRows]:
        device = batch["input_ids"].device
        if self.cache is not None:
            counts = positions.sum(1).tolist()
            rows = self.cache.read(ids, counts).to(device)
            return rows.rows
        return LiveTeacherRows(
            self.teacher.model(), batch, positions, self.config.temperature, device, self.teacher_context
        )

    def _sums(
        self,
        model: nn.Module,
        batch: dict[str, torch.Tensor],
        ids: Sequence[int],
        normalizer: int | None,
    ) -> dict[str, float]:
        positions = trained_positions(batch)
        teacher_rows = self._teacher_rows(batch, positions, ids)
        with self.context():
            hidden = final_hidden(model, batch)[:, :-1][positions]
        targets = batch["labels"][:, 1:][positions]
        return distill_sums(
            lambda h: output_logits(model, h),
            hidden,
            targets,
            teacher_rows,
            self.config,
            normalizer,
            forward_context=self.context,
        )

    def train_micro(
        self, model: nn.Module, batch: dict[str, torch.Tensor], ids: Sequence[int], normalizer: int
    ) -> dict[str, float]:
        return self._sums(model, batch, ids, normalizer)

    @torch.no_grad()
    def evaluate(
        self,
        model: nn.Module,
        examples: Sequence[Example],
        ids: Sequence[int],
        micro_batch_size: int,
        pad_id: int,
        device: torch.device,
    ) -> dict[str, float]:
        """Held-out LM loss and perplexity (as the LM objective reports them) and the mean KL to the teacher."""
        was_training = model.training
        model.eval()
        kl, lm, tokens = 0.0, 0.0, 0
        for start in range(0, len(examples), micro_batch_size):
            chunk = examples[start : start + micro_batch_size]
            sums = self._sums(
                model, collate(chunk, pad_id, device), ids[start : start + micro_batch_size], None
            )
            kl += sums["kl"]
            lm += sums["lm"]
            tokens += sum(ex.n_targets for ex in chunk)
        model.train(was_training)
        loss = lm / max(tokens, 1)
        return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "tokens": tokens, "kl": kl / max(tokens, 1)}


Objective = LmObjective | DistillObjective  # what the training loop calls


def describe_distillation(config: DistillConfig, teacher: Teacher, cached: bool) -> dict[str, Any]:
    """What a run distils and how: the report says it, the checkpoint keeps it, a resumed run must match it."""
    return {
        "kind": config.kind,
        "alpha": config.alpha,
        "temperature": config.temperature,
        "teacher": teacher.source,
        "teacher_identity": teacher.identity,
        # "full": the teacher's whole distribution, run on the fly; "top-k": its top-k from a teacher cache.
        "teacher_targets": "top-k" if cached else "full",
        "top_k": min(config.top_k, teacher.vocab_size) if cached else None,
        "positions": "trained tokens (those of the LM loss)",
    }
