"""The distillation loss: KL(teacher || student) between next-token distributions, in float32, chunked.

Vocabulary-sized logits are the largest tensors of a training step (SmolLM2: 49,152 floats per position, 0.8 GB
in float32 for a micro-batch of 4 x 1,024 tokens, and the KL needs several such tensors). So the loss is
computed `chunk` positions at a time from the final hidden states, and in training each chunk's gradient is
taken at once (`distill_sums(..., normalizer=...)`): the chunk's logits are freed before the next chunk's are
made, and the gradient reaching the hidden states is passed through the decoder in one backward pass at the
end. At most one chunk of `[chunk, vocab]` tensors exists at any time, for the teacher and the student alike.

Two forms of the teacher's distribution:

* full log-probabilities (a teacher run on the fly): the exact KL;
* `TopK`, the teacher's k most likely tokens plus one bucket for the rest of its mass (a teacher cache). The
  KL is then taken between the two distributions coarse-grained to those k + 1 outcomes. What is
  approximated: how the teacher spreads its remaining mass over the other tokens is not known, so the student
  is only asked to give the bucket as a whole the same mass, not to match the teacher inside it. This is a
  lower bound of the full KL, equal to it when k is the vocabulary size (or when the student's distribution
  inside the bucket is proportional to the teacher's).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llm_bip.recovery.config import DistillConfig
from llm_bip.recovery.data import IGNORE_INDEX

# Positions whose logits exist at once: [1024, vocab] float32 is 200 MB for a 49k vocabulary.
DISTILL_CHUNK = 1024


@dataclass(frozen=True)
class TopK:
    """A teacher's next-token distribution at n positions, kept sparse (at the run's temperature)."""

    logprobs: torch.Tensor  # [n, k] float32: log-probabilities of the k most likely tokens
    indices: torch.Tensor  # [n, k] int64: those tokens
    remainder: torch.Tensor  # [n] float32: log of the mass outside the top k (-inf when k is the vocabulary)

    def __len__(self) -> int:
        return self.logprobs.shape[0]

    def rows(self, start: int, end: int) -> TopK:
        return TopK(self.logprobs[start:end], self.indices[start:end], self.remainder[start:end])

    def to(self, device: torch.device) -> TopK:
        return TopK(self.logprobs.to(device), self.indices.to(device).long(), self.remainder.to(device))

    @staticmethod
    def cat(parts: list[TopK]) -> TopK:
        return TopK(
            torch.cat([p.logprobs for p in parts]),
            torch.cat([p.indices for p in parts]),
            torch.cat([p.remainder for p in parts]),
        )


TeacherRows = torch.Tensor | TopK  # full log-probabilities [n, vocab], or a TopK


def final_hidden(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The decoder's last hidden states [batch, length, hidden], without making any logits."""
    out = model.base_model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    )
    return out.last_hidden_state


def trained_positions(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[batch, length - 1] mask of the positions whose next token is trained on (the LM loss's positions)."""
    return batch["labels"][:, 1:] != IGNORE_INDEX


def log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return F.log_softmax(logits.float() / temperature, dim=-1)


def kl_full_sum(
    student_logits: torch.Tensor, teacher_logprobs: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Sum over positions of KL(teacher || student) at `temperature`; `teacher_logprobs` are already at it."""
    return _kl_full(log_probs(student_logits, temperature), teacher_logprobs)


def _kl_full(student: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    return F.kl_div(student, teacher_logprobs.float(), log_target=True, reduction="sum")


def teacher_topk(teacher_logits: torch.Tensor, k: int, temperature: float) -> TopK:
    """The k most likely tokens' log-probabilities at `temperature` and the log-mass of all the others.

    The remainder stays exact when it is tiny (rest_log_mass), and is exactly -inf when k covers the vocabulary.
    """
    logprobs = log_probs(teacher_logits, temperature)
    values, indices = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
    return TopK(values, indices, rest_log_mass(logprobs, values, indices, float("-inf")))


# Above this mass in the top k, the rest's log-mass is summed over the other tokens, not taken as 1 - the top's
# mass: float32 log-probabilities give that difference to about 1e-7, 1e-5 of 1%.
EXACT_REST_ABOVE = 0.99


def rest_log_mass(logprobs: torch.Tensor, top: torch.Tensor, indices: torch.Tensor, masked: float) -> torch.Tensor:
    """Log of the mass outside `indices` ([n, k]) of the distributions `logprobs` ([n, vocab]), `top` their values.

    log(1 - the top's mass) costs k numbers a position where a sum over the vocabulary costs a pass over
    [n, vocab] (forward, and two backward where there is a gradient: a training step's largest tensors). Where
    the top holds nearly all the mass, the sum over the other tokens, exactly, with the top's entries set to
    `masked`: -inf gives exactly -inf where k covers the vocabulary; the most negative finite float keeps the
    log-sum-exp's gradient finite there.
    """
    top_mass = top.double().exp().sum(-1)
    rest = torch.log1p(-top_mass.clamp(max=EXACT_REST_ABOVE)).to(logprobs.dtype)
    near = (top_mass > EXACT_REST_ABOVE).nonzero().squeeze(1)
    if near.numel():
        exact = logprobs[near].scatter(-1, indices[near], masked).logsumexp(-1)
        rest = rest.index_put((near,), exact)
    return rest


def kl_topk_sum(student_logits: torch.Tensor, teacher: TopK, temperature: float) -> torch.Tensor:
    """Sum over positions of the KL between teacher and student collapsed to the teacher's top k + 1 bucket.

    The teacher's k + 1 probabilities are renormalized to sum to one (they do up to rounding: this only guards
    against stored log-probabilities that were rounded). The student's are its exact probabilities at the
    teacher's top-k tokens and its total mass on every other token. See the module docstring for what this
    approximates.
    """
    return _kl_topk(log_probs(student_logits, temperature), teacher)


def _kl_topk(student: torch.Tensor, teacher: TopK) -> torch.Tensor:
    student_top = student.gather(-1, teacher.indices)
    # The student's mass outside the teacher's top k (where k covers the vocabulary, that bucket carries no
    # teacher mass and contributes 0; its gradient must stay finite there: the most negative float, not -inf).
    student_rest = rest_log_mass(student, student_top, teacher.indices, torch.finfo(student.dtype).min)

    log_z = torch.cat([teacher.logprobs.float(), teacher.remainder.float()[:, None]], dim=-1).logsumexp(-1)
    teacher_top = teacher.logprobs.float() - log_z[:, None]
    teacher_rest = teacher.remainder.float() - log_z
    top_term = F.kl_div(student_top, teacher_top, log_target=True, reduction="sum")
    has_rest = torch.isfinite(teacher_rest)
    rest_mass = torch.where(has_rest, teacher_rest.exp(), torch.zeros_like(teacher_rest))
    rest_log = torch.where(has_rest, teacher_rest, torch.zeros_like(teacher_rest))
    return top_term + (rest_mass * (rest_log - student_rest)).sum()


def kl_and_ce_sums(
    student_logits: torch.Tensor, teacher: TeacherRows, temperature: float, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(KL to the teacher at `temperature`, cross-entropy of `targets` at temperature 1), summed over positions.

    One log-softmax of the student serves both where the temperature is 1 (a full-vocabulary pass fewer,
    forward and backward: the loss head of a distillation step cost 2.8x the LM loss's before, on SmolLM2).
    """
    student = log_probs(student_logits, temperature)
    kl = _kl_topk(student, teacher) if isinstance(teacher, TopK) else _kl_full(student, teacher)
    if temperature == 1.0:
        ce = -student.gather(-1, targets[:, None]).sum()
    else:
        ce = F.cross_entropy(student_logits.float(), targets, reduction="sum")
    return kl, ce


def distill_sums(
    logits_of: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    targets: torch.Tensor,
    teacher_rows: Callable[[int, int], TeacherRows],
    config: DistillConfig,
    normalizer: float | None = None,
    chunk: int = DISTILL_CHUNK,
    forward_context: Callable[[], AbstractContextManager] | None = None,
) -> dict[str, float]:
    """Summed KL and cross-entropy over `hidden`'s positions ([n, hidden], in training order), a chunk at a time.

    `logits_of` makes the student's logits for some rows of `hidden`; `teacher_rows(start, end)` gives the
    teacher's distribution for the same rows; `targets` are the data's next tokens. With `normalizer`, the
    gradient of `loss / normalizer` (loss = alpha * T^2 * KL + (1 - alpha) * CE) is accumulated into the
    parameters, through the head chunk by chunk and then through the decoder once. Returns the sums as floats:
    {"loss", "kl" (at the temperature, without the T^2), "lm" (cross-entropy at temperature 1)}.
    `forward_context` (autocast) wraps the forward computations only: backward passes run outside it.
    """
    alpha, temperature = config.alpha, config.temperature
    training = normalizer is not None
    # The chunks' backward passes stop at this leaf; its gradient then goes through the decoder once.
    leaf = hidden.detach().requires_grad_(training and hidden.requires_grad)
    kl_total = torch.zeros((), dtype=torch.float64, device=hidden.device)
    ce_total = torch.zeros((), dtype=torch.float64, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk):
        end = min(start + chunk, hidden.shape[0])
        teacher = teacher_rows(start, end)
        with forward_context() if forward_context else nullcontext():
            logits = logits_of(leaf[start:end])
        kl, ce = kl_and_ce_sums(logits, teacher, temperature, targets[start:end])
        if alpha < 1.0:
            loss = alpha * temperature**2 * kl + (1.0 - alpha) * ce
        else:
            # Reported, not trained on: the data's loss shows how distillation moves the LM loss.
            ce = ce.detach()
            loss = temperature**2 * kl
        if training and loss.requires_grad:
            (loss / normalizer).backward()
        kl_total += kl.detach().double()
        ce_total += ce.detach().double()
        del logits, teacher, kl, ce, loss
    if leaf.grad is not None:
        hidden.backward(leaf.grad)
    kl_value, ce_value = kl_total.item(), ce_total.item()
    loss_value = alpha * temperature**2 * kl_value + (1.0 - alpha) * ce_value
    return {"loss": loss_value, "kl": kl_value, "lm": ce_value}
