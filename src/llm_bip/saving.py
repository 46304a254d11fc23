"""Save a pruned model in Hugging Face format, atomically.

Uniform widths (every block the same, no biases the stock class cannot hold) save with the stock
config, so plain `AutoModelForCausalLM.from_pretrained` (and vLLM and friends) load them. Otherwise
the config records per-block widths and the directory carries `modeling_llm_bip.py`, loadable with
`trust_remote_code=True` from the directory alone, or without the flag once `llm_bip` is imported.
Everything is written to a temporary sibling directory and renamed into place at the end, so an
interrupted save never leaves a half-written model where the output should be.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from llm_bip import modeling_llm_bip
from llm_bip.adapters import FamilyAdapter, base_model_type
from llm_bip.errors import LlmBipError
from llm_bip.params import count_parameters

log = logging.getLogger(__name__)

RECORD_FILE = "pruning_record.json"


def check_output_dir(out_dir: str | Path, overwrite: bool) -> Path:
    """Fail before any long work if the output cannot be written."""
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not overwrite:
        raise LlmBipError(f"{out} already exists: choose another --output or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise LlmBipError(f"{out} exists and is not a directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(out.parent, os.W_OK):
        raise LlmBipError(f"cannot write to {out.parent}")
    return out


def block_layout(model: nn.Module, adapter: FamilyAdapter) -> list[dict]:
    head_dim = adapter.head_dim(model)
    layout = []
    for block in adapter.blocks(model):
        heads, kv, channels = adapter.widths(block, head_dim)
        parts = adapter.parts(block)
        layout.append({
            "num_attention_heads": heads, "num_key_value_heads": kv, "intermediate_size": channels,
            "o_proj_bias": parts.o_proj.bias is not None, "down_proj_bias": parts.down_proj.bias is not None,
        })
    return layout


def _stock_config(model: nn.Module, adapter: FamilyAdapter, layout: list[dict]):
    """The family's stock config describing the pruned model, or None if it cannot."""
    if any(w != layout[0] for w in layout):
        return None
    first = layout[0]
    base = model.config
    if getattr(base, "layer_widths", None):
        return None
    flags = adapter.stock_bias_config(first["o_proj_bias"], first["down_proj_bias"])
    if flags is None:
        return None
    data = base.to_dict()
    data.update(
        num_attention_heads=first["num_attention_heads"], num_key_value_heads=first["num_key_value_heads"],
        intermediate_size=first["intermediate_size"], head_dim=adapter.head_dim(model), **flags,
    )
    try:
        config = type(base).from_dict(data)
    except Exception as exc:  # noqa: BLE001  (strict-dataclass validation, e.g. hidden_size % heads != 0)
        log.info("stock config cannot describe the pruned model (%s); saving per-block widths", exc)
        return None
    return config, flags


def _pruned_config(model: nn.Module, adapter: FamilyAdapter, layout: list[dict]):
    family = base_model_type(model.config)
    config_cls, model_cls = modeling_llm_bip.PRUNED_CLASSES[adapter.family or family]
    data = model.config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "layer_widths", "base_model_type"):
        data.pop(key, None)
    data["head_dim"] = adapter.head_dim(model)
    config = config_cls(layer_widths=layout, base_model_type=adapter.family, **data)
    config.architectures = [model_cls.__name__]
    config.auto_map = {
        "AutoConfig": f"modeling_llm_bip.{config_cls.__name__}",
        "AutoModelForCausalLM": f"modeling_llm_bip.{model_cls.__name__}",
    }
    return config


@torch.no_grad()
def _add_zero_biases(model: nn.Module, adapter: FamilyAdapter, flags: dict) -> None:
    """The stock flags add biases to sibling projections too; give them zero biases so shapes match."""
    for block in adapter.blocks(model):
        parts = adapter.parts(block)
        if flags.get("attention_bias"):
            for linear in (parts.q_proj, parts.k_proj, parts.v_proj, parts.o_proj):
                adapter.zero_bias_like(linear)
        if flags.get("mlp_bias"):
            for linear in (parts.gate_proj, parts.up_proj, parts.down_proj):
                adapter.zero_bias_like(linear)


def save_pruned(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase | None, adapter: FamilyAdapter, out_dir: str | Path,
    record: dict | None = None, overwrite: bool = False,
) -> Path:
    """Write model, tokenizer and pruning record to `out_dir` atomically; returns the directory.

    `record` is updated in place with the saved format, the layer widths and the saved parameter count."""
    out = check_output_dir(out_dir, overwrite)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    layout = block_layout(model, adapter)
    stock = _stock_config(model, adapter, layout)
    try:
        tmp.mkdir()
        if stock is not None:
            config, flags = stock
            before = sum(p.numel() for p in model.parameters())
            _add_zero_biases(model, adapter, flags)
            added = sum(p.numel() for p in model.parameters()) - before
            if added:
                log.info("stock %s adds zero biases to sibling projections: %d parameters", flags, added)
            config.architectures = [type(model).__name__]
            fmt = "stock"
        else:
            config = _pruned_config(model, adapter, layout)
            shutil.copy(Path(modeling_llm_bip.__file__), tmp / "modeling_llm_bip.py")
            fmt = "per-block widths (trust_remote_code, or import llm_bip)"
        original = model.config
        model.config = config
        try:
            model.save_pretrained(tmp)
        finally:
            model.config = original
        # save_pretrained rewrites `architectures` from the class; the config we built is the truth.
        (tmp / "config.json").write_text(config.to_json_string(use_diff=False))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        full_record = record if record is not None else {}
        full_record["saved_format"] = fmt
        # What is on disk, zero biases that the stock config needs included.
        full_record["parameters_after"] = count_parameters(model, adapter)
        full_record["layer_widths"] = layout
        (tmp / RECORD_FILE).write_text(json.dumps(full_record, indent=1, default=str))
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved %s (%s)", out, fmt)
    return out


def _swap_into_place(tmp: Path, out: Path) -> None:
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def read_record(model_dir: str | Path) -> dict | None:
    path = Path(model_dir) / RECORD_FILE
    return json.loads(path.read_text()) if path.is_file() else None
