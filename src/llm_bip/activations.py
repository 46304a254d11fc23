"""Calibration activations between blocks: catch what block 0 receives, run a block over every batch.

Only the modules before block 0 run to catch its inputs, so the blocks themselves may still be on
disk (streaming). One block's activations are alive at a time.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from llm_bip.adapters import FamilyAdapter
from llm_bip.errors import LlmBipError


class _StopForward(Exception):
    pass


class DiskSpill:
    """Keeps activations in memory-mapped files instead of anonymous memory, for calibration sets whose
    activations do not fit: the kernel writes the pages out and evicts them as memory is needed. Each
    file is unlinked as soon as it is mapped, so nothing is left on disk, even after a kill."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def keep(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device.type != "cpu":
            return tensor  # activations on an accelerator stay there
        path = self.directory / f".llm-bip-activations-{uuid.uuid4().hex}"
        mapped = torch.from_file(str(path), shared=True, size=tensor.numel(), dtype=tensor.dtype).view(tensor.shape)
        path.unlink()
        mapped.copy_(tensor)
        return mapped


@dataclass
class BlockInputs:
    """Calibration activations entering one block, one tensor per batch, plus the keyword arguments
    (rotary embeddings, mask) that the model passes to every block. With `spill`, every block's outputs
    go to disk-backed memory too."""

    hidden: list[torch.Tensor]
    kwargs: list[dict]
    spill: DiskSpill | None = None

    @property
    def num_tokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.hidden)


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, adapter: FamilyAdapter, samples: torch.Tensor, batch_size: int, spill: DiskSpill | None = None,
) -> BlockInputs:
    """Run the model's embedding stage on each batch and keep what block 0 receives."""
    first_block = adapter.blocks(model)[0]
    hidden, kwargs_list = [], []

    def grab(_module, args, kwargs):
        caught = args[0] if args else kwargs.pop("hidden_states")
        hidden.append(spill.keep(caught) if spill else caught)
        kwargs_list.append({k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values")})
        raise _StopForward

    handle = first_block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        device = input_device(model, adapter)
        for start in range(0, samples.shape[0], batch_size):
            try:
                model(samples[start : start + batch_size].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return BlockInputs(hidden=hidden, kwargs=kwargs_list, spill=spill)


def input_device(model: nn.Module, adapter: FamilyAdapter) -> torch.device:
    """Where the token ids go: the device of the input embedding."""
    return model.get_input_embeddings().weight.device


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs, check_finite: bool = True, layer: int = -1,
              keep_outputs: bool = True) -> BlockInputs | None:
    """Outputs of `block` on every batch: the next block's inputs (None if not `keep_outputs`: a pass
    run only for what its hooks gather)."""
    outputs = []
    for hidden, kwargs in zip(inputs.hidden, inputs.kwargs, strict=True):
        out = block(hidden, **kwargs)  # a block spread to another device by accelerate moves its inputs itself
        out = out[0] if isinstance(out, tuple) else out
        if check_finite and not torch.isfinite(out).all():
            raise LlmBipError(
                f"block {layer} produced NaN/Inf on the calibration data: load the weights in float32 "
                "(--weights-dtype float32) or check the checkpoint"
            )
        if keep_outputs:
            outputs.append(inputs.spill.keep(out) if inputs.spill else out)
    # Autocast keeps a low-precision copy of every weight it casts until its context exits; dropping
    # them per block holds memory to one block's copies (not the whole model's) and never lets a
    # stale copy outlive a weight that compensation rewrites in place.
    torch.clear_autocast_cache()
    return BlockInputs(hidden=outputs, kwargs=inputs.kwargs, spill=inputs.spill) if keep_outputs else None


def full_precision():
    """Autocast off (on every device type torch autocasts): the compute dtype (bf16 autocast over float32
    weights) is for forward passes only; statistics, scores and refits would lose precision in it."""
    return contextlib.ExitStack() if not torch.is_autocast_enabled("cpu") and not _cuda_autocast() else _disabled()


def _cuda_autocast() -> bool:
    return torch.cuda.is_available() and torch.is_autocast_enabled("cuda")


@contextlib.contextmanager
def _disabled():
    with torch.autocast("cpu", enabled=False):
        if torch.cuda.is_available():
            with torch.autocast("cuda", enabled=False):
                yield
        else:
            yield


def iterate_batches(inputs: BlockInputs) -> Iterator[tuple[torch.Tensor, dict]]:
    yield from zip(inputs.hidden, inputs.kwargs, strict=True)
