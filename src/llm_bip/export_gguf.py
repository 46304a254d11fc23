"""Export a saved llm-bip model directory as a GGUF file for llama.cpp and Ollama.

The directory (stock or per-block-widths format, one safetensors file or shards) is read tensor by
tensor, converted and appended to the GGUF file, so a big model is never whole in memory. Names,
metadata and the LLaMA q/k row order follow what llama.cpp's loaders read (`llama-model.cpp`,
`convert_hf_to_gguf.py`; see the README's "GGUF export" section for what was read where).

Which GGUF architecture a model becomes is decided by what llama.cpp can run:
- uniform widths: `llama` (LLaMA, Mistral), `qwen2`, `qwen3`;
- per-layer widths: llama.cpp reads `head_count`, `head_count_kv` and `feed_forward_length` as
  per-layer arrays for every architecture, but the `llama`, `qwen2` and `qwen3` loaders size every
  block's tensors from layer 0's values, so such a file would fail to load. The `deci` architecture
  (Nemotron-NAS: LLaMA's block with per-layer widths) sizes each block from its own entries and uses
  LLaMA's rotary convention, so non-uniform LLaMA / Mistral models (and Qwen2 models that kept every
  query head) are written as `deci`. Anything llama.cpp cannot run is refused before a byte is written.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from llm_bip.checkpoints import SafetensorsCheckpoint
from llm_bip.errors import LlmBipError
from llm_bip.outputs import check_output_file, write_atomic

log = logging.getLogger(__name__)

# What `--type` may ask for. 4-bit: the gguf package quantizes Q4_0 (and Q4_1, Q5_0, Q5_1) but none of
# the K-quants, so Q4_0 is the 4-bit type offered; llama.cpp's llama-quantize does better ones.
TENSOR_TYPES = ("f16", "bf16", "f32", "q8_0", "q4_0")
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
EXPORT_KEY = "llm_bip.exported_from"  # marks a file as ours (what a later --overwrite may replace)

# The regexes of the Hugging Face pre-tokenizers llama.cpp reimplements under these names
# (llama-vocab.cpp); a tokenizer whose pre-tokenizer is none of them gets no name (llama.cpp's default).
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# Hugging Face block tensor -> llama.cpp tensor (both without the "model.layers.N." / "blk.N." prefix).
_BLOCK_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
# Gemma 3 names its four norms differently: its post_attention_layernorm normalises the attention's
# output (llama.cpp's post_attention_norm), and the norm in front of the FFN is pre_feedforward_layernorm.
_GEMMA3_BLOCK_NAMES = {
    **{hf: short for hf, short in _BLOCK_NAMES.items() if "layernorm" not in hf},
    "input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
}
# Bias tensors each architecture's loader reads (optional or required); a bias outside this set is
# dropped when it is all zeros and refused otherwise (llama.cpp fails on a tensor it does not read).
_BIASES = {
    "llama": {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"},
    "deci": {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"},
    "qwen2": {"attn_q", "attn_k", "attn_v"},
    "qwen3": set(),
    "gemma3": set(),
}
_REQUIRED_BIASES = {"qwen2": {"attn_q", "attn_k", "attn_v"}}


@dataclass(frozen=True)
class LayerShape:
    heads: int
    kv_heads: int
    channels: int


@dataclass
class _Tensor:
    """One tensor to write: where it comes from, how it is transformed, how it is stored."""

    gguf_name: str
    source: str | None  # safetensors name; None for a tensor computed here (rope_freqs)
    shape: tuple[int, ...]  # numpy order (rows, columns)
    qtype: object  # gguf.GGMLQuantizationType
    permute_heads: int = 0  # >0: reorder the rows of each of this many heads for llama.cpp's rotary layout
    data: np.ndarray | None = None
    plus_one: bool = False  # a Gemma norm: Hugging Face stores w and scales by (1 + w), llama.cpp stores 1 + w


@dataclass
class GGUFExport:
    """What `export_gguf` wrote."""

    path: Path
    architecture: str
    tensor_type: str
    per_layer: bool
    tensor_types: dict[str, int] = field(default_factory=dict)  # GGML type name -> number of tensors
    fallbacks: list[str] = field(default_factory=list)  # tensors stored in F16 because their rows do not fit blocks
    size_bytes: int = 0


# ------------------------------------------------------------------------------------- entry point


def check_gguf_output(out_path: str | Path, overwrite: bool, inputs: tuple = ()) -> Path:
    """The project's output rules for a GGUF file: refuse an existing file without `overwrite`, a file
    llm-bip did not write even with it, and any input of the run."""
    return check_output_file(out_path, overwrite, inputs, "--gguf", ours=is_our_gguf)


def is_our_gguf(path: Path) -> bool:
    try:
        from gguf import GGUFReader

        return EXPORT_KEY in GGUFReader(str(path)).fields
    except Exception:  # noqa: BLE001  (a file that does not parse as GGUF is not ours)
        return False


def export_gguf(model_dir: str | Path, out_path: str | Path, tensor_type: str = "f16", overwrite: bool = False,
                inputs: tuple = ()) -> GGUFExport:
    """Write the saved model in `model_dir` as a GGUF file at `out_path` (atomically), with 2-D weights in
    `tensor_type` (norms and biases stay F32). Every check runs before anything is written."""
    import gguf

    if tensor_type not in TENSOR_TYPES:
        raise LlmBipError(f"unknown GGUF tensor type '{tensor_type}': use one of {', '.join(TENSOR_TYPES)}")
    model_dir = Path(model_dir).expanduser().resolve()
    if not (model_dir / "config.json").is_file():
        raise LlmBipError(f"{model_dir} is not a saved model directory (no config.json): pass the output of "
                          "`llm-bip prune` (a .gguf file needs no export)")
    out = check_gguf_output(out_path, overwrite, (model_dir, *inputs))
    config = json.loads((model_dir / "config.json").read_text())
    checkpoint = SafetensorsCheckpoint(model_dir)
    checkpoint.validate()
    model = _Model(model_dir, config, checkpoint)
    arch = model.architecture()
    vocab = _Vocab.read(model_dir, model.vocab_size)
    tensors, fallbacks = model.tensors(arch, tensor_type)

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(tmp, arch)
        try:
            model.write_metadata(writer, arch, tensor_type)
            vocab.write(writer)
            for t in tensors:
                nbytes = _nbytes(t.shape, t.qtype)
                if t.qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                    dtype = np.float32 if t.qtype == gguf.GGMLQuantizationType.F32 else np.float16
                    writer.add_tensor_info(t.gguf_name, t.shape, np.dtype(dtype), nbytes)
                else:
                    byte_shape = gguf.quant_shape_to_byte_shape(t.shape, t.qtype)
                    writer.add_tensor_info(t.gguf_name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=t.qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for t in tensors:  # one tensor in memory at a time
                writer.write_tensor_data(_convert(model.read(t), t.qtype))
        finally:
            writer.close()

    write_atomic(out, write)
    counts = Counter(t.qtype.name for t in tensors)
    result = GGUFExport(out, arch, tensor_type, model.per_layer, dict(counts), fallbacks, out.stat().st_size)
    log.info("wrote %s (%s, %s, %.1f MiB)", out, arch, ", ".join(f"{n} {k}" for k, n in counts.items()),
             result.size_bytes / 2**20)
    return result


# --------------------------------------------------------------------------------------- the model


class _Model:
    """A saved model directory: its family, per-layer widths and tensors, and how llama.cpp sees them."""

    def __init__(self, model_dir: Path, config: dict, checkpoint: SafetensorsCheckpoint) -> None:
        self.dir, self.config, self.checkpoint = model_dir, config, checkpoint
        self.family = config.get("base_model_type") or config.get("model_type")
        if self.family not in FAMILIES:
            raise LlmBipError(f"cannot export '{self.family}' to GGUF: the export supports {', '.join(FAMILIES)}")
        self.hidden = int(config["hidden_size"])
        self.head_dim = int(config.get("head_dim") or self.hidden // int(config["num_attention_heads"]))
        self.num_layers = int(config["num_hidden_layers"])
        names = set(checkpoint.names())
        self.names = names
        if "model.embed_tokens.weight" not in names:
            raise LlmBipError(f"{model_dir} has no model.embed_tokens.weight: it is not a saved {self.family} model")
        self.layers = [self._layer(i) for i in range(self.num_layers)]
        self.per_layer = len(set(self.layers)) > 1
        self.vocab_size = checkpoint.shape("model.embed_tokens.weight")[0]
        self.tied = "lm_head.weight" not in names
        if self.tied and config.get("tie_word_embeddings") is False:
            raise LlmBipError(f"{model_dir} has no lm_head.weight and its config does not tie it to the embedding: "
                              "the checkpoint is incomplete; re-save it")
        self._check_layers()
        kind = self.rope()["rope_type"]
        if kind not in ("default", "linear", "yarn", "llama3"):
            raise LlmBipError(f"rope scaling '{kind}' has no GGUF form this export writes (default, linear, yarn, "
                              "llama3)")

    def _layer(self, i: int) -> LayerShape:
        prefix = f"model.layers.{i}."
        for part in ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "mlp.gate_proj.weight"):
            if prefix + part not in self.names:
                raise LlmBipError(f"{self.dir} lacks {prefix + part}: the checkpoint is incomplete or not a "
                                  f"{self.family} model; re-save it")
        q = self.checkpoint.shape(prefix + "self_attn.q_proj.weight")[0]
        kv = self.checkpoint.shape(prefix + "self_attn.k_proj.weight")[0]
        return LayerShape(q // self.head_dim, kv // self.head_dim, self.checkpoint.shape(prefix + "mlp.gate_proj.weight")[0])

    def _check_layers(self) -> None:
        for i, layer in enumerate(self.layers):
            if layer.heads == 0 or layer.kv_heads == 0:
                # llama.cpp derives the head size from layer 0's head count, and only `deci` has
                # attention-free layers; llm-bip's own format never holds one either.
                raise LlmBipError(f"block {i} has no attention heads left: llama.cpp cannot run that layout; "
                                  "prune with fewer heads removed (e.g. --head-ratio 0) or remove the block "
                                  "whole (--remove-blocks)")
            if layer.channels == 0:
                # deci's graph skips a block without FFN before taking its attention output, so the
                # result would be wrong rather than refused.
                raise LlmBipError(f"block {i} has no FFN channels left: llama.cpp does not run such a block "
                                  "correctly; keep some channels or remove the block whole (--remove-blocks)")
            if layer.heads % layer.kv_heads:
                raise LlmBipError(f"block {i} has {layer.heads} query heads for {layer.kv_heads} KV heads: llama.cpp "
                                  "needs whole groups; prune with --gqa-mode kv-groups")

    # ------------------------------------------------------------------------------- architecture

    def architecture(self) -> str:
        """The GGUF architecture llama.cpp can run this model as; LlmBipError if there is none."""
        if not self.per_layer:
            if self.family == "qwen2" and self.layers[0].heads * self.head_dim != self.hidden:
                # llama.cpp's qwen2 loader makes attn_q and attn_output hidden_size x hidden_size.
                raise LlmBipError(
                    f"this Qwen2 model has {self.layers[0].heads} query heads of {self.head_dim} "
                    f"(q_proj {self.layers[0].heads * self.head_dim} rows) but llama.cpp's qwen2 architecture "
                    f"needs q_proj and o_proj of hidden_size ({self.hidden}): prune Qwen2 without removing heads "
                    "(--head-ratio 0, the default for uniform pruning) for a GGUF export")
            if self.family == "gemma3_text":
                self._check_gemma3()
            return {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
                    "gemma3_text": "gemma3"}[self.family]
        if self.family == "gemma3_text":
            raise LlmBipError("llama.cpp's gemma3 loader sizes every block from layer 0, so a Gemma 3 model with "
                              "per-layer widths cannot be exported: prune with --allocation uniform for a GGUF "
                              "export, or serve the per-block-widths model with transformers")
        if self.family == "qwen3":
            raise LlmBipError("llama.cpp has no architecture with Qwen3's q/k norms and per-layer widths (its qwen3 "
                              "loader sizes every block from layer 0): prune with --allocation uniform for a GGUF "
                              "export, or serve the per-block-widths model with transformers")
        if self.family == "qwen2" and any(layer.heads * self.head_dim != self.hidden for layer in self.layers):
            raise LlmBipError("a Qwen2 model with per-layer widths exports as llama.cpp's deci architecture, whose "
                              "loader sizes the q bias by hidden_size, so every block must keep all its query "
                              "heads: prune Qwen2 with --head-ratio 0 (channels only) or --allocation uniform")
        return "deci"

    def _check_gemma3(self) -> None:
        """What llama.cpp's gemma3 architecture fixes rather than reads: a full-attention layer every 6th
        (the others slide over `sliding_window` tokens with rotary base 10,000), attention scaled by
        1/sqrt(head_dim), no logit soft-capping. A model that differs (blocks removed whole, the 27B's
        scaling) would load and give wrong outputs, so it is refused."""
        config = self.config
        types = config.get("layer_types") or []
        expected = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(self.num_layers)]
        if types and list(types) != expected:
            raise LlmBipError("llama.cpp's gemma3 architecture takes every 6th layer as full attention and the rest as "
                              "sliding; this model's layer_types differ (blocks removed whole change the pattern): "
                              "prune Gemma 3 by width only (no --remove-blocks / --depth-ratio) for a GGUF export")
        local = (config.get("rope_parameters") or {}).get("sliding_attention") or {}
        if float(local.get("rope_theta", config.get("rope_local_base_freq", 10000.0))) != 10000.0:
            raise LlmBipError("llama.cpp's gemma3 architecture fixes the sliding layers' rotary base at 10,000; this "
                              "model's differs")
        scalar = config.get("query_pre_attn_scalar")
        if scalar is not None and int(scalar) != self.head_dim:
            raise LlmBipError(f"query_pre_attn_scalar {scalar} is not head_dim ({self.head_dim}): llama.cpp's gemma3 "
                              "scales attention by 1/sqrt(head_dim) for this size, so the export would be wrong")
        if config.get("final_logit_softcapping") or config.get("attn_logit_softcapping"):
            raise LlmBipError("llama.cpp's gemma3 architecture applies no logit soft-capping, which this model uses")

    # ------------------------------------------------------------------------------------ tensors

    def tensors(self, arch: str, tensor_type: str) -> tuple[list[_Tensor], list[str]]:
        """Every tensor of the GGUF file in order, with its storage type; and those that fell back to F16."""
        import gguf

        wanted = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
                  "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0,
                  "q4_0": gguf.GGMLQuantizationType.Q4_0}[tensor_type]
        fallbacks: list[str] = []
        rope_permuted = arch in ("llama", "deci")  # llama.cpp's "normal" rotary pairs rows (i, i + d/2)
        gemma = arch == "gemma3"
        block_names = _GEMMA3_BLOCK_NAMES if gemma else _BLOCK_NAMES

        def pick(name: str, shape: tuple[int, ...], edge: bool = False) -> object:
            if len(shape) == 1:
                return gguf.GGMLQuantizationType.F32  # norms and biases, as llama.cpp's converter keeps them
            qtype = wanted
            if edge and qtype == gguf.GGMLQuantizationType.Q4_0:
                # 4-bit embeddings / output layer cost most of the quality; llama-quantize keeps them higher too
                qtype = gguf.GGMLQuantizationType.Q8_0
            block = gguf.GGML_QUANT_SIZES[qtype][0]
            if shape[-1] % block:
                fallbacks.append(name)
                return gguf.GGMLQuantizationType.F16  # a row that is not whole blocks cannot be quantized
            return qtype

        out: list[_Tensor] = []
        handled: set[str] = set()  # every checkpoint tensor written, or dropped as a zero bias
        embed = "model.embed_tokens.weight"
        out.append(_Tensor("token_embd.weight", embed, self.checkpoint.shape(embed),
                           pick("token_embd.weight", self.checkpoint.shape(embed), edge=self.tied)))
        freqs = self._rope_freqs(arch)
        if freqs is not None:
            out.append(_Tensor("rope_freqs.weight", None, freqs.shape, gguf.GGMLQuantizationType.F32, data=freqs))
        for i, layer in enumerate(self.layers):
            prefix = f"model.layers.{i}."
            for hf, short in block_names.items():
                for kind in ("weight", "bias"):
                    source = f"{prefix}{hf}.{kind}"
                    if source not in self.names:
                        if kind == "bias" and short in _REQUIRED_BIASES.get(arch, set()):
                            raise LlmBipError(f"{self.dir} lacks {source}, which llama.cpp's {arch} needs")
                        continue
                    name = f"blk.{i}.{short}.{kind}"
                    shape = self.checkpoint.shape(source)
                    handled.add(source)
                    if kind == "bias" and not self._keep_bias(arch, short, source, shape, i):
                        continue
                    if short in ("attn_q_norm", "attn_k_norm") and arch not in ("qwen3", "gemma3"):
                        raise LlmBipError(f"{source} (per-head q/k norms) has no place in llama.cpp's {arch}")
                    heads = 0
                    if rope_permuted and short in ("attn_q", "attn_k"):
                        heads = layer.heads if short == "attn_q" else layer.kv_heads
                    out.append(_Tensor(name, source, shape, pick(name, shape), permute_heads=heads,
                                       plus_one=gemma and short.endswith("norm")))
        out.append(_Tensor("output_norm.weight", "model.norm.weight", self.checkpoint.shape("model.norm.weight"),
                           gguf.GGMLQuantizationType.F32, plus_one=gemma))
        if not self.tied:
            shape = self.checkpoint.shape("lm_head.weight")
            out.append(_Tensor("output.weight", "lm_head.weight", shape, pick("output.weight", shape, edge=True)))
        handled |= {t.source for t in out}
        unused = sorted(self.names - handled)
        if unused:
            raise LlmBipError(f"{self.dir} holds tensors llama.cpp's {arch} has no place for ({', '.join(unused[:3])}): "
                              "this is not a plain llm-bip model of a supported family")
        if fallbacks:
            log.info("%d tensor(s) have rows that are not whole %s blocks and are stored as F16: %s", len(fallbacks),
                     tensor_type, ", ".join(fallbacks[:4]) + (" ..." if len(fallbacks) > 4 else ""))
        return out, fallbacks

    def _keep_bias(self, arch: str, short: str, source: str, shape: tuple[int, ...], layer: int) -> bool:
        """Whether to write a bias: zero biases (from the stock config's flags) are dropped where llama.cpp
        would not read them; a bias with content it cannot read is refused."""
        if short in _REQUIRED_BIASES.get(arch, set()):
            return True
        zero = not bool(self.checkpoint.tensor(source).any())  # biases are small: read now, decide now
        if zero and short in ("attn_q", "attn_k", "attn_v", "ffn_gate", "ffn_up"):
            return False  # siblings the stock bias flags gave zero biases: nothing to write
        if short in _BIASES[arch]:
            if short == "attn_q" and shape[0] != self.hidden:
                # llama.cpp's llama/deci loaders size the q bias by hidden_size
                raise LlmBipError(f"block {layer}'s q_proj bias has {shape[0]} rows, but llama.cpp's {arch} reads "
                                  f"one of hidden_size ({self.hidden}); prune without removing heads")
            return not zero
        if zero:
            return False
        raise LlmBipError(f"{source} is a non-zero bias that llama.cpp's {arch} architecture does not read; a model "
                          "compensated with output biases cannot be exported for this family (prune with "
                          "--compensation refit --refit-intercept never)")

    def _rope_freqs(self, arch: str) -> np.ndarray | None:
        """LLaMA 3's rope scaling, as the per-frequency divisors llama.cpp reads from `rope_freqs.weight`."""
        rope = self.rope()
        if rope.get("rope_type") != "llama3":
            return None
        if arch not in ("llama", "deci"):
            raise LlmBipError(f"llama3 rope scaling has no place in llama.cpp's {arch}")
        base, dim = float(rope.get("rope_theta", 10000.0)), self.head_dim
        factor = float(rope.get("factor", 8.0))
        low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
        old = float(rope.get("original_max_position_embeddings", 8192))
        divisors = []
        for k in range(0, dim, 2):
            wavelen = 2 * math.pi * base ** (k / dim)
            if wavelen < old / high:
                divisors.append(1.0)
            elif wavelen > old / low:
                divisors.append(factor)
            else:  # the band between the two is interpolated
                smooth = (old / wavelen - low) / (high - low)
                divisors.append(1 / ((1 - smooth) / factor + smooth))
        return np.asarray(divisors, dtype=np.float32)

    def rope(self) -> dict:
        """The rope settings, from transformers 5's `rope_parameters` or the older `rope_scaling` / `rope_theta`."""
        rope = dict(self.config.get("rope_parameters") or {})
        rope = rope.get("full_attention", rope) if isinstance(rope.get("full_attention"), dict) else rope
        legacy = self.config.get("rope_scaling") or {}
        for key, value in legacy.items():
            rope.setdefault(key, value)
        if "type" in rope and "rope_type" not in rope:
            rope["rope_type"] = rope["type"]
        rope.setdefault("rope_theta", self.config.get("rope_theta", 10000.0))
        rope.setdefault("rope_type", "default")
        return rope

    def read(self, t: _Tensor) -> torch.Tensor:
        if t.data is not None:
            return torch.from_numpy(t.data)
        tensor = self.checkpoint.tensor(t.source)
        if t.plus_one:
            tensor = tensor.float() + 1
        if t.permute_heads:
            tensor = _rotary_rows(tensor, t.permute_heads)
        return tensor

    # ----------------------------------------------------------------------------------- metadata

    def write_metadata(self, writer, arch: str, tensor_type: str) -> None:
        import gguf

        config = self.config
        writer.add_type("model")
        writer.add_name(self.dir.name)
        writer.add_string(EXPORT_KEY, str(self.dir))
        writer.add_context_length(int(config.get("max_position_embeddings") or 2048))
        writer.add_embedding_length(self.hidden)
        writer.add_block_count(self.num_layers)
        writer.add_vocab_size(self.vocab_size)
        # Arrays only where widths differ: a scalar is what every llama.cpp version (and transformers) reads.
        heads = [layer.heads for layer in self.layers]
        kv_heads = [layer.kv_heads for layer in self.layers]
        channels = [layer.channels for layer in self.layers]
        writer.add_head_count(heads[0] if len(set(heads)) == 1 else heads)
        writer.add_head_count_kv(kv_heads[0] if len(set(kv_heads)) == 1 else kv_heads)
        writer.add_feed_forward_length(channels[0] if len(set(channels)) == 1 else channels)
        # llama.cpp derives the head size as n_embd / n_head(layer 0) unless told: pruned heads break that.
        writer.add_key_length(self.head_dim)
        writer.add_value_length(self.head_dim)
        writer.add_rope_dimension_count(self.head_dim)
        writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
        rope = self.rope()
        writer.add_rope_freq_base(float(rope["rope_theta"]))
        kind = rope["rope_type"]
        if kind == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(rope["factor"]))
        elif kind == "yarn":
            writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            writer.add_rope_scaling_factor(float(rope["factor"]))
            if rope.get("original_max_position_embeddings"):
                writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
        window = config.get("sliding_window")
        if arch == "gemma3":
            writer.add_sliding_window(int(window))
        elif window and (self.family == "mistral" or config.get("use_sliding_window")) and \
                window < int(config.get("max_position_embeddings") or 0):
            # llama.cpp's llama / qwen2 architectures attend over the whole context
            log.warning("the model attends within a sliding window of %d tokens, which llama.cpp's %s does not "
                        "apply: outputs differ beyond %d tokens of context", window, arch, window)
        file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                      "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                      "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}
        writer.add_file_type(file_types[tensor_type])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _rotary_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Hugging Face rotates row i with row i + d/2 of each head; llama.cpp's "normal" rope rotates
    neighbouring rows 2i, 2i+1. Interleave each head's two halves (weights and biases alike)."""
    rows = weight.shape[0]
    half = rows // heads // 2
    return weight.reshape(heads, 2, half, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _nbytes(shape: tuple[int, ...], qtype) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return math.prod(shape[:-1]) * (shape[-1] // block) * size


def _convert(tensor: torch.Tensor, qtype) -> np.ndarray:
    """A tensor as the bytes of its GGML type (C order, numpy's (rows, columns))."""
    import gguf

    if qtype == gguf.GGMLQuantizationType.F32:
        return tensor.to(torch.float32).contiguous().numpy()
    if qtype == gguf.GGMLQuantizationType.F16:
        return tensor.to(torch.float16).contiguous().numpy()
    if qtype == gguf.GGMLQuantizationType.BF16:
        # torch rounds to nearest even like ggml's fp32 -> bf16; a bf16 checkpoint stays bit-exact
        return tensor.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint8)
    return gguf.quants.quantize(tensor.to(torch.float32).contiguous().numpy(), qtype)


# ---------------------------------------------------------------------------------------- vocabulary


@dataclass
class _Vocab:
    """The tokenizer as llama.cpp reads it: model kind, tokens, their types (and scores), merges, specials."""

    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece-style)
    tokens: list[str]
    types: list[int]
    scores: list[float] | None
    pre: str | None
    special: object  # gguf.SpecialVocab: merges, bos/eos/pad ids, add_bos, chat template
    add_space_prefix: bool | None = None  # SentencePiece's dummy prefix (llama.cpp assumes one unless told)

    @classmethod
    def read(cls, model_dir: Path, n_vocab: int) -> _Vocab:
        import gguf

        tj = model_dir / "tokenizer.json"
        data = json.loads(tj.read_text()) if tj.is_file() else None
        model = (data or {}).get("model") or {}
        if model.get("type") == "BPE" and not model.get("byte_fallback") and \
                ((data.get("decoder") or {}).get("type") == "ByteLevel"):
            tokens, types = _from_tokenizer_json(data, n_vocab, model_dir)
            special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=n_vocab)
            if not special.merges:
                raise LlmBipError(f"{tj} has no BPE merges: llama.cpp cannot tokenize without them; copy the base "
                                  "model's tokenizer files into the directory")
            pre = _pre_tokenizer(data)
            if pre is None:
                log.warning("the tokenizer's pre-tokenizer is not one llama.cpp knows by name: llama.cpp will use "
                            "its default and may split text differently")
            return cls("gpt2", tokens, types, None, pre, special)
        if (model_dir / "tokenizer.model").is_file() and _has_sentencepiece():
            return cls._sentencepiece(model_dir, n_vocab)
        if model.get("type") == "BPE" and model.get("byte_fallback"):
            # SentencePiece BPE saved as tokenizer.json (LLaMA 2, Mistral): its pieces are ordered by score,
            # so minus the id ranks merges as SentencePiece's scores do.
            tokens, types = _from_tokenizer_json(data, n_vocab, model_dir)
            scores = [-float(i) if t == gguf.TokenType.NORMAL else 0.0 for i, t in enumerate(types)]
            return cls("llama", tokens, types, scores, None, gguf.SpecialVocab(model_dir, n_vocab=n_vocab),
                       _prepends_space(data))
        if (model_dir / "tokenizer.model").is_file():
            raise LlmBipError(f"{model_dir} has only a SentencePiece tokenizer.model and the sentencepiece package is "
                              "not installed: install it, or save the tokenizer as tokenizer.json")
        raise LlmBipError(f"{model_dir} has no tokenizer llama.cpp can use (a byte-level or byte-fallback BPE "
                          "tokenizer.json, or a SentencePiece tokenizer.model): copy the base model's tokenizer "
                          "files into it")

    @classmethod
    def _sentencepiece(cls, model_dir: Path, n_vocab: int) -> _Vocab:
        import gguf

        vocab = gguf.SentencePieceVocab(model_dir)
        tokens, scores, types = [], [], []
        for text, score, kind in vocab.all_tokens():
            tokens.append(text.decode("utf-8"))
            scores.append(score)
            types.append(int(kind))
        if len(tokens) > n_vocab:
            raise LlmBipError(f"the tokenizer has {len(tokens)} tokens but the embedding only {n_vocab} rows: it is "
                              "not this model's tokenizer")
        for i in range(len(tokens), n_vocab):
            tokens.append(f"[PAD{i}]")
            scores.append(-1000.0)
            types.append(int(gguf.TokenType.UNUSED))
        return cls("llama", tokens, types, scores, None, gguf.SpecialVocab(model_dir, n_vocab=n_vocab))

    def write(self, writer) -> None:
        writer.add_tokenizer_model(self.model)
        if self.pre:
            writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        writer.add_token_types(self.types)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        self.special.add_to_gguf(writer, quiet=True)


def _prepends_space(data: dict) -> bool:
    """Whether a SentencePiece-style tokenizer.json puts "▁" before the text (LLaMA 2, Mistral: a Prepend
    normalizer or a Metaspace pre-tokenizer that prepends) or not (Gemma: spaces replaced, nothing added)."""
    def parts(item: dict | None) -> list[dict]:
        item = item or {}
        return item.get("normalizers") or item.get("pretokenizers") or [item]

    if any(p.get("type") == "Prepend" for p in parts(data.get("normalizer"))):
        return True
    return any(p.get("type") == "Metaspace" and p.get("prepend_scheme", "always") != "never"
               and p.get("add_prefix_space", True) for p in parts(data.get("pre_tokenizer")))


def _from_tokenizer_json(data: dict, n_vocab: int, model_dir: Path) -> tuple[list[str], list[int]]:
    """Token texts by id and their llama.cpp types; ids the tokenizer does not use become unused padding
    (the embedding often has more rows than the tokenizer has tokens)."""
    import gguf

    by_id: dict[int, str] = {int(i): tok for tok, i in data["model"]["vocab"].items()}
    added = {int(t["id"]): t for t in data.get("added_tokens", [])}
    for i, t in added.items():
        by_id.setdefault(i, t["content"])
    if by_id and max(by_id) >= n_vocab:
        raise LlmBipError(f"the tokenizer in {model_dir} has token id {max(by_id)} but the embedding only {n_vocab} "
                          "rows: it is not this model's tokenizer")
    unk = data["model"].get("unk_token")
    tokens, types = [], []
    for i in range(n_vocab):
        text = by_id.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
        elif i in added:
            tokens.append(text)
            types.append(int(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED))
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text) and data["model"].get("byte_fallback"):
            tokens.append(text)
            types.append(int(gguf.TokenType.BYTE))
        else:
            tokens.append(text)
            types.append(int(gguf.TokenType.UNKNOWN if text == unk else gguf.TokenType.NORMAL))
    return tokens, types


def _pre_tokenizer(data: dict) -> str | None:
    """The name llama.cpp gives this byte-level BPE pre-tokenizer, told from its structure and regex."""
    pre = data.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"  # digits one by one, then GPT-2's regex (SmolLM, StarCoder)
    if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        regex = (parts[0].get("pattern") or {}).get("Regex")
        return {_QWEN2_REGEX: "qwen2", _LLAMA3_REGEX: "llama-bpe"}.get(regex)
    return None


def _has_sentencepiece() -> bool:
    try:
        import sentencepiece  # noqa: F401
    except ImportError:
        return False
    return True
