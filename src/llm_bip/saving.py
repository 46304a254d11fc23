"""Save a pruned model in Hugging Face format, atomically.

Uniform widths (every block the same, no biases the stock class cannot hold) save with the stock
config, so plain `AutoModelForCausalLM.from_pretrained` (and vLLM and friends) load them. Otherwise
the config records per-block widths and the directory carries `modeling_llm_bip.py`, loadable with
`trust_remote_code=True` from the directory alone, or without the flag once `llm_bip` is imported.
Every saved directory carries a Hugging Face model card (`README.md`, `model_card.py`) made from the
record. Everything is written to a marked temporary sibling directory and renamed into place at the end
(`outputs.py`), so an interrupted save never leaves a half-written model where the output should be.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from llm_bip import modeling_llm_bip
from llm_bip.adapters import FamilyAdapter
from llm_bip.dtypes import dtype_name
from llm_bip.model_card import CARD_FILE, refreshed_card, write_card, write_model_card
from llm_bip.outputs import (
    PARTIAL_MARKER,
    RECORD_FILE,
    check_output_dir,
    os_error,
    staging_dir,
    swap_into_place,
)
from llm_bip.params import count_parameters

log = logging.getLogger(__name__)

STOCK_FORMAT = "stock"
PER_BLOCK_FORMAT = "per-block widths (trust_remote_code, or import llm_bip)"


def block_layout(model: nn.Module, adapter: FamilyAdapter) -> list[dict]:
    """Per block: its widths and which output projections carry a bias (the saved `layer_widths`)."""
    return [{**adapter.widths(b).to_json(), **adapter.output_biases(b)} for b in adapter.blocks(model)]


def saved_config(base: PretrainedConfig, adapter: FamilyAdapter, layout: list[dict]) -> tuple[PretrainedConfig, str, dict]:
    """The config to save for blocks of this layout: the family's stock config where it can describe them
    (with the bias flags it needs), else the per-block-widths config. Returns (config, format, flags)."""
    stock = _stock_config(base, adapter, layout)
    if stock is not None:
        return stock[0], STOCK_FORMAT, stock[1]
    return _pruned_config(base, adapter, layout), PER_BLOCK_FORMAT, {}


def _stock_config(base: PretrainedConfig, adapter: FamilyAdapter, layout: list[dict]):
    if any(w != layout[0] for w in layout) or getattr(base, "layer_widths", None):
        return None
    first = layout[0]
    flags = adapter.stock_bias_config(first["o_proj_bias"], first["down_proj_bias"])
    if flags is None:
        return None
    data = base.to_dict()
    data.update(
        num_attention_heads=first["num_attention_heads"], num_key_value_heads=first["num_key_value_heads"],
        intermediate_size=first["intermediate_size"], head_dim=adapter.head_dim, **flags,
    )
    try:
        config = type(base).from_dict(data)
    except Exception as exc:  # noqa: BLE001  (strict-dataclass validation, e.g. hidden_size % heads != 0)
        log.info("stock config cannot describe the pruned model (%s); saving per-block widths", exc)
        return None
    return config, flags


def _pruned_config(base: PretrainedConfig, adapter: FamilyAdapter, layout: list[dict]) -> PretrainedConfig:
    config_cls, model_cls = modeling_llm_bip.PRUNED_CLASSES[adapter.family]
    data = base.to_dict()
    for key in ("model_type", "architectures", "auto_map", "layer_widths", "base_model_type"):
        data.pop(key, None)
    data["head_dim"] = adapter.head_dim
    config = config_cls(layer_widths=layout, base_model_type=adapter.family, **data)
    config.architectures = [model_cls.__name__]
    config.auto_map = {
        "AutoConfig": f"modeling_llm_bip.{config_cls.__name__}",
        "AutoModelForCausalLM": f"modeling_llm_bip.{model_cls.__name__}",
    }
    return config


def write_model_files(tmp: Path, config: PretrainedConfig, fmt: str, tokenizer: PreTrainedTokenizerBase | None) -> None:
    """Everything beside the weights: config, remote code for per-block widths, tokenizer."""
    # save_pretrained rewrites `architectures` from the class; the config we built is the truth.
    (tmp / "config.json").write_text(config.to_json_string(use_diff=False))
    if fmt == PER_BLOCK_FORMAT:
        shutil.copy(Path(modeling_llm_bip.__file__), tmp / "modeling_llm_bip.py")
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)


def finish_record(tmp: Path, record: dict, fmt: str, layout: list[dict]) -> None:
    """The model card and the pruning record, with the saved format and the list of files llm-bip wrote
    (what a later `--overwrite` may replace)."""
    record["saved_format"] = fmt
    record["layer_widths"] = layout
    # The card (and its plot) before the listing: they are ours, so `--overwrite` may replace them.
    write_model_card(tmp, record)
    record["files"] = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*")
                             if p.is_file() and p.name != PARTIAL_MARKER) + [RECORD_FILE]
    (tmp / RECORD_FILE).write_text(json.dumps(record, indent=1, default=str))


def save_pruned(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase | None, adapter: FamilyAdapter, out_dir: str | Path,
    record: dict | None = None, overwrite: bool = False, inputs: tuple = (), save_dtype: torch.dtype | None = None,
    source: str | None = None,
) -> Path:
    """Write model, tokenizer, model card and pruning record to `out_dir` atomically; returns the directory.

    `record` is updated in place with the saved format, the layer widths, the saved parameter count and
    the files written. `inputs` are paths the output must not replace (the run's model, plan, scores).
    `source` is the model as the user gave it (the card's `base_model`) where the record does not say."""
    out = check_output_dir(out_dir, overwrite, inputs)
    layout = block_layout(model, adapter)
    config, fmt, flags = saved_config(model.config, adapter, layout)
    with staging_dir(out) as tmp:
        added = sum(len(adapter.add_stock_zero_biases(b, flags)) for b in adapter.blocks(model)) if flags else 0
        if added:
            log.info("the stock config's %s gives %d sibling projections zero biases", flags, added)
        if save_dtype is not None:
            model.to(save_dtype)
        config.dtype = next(model.parameters()).dtype
        architectures = [type(model).__name__] if fmt == STOCK_FORMAT else list(config.architectures)
        original = model.config
        model.config = config
        try:
            model.save_pretrained(tmp)
        except OSError as exc:
            raise os_error(exc, out) from None
        finally:
            model.config = original
        config.architectures = architectures  # save_pretrained set them from the class it saved
        write_model_files(tmp, config, fmt, tokenizer)
        full_record = record if record is not None else {}
        if source and not full_record.get("model"):
            full_record["model"] = source
        full_record["parameters_after"] = count_parameters(model, adapter)  # on disk, zero biases included
        full_record["saved_dtype"] = dtype_name(next(model.parameters()).dtype)
        finish_record(tmp, full_record, fmt, layout)
        swap_into_place(tmp, out)
    log.info("saved %s (%s)", out, fmt)
    return out


def update_record(model_dir: Path, updates: dict) -> None:
    """Add to the record of an output llm-bip wrote (e.g. perplexities measured after saving)."""
    from llm_bip.outputs import write_text_atomic

    record = read_record(model_dir) or {}
    record.update(updates)
    card = refreshed_card(model_dir, record)  # the card shows what the record now holds (its checksum goes in)
    write_text_atomic(model_dir / RECORD_FILE, json.dumps(record, indent=1, default=str))
    if card is not None:
        write_card(model_dir / CARD_FILE, card)


def read_record(model_dir: str | Path) -> dict | None:
    path = Path(model_dir) / RECORD_FILE
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except ValueError:
        return None
