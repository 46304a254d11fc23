"""Reading a checkpoint's tensors one at a time, without loading the model: safetensors shards or GGUF.

Streaming reads one block's tensors, prunes the block and writes it out, so it needs tensors by name
from disk. Every shard is opened only while its tensors are read (a mapping left open would keep the
pages read so far in this process's memory), and GGUF tensors are read with plain file reads and
dequantized one by one, the way transformers' own GGUF loader does (same name map, same un-permuting
of LLaMA's q/k), so a streamed block equals the in-memory one bit for bit.

`validate()` checks, before any long work, that every shard the index names exists and is as long as
its header says: a missing or truncated shard is a clear error, not a crash half-way.
"""

from __future__ import annotations

import json
import os
import struct
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from llm_bip.errors import LlmBipError

_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


class Checkpoint:
    """Tensors of a checkpoint by their Hugging Face names."""

    path: Path

    def names(self) -> list[str]:
        raise NotImplementedError

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def tensors(self, names: list[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def tensor(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.tensors([name], dtype)[name]

    def validate(self) -> None:
        """Raise LlmBipError if a file is missing or shorter than its header says."""

    @property
    def stored_dtype(self) -> torch.dtype:
        """The weights' dtype as stored (what "keep the checkpoint's dtype" means)."""
        raise NotImplementedError

    @property
    def size_bytes(self) -> int:
        raise NotImplementedError


# ------------------------------------------------------------------------------------ safetensors


def _safetensors_header(path: Path) -> tuple[dict, int]:
    """The header of a safetensors file and the file length it implies."""
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > 100 * 2**20:
                raise ValueError("header too long")
            header = json.loads(handle.read(length))
    except (OSError, struct.error, ValueError) as exc:
        raise LlmBipError(f"{path} is not a readable safetensors file ({type(exc).__name__}): the checkpoint is "
                          "corrupt; re-download or re-save it") from None
    header.pop("__metadata__", None)
    end = max((info["data_offsets"][1] for info in header.values()), default=0)
    return header, 8 + length + end


class SafetensorsCheckpoint(Checkpoint):
    def __init__(self, path: Path) -> None:
        self.path = path
        index = path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError) as exc:
                raise LlmBipError(f"{index} is not a readable index ({type(exc).__name__}): re-download it") from None
            self.files = sorted(set(weight_map.values()))
        elif (path / "model.safetensors").is_file():
            self.files = ["model.safetensors"]
        else:
            raise LlmBipError(f"{path} has no model.safetensors (nor an index of shards): streaming reads safetensors "
                              "or GGUF checkpoints; re-save the model with safe_serialization")
        self._headers: dict[str, dict] = {}
        self._where: dict[str, str] = {}

    def validate(self) -> None:
        missing = [f for f in self.files if not (self.path / f).is_file()]
        if missing:
            raise LlmBipError(f"{self.path} lacks {len(missing)} shard(s) its index names ({', '.join(missing[:3])}): "
                              "the download is incomplete; download the checkpoint again")
        for name in self.files:
            header, expected = _safetensors_header(self.path / name)
            actual = (self.path / name).stat().st_size
            if actual < expected:
                raise LlmBipError(f"{self.path / name} is truncated ({actual:,} of {expected:,} bytes): the download "
                                  "is incomplete; download the checkpoint again")
            self._headers[name] = header
            for tensor in header:
                self._where[tensor] = name

    def _index(self) -> dict[str, str]:
        if not self._where:
            self.validate()
        return self._where

    def names(self) -> list[str]:
        return list(self._index())

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._headers[self._index()[name]][name]["shape"])

    def tensors(self, names: list[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        by_file: dict[str, list[str]] = defaultdict(list)
        index = self._index()
        for name in names:
            if name not in index:
                raise LlmBipError(f"{self.path} has no tensor '{name}': is it a checkpoint of this architecture?")
            by_file[index[name]].append(name)
        out = {}
        for file, wanted in by_file.items():
            with safe_open(str(self.path / file), framework="pt") as handle:  # closed at once: no pages stay mapped
                for name in wanted:
                    t = handle.get_tensor(name)
                    out[name] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        return out

    @property
    def stored_dtype(self) -> torch.dtype:
        index = self._index()
        sizes: Counter = Counter()
        for name, file in index.items():
            info = self._headers[file][name]
            dtype = _ST_DTYPES.get(info["dtype"])
            if dtype is not None and dtype.is_floating_point:
                sizes[dtype] += info["data_offsets"][1] - info["data_offsets"][0]
        return sizes.most_common(1)[0][0] if sizes else torch.float32

    @property
    def size_bytes(self) -> int:
        return sum((self.path / f).stat().st_size for f in self.files)


# ------------------------------------------------------------------------------------------- GGUF


class GGUFCheckpoint(Checkpoint):
    """A GGUF file's tensors under Hugging Face names, dequantized one by one (to the dtype asked for)."""

    def __init__(self, path: Path, skeleton) -> None:
        from gguf import GGUFReader
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS,
            TensorProcessor,
            get_gguf_hf_weights_map,
            load_gguf_checkpoint,
            read_field,
        )

        self.path = path
        try:
            reader = GGUFReader(str(path))
            parsed = load_gguf_checkpoint(str(path), return_tensors=False)
        except Exception as exc:  # noqa: BLE001  (gguf raises a zoo of types for a bad file)
            raise LlmBipError(f"cannot read GGUF file {path} ({type(exc).__name__}): it is corrupt or not a supported "
                              "architecture; re-download it") from None
        architecture = read_field(reader, "general.architecture")[0]
        self.processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=parsed.get("config", {}))
        to_hf = get_gguf_hf_weights_map(skeleton, self.processor)
        self._info = {}  # hf name -> (gguf name, type, numpy dtype, numpy shape, offset, bytes)
        for t in reader.tensors:
            if t.name in to_hf:
                self._info[to_hf[t.name]] = (t.name, t.tensor_type, t.data.dtype, tuple(t.data.shape),
                                             int(t.data_offset), int(t.n_bytes), tuple(int(d) for d in reversed(t.shape)))
        self._file_size = path.stat().st_size
        del reader  # its memory map of the whole file goes with it

    def validate(self) -> None:
        end = max((info[4] + info[5] for info in self._info.values()), default=0)
        if self._file_size < end:
            raise LlmBipError(f"{self.path} is truncated ({self._file_size:,} of {end:,} bytes): download it again")

    def names(self) -> list[str]:
        return list(self._info)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._info[name][6]

    def tensors(self, names: list[str], dtype: torch.dtype | None = torch.bfloat16) -> dict[str, torch.Tensor]:
        from gguf import dequantize

        out = {}
        with open(self.path, "rb") as handle:
            for name in names:
                gguf_name, qtype, np_dtype, np_shape, offset, n_bytes, _shape = self._info[name]
                raw = np.frombuffer(os.pread(handle.fileno(), n_bytes, offset), dtype=np_dtype).reshape(np_shape)
                weights = self.processor.process(weights=dequantize(raw, qtype), name=gguf_name).weights
                t = torch.from_numpy(np.copy(weights))
                out[name] = t.to(dtype) if dtype is not None else t
        return out

    @property
    def stored_dtype(self) -> torch.dtype:
        # Quantized weights have no float dtype: bf16 is their half-precision form. A GGUF model's weights in
        # memory are bf16 or float32 by the device (loading._gguf_weights_dtype).
        return torch.bfloat16

    @property
    def size_bytes(self) -> int:
        return self._file_size
