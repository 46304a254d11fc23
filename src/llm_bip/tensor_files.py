"""Writing safetensors files tensor by tensor, without a second copy of them in memory.

safetensors' own `save_file` turns every tensor into a bytes object before writing, so a shard costs
twice its size in memory at the moment it is written; streaming writes a shard per block (and the
calibration activations per block when resumable), so that copy would set the peak. The format is
simple and fixed (an 8-byte little-endian header length, a JSON header naming each tensor's dtype,
shape and byte range, then the data), so this writes the same files from the tensors' own memory;
the tests read them back with safetensors.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` (CPU) to `path` in the safetensors format, one tensor's bytes at a time."""
    names = sorted(tensors)
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in names:
        t = tensors[name]
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for name in names:
            t = tensors[name].detach().contiguous()
            if t.numel():
                handle.write(memoryview(t.view(torch.uint8).reshape(-1).numpy()))
