"""Calibration activations between blocks: catch what block 0 receives, run a block over every batch.

Only the modules before block 0 run to catch its inputs, so the blocks themselves may still be on
disk (streaming): while the model's own forward runs, every block is stood in for by a probe that
records what the model passes it and hands its hidden states on unchanged. So each block later gets
the keyword arguments the model itself gives it: models that mix sliding-window and full attention
(Gemma 2/3, Mistral/Qwen2 with `layer_types`) give each layer type its own mask, and Gemma 3 its
own rotary embedding, which block 0's arguments would get wrong. One block's activations are alive
at a time.
"""

from __future__ import annotations

import contextlib
import uuid
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
    (rotary embeddings, mask) that the model passes to block 0 (`kwargs`) and, where blocks differ,
    to every block (`layer_kwargs[layer][batch]`; None when every block gets block 0's). Blocks of
    the same layer type share the same tensors. With `spill`, every block's outputs go to
    disk-backed memory too."""

    hidden: list[torch.Tensor]
    kwargs: list[dict]
    spill: DiskSpill | None = None
    layer_kwargs: list[list[dict]] | None = None

    @property
    def num_tokens(self) -> int:
        return sum(h.shape[0] * h.shape[1] for h in self.hidden)

    def keep(self, tensor: torch.Tensor) -> torch.Tensor:
        """Activations that stay alive beyond one batch: in disk-backed memory where these inputs spill."""
        return self.spill.keep(tensor) if self.spill else tensor

    def kwargs_for(self, layer: int | None) -> list[dict]:
        """The keyword arguments of block `layer` (its index in the model the inputs were caught from),
        one dict per batch."""
        if self.layer_kwargs is None:
            return self.kwargs
        if layer is None or not 0 <= layer < len(self.layer_kwargs):
            raise ValueError(f"the blocks of this model get different masks or rotary embeddings: run_block needs "
                             f"the block's layer index (got {layer})")
        return self.layer_kwargs[layer]

    def with_hidden(self, hidden: list[torch.Tensor]) -> BlockInputs:
        """Other activations with the same keyword arguments."""
        return BlockInputs(hidden=hidden, kwargs=self.kwargs, spill=self.spill, layer_kwargs=self.layer_kwargs)


class _BlockProbe(nn.Module):
    """Stands in for a block while the model's forward catches the calibration inputs: records what the
    model passes the block and hands the hidden states on unchanged (so no block runs), and stops the
    forward after the last block."""

    def __init__(self, layer: int, last: int, record) -> None:
        super().__init__()
        self.layer, self.last, self.record = layer, last, record

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        self.record(self.layer, hidden, kwargs)
        if self.layer == self.last:
            raise _StopForward
        return hidden


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, adapter: FamilyAdapter, samples: torch.Tensor, batch_size: int, spill: DiskSpill | None = None,
) -> BlockInputs:
    """Run the model's embedding stage on each batch and keep what block 0 receives, with the keyword
    arguments the model passes to every block (the blocks themselves do not run)."""
    blocks = adapter.blocks(model)
    hidden: list[torch.Tensor] = []
    per_layer: list[list[dict]] = [[] for _ in blocks]

    def record(layer: int, caught: torch.Tensor, kwargs: dict) -> None:
        kwargs = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values")}
        if layer == 0:
            hidden.append(spill.keep(caught) if spill else caught)
        else:  # a block that gets the very same objects as an earlier one shares its dict
            kwargs = next((d for d in (per_layer[i][-1] for i in range(layer)) if _same(d, kwargs)), kwargs)
        per_layer[layer].append(kwargs)

    def stop(*_args):
        raise _StopForward

    probes = nn.ModuleList([_BlockProbe(i, len(blocks) - 1, record) for i in range(len(blocks))])
    adapter.set_blocks(model, probes)
    handle = adapter.final_norm(model).register_forward_pre_hook(stop)  # a model that runs fewer blocks stops here
    try:
        device = input_device(model, adapter)
        for start in range(0, samples.shape[0], batch_size):
            try:
                model(samples[start : start + batch_size].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
        adapter.set_blocks(model, blocks)
    if any(len(calls) != len(hidden) for calls in per_layer):
        raise LlmBipError("the model did not pass every batch through every block: cannot catch the calibration inputs")
    uniform = all(per_layer[i][b] is per_layer[0][b] for i in range(len(blocks)) for b in range(len(hidden)))
    return BlockInputs(hidden=hidden, kwargs=per_layer[0], spill=spill, layer_kwargs=None if uniform else per_layer)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k] is b[k] or (_plain(a[k]) and _plain(b[k]) and a[k] == b[k]) for k in a)


def _plain(value) -> bool:
    return value is None or isinstance(value, bool | int | float | str)


def input_device(model: nn.Module, adapter: FamilyAdapter) -> torch.device:
    """Where the token ids go: the device of the input embedding."""
    return model.get_input_embeddings().weight.device


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs, check_finite: bool = True, layer: int = -1,
              keep_outputs: bool = True) -> BlockInputs | None:
    """Outputs of `block` on every batch: the next block's inputs (None if not `keep_outputs`: a pass
    run only for what its hooks gather). `layer` (the block's index when the inputs were caught) picks
    the mask and rotary embeddings the model gives that block."""
    outputs = []
    for hidden, kwargs in zip(inputs.hidden, inputs.kwargs_for(layer), strict=True):
        out = block(hidden, **kwargs)  # a block spread to another device by accelerate moves its inputs itself
        out = out[0] if isinstance(out, tuple) else out
        _check(out, check_finite, layer)
        if keep_outputs:
            outputs.append(inputs.keep(out))
    _drop_autocast_copies()
    return inputs.with_hidden(outputs) if keep_outputs else None


@torch.no_grad()
def run_ffn_sublayer(adapter: FamilyAdapter, block: nn.Module, residuals: list[torch.Tensor], inputs: BlockInputs,
                     layer: int = -1) -> BlockInputs:
    """Outputs of `block` on every batch from its FFN residual inputs (`stats.BlockStats.ffn_inputs`, gathered
    while the block ran on `inputs`): what `run_block` gives when the attention is as it was then. Each
    residual is dropped from `residuals` once used, so they and the outputs together hold one set."""
    outputs = []
    for i in range(len(residuals)):
        residual, residuals[i] = residuals[i], None
        out = adapter.ffn_sublayer(block, residual)
        del residual
        _check(out, True, layer)
        outputs.append(inputs.keep(out))
    _drop_autocast_copies()
    return inputs.with_hidden(outputs)


def _check(out: torch.Tensor, check_finite: bool, layer: int) -> None:
    if check_finite and not all_finite(out):
        raise LlmBipError(
            f"block {layer} produced NaN/Inf on the calibration data: load the weights in float32 "
            "(--weights-dtype float32) or check the checkpoint"
        )


def _drop_autocast_copies() -> None:
    # Autocast keeps a low-precision copy of every weight it casts until its context exits; dropping
    # them per block holds memory to one block's copies (not the whole model's) and never lets a
    # stale copy outlive a weight that compensation rewrites in place.
    torch.clear_autocast_cache()


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


def all_finite(x: torch.Tensor) -> bool:
    """No NaN or Inf in `x`: its min and max carry any (17x faster than isfinite(x).all() on CPU)."""
    return bool(torch.isfinite(torch.stack(torch.aminmax(x))).all())
