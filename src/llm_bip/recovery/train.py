"""The recovery training loop: fine-tune a (pruned) causal LM with LoRA or in full, on the LM loss or by
distillation from the dense model.

A plain PyTorch loop (not the HF Trainer) so that checkpoints hold exactly what an exact resume needs and the
loss is computed the same way in training and evaluation. What is trained is the trainer's business
(`lora.LoraTrainer`, `full.FullTrainer`); what is minimised is the objective's (`objective.LmObjective`,
`objective.DistillObjective`); this loop only orders the data, steps the optimizer and the schedule, and
checkpoints.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from llm_bip.adapters import adapter_for
from llm_bip.errors import LlmBipError
from llm_bip.recovery.checkpoint import (
    TrainingState,
    capture_rng,
    has_checkpoint,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from llm_bip.recovery.config import LORA_ONLY_FIELDS, TRAINERS, DistillConfig, LoraRecoveryConfig
from llm_bip.recovery.data import DEFAULT_DATASET, Example, load_recovery_data
from llm_bip.recovery.full import FullTrainer
from llm_bip.recovery.lora import LoraTrainer
from llm_bip.recovery.loss import collate
from llm_bip.recovery.objective import DistillObjective, LmObjective, Objective, describe_distillation
from llm_bip.recovery.schedule import LinearSchedule, TimeFit, effective_warmup
from llm_bip.recovery.teacher import Teacher, check_same_vocabulary, vocab_digest
from llm_bip.recovery.teacher_cache import CACHE_FORMAT, TeacherCache

log = logging.getLogger(__name__)


def recover(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    data: str | Path = DEFAULT_DATASET,
    config: LoraRecoveryConfig | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    *,
    trainer: str = "lora",
    teacher: Teacher | nn.Module | None = None,
    distill: DistillConfig | None = None,
    teacher_cache: str | Path | None = None,
    dtype: str | None = None,
) -> tuple[PreTrainedModel, dict[str, Any]]:
    """Fine-tune `model` on `data` and return `(model, report)`.

    `trainer`: "lora" (adapters, merged at the end; LLM-Pruner's recipe) or "full" (every weight; AdamW on
    float32 master weights where the weights are half precision, see `recovery.full`). `teacher` (a `Teacher`,
    or a model in memory with the same vocabulary) switches the objective to distillation as `distill` says
    (default: pure KL at temperature 1); `teacher_cache` is a directory for the teacher's top-k
    log-probabilities (see `recovery.teacher_cache`), so that a later run or a resume does not load the
    teacher. `dtype` is the compute dtype of the forward passes, student and teacher, by autocast where the
    weights are float32 (None: the weights' own dtype).

    The model is changed in place and returned as the same class with the same module shapes. Its weights
    keep their dtype; the trained weights (LoRA adapters, or full fine-tuning's masters) and the loss are fp32,
    so a bf16/fp16 model trains stably. With `checkpoint_dir`, the run state is saved every
    `config.save_steps` optimizer steps and when the run stops; `resume=True` continues from there and needs
    the same original (unmerged) model, data, config, trainer and objective (only max_time_s, eval_steps,
    save_steps and progress_bar may change).

    The report holds: trainer, objective ({kind: "lm" | "distill" | "mixed", alpha, temperature, teacher,
    ...}), steps, total_steps, stopped ("completed", "max_steps", "max_time", or "time_schedule": the end of a
    schedule fitted to max_time_s), time_fit (how that schedule was fitted, a list of fits; None without one),
    train_loss (a list of {step, loss, lr}, with kl and lm for distillation), eval_before / eval_after ({loss,
    ppl, tokens} on the held-out split, plus kl for distillation; None without one), eval_history, time_s,
    train_time_s, tokens_trained, trainable_params, data sizes and config.
    """
    run_start = time.monotonic()
    config = config or LoraRecoveryConfig()
    runner = _trainer(trainer, model, config)
    config = runner.config if isinstance(runner, LoraTrainer) else config
    if teacher is None and (distill is not None or teacher_cache is not None):
        what = "distillation settings" if distill is not None else "a teacher cache"
        raise LlmBipError(f"{what} need a teacher: pass the dense model as the teacher")
    if teacher is not None and not isinstance(teacher, Teacher):
        teacher = Teacher.in_memory(teacher)
    if teacher is not None:
        distill = distill or DistillConfig()
        check_same_vocabulary(teacher, model, tokenizer)
    objective_description = (
        describe_distillation(distill, teacher, teacher_cache is not None)
        if teacher is not None
        else {"kind": "lm"}
    )

    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    ckpt = None
    if resume:
        if ckpt_dir is None:
            raise LlmBipError("resuming needs the checkpoint directory of the interrupted run")
        ckpt = load_checkpoint(ckpt_dir)
        if ckpt.state.trainer != runner.name:
            raise LlmBipError(
                f"cannot resume from {ckpt_dir}: the checkpoint was trained with the {ckpt.state.trainer} trainer, "
                f"this run asks for {runner.name}"
            )
        diff = LoraRecoveryConfig.from_dict(ckpt.state.config).differences(config)
        if diff:
            raise LlmBipError(
                f"cannot resume from {ckpt_dir}: the config differs from the checkpoint's in {', '.join(diff)}"
            )
        before = ckpt.state.objective or {"kind": "lm"}
        if before != objective_description:
            raise LlmBipError(
                f"cannot resume from {ckpt_dir}: the checkpoint's objective was {objective_summary(before)}, "
                f"this run asks for {objective_summary(objective_description)}"
            )
    elif ckpt_dir is not None and has_checkpoint(ckpt_dir):
        raise LlmBipError(
            f"{ckpt_dir} already holds a recovery checkpoint: resume it, or pass an empty checkpoint directory"
        )

    signature = runner.signature()
    if ckpt is not None and ckpt.state.model_signature != signature:
        raise LlmBipError(
            "cannot resume: the model differs from the one the checkpoint was trained on "
            "(pass the same pruned model as before, not the merged result)"
        )
    data_set = load_recovery_data(
        data, tokenizer, config.cutoff_len, config.val_set_size, config.train_on_inputs, config.seed,
        bos_id=_window_bos(model, tokenizer),
    )
    if ckpt is not None and ckpt.state.data_fingerprint != data_set.fingerprint:
        raise LlmBipError("cannot resume: the training data (or tokenizer) differs from the checkpoint's")
    train, val = data_set.train, data_set.val
    # Example ids (what a teacher cache is indexed by): the training examples, then the held-out ones.
    val_ids = list(range(len(train), len(train) + len(val)))
    log.info("recovery data %s: %d train / %d held-out examples", data_set.source, len(train), len(val))

    device = model.get_input_embeddings().weight.device
    pad_id = _pad_id(tokenizer)
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    planned_steps = config.num_epochs * steps_per_epoch
    total_steps = min(planned_steps, config.max_steps) if config.max_steps else planned_steps
    run_steps = total_steps  # what the run would be without fitting it to a time budget
    if ckpt is not None and ckpt.state.time_fit:
        total_steps = ckpt.state.time_fit[-1]["total_steps"]  # a resume keeps the fitted schedule
    if ckpt is not None:
        data_order = ckpt.data_order
    else:
        # Own generators: the data order neither uses nor moves the global random state.
        data_order = [
            torch.randperm(len(train), generator=torch.Generator().manual_seed(config.seed + epoch))
            for epoch in range(config.num_epochs)
        ]
    if len(data_order) != config.num_epochs or any(len(o) != len(train) for o in data_order):
        raise LlmBipError("cannot resume: the checkpoint's data order does not match the training data")

    def forward_context() -> AbstractContextManager:
        return _compute_context(model, dtype)

    objective: Objective = LmObjective(forward_context)
    cache_report = None
    if teacher is not None:
        # The teacher is loaded (or its cache filled) before the random state is seeded or restored, so
        # whatever loading does to it cannot make a resumed run differ from an uninterrupted one.
        def teacher_context() -> AbstractContextManager:
            return _compute_context(teacher.model(), dtype)

        cache = None
        if teacher_cache is not None:
            start_step = ckpt.state.step if ckpt is not None else 0
            used = _examples_used(data_order, steps_per_epoch, config.batch_size, start_step, total_steps)
            examples = {i: train[i] for i in used} | {i: val[i - len(train)] for i in val_ids}
            cache, cache_report = _filled_cache(
                teacher_cache, teacher, distill, config, data_set.fingerprint, tokenizer, examples, dtype, pad_id,
                teacher_context,
            )  # fmt: skip
        else:
            teacher.model()  # load it now: a missing or broken teacher fails before any training
        objective = DistillObjective(distill, teacher, cache, forward_context, teacher_context)

    _seed_everything(config.seed)
    use_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = False  # the KV cache is useless in training and costs memory
    runner.setup()
    trainable = runner.trainable
    optimizer = torch.optim.AdamW(
        trainable.values(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    warmup = effective_warmup(config.warmup_steps, total_steps)
    if warmup < config.warmup_steps:
        log.info(
            "warm-up capped at %d of the run's %d steps (asked for %d): a warm-up longer than a tenth of "
            "the run would keep the learning rate low for most of it",
            warmup,
            total_steps,
            config.warmup_steps,
        )
    schedule = LinearSchedule(warmup, total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

    eval_s = None  # the held-out evaluation before training, in seconds
    if ckpt is not None:
        runner.load(ckpt.trainable)
        optimizer.load_state_dict(ckpt.optimizer)
        scheduler.load_state_dict(ckpt.scheduler)
        warmup = schedule.warmup_steps  # as the checkpoint's schedule has it (a fitted run's first fit set it)
        state = ckpt.state
        state.config = config.to_dict()
        restore_rng(ckpt)
    else:
        eval_start = _now()
        eval_before = (
            objective.evaluate(runner.model, val, val_ids, config.micro_batch_size, pad_id, device)
            if val
            else None
        )
        eval_s = _now() - eval_start if val else None
        state = TrainingState(
            step=0,
            config=config.to_dict(),
            data_fingerprint=data_set.fingerprint,
            model_signature=signature,
            train_loss=[],
            eval_history=[],
            eval_before=eval_before,
            train_time_s=0.0,
            tokens_trained=0,
            trainer=runner.name,
            objective=objective_description,
        )
    resumed_from = state.step
    fit = None
    if config.schedule_to_time:
        assert config.max_time_s is not None
        state.time_fit = state.time_fit or []
        fit = TimeFit(schedule, config.max_time_s, config.warmup_steps, run_steps, config.eval_steps, state.time_fit)
        if eval_s is not None:
            fit.timed_eval(eval_s)

    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    runner.model.train()
    train_start, prior_time = _now(), state.train_time_s
    saved_step = state.step if ckpt is not None else -1

    def spent() -> float:
        """Seconds of training so far, those before a resume included: what max_time_s budgets."""
        return prior_time + _now() - train_start

    def save(rng: dict[str, Any]) -> None:
        nonlocal saved_step
        if ckpt_dir is None or saved_step == state.step:
            return
        state.train_time_s = spent()
        save_checkpoint(ckpt_dir, state, trainable, optimizer, scheduler, data_order, rng)
        saved_step = state.step

    stopped = None
    bar = tqdm(
        total=total_steps,
        initial=state.step,
        desc=_title(runner.name, objective_description),
        unit="step",
        disable=not config.progress_bar,
    )
    rng_at_step = capture_rng()
    try:
        while state.step < total_steps:
            epoch, index = divmod(state.step, steps_per_epoch)
            rows = data_order[epoch][index * config.batch_size : (index + 1) * config.batch_size].tolist()
            batch = [train[i] for i in rows]
            n_targets = max(1, sum(ex.n_targets for ex in batch))
            sums: dict[str, float] = {}
            for start in range(0, len(batch), config.micro_batch_size):
                micro = collate(batch[start : start + config.micro_batch_size], pad_id, device)
                ids = rows[start : start + config.micro_batch_size]
                for name, value in objective.train_micro(runner.model, micro, ids, n_targets).items():
                    sums[name] = sums.get(name, 0.0) + value
                runner.after_backward()
            if config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(list(trainable.values()), config.max_grad_norm)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            runner.after_step()
            if fit is not None and fit.after_step(state.step + 1, spent()):
                total_steps, warmup = fit.total_steps, schedule.warmup_steps
                bar.total = total_steps
                bar.refresh()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step_loss = sums["loss"] / n_targets
            point = {"step": state.step + 1, "loss": step_loss, "lr": lr}
            point.update({name: value / n_targets for name, value in sums.items() if name != "loss"})
            state.train_loss.append(point)
            state.tokens_trained += n_targets
            state.step += 1
            rng_at_step = capture_rng()
            if not math.isfinite(step_loss):
                raise LlmBipError(
                    f"recovery diverged (loss {step_loss}) at step {state.step}; lower the learning rate"
                )
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
            if config.eval_steps and val and state.step % config.eval_steps == 0 and state.step < total_steps:
                eval_start = _now()
                result = objective.evaluate(
                    runner.model, val, val_ids, config.micro_batch_size, pad_id, device
                )
                if fit is not None:
                    fit.timed_eval(_now() - eval_start)
                state.eval_history.append({"step": state.step, **result})
                bar.write(f"step {state.step}: held-out loss {result['loss']:.4f}, ppl {result['ppl']:.2f}")
            if state.step % config.save_steps == 0:
                save(rng_at_step)
            if config.max_time_s is not None and state.step < total_steps:
                if spent() >= config.max_time_s:
                    stopped = "max_time"
                    break
    except KeyboardInterrupt:
        # Keep the last completed step: the half-accumulated gradients are dropped, and the random state
        # from that step boundary makes the resumed run redo this step with the same dropout masks.
        bar.close()
        save(rng_at_step)
        if ckpt_dir is not None:
            log.warning(
                "interrupted: checkpoint at step %d in %s (resume=True continues)", state.step, ckpt_dir
            )
        raise
    finally:
        bar.close()
    save(rng_at_step)
    state.train_time_s = spent()
    if stopped is None:
        shortened = bool(state.time_fit) and state.time_fit[-1]["shortened"]
        stopped = "completed" if state.step >= planned_steps else "time_schedule" if shortened else "max_steps"

    if config.gradient_checkpointing:
        model.gradient_checkpointing_disable()
    result_model = runner.finish()
    result_model.eval()
    if use_cache is not None:
        result_model.config.use_cache = use_cache
    eval_after = (
        objective.evaluate(result_model, val, val_ids, config.micro_batch_size, pad_id, device)
        if val
        else None
    )
    if teacher is not None and teacher_cache is None:
        teacher.release()

    report_config = config.to_dict()
    if runner.name == "full":
        report_config = {k: v for k, v in report_config.items() if k not in LORA_ONLY_FIELDS}
    report = {
        "trainer": runner.name,
        "objective": {**objective_description, "teacher_cache": cache_report},
        "data": data_set.source,
        "data_kind": data_set.kind,
        "n_train": len(train),
        "n_val": len(val),
        "dropped_examples": data_set.dropped,
        "steps": state.step,
        "total_steps": total_steps,
        "warmup_steps": warmup,
        "time_fit": state.time_fit,
        "steps_per_epoch": steps_per_epoch,
        "stopped": stopped,
        "resumed_from_step": resumed_from if ckpt is not None else None,
        "train_loss": state.train_loss,
        "eval_before": state.eval_before,
        "eval_after": eval_after,
        "eval_history": state.eval_history,
        "tokens_trained": state.tokens_trained,
        "trainable_params": sum(p.numel() for p in trainable.values()),
        "train_time_s": state.train_time_s,
        "time_s": time.monotonic() - run_start,
        "compute_dtype": dtype,
        "checkpoint": str(ckpt_dir) if ckpt_dir is not None else None,
        "config": report_config,
    }
    if teacher is None:
        report["objective"] = objective_description
    return result_model, report


def objective_summary(description: dict[str, Any]) -> str:
    """One line for messages: "the LM loss", or "distillation (alpha 0.5, T 2.0, top-64 cache) from X"."""
    if description.get("kind", "lm") == "lm":
        return "the LM loss"
    targets = (
        "full logits"
        if description.get("teacher_targets") == "full"
        else f"top-{description.get('top_k')} cache"
    )
    return (
        f"distillation (alpha {description.get('alpha')}, T {description.get('temperature')}, {targets}) "
        f"from {description.get('teacher')}"
    )


def _filled_cache(
    directory: str | Path,
    teacher: Teacher,
    distill: DistillConfig,
    config: LoraRecoveryConfig,
    data_fingerprint: str,
    tokenizer: PreTrainedTokenizerBase,
    examples: dict[int, Example],
    dtype: str | None,
    pad_id: int,
    teacher_context: Callable[[], AbstractContextManager],
) -> tuple[TeacherCache, dict[str, Any]]:
    """The teacher cache in `directory` (refused if made for anything else), holding every one of `examples`.

    The teacher runs only for the examples the cache lacks; a teacher this run loaded for that is freed
    afterwards, since the run reads the cache from then on.
    """
    key = {
        "format": CACHE_FORMAT,
        "data": data_fingerprint,
        "seq_len": config.cutoff_len,
        "teacher": teacher.identity,
        "temperature": distill.temperature,
        "top_k": min(distill.top_k, teacher.vocab_size),
        "dtype": dtype or "weights",
        "vocab": [teacher.vocab_size, vocab_digest(tokenizer)],
    }
    cache = TeacherCache.open(directory, key)
    before, start, built = len(cache), time.monotonic(), 0
    if cache.missing(list(examples)):
        was_loaded = teacher.loaded
        built = cache.fill(
            examples,
            teacher.model(),
            distill.top_k,
            distill.temperature,
            config.micro_batch_size,
            pad_id,
            teacher_context,
            config.progress_bar,
        )
        if not was_loaded:
            teacher.release()
    report = {
        "dir": str(cache.directory),
        "examples_computed": built,
        "examples_reused": len(examples) - built,
        "examples_in_cache": len(cache),
        "examples_in_cache_before": before,
        "build_time_s": time.monotonic() - start if built else 0.0,
        "teacher_ran": built > 0,
    }
    return cache, report


def _now() -> float:
    """The clock of time budgets and step pacing (a function of its own, so a test can run on a fake one)."""
    return time.monotonic()


def _trainer(name: str, model: PreTrainedModel, config: LoraRecoveryConfig) -> LoraTrainer | FullTrainer:
    if name not in TRAINERS:
        raise LlmBipError(f"unknown recovery trainer '{name}': use one of {', '.join(TRAINERS)}")
    if name == "lora":
        return LoraTrainer(model, config)
    defaults = LoraRecoveryConfig()
    lora_only = [f for f in LORA_ONLY_FIELDS if getattr(config, f) != getattr(defaults, f)]
    if lora_only:
        raise LlmBipError(
            f"{', '.join(lora_only)} cannot apply to full fine-tuning (they configure LoRA adapters, and full "
            "fine-tuning trains every weight): leave them at their defaults"
        )
    return FullTrainer(model)


def _examples_used(
    data_order: list[torch.Tensor], steps_per_epoch: int, batch_size: int, start: int, end: int
) -> list[int]:
    """The training examples that steps [start, end) read, in the order they first read them."""
    used: dict[int, None] = {}
    for step in range(start, end):
        epoch, index = divmod(step, steps_per_epoch)
        for i in data_order[epoch][index * batch_size : (index + 1) * batch_size].tolist():
            used.setdefault(i, None)
    return list(used)


def _compute_context(model: nn.Module, dtype: str | None) -> AbstractContextManager:
    if dtype is None:
        return nullcontext()
    from llm_bip.evaluation.perplexity import compute_context

    return compute_context(model, dtype)


def _title(trainer: str, objective: dict[str, Any]) -> str:
    what = "LoRA" if trainer == "lora" else "full fine-tuning"
    return f"{what} {'recovery' if objective['kind'] == 'lm' else 'distillation'}"


def _window_bos(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The BOS token packed text blocks start with, for families that need one (FamilyAdapter.window_bos)."""
    try:
        adapter = adapter_for(model)
    except LlmBipError:  # a family llm-bip does not prune trains on text as it is
        return None
    return adapter.window_bos(tokenizer)


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0  # masked out by the attention mask and the labels, so any id works


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
