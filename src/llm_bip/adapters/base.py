"""What the pruning pipeline needs to know about a decoder-only model family.

Scoring, allocation, cutting, saving and recovery talk to a model only through a `FamilyAdapter`, so
they never test `model_type` or name a projection. Every family supported today is a pre-norm decoder
with LLaMA's layout (q/k/v/o, gated FFN, RoPE); an adapter says where the blocks live, how a block is
cut, which output biases the stock config can express and which modules LoRA adapts. A family with
another layout (fused projections, extra norms) overrides the methods it changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llm_bip.errors import LlmBipError
from llm_bip.widths import BlockWidths


@dataclass(frozen=True)
class LinearRows:
    """Output rows [start, stop) of a fused `nn.Linear`, read like a projection of its own (Phi-3's
    qkv_proj holds the q, k and v rows). `weight` and `bias` are views: reading only."""

    linear: nn.Linear
    start: int
    stop: int

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight[self.start : self.stop]

    @property
    def bias(self) -> torch.Tensor | None:
        return None if self.linear.bias is None else self.linear.bias[self.start : self.stop]

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    @property
    def out_features(self) -> int:
        return self.stop - self.start


Projection = nn.Linear | LinearRows


def weight_rows(projection: Projection) -> tuple[nn.Parameter, slice]:
    """The weight parameter a projection lives in and its rows there (gradient hooks need the parameter)."""
    if isinstance(projection, LinearRows):
        return projection.linear.weight, slice(projection.start, projection.stop)
    return projection.weight, slice(None)


@dataclass(frozen=True)
class BlockParts:
    """The modules of one decoder block that scoring and compensation read (never assign through these:
    `FamilyAdapter.cut` replaces them). q/k/v and gate/up are only read (their weights, for weight-based
    scores); where a family fuses them they are `LinearRows` of the fused projection."""

    attention: nn.Module
    q_proj: Projection
    k_proj: Projection
    v_proj: Projection
    o_proj: nn.Linear
    post_attention_norm: nn.Module  # N2: the norm in front of the FFN
    mlp: nn.Module  # F: the FFN whose output is added to the residual stream
    gate_proj: Projection
    up_proj: Projection
    down_proj: nn.Linear
    # Norms on a sub-layer's output before the residual add (Gemma 2/3's post-attention and post-FFN
    # norms), None where the output goes straight to the residual stream. Scores and refits weigh each
    # token by what the norm does to it (stats.py, docs/method.md).
    attn_output_norm: nn.Module | None = None
    ffn_output_norm: nn.Module | None = None


class FamilyAdapter:
    """Adapter for LLaMA-layout decoders, bound to one model config."""

    model_types: tuple[str, ...] = ()
    family: str = ""
    # Names of the stock config flags that add output biases to o_proj / down_proj; None where the stock
    # class cannot have one. Each flag also gives biases to the sibling projections listed below.
    o_proj_bias_flag: str | None = None
    down_proj_bias_flag: str | None = None
    # Paths inside a block of the two projections whose inputs are pruned (for reading them from disk).
    o_proj_name: str = "self_attn.o_proj"
    down_proj_name: str = "mlp.down_proj"
    lora_target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    # Config fields that hold one entry per layer where they are lists (removed blocks' entries go), and
    # fields that count layers from the bottom (Qwen's `max_window_layers`: the first N layers use full
    # attention; after a removal they count the kept layers among those N).
    per_layer_fields: tuple[str, ...] = ("layer_types", "sliding_window")
    layer_count_fields: tuple[str, ...] = ()
    # Whether blocks have norms on the sub-layer outputs (`BlockParts.attn_output_norm`, Gemma 2/3).
    has_output_norms: bool = False
    # Whether every window of text the model sees (calibration samples, perplexity windows) starts with
    # the tokenizer's BOS token. Gemma's attention is built around it: dense Gemma-3-270M has ppl@128 461
    # on WikiText-2 without it and 45.5 with it, while the other families are measured, as the field
    # measures them, on bare windows.
    bos_per_window: bool = False

    def __init__(self, config) -> None:
        self.config = config

    def window_bos(self, tokenizer) -> int | None:
        """The token every window of text starts with (`bos_per_window`), else None; a tokenizer without
        the BOS this family needs is refused."""
        if not self.bos_per_window:
            return None
        if tokenizer.bos_token_id is None:
            raise LlmBipError(f"{self.family} models need a BOS token at the start of every window, and this "
                              "model's tokenizer has none: give the model's own tokenizer (tokenizer.json with its "
                              "bos_token)")
        return tokenizer.bos_token_id

    # ----------------------------------------------------------------------------------- layout

    @property
    def head_dim(self) -> int:
        config = self.config
        return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    @property
    def num_blocks(self) -> int:
        return self.config.num_hidden_layers

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.model.layers

    def block_prefix(self, layer: int) -> str:
        """The prefix of a block's tensors in the checkpoint's state dict."""
        return f"model.layers.{layer}."

    def final_norm(self, model: nn.Module) -> nn.Module:
        return model.model.norm

    def embedding_parameters(self, model: nn.Module) -> int:
        """Parameters outside the decoder blocks (embeddings, final norm, untied head)."""
        blocks = sum(p.numel() for p in self.blocks(model).parameters())
        return sum(p.numel() for p in model.parameters()) - blocks

    def parts(self, block: nn.Module) -> BlockParts:
        attn, mlp = block.self_attn, block.mlp
        return BlockParts(
            attention=attn, q_proj=attn.q_proj, k_proj=attn.k_proj, v_proj=attn.v_proj, o_proj=attn.o_proj,
            post_attention_norm=block.post_attention_layernorm, mlp=mlp,
            gate_proj=mlp.gate_proj, up_proj=mlp.up_proj, down_proj=mlp.down_proj,
        )

    def ffn_sublayer(self, block: nn.Module, residual: torch.Tensor) -> torch.Tensor:
        """The block's output from its FFN residual input h (the residual stream once attention has added
        to it): h + F(N2(h)), through the norm on the FFN's output where there is one. The block loop passes
        calibration activations on with it where a block's attention did not change, instead of running
        the attention again. A family whose block computes otherwise overrides it (a test checks it against
        the block's own forward on every family)."""
        p = self.parts(block)
        out = p.mlp(p.post_attention_norm(residual))
        if p.ffn_output_norm is not None:
            out = p.ffn_output_norm(out)
        return residual + out

    def widths(self, block: nn.Module) -> BlockWidths:
        """A block's widths, read from its weights."""
        p = self.parts(block)
        return BlockWidths(p.q_proj.out_features // self.head_dim, p.k_proj.out_features // self.head_dim,
                           p.down_proj.in_features)

    def output_biases(self, block: nn.Module) -> dict[str, bool]:
        """Which of the block's output projections carry a bias (compensation adds them)."""
        p = self.parts(block)
        return {"o_proj_bias": p.o_proj.bias is not None, "down_proj_bias": p.down_proj.bias is not None}

    # ------------------------------------------------------------------------------------ cutting

    @torch.no_grad()
    def cut(self, block: nn.Module, q_rows: torch.Tensor, kv_rows: torch.Tensor, channels: torch.Tensor) -> None:
        """Slice a block to the kept q/o rows (query heads), k/v rows (KV heads) and FFN channels."""
        p = self.parts(block)
        attn, mlp = p.attention, p.mlp
        attn.q_proj = slice_linear(p.q_proj, out_index=q_rows)
        attn.k_proj = slice_linear(p.k_proj, out_index=kv_rows)
        attn.v_proj = slice_linear(p.v_proj, out_index=kv_rows)
        attn.o_proj = slice_linear(p.o_proj, in_index=q_rows)
        mlp.gate_proj = slice_linear(p.gate_proj, out_index=channels)
        mlp.up_proj = slice_linear(p.up_proj, out_index=channels)
        mlp.down_proj = slice_linear(p.down_proj, in_index=channels)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = len(channels)
        num_heads, num_kv = len(q_rows) // self.head_dim, len(kv_rows) // self.head_dim
        attn.num_key_value_groups = num_heads // num_kv
        for name, value in (("num_heads", num_heads), ("num_key_value_heads", num_kv)):
            if hasattr(attn, name):  # some versions keep these too; keep them truthful where they exist
                setattr(attn, name, value)

    # ------------------------------------------------------------------------------- depth pruning

    def set_blocks(self, model: nn.Module, blocks: nn.ModuleList) -> None:
        model.model.layers = blocks

    def renumber_block(self, block: nn.Module, position: int) -> None:
        """Tell a block its new position: the attention's `layer_idx` picks its KV-cache slot."""
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = position

    def remove_blocks(self, model: nn.Module, removed: list[int]) -> None:
        """Delete these blocks (by their current index) from the model, renumber the rest, and make the
        config say so: `num_hidden_layers`, every per-layer list (`layer_types`, ...) and the fields that
        count layers (`layer_count_fields`). The adapter's config follows if it is another object."""
        removed_set = set(removed)
        if not removed_set:
            return
        num_blocks = len(self.blocks(model))
        kept = [i for i in range(num_blocks) if i not in removed_set]
        if not kept or not removed_set <= set(range(num_blocks)):
            raise ValueError(f"cannot remove blocks {sorted(removed_set)} of {num_blocks}")
        blocks = self.blocks(model)
        self.set_blocks(model, nn.ModuleList([blocks[i] for i in kept]))
        for position, block in enumerate(self.blocks(model)):
            self.renumber_block(block, position)
        configs = [model.config] + ([self.config] if self.config is not model.config else [])
        for config in configs:
            self.remove_from_config(config, kept, num_blocks)

    def remove_from_config(self, config, kept: list[int], num_blocks: int) -> None:
        for name in self.per_layer_fields:
            value = getattr(config, name, None)
            if isinstance(value, list | tuple) and len(value) == num_blocks:
                setattr(config, name, type(value)(value[i] for i in kept))
        for name in self.layer_count_fields:
            value = getattr(config, name, None)
            if isinstance(value, int):
                setattr(config, name, sum(1 for i in kept if i < value))
        config.num_hidden_layers = len(kept)

    # ------------------------------------------------------------------------------------- biases

    def stock_bias_config(self, o_proj_bias: bool, down_proj_bias: bool) -> dict | None:
        """Config updates that let the stock class hold these output biases, or None if it cannot."""
        updates: dict = {}
        for wanted, flag in ((o_proj_bias, self.o_proj_bias_flag), (down_proj_bias, self.down_proj_bias_flag)):
            if wanted:
                if flag is None:
                    return None
                updates[flag] = True
        return updates

    def can_hold_output_bias(self, projection: str) -> bool:
        """Whether the stock class can hold a bias on `o_proj` or `down_proj`."""
        return (self.o_proj_bias_flag if projection == "o_proj" else self.down_proj_bias_flag) is not None

    def stock_bias_siblings(self, flags: dict) -> list[str]:
        """Projections (paths inside a block) that the stock bias flags give a bias: they need a zero one
        where they have none, so the saved shapes match the config."""
        siblings: list[str] = []
        if self.o_proj_bias_flag and flags.get(self.o_proj_bias_flag):
            siblings += ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
        if self.down_proj_bias_flag and flags.get(self.down_proj_bias_flag):
            siblings += ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
        return siblings

    @torch.no_grad()
    def add_stock_zero_biases(self, block: nn.Module, flags: dict) -> list[str]:
        """Give the stock flags' sibling projections zero biases where they have none; returns their paths."""
        return [path for path in self.stock_bias_siblings(flags) if self.zero_bias_like(block.get_submodule(path))]

    @torch.no_grad()
    def zero_bias_like(self, linear: nn.Linear) -> bool:
        """Give `linear` a zero bias if it has none; True if it got one."""
        if linear.bias is not None:
            return False
        linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=linear.weight.dtype,
                                               device=linear.weight.device))
        return True

    # ------------------------------------------------------------------------------------- checks

    def check_supported(self) -> None:
        """Raise ValueError for a variant of the family that this adapter does not handle."""
        config = self.config
        if config.num_attention_heads % config.num_key_value_heads:
            raise ValueError("num_attention_heads is not a multiple of num_key_value_heads")


@torch.no_grad()
def slice_linear(linear: nn.Linear, out_index: torch.Tensor | None = None, in_index: torch.Tensor | None = None) -> nn.Linear:
    """A new `nn.Linear` holding the given output rows and input columns of `linear` (same dtype, device);
    `linear` itself where both keep everything in order (no copy, and the block loop can tell that a
    projection the plan leaves whole is untouched)."""
    if _keeps_all(out_index, linear.out_features) and _keeps_all(in_index, linear.in_features):
        return linear
    weight = linear.weight
    if out_index is not None:
        weight = weight.index_select(0, out_index.to(weight.device))
    if in_index is not None:
        weight = weight.index_select(1, in_index.to(weight.device))
    bias = linear.bias
    if bias is not None and out_index is not None:
        bias = bias.index_select(0, out_index.to(bias.device))
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    new.weight.copy_(weight)
    if bias is not None:
        new.bias.copy_(bias)
    return new


def _keeps_all(index: torch.Tensor | None, size: int) -> bool:
    return index is None or (len(index) == size and bool((index.cpu() == torch.arange(size)).all()))
