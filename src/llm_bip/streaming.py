"""Out-of-core pruning and evaluation: the block loop fed from disk, one block in memory at a time.

`StreamedBlocks` is the `BlockSource` of a streamed model: it reads one block's tensors from the
checkpoint onto the device, and once the loop has pruned it, writes it into its own output shard and
frees it. Peak memory is the input embedding, one block, and the calibration activations. The output
is a sharded safetensors checkpoint with its index (`ShardWriter`): shard 1 holds the input
embedding, shard i + 2 block i, and the last the final norm, the LM head and any zero biases the stock
config needs, so a resumed run only rewrites what it had not finished. A block that depth pruning
removes is never written (its shard number stays unused); the blocks after it are written under their
new index, as the in-memory path saves them.

`streamed_perplexity` evaluates a model that does not fit in memory the same way: every window's
activations go through one block at a time.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm

from llm_bip.activations import capture_block_inputs, run_block
from llm_bip.devices import release_freed_memory
from llm_bip.dtypes import dtype_name
from llm_bip.evaluation.perplexity import window_losses
from llm_bip.loading import LoadedModel, input_side_names, materialize, output_side_names
from llm_bip.tensor_files import write_safetensors

INDEX_FILE = "model.safetensors.index.json"


class StreamedBlocks:
    """Blocks read from the checkpoint on `load`; on `done`, written to the writer (if any) and freed."""

    def __init__(self, loaded: LoadedModel, writer: ShardWriter | None = None) -> None:
        self.loaded, self.writer = loaded, writer
        self.dtype = loaded.dtype
        self.removed: frozenset[int] = frozenset()

    def remove(self, layers: list[int]) -> None:
        self.removed = frozenset(layers)

    def position(self, layer: int) -> int:
        """The block's index in the output, once the removed blocks before it are gone."""
        return layer - sum(1 for r in self.removed if r < layer)

    def load(self, layer: int) -> nn.Module:
        adapter, checkpoint = self.loaded.adapter, self.loaded.checkpoint
        prefix = adapter.block_prefix(layer)
        block = adapter.blocks(self.loaded.model)[layer]
        names = [prefix + name for name in block.state_dict()]
        materialize(self.loaded.model, checkpoint, names, self.dtype, self.loaded.device)
        return block

    def replay(self, layer: int, plan, written: dict) -> None:
        """Give a block an interrupted run already wrote its pruned shape (on the meta device): its cut,
        and the biases compensation gave it, so the layout and parameter counts are those of the output."""
        from llm_bip.surgery import cut_block

        if plan.removed:
            return  # gone from the skeleton already (pipeline.prune deletes removed blocks at its end)
        block = self.loaded.adapter.blocks(self.loaded.model)[self.position(layer)]
        cut_block(self.loaded.adapter, block, plan)
        prefix = self.loaded.adapter.block_prefix(self.position(layer))
        for name, module in block.named_modules():
            if isinstance(module, nn.Linear) and module.bias is None and f"{prefix}{name}.bias" in written:
                module.bias = nn.Parameter(torch.empty(module.out_features, device="meta", dtype=module.weight.dtype))

    def done(self, layer: int, block: nn.Module) -> None:
        if self.writer is not None and layer not in self.removed:
            prefix = self.loaded.adapter.block_prefix(self.position(layer))
            self.writer.write(block_shard(layer), {prefix + k: v for k, v in block.state_dict().items()})
        block.to("meta")  # frees its memory; shapes stay (parameter counts still add up)
        release_freed_memory(self.loaded.device)


def input_side(loaded: LoadedModel, present: bool) -> None:
    """Read the input embedding back in (`present`), or free it once block 0's inputs are caught: a
    large vocabulary's embedding is among the biggest tensors a streamed run would otherwise hold."""
    embedding = loaded.model.get_input_embeddings()
    if present and embedding.weight.device.type == "meta":
        names = [n for n in input_side_names(loaded.model, loaded.adapter) if n in loaded.checkpoint.names()]
        materialize(loaded.model, loaded.checkpoint, names, StreamedBlocks(loaded).dtype, loaded.device)
        loaded.model.tie_weights()
    elif not present:
        buffers = dict(embedding.named_buffers(recurse=False))  # not in the checkpoint (Gemma's embed_scale): kept
        embedding.to("meta")  # a new (meta) parameter: tie a tied head to it again, so the old one is freed
        for name, buffer in buffers.items():
            setattr(embedding, name, buffer)
        loaded.model.tie_weights()
        release_freed_memory(loaded.device)


def block_shard(layer: int) -> int:
    return layer + 2


class ShardWriter:
    """Writes numbered safetensors shards into a directory (each atomically), then their index."""

    def __init__(self, directory: Path, num_shards: int, dtype: torch.dtype) -> None:
        self.directory, self.num_shards, self.dtype = directory, num_shards, dtype

    def name(self, shard: int) -> str:
        return f"model-{shard:05d}-of-{self.num_shards:05d}.safetensors"

    def write(self, shard: int, tensors: dict[str, torch.Tensor]) -> None:
        cpu = {k: v.detach().to("cpu", self.dtype if v.is_floating_point() else v.dtype).contiguous()
               for k, v in tensors.items()}
        path = self.directory / self.name(shard)
        tmp = path.with_suffix(".partial")
        write_safetensors(tmp, cpu, metadata={"format": "pt"})
        tmp.replace(path)

    def written(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Every tensor in the shards written so far: name -> (file, shape)."""
        out = {}
        for shard in range(1, self.num_shards + 1):
            path = self.directory / self.name(shard)
            if path.is_file():
                with safe_open(str(path), framework="pt") as handle:
                    for key in handle.keys():
                        out[key] = (path.name, tuple(handle.get_slice(key).get_shape()))
        return out

    def finish_index(self) -> None:
        written = self.written()
        total = sum(math.prod(shape) * torch.finfo(self.dtype).bits // 8 for _file, shape in written.values())
        index = {"metadata": {"total_size": total}, "weight_map": {k: v[0] for k, v in sorted(written.items())}}
        (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2))


def write_input_side(loaded: LoadedModel, writer: ShardWriter) -> None:
    names = [n for n in input_side_names(loaded.model, loaded.adapter) if n in loaded.checkpoint.names()]
    writer.write(1, loaded.checkpoint.tensors(names, None))


def write_output_side(loaded: LoadedModel, writer: ShardWriter, zero_biases: dict[str, int]) -> None:
    """Final norm and LM head from the checkpoint, and zero biases (name -> length) for the stock config."""
    names = [n for n in output_side_names(loaded.model, loaded.adapter) if n in loaded.checkpoint.names()]
    tensors = loaded.checkpoint.tensors(names, None)
    tensors.update({name: torch.zeros(length) for name, length in zero_biases.items()})
    writer.write(writer.num_shards, tensors)


@torch.no_grad()
def streamed_perplexity(loaded: LoadedModel, data: torch.Tensor, source: str, batch_size: int, dtype: str,
                        progress: bool = True) -> dict:
    """Perplexity of a streamed model over `data` (windows × seq_len token ids, data.text_windows): all
    windows through one block at a time, then norm and head."""
    start = time.perf_counter()
    model, adapter = loaded.model, loaded.adapter
    windows, seq_len = data.shape
    input_side(loaded, present=True)
    inputs = capture_block_inputs(model, adapter, data, batch_size)
    blocks = StreamedBlocks(loaded)
    for layer in tqdm(range(adapter.num_blocks), desc=f"perplexity {source}@{seq_len} (streamed)",
                      disable=not progress, leave=False, unit="block"):
        block = blocks.load(layer)
        inputs = run_block(block, inputs, layer=layer)
        blocks.done(layer, block)
    out_names = [n for n in output_side_names(model, adapter) if n in loaded.checkpoint.names()]
    materialize(model, loaded.checkpoint, out_names, blocks.dtype, loaded.device)
    model.tie_weights()
    norm = adapter.final_norm(model)
    losses = []
    for i, hidden in enumerate(inputs.hidden):
        batch = data[i * batch_size : (i + 1) * batch_size].to(loaded.device)
        losses += window_losses(model, norm(hidden), batch).tolist()
    for name in out_names:  # free the norm and an untied head again (a tied head is the embedding)
        model.get_submodule(name.rsplit(".", 1)[0]).to("meta")
    mean = sum(losses) / len(losses)
    return {"source": str(source), "seq_len": seq_len, "windows": windows, "tokens": windows * seq_len,
            "perplexity": math.exp(mean), "dtype": dtype_name(blocks.dtype), "streamed": True,
            "seconds": time.perf_counter() - start,
            **({"bos_per_window": True} if adapter.bos_per_window else {})}
