"""LoRA recovery fine-tuning of a (pruned) causal LM, merged back into plain weights at the end.

A plain PyTorch loop (not the HF Trainer) so that checkpoints hold exactly what an exact resume needs and the
loss is computed the same way in training and evaluation. Pruned models may have a different width in every
layer; LoRA wraps each `nn.Linear` by its actual shape, so nothing here reads widths from the config.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from llm_bip.errors import LlmBipError
from llm_bip.recovery.checkpoint import (
    TrainingState,
    capture_rng,
    has_checkpoint,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from llm_bip.recovery.config import LoraRecoveryConfig
from llm_bip.recovery.data import DEFAULT_DATASET, load_recovery_data
from llm_bip.recovery.loss import collate, evaluate_loss, summed_loss

log = logging.getLogger(__name__)


def recover(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    data: str | Path = DEFAULT_DATASET,
    config: LoraRecoveryConfig | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
) -> tuple[PreTrainedModel, dict[str, Any]]:
    """Fine-tune LoRA adapters on `data`, merge them and return `(model, report)`.

    The model is changed in place and returned as the same class with the same module shapes. Its weights
    keep their dtype; the adapters and the loss are fp32, so a bf16/fp16 model trains stably. With
    `checkpoint_dir`, the run state is saved every `config.save_steps` optimizer steps and when the run
    stops; `resume=True` continues from there and needs the same original (unmerged) model, data and config
    (only max_time_s, eval_steps, save_steps and progress_bar may change).

    The report holds: steps, total_steps, stopped ("completed", "max_steps" or "max_time"), train_loss
    (a list of {step, loss, lr}), eval_before / eval_after ({loss, ppl, tokens} on the held-out split, None
    without one), eval_history, time_s, train_time_s, tokens_trained, trainable_params, data sizes and config.
    """
    run_start = time.monotonic()
    config = config or LoraRecoveryConfig()
    config = with_targets(config, model)
    if isinstance(model, PeftModel):
        raise LlmBipError("the model already carries PEFT adapters: pass the plain (pruned) model")
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    ckpt = None
    if resume:
        if ckpt_dir is None:
            raise LlmBipError("resuming needs the checkpoint directory of the interrupted run")
        ckpt = load_checkpoint(ckpt_dir)
        diff = LoraRecoveryConfig.from_dict(ckpt.state.config).differences(config)
        if diff:
            raise LlmBipError(
                f"cannot resume from {ckpt_dir}: the config differs from the checkpoint's in {', '.join(diff)}"
            )
    elif ckpt_dir is not None and has_checkpoint(ckpt_dir):
        raise LlmBipError(
            f"{ckpt_dir} already holds a recovery checkpoint: resume it, or pass an empty checkpoint directory"
        )

    signature = model_signature(model, config.target_modules)
    if ckpt is not None and ckpt.state.model_signature != signature:
        raise LlmBipError(
            "cannot resume: the model differs from the one the checkpoint was trained on "
            "(pass the same pruned model as before, not the merged result)"
        )
    data_set = load_recovery_data(
        data, tokenizer, config.cutoff_len, config.val_set_size, config.train_on_inputs, config.seed
    )
    if ckpt is not None and ckpt.state.data_fingerprint != data_set.fingerprint:
        raise LlmBipError("cannot resume: the training data (or tokenizer) differs from the checkpoint's")
    train, val = data_set.train, data_set.val
    log.info("LoRA recovery data %s: %d train / %d held-out examples", data_set.source, len(train), len(val))

    device = model.get_input_embeddings().weight.device
    pad_id = _pad_id(tokenizer)
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    planned_steps = config.num_epochs * steps_per_epoch
    total_steps = min(planned_steps, config.max_steps) if config.max_steps else planned_steps

    _seed_everything(config.seed)
    use_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = False  # the KV cache is useless in training and costs memory
    peft_model = get_peft_model(model, build_lora_config(config))
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    for p in trainable.values():
        if p.dtype != torch.float32:
            # Half-precision adapters on a pruned model diverge; the frozen base may stay bf16/fp16.
            p.data = p.data.float()
    optimizer = torch.optim.AdamW(
        trainable.values(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    warmup = effective_warmup(config.warmup_steps, total_steps)
    if warmup < config.warmup_steps:
        log.info("warm-up capped at %d of the run's %d steps (asked for %d): a warm-up longer than a tenth of "
                 "the run would keep the learning rate low for most of it", warmup, total_steps, config.warmup_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _linear_schedule(warmup, total_steps))

    if ckpt is not None:
        _load_trainable(trainable, ckpt.trainable)
        optimizer.load_state_dict(ckpt.optimizer)
        scheduler.load_state_dict(ckpt.scheduler)
        data_order = ckpt.data_order
        state = ckpt.state
        state.config = config.to_dict()
        restore_rng(ckpt)
    else:
        data_order = [
            torch.randperm(len(train), generator=torch.Generator().manual_seed(config.seed + epoch))
            for epoch in range(config.num_epochs)
        ]
        eval_before = evaluate_loss(peft_model, val, config.micro_batch_size, pad_id, device) if val else None
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
        )
    if len(data_order) != config.num_epochs or any(len(o) != len(train) for o in data_order):
        raise LlmBipError("cannot resume: the checkpoint's data order does not match the training data")
    resumed_from = state.step

    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_model.train()
    train_start, prior_time = time.monotonic(), state.train_time_s
    saved_step = state.step if ckpt is not None else -1

    def save(rng: dict[str, Any]) -> None:
        nonlocal saved_step
        if ckpt_dir is None or saved_step == state.step:
            return
        state.train_time_s = prior_time + time.monotonic() - train_start
        save_checkpoint(ckpt_dir, state, trainable, optimizer, scheduler, data_order, rng)
        saved_step = state.step

    stopped = None
    bar = tqdm(
        total=total_steps,
        initial=state.step,
        desc="LoRA recovery",
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
            loss_sum = 0.0
            for start in range(0, len(batch), config.micro_batch_size):
                micro = collate(batch[start : start + config.micro_batch_size], pad_id, device)
                loss = summed_loss(peft_model, micro)
                # Normalised by the whole batch's token count: each token weighs the same however the
                # batch is cut into micro-batches.
                (loss / n_targets).backward()
                loss_sum += loss.item()
            if config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(list(trainable.values()), config.max_grad_norm)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step_loss = loss_sum / n_targets
            state.train_loss.append({"step": state.step + 1, "loss": step_loss, "lr": lr})
            state.tokens_trained += n_targets
            state.step += 1
            rng_at_step = capture_rng()
            if not math.isfinite(step_loss):
                raise LlmBipError(
                    f"LoRA recovery diverged (loss {step_loss}) at step {state.step}; lower the learning rate"
                )
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
            if config.eval_steps and val and state.step % config.eval_steps == 0 and state.step < total_steps:
                result = evaluate_loss(peft_model, val, config.micro_batch_size, pad_id, device)
                state.eval_history.append({"step": state.step, **result})
                bar.write(f"step {state.step}: held-out loss {result['loss']:.4f}, ppl {result['ppl']:.2f}")
            if state.step % config.save_steps == 0:
                save(rng_at_step)
            if config.max_time_s is not None and state.step < total_steps:
                if prior_time + time.monotonic() - train_start >= config.max_time_s:
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
    state.train_time_s = prior_time + time.monotonic() - train_start
    if stopped is None:
        stopped = "completed" if state.step >= planned_steps else "max_steps"

    if config.gradient_checkpointing:
        model.gradient_checkpointing_disable()
    merged = peft_model.merge_and_unload()
    merged.eval()
    if use_cache is not None:
        merged.config.use_cache = use_cache
    eval_after = evaluate_loss(merged, val, config.micro_batch_size, pad_id, device) if val else None

    report = {
        "data": data_set.source,
        "data_kind": data_set.kind,
        "n_train": len(train),
        "n_val": len(val),
        "dropped_examples": data_set.dropped,
        "steps": state.step,
        "total_steps": total_steps,
        "warmup_steps": warmup,
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
        "checkpoint": str(ckpt_dir) if ckpt_dir is not None else None,
        "config": config.to_dict(),
    }
    return merged, report


def with_targets(config: LoraRecoveryConfig, model: nn.Module) -> LoraRecoveryConfig:
    """The config with its LoRA target modules filled in from the model family's adapter where unset."""
    if config.target_modules is not None:
        return config
    from llm_bip.adapters import adapter_for

    return dataclasses.replace(config, target_modules=adapter_for(model).lora_target_modules)


def build_lora_config(config: LoraRecoveryConfig) -> LoraConfig:
    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def model_signature(model: nn.Module, target_modules: tuple[str, ...]) -> str:
    """A fingerprint of the LoRA target layers (names, shapes, a sample of weights).

    Also checks that every target module name exists, so a wrong name fails before any data is read.
    """
    layers = []
    found: set[str] = set()
    linear_names: set[str] = set()
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        leaf = name.rsplit(".", 1)[-1]
        linear_names.add(leaf)
        if leaf not in target_modules:
            continue
        found.add(leaf)
        weight = module.weight.detach().flatten()
        sample = weight[:: max(1, weight.numel() // 64)][:64].float().cpu()
        layers.append([name, list(module.weight.shape), sample.tolist()])
    missing = [t for t in target_modules if t not in found]
    if missing:
        raise LlmBipError(
            f"LoRA target module(s) {', '.join(missing)} not found in {type(model).__name__}; "
            f"its linear layers are named {', '.join(sorted(linear_names))}"
        )
    blob = json.dumps([type(model).__name__, layers]).encode()
    return hashlib.sha256(blob).hexdigest()


def effective_warmup(warmup_steps: int, total_steps: int) -> int:
    """Warm-up steps, at most a tenth of the run (LLM-Pruner's 100 of ~1,560 steps is 6%)."""
    return min(warmup_steps, math.ceil(total_steps / 10))


def _linear_schedule(warmup_steps: int, total_steps: int):
    # The Hugging Face Trainer's default (linear warmup, then linear decay to 0), as in LLM-Pruner.
    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0  # masked out by the attention mask and the labels, so any id works


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _load_trainable(trainable: dict[str, nn.Parameter], saved: dict[str, torch.Tensor]) -> None:
    if set(saved) != set(trainable):
        raise LlmBipError(
            "cannot resume: the checkpoint's adapter weights do not match this model's LoRA layers"
        )
    with torch.no_grad():
        for name, param in trainable.items():
            if saved[name].shape != param.shape:
                raise LlmBipError(
                    f"cannot resume: adapter {name} has shape {tuple(saved[name].shape)} in the checkpoint"
                )
            param.copy_(saved[name])
