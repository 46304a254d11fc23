"""GGUF export: metadata llama.cpp reads, tensors equal to the source, the rotary row order, per-layer
widths as arrays (deci), refusals, output rules; and the logits of the exported file, computed both
with llama.cpp's conventions (a reference forward pass over the GGUF tensors below) and with
transformers' own GGUF loader, equal the saved model's."""

from __future__ import annotations

import hashlib
import json

import gguf
import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

from conftest import tiny_from_config
from llm_bip import api
from llm_bip.cli import main
from llm_bip.errors import LlmBipError
from llm_bip.saving import save_pruned

pytestmark = pytest.mark.usefixtures("one_thread")
HEAD_DIM = 16


@pytest.fixture(scope="module")
def tokenizer(small_tokenizer):
    """The real tokenizer's kind in a twelfth of its entries (conftest.small_tokenizer): reading a GGUF file's
    98k vocabulary and merge strings back with gguf's reader took seconds per read, a third of the suite."""
    return small_tokenizer


CONFIGS = {
    "llama": (LlamaConfig, {"tie_word_embeddings": True}),
    "mistral": (MistralConfig, {"tie_word_embeddings": False}),
    "qwen2": (Qwen2Config, {"tie_word_embeddings": False}),
    "qwen3": (Qwen3Config, {"tie_word_embeddings": False}),
    # Gemma 3 as llama.cpp's gemma3 runs it: a full-attention layer every 6th (none of 3), attention scaled
    # by 1/sqrt(head_dim); random norms, so the +1 of Gemma's norm convention shows.
    "gemma3_text": (Gemma3TextConfig, {"query_pre_attn_scalar": HEAD_DIM, "sliding_window": 512,
                                       "layer_types": ["sliding_attention"] * 3}),
}
# Per layer: the KV groups kept (2 groups of 2 query heads each) and the FFN channels kept (of 96).
FFN_ONLY = [([0, 1], 64)] * 3
FEWER_HEADS = [([1], 64)] * 3
PER_LAYER = [([0, 1], 80), ([1], 40), ([0], 64)]
PER_LAYER_FFN = [([0, 1], 80), ([0, 1], 40), ([0, 1], 64)]


def _saved(tmp_path, tokenizer, family: str, layout, biases: bool = False, name: str = "model", **config):
    """A tiny random model of `family` (with the tokenizer's vocabulary), cut to `layout` and saved
    by llm-bip; `biases` gives o_proj / down_proj biases as bias compensation would."""
    torch.manual_seed(0)
    cls, extra = CONFIGS[family]
    options = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=len(layout), num_attention_heads=4,
                   num_key_value_heads=2, head_dim=HEAD_DIM, vocab_size=len(tokenizer), max_position_embeddings=512,
                   rope_theta=10000.0)
    options.update(extra)
    options.update(config)
    if biases:
        options.update(attention_bias=True, mlp_bias=True)
    lm = tiny_from_config(cls(**options), family)
    with torch.no_grad():
        for p_name, p in lm.model.named_parameters():
            if biases and p_name.endswith("bias") and ("q_proj" in p_name or "k_proj" in p_name
                                                       or "v_proj" in p_name or "gate" in p_name or "up_proj" in p_name):
                p.zero_()  # as the stock bias flags leave them: only o_proj / down_proj biases carry content
    for block, (groups, channels) in zip(lm.adapter.blocks(lm.model), layout, strict=True):
        heads = [g * 2 + h for g in groups for h in range(2)]
        q_rows = torch.tensor([h * HEAD_DIM + d for h in heads for d in range(HEAD_DIM)])
        kv_rows = torch.tensor([g * HEAD_DIM + d for g in groups for d in range(HEAD_DIM)])
        lm.adapter.cut(block, q_rows, kv_rows, torch.arange(channels))
    out = save_pruned(lm.model, tokenizer, lm.adapter, tmp_path / name)
    return out, lm.model


def _read(path):
    reader = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items()}, {t.name: t for t in reader.tensors}


def _value(t) -> torch.Tensor:
    return torch.from_numpy(np.array(gguf.dequantize(t.data, t.tensor_type), dtype=np.float32))


def _source(model_dir, name: str) -> torch.Tensor:
    from llm_bip.checkpoints import SafetensorsCheckpoint

    return SafetensorsCheckpoint(model_dir).tensor(name).float()


def _unrotate(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's row order (pairs 2i, 2i+1 of each head) back to Hugging Face's (i, i + d/2)."""
    half = weight.shape[0] // heads // 2
    return weight.reshape(heads, half, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _per_layer(fields, key: str, layers: int) -> list[int]:
    value = fields[key]
    return list(value) if isinstance(value, list) else [value] * layers


# ------------------------------------------------------------------ a forward pass as llama.cpp runs it


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rope(x: torch.Tensor, base: float, neox: bool, divisors: torch.Tensor | None) -> torch.Tensor:
    """ggml_rope_ext: mode 0 ("normal", llama/deci) rotates neighbouring pairs (2i, 2i+1); NEOX (qwen2,
    qwen3) rotates (i, i + d/2). x: (tokens, heads, d)."""
    tokens, _, d = x.shape
    theta = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    if divisors is not None:
        theta = theta / divisors.double()
    angle = torch.arange(tokens, dtype=torch.float64)[:, None] * theta[None]  # (tokens, d/2)
    cos, sin = angle.cos()[:, None].float(), angle.sin()[:, None].float()
    if neox:
        a, b = x[..., : d // 2], x[..., d // 2:]
        return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).reshape(x.shape)


def _llamacpp_logits(path, ids: torch.Tensor) -> torch.Tensor:
    """Logits of one sequence from the GGUF file alone, read the way llama.cpp's llama / deci / qwen2 /
    qwen3 graphs read it (per-layer head counts, key_length, rotary convention, optional biases)."""
    fields, tensors = _read(path)
    arch = fields["general.architecture"]
    layers = fields[f"{arch}.block_count"]
    heads = _per_layer(fields, f"{arch}.attention.head_count", layers)
    kv_heads = _per_layer(fields, f"{arch}.attention.head_count_kv", layers)
    d = fields[f"{arch}.attention.key_length"]
    eps = fields[f"{arch}.attention.layer_norm_rms_epsilon"]
    base = fields[f"{arch}.rope.freq_base"]
    divisors = _value(tensors["rope_freqs.weight"]) if "rope_freqs.weight" in tensors else None
    neox = arch in ("qwen2", "qwen3", "gemma3")
    gemma = arch == "gemma3"  # norms after each sub-layer too, scaled embedding, GELU; 3 sliding layers: base 10k
    if gemma:
        base = 10000.0

    def w(name):
        return _value(tensors[name]) if name in tensors else None

    def linear(x, name):
        y = x @ w(f"{name}.weight").T
        return y + w(f"{name}.bias") if f"{name}.bias" in tensors else y

    x = w("token_embd.weight")[ids]
    if gemma:
        x = x * fields[f"{arch}.embedding_length"] ** 0.5
    tokens = len(ids)
    mask = torch.full((tokens, tokens), float("-inf")).triu(1)
    for i in range(layers):
        h = _rms(x, w(f"blk.{i}.attn_norm.weight"), eps)
        q = linear(h, f"blk.{i}.attn_q").reshape(tokens, heads[i], d)
        k = linear(h, f"blk.{i}.attn_k").reshape(tokens, kv_heads[i], d)
        v = linear(h, f"blk.{i}.attn_v").reshape(tokens, kv_heads[i], d)
        if f"blk.{i}.attn_q_norm.weight" in tensors:
            q, k = _rms(q, w(f"blk.{i}.attn_q_norm.weight"), eps), _rms(k, w(f"blk.{i}.attn_k_norm.weight"), eps)
        q, k = _rope(q, base, neox, divisors), _rope(k, base, neox, divisors)
        group = heads[i] // kv_heads[i]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = torch.einsum("thd,shd->hts", q, k) / d**0.5 + mask
        attn = torch.einsum("hts,shd->thd", scores.softmax(-1), v).reshape(tokens, heads[i] * d)
        out = linear(attn, f"blk.{i}.attn_output")
        x = x + (_rms(out, w(f"blk.{i}.post_attention_norm.weight"), eps) if gemma else out)
        h = _rms(x, w(f"blk.{i}.ffn_norm.weight"), eps)
        gate = linear(h, f"blk.{i}.ffn_gate")
        gate = torch.nn.functional.gelu(gate, approximate="tanh") if gemma else torch.nn.functional.silu(gate)
        out = linear(gate * linear(h, f"blk.{i}.ffn_up"), f"blk.{i}.ffn_down")
        x = x + (_rms(out, w(f"blk.{i}.post_ffw_norm.weight"), eps) if gemma else out)
    head = w("output.weight") if "output.weight" in tensors else w("token_embd.weight")
    return _rms(x, w("output_norm.weight"), eps) @ head.T


IDS = torch.tensor([5, 901, 17, 3000, 42, 7, 4000, 256, 33, 8])


def _hf_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS[None]).logits[0].float()


# ----------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("family", list(CONFIGS))
def test_uniform_export_metadata_tensors_and_logits(family, tmp_path, tokenizer):
    model_dir, model = _saved(tmp_path, tokenizer, family, FFN_ONLY)
    result = api.export_gguf(model_dir, tmp_path / "m.gguf", "f32")
    arch = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3_text": "gemma3"}[family]
    assert result.architecture == arch and not result.per_layer
    fields, tensors = _read(result.path)
    config = json.loads((model_dir / "config.json").read_text())
    assert fields["general.architecture"] == arch
    expected = {"context_length": 512, "embedding_length": 64, "block_count": 3, "feed_forward_length": 64,
                "attention.head_count": 4, "attention.head_count_kv": 2, "attention.key_length": HEAD_DIM,
                "attention.value_length": HEAD_DIM, "rope.dimension_count": HEAD_DIM, "vocab_size": len(tokenizer)}
    for key, value in expected.items():
        assert fields[f"{arch}.{key}"] == value, key  # scalars, not arrays, for a uniform model
    assert fields[f"{arch}.rope.freq_base"] == pytest.approx(10000.0)
    assert fields[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(config["rms_norm_eps"])
    assert fields["general.file_type"] == gguf.LlamaFileType.ALL_F32
    # The tokenizer, as llama.cpp reads it.
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.ggml.tokens"] == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    assert len(fields["tokenizer.ggml.merges"]) == len(json.loads((model_dir / "tokenizer.json").read_text())
                                                        ["model"]["merges"])
    assert fields["tokenizer.ggml.bos_token_id"] == tokenizer.bos_token_id
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert fields["tokenizer.ggml.padding_token_id"] == tokenizer.pad_token_id
    assert fields["tokenizer.chat_template"] == tokenizer.chat_template
    types = fields["tokenizer.ggml.token_type"]
    assert types[tokenizer.eos_token_id] == gguf.TokenType.CONTROL and types[1000] == gguf.TokenType.NORMAL
    # Every tensor, named as llama.cpp expects, with its shape, F32 and equal to the source.
    block = ["attn_norm.weight", "ffn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight",
             "attn_output.weight", "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight"]
    block += {"qwen2": ["attn_q.bias", "attn_k.bias", "attn_v.bias"],
              "qwen3": ["attn_q_norm.weight", "attn_k_norm.weight"],
              "gemma3_text": ["attn_q_norm.weight", "attn_k_norm.weight", "post_attention_norm.weight",
                              "post_ffw_norm.weight"]}.get(family, [])
    names = {"token_embd.weight", "output_norm.weight"} | {f"blk.{i}.{n}" for i in range(3) for n in block}
    if not config["tie_word_embeddings"]:
        names.add("output.weight")
    assert set(tensors) == names
    if family == "gemma3_text":
        assert fields["gemma3.attention.sliding_window"] == 512
    hf = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
          "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
          "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
          "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj",
          "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    if family == "gemma3_text":
        hf.update(post_attention_norm="post_attention_layernorm", ffn_norm="pre_feedforward_layernorm",
                  post_ffw_norm="post_feedforward_layernorm")
    for name, t in tensors.items():
        parts = name.split(".")
        source = (f"model.layers.{parts[1]}.{hf[parts[2]]}.{parts[3]}" if parts[0] == "blk"
                  else f"{hf[parts[0]]}.{parts[1]}")
        expected_tensor = _source(model_dir, source)
        if family == "gemma3_text" and parts[-2].endswith("norm"):
            expected_tensor = expected_tensor + 1  # Gemma scales by (1 + w); llama.cpp stores 1 + w
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        assert tuple(int(n) for n in t.shape) == tuple(reversed(expected_tensor.shape))  # GGML order: columns first
        value = _value(t)
        if arch == "llama" and parts[-2] in ("attn_q", "attn_k"):
            assert not torch.equal(value, expected_tensor)  # rows reordered for llama.cpp's rotary pairs ...
            value = _unrotate(value, 4 if parts[-2] == "attn_q" else 2)  # ... and only reordered
        assert torch.equal(value, expected_tensor), name
    # The logits, computed from the GGUF file the way llama.cpp does, are the saved model's.
    torch.testing.assert_close(_llamacpp_logits(result.path, IDS), _hf_logits(model), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("family,layout,types", [("llama", "ffn-only", ("f32", "f16")), ("qwen2", "ffn-only", ("f32",)),
                                                 ("mistral", "fewer-heads", ("f32",))])
def test_transformers_gguf_loader_gives_the_same_logits(family, layout, types, tmp_path, tokenizer):
    """transformers reads llama (and mistral, written as llama) and qwen2 GGUF files, un-permuting q/k
    itself. (Its qwen3 reader has no head_dim key, so it cannot size a Qwen3 with head_dim != 128; Qwen2
    with heads removed is refused, see below.) Each load converts the tokenizer (seconds), so
    the cases are the writer's distinct paths: llama's q/k permutation in two types, qwen2's biases,
    and per-head rows of a model with heads removed."""
    model_dir, model = _saved(tmp_path, tokenizer, family, FFN_ONLY if layout == "ffn-only" else FEWER_HEADS)
    expected = _hf_logits(model)
    for tensor_type, tolerance in (("f32", 1e-4), ("f16", 3e-2)):
        if tensor_type not in types:
            continue
        path = api.export_gguf(model_dir, tmp_path / f"m-{tensor_type}.gguf", tensor_type).path
        loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        torch.testing.assert_close(_hf_logits(loaded.eval()), expected, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("tensor_type", ["f16", "bf16", "q8_0", "q4_0"])
def test_tensor_types_dequantize_to_the_source(tensor_type, tmp_path, tokenizer):
    model_dir, model = _saved(tmp_path, tokenizer, "mistral", PER_LAYER)  # ffn_down rows of 80 and 40
    result = api.export_gguf(model_dir, tmp_path / "m.gguf", tensor_type)
    fields, tensors = _read(result.path)
    wanted = {"f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0"}[tensor_type]
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[wanted]][0]
    assert fields["general.file_type"] == {"f16": 1, "bf16": 32, "q8_0": 7, "q4_0": 2}[tensor_type]
    for name, t in tensors.items():
        row_length = int(t.shape[0])  # GGML order: the first dimension is along a row
        if len(t.shape) == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, name  # norms stay F32
            continue
        edge = name == "output.weight" and tensor_type == "q4_0"  # 4-bit keeps the output layer at 8 bits
        if row_length % block:
            assert t.tensor_type == gguf.GGMLQuantizationType.F16 and name in result.fallbacks, name
        else:
            assert t.tensor_type.name == ("Q8_0" if edge else wanted), name
    quantized = tensor_type in ("q8_0", "q4_0")
    assert sorted(result.fallbacks) == (["blk.0.ffn_down.weight", "blk.1.ffn_down.weight"] if quantized else [])
    for name in ("blk.1.ffn_up.weight", "blk.1.ffn_down.weight", "output.weight", "blk.2.attn_output.weight"):
        source = _source(model_dir, {"blk.1.ffn_up.weight": "model.layers.1.mlp.up_proj.weight",
                                     "blk.1.ffn_down.weight": "model.layers.1.mlp.down_proj.weight",
                                     "output.weight": "lm_head.weight",
                                     "blk.2.attn_output.weight": "model.layers.2.self_attn.o_proj.weight"}[name])
        value, t = _value(tensors[name]), tensors[name]
        if t.tensor_type == gguf.GGMLQuantizationType.F16:
            assert torch.equal(value, source.half().float()), name
        elif t.tensor_type == gguf.GGMLQuantizationType.BF16:
            assert torch.equal(value, source.bfloat16().float()), name
        else:  # within one quantization step of each 32-value block
            blocks = source.reshape(-1, 32)
            step = blocks.abs().amax(1, keepdim=True) / (127 if t.tensor_type.name == "Q8_0" else 7)
            error = (value.reshape(-1, 32) - blocks).abs()
            assert bool((error <= step + 1e-6).all()), name
            assert error.mean() < step.mean() / 2, name
    tolerance = {"f16": 2e-2, "bf16": 0.15, "q8_0": 0.15, "q4_0": None}[tensor_type]
    if tolerance:
        torch.testing.assert_close(_llamacpp_logits(result.path, IDS), _hf_logits(model), atol=tolerance,
                                   rtol=tolerance)


@pytest.mark.parametrize("family,layout", [("llama", PER_LAYER), ("mistral", PER_LAYER), ("qwen2", PER_LAYER_FFN)])
def test_per_layer_widths_export_as_deci_with_arrays(family, layout, tmp_path, tokenizer):
    model_dir, model = _saved(tmp_path, tokenizer, family, layout)
    assert json.loads((model_dir / "config.json").read_text())["layer_widths"]  # llm-bip's per-block format
    result = api.export_gguf(model_dir, tmp_path / "m.gguf", "f32")
    assert result.architecture == "deci" and result.per_layer
    fields, tensors = _read(result.path)
    heads = [len(groups) * 2 for groups, _ in layout]
    kv_heads = [len(groups) for groups, _ in layout]
    channels = [c for _, c in layout]
    assert fields["deci.feed_forward_length"] == channels
    for key, values in (("deci.attention.head_count", heads), ("deci.attention.head_count_kv", kv_heads)):
        assert fields[key] == (values if len(set(values)) > 1 else values[0])  # an array only where they differ
    assert fields["deci.attention.key_length"] == HEAD_DIM and fields["deci.rope.dimension_count"] == HEAD_DIM
    for i in range(len(layout)):
        q, k = tensors[f"blk.{i}.attn_q.weight"], tensors[f"blk.{i}.attn_k.weight"]
        assert tuple(int(n) for n in q.shape) == (64, heads[i] * HEAD_DIM)
        assert tuple(int(n) for n in tensors[f"blk.{i}.ffn_down.weight"].shape) == (channels[i], 64)
        # q/k rows reordered per layer with that layer's own head count (deci uses llama's rotary pairs)
        for t, n, source in ((q, heads[i], "q_proj"), (k, kv_heads[i], "k_proj")):
            expected = _source(model_dir, f"model.layers.{i}.self_attn.{source}.weight")
            assert torch.equal(_unrotate(_value(t), n), expected)
            if family == "qwen2":
                bias = _source(model_dir, f"model.layers.{i}.self_attn.{source}.bias")
                assert torch.equal(_unrotate(_value(tensors[f"blk.{i}.attn_{source[0]}.bias"]), n), bias)
    torch.testing.assert_close(_llamacpp_logits(result.path, IDS), _hf_logits(model), atol=2e-4, rtol=1e-4)


def test_output_biases_of_compensation_are_written_and_zero_biases_dropped(tmp_path, tokenizer):
    model_dir, model = _saved(tmp_path, tokenizer, "llama", FEWER_HEADS, biases=True)
    result = api.export_gguf(model_dir, tmp_path / "m.gguf", "f32")
    _, tensors = _read(result.path)
    biases = sorted(n.split(".", 2)[2] for n in tensors if n.startswith("blk.0.") and n.endswith(".bias"))
    assert biases == ["attn_output.bias", "ffn_down.bias"]  # the zero q/k/v/gate/up biases are not written
    torch.testing.assert_close(_llamacpp_logits(result.path, IDS), _hf_logits(model), atol=2e-4, rtol=1e-4)


def test_llama3_rope_scaling_becomes_rope_freqs(tmp_path, tokenizer):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256, "rope_theta": 500000.0}
    model_dir, model = _saved(tmp_path, tokenizer, "llama", FFN_ONLY, rope_parameters=rope)
    result = api.export_gguf(model_dir, tmp_path / "m.gguf", "f32")
    fields, tensors = _read(result.path)
    assert fields["llama.rope.freq_base"] == pytest.approx(500000.0)
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](model.config, "cpu")
    base = 500000.0 ** (-torch.arange(0, HEAD_DIM, 2, dtype=torch.float64) / HEAD_DIM)
    torch.testing.assert_close(_value(tensors["rope_freqs.weight"]).double(), base / inv_freq.double(), rtol=1e-5,
                               atol=0)
    torch.testing.assert_close(_llamacpp_logits(result.path, IDS), _hf_logits(model), atol=2e-4, rtol=1e-4)


def test_sentencepiece_style_tokenizer_json_becomes_a_llama_vocab(tmp_path, tokenizer):
    """LLaMA 2 / Mistral tokenizers (byte-fallback BPE in tokenizer.json) are llama.cpp's "llama" vocab:
    byte tokens typed BYTE, specials CONTROL, scores ranking pieces by id as SentencePiece's scores do."""
    model_dir, _ = _saved(tmp_path, tokenizer, "llama", FFN_ONLY)
    specials = ["<unk>", "<s>", "</s>"]
    pieces = [f"<0x{b:02X}>" for b in range(256)] + ["\u2581", "t", "h", "e", "\u2581t", "he", "\u2581the"]
    vocab = {tok: i for i, tok in enumerate(specials + pieces)}
    data = {"version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                              "normalized": False, "special": True} for i, t in enumerate(specials)],
            "normalizer": None, "pre_tokenizer": None, "post_processor": None,
            "decoder": {"type": "Sequence", "decoders": [{"type": "ByteFallback"}, {"type": "Fuse"}]},
            "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                      "vocab": vocab, "merges": [["\u2581", "t"], ["h", "e"], ["\u2581t", "he"]]}}
    (model_dir / "tokenizer.json").write_text(json.dumps(data))
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                                 "unk_token": "<unk>", "add_bos_token": True}))
    fields, _ = _read(api.export_gguf(model_dir, tmp_path / "m.gguf").path)
    assert fields["tokenizer.ggml.model"] == "llama" and "tokenizer.ggml.pre" not in fields
    tokens, types, scores = (fields[f"tokenizer.ggml.{k}"] for k in ("tokens", "token_type", "scores"))
    assert len(tokens) == len(types) == len(scores) == len(tokenizer)  # padded to the embedding's rows
    assert tokens[:len(vocab)] == specials + pieces and tokens[-1] == f"[PAD{len(tokenizer) - 1}]"
    assert types[1] == gguf.TokenType.CONTROL and types[3 + 0x41] == gguf.TokenType.BYTE
    assert types[-1] == gguf.TokenType.UNUSED and types[vocab["\u2581the"]] == gguf.TokenType.NORMAL
    assert scores[vocab["\u2581t"]] > scores[vocab["he"]] > scores[vocab["\u2581the"]]  # merge order
    assert fields["tokenizer.ggml.bos_token_id"] == 1 and fields["tokenizer.ggml.add_bos_token"] is True
    (model_dir / "tokenizer.json").unlink()
    (model_dir / "tokenizer.model").write_bytes(b"a SentencePiece model")
    try:
        import sentencepiece  # noqa: F401
    except ImportError:
        with pytest.raises(LlmBipError, match="only a SentencePiece tokenizer.model and the sentencepiece package"):
            api.export_gguf(model_dir, tmp_path / "spm.gguf")


def test_a_sharded_checkpoint_exports_the_same_file(tmp_path, tokenizer):
    """Streamed prunes save shards with an index: the export reads them tensor by tensor all the same."""
    from safetensors.torch import load_file, save_file

    model_dir, _ = _saved(tmp_path, tokenizer, "qwen2", PER_LAYER_FFN)
    single = api.export_gguf(model_dir, tmp_path / "single.gguf", "q8_0").path.read_bytes()
    weights = load_file(model_dir / "model.safetensors")
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, part in shards.items():
        save_file({n: weights[n] for n in part}, model_dir / file)
    (model_dir / "model.safetensors").unlink()
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: file for file, part in shards.items() for n in part}}))
    assert api.export_gguf(model_dir, tmp_path / "sharded.gguf", "q8_0").path.read_bytes() == single


# -------------------------------------------------------------------------------------------- refusals


def test_qwen2_with_heads_removed_is_refused(tmp_path, tokenizer):
    model_dir, _ = _saved(tmp_path, tokenizer, "qwen2", FEWER_HEADS)
    with pytest.raises(LlmBipError, match="qwen2 architecture needs q_proj and o_proj of hidden_size.*--head-ratio 0"):
        api.export_gguf(model_dir, tmp_path / "m.gguf")
    model_dir, _ = _saved(tmp_path, tokenizer, "qwen2", PER_LAYER, name="per-layer")
    with pytest.raises(LlmBipError, match="deci.*keep all its query heads"):
        api.export_gguf(model_dir, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_qwen3_with_per_layer_widths_is_refused(tmp_path, tokenizer):
    model_dir, _ = _saved(tmp_path, tokenizer, "qwen3", PER_LAYER)
    with pytest.raises(LlmBipError, match="no architecture with Qwen3's q/k norms and per-layer widths.*uniform"):
        api.export_gguf(model_dir, tmp_path / "m.gguf")


def test_gemma3_that_llama_cpp_would_run_wrongly_is_refused(tmp_path, tokenizer):
    model_dir, _ = _saved(tmp_path, tokenizer, "gemma3_text", PER_LAYER_FFN)
    with pytest.raises(LlmBipError, match="gemma3 loader sizes every block from layer 0.*--allocation uniform"):
        api.export_gguf(model_dir, tmp_path / "m.gguf")
    model_dir, _ = _saved(tmp_path, tokenizer, "gemma3_text", FFN_ONLY, name="full-attention",
                          layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    with pytest.raises(LlmBipError, match="every 6th layer as full attention"):
        api.export_gguf(model_dir, tmp_path / "m.gguf")
    model_dir, _ = _saved(tmp_path, tokenizer, "gemma3_text", FFN_ONLY, name="scalar", query_pre_attn_scalar=24)
    with pytest.raises(LlmBipError, match="query_pre_attn_scalar 24 is not head_dim"):
        api.export_gguf(model_dir, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_a_bias_llama_cpp_does_not_read_is_refused(tmp_path, tokenizer):
    model_dir, _ = _saved(tmp_path, tokenizer, "qwen3", FFN_ONLY, attention_bias=True)  # random q/k/v/o biases
    with pytest.raises(LlmBipError, match="is a non-zero bias that llama.cpp's qwen3 architecture does not read"):
        api.export_gguf(model_dir, tmp_path / "m.gguf")


def test_unsupported_family_and_bad_inputs_are_clear_errors(tmp_path, tokenizer):
    model_dir, _ = _saved(tmp_path, tokenizer, "llama", FFN_ONLY)
    config = json.loads((model_dir / "config.json").read_text())
    config["model_type"] = "gpt_neox"
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(LlmBipError, match="cannot export 'gpt_neox' to GGUF: the export supports llama"):
        api.export_gguf(model_dir, tmp_path / "m.gguf")
    with pytest.raises(LlmBipError, match="not a saved model directory"):
        api.export_gguf(tmp_path / "nothing", tmp_path / "m.gguf")
    with pytest.raises(LlmBipError, match="unknown GGUF tensor type 'q2_k'"):
        api.export_gguf(model_dir, tmp_path / "m.gguf", "q2_k")
    untokenized, _ = _saved(tmp_path, tokenizer, "llama", FFN_ONLY, name="no-tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (untokenized / name).unlink()
    with pytest.raises(LlmBipError, match="no tokenizer llama.cpp can use"):
        api.export_gguf(untokenized, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


# -------------------------------------------------------------------------------------- output rules


def _digest(directory) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def test_output_rules(tmp_path, tokenizer, monkeypatch):
    model_dir, _ = _saved(tmp_path, tokenizer, "llama", FFN_ONLY)
    (model_dir / "my-notes.txt").write_text("the user's own file")
    before = _digest(model_dir)
    out = tmp_path / "m.gguf"
    api.export_gguf(model_dir, out, "f16")
    with pytest.raises(LlmBipError, match="already exists: choose another name or pass --overwrite"):
        api.export_gguf(model_dir, out, "f16")
    api.export_gguf(model_dir, out, "q8_0", overwrite=True)  # our own file may be replaced
    assert _read(out)[0]["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    foreign = tmp_path / "theirs.gguf"
    foreign.write_bytes(b"not ours")
    with pytest.raises(LlmBipError, match="was not written by llm-bip"):
        api.export_gguf(model_dir, foreign, overwrite=True)
    assert foreign.read_bytes() == b"not ours"
    for inside in ("model.safetensors", "exported.gguf"):  # an input, or anything inside the input directory
        with pytest.raises(LlmBipError, match="llm-bip never overwrites its inputs"):
            api.export_gguf(model_dir, model_dir / inside, overwrite=True)
    assert _digest(model_dir) == before

    def broken(tensor, qtype):
        raise RuntimeError("killed half-way")

    monkeypatch.setattr("llm_bip.export_gguf._convert", broken)
    with pytest.raises(RuntimeError):
        api.export_gguf(model_dir, tmp_path / "half.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "model", "theirs.gguf"]  # no debris
    assert _digest(model_dir) == before


def test_cli_export_and_prune_export_gguf(tmp_path, tokenizer, capsys):
    model_dir, _ = _saved(tmp_path, tokenizer, "llama", PER_LAYER)
    out = tmp_path / "cli.gguf"
    assert main(["export", "--model", str(model_dir), "--gguf", str(out), "--type", "q8_0"]) == 0
    printed = capsys.readouterr().out
    assert "GGUF (deci, per-layer widths" in printed and str(out) in printed and "kept in F16" in printed
    assert main(["export", "--model", str(model_dir), "--gguf", str(out)]) == 2  # exists, no --overwrite
    assert "already exists" in capsys.readouterr().err
    assert main(["export", "--model", str(model_dir), "--gguf", str(out), "--overwrite"]) == 0
    # prune --export-gguf: checked before the work (inside the output / --gguf-type alone), written after saving.
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(["The quick brown fox jumps over the lazy dog near the river bank."] * 200))
    dense, _ = _saved(tmp_path, tokenizer, "llama", [([0, 1], 96)] * 2, name="dense")
    common = ["prune", "--model", str(dense), "--ratio", "0.2", "--calibration", str(text), "--num-samples", "2",
              "--seq-len", "16", "--eval", "none", "--quiet"]
    assert main([*common, "--output", str(tmp_path / "p"), "--export-gguf", str(tmp_path / "p" / "m.gguf")]) == 2
    assert "inside the output" in capsys.readouterr().err
    assert main([*common, "--output", str(tmp_path / "p"), "--gguf-type", "q8_0"]) == 2
    assert not (tmp_path / "p").exists()
    assert main([*common, "--output", str(tmp_path / "p"), "--export-gguf", str(tmp_path / "p.gguf"),
                 "--gguf-type", "f32"]) == 0
    assert "GGUF (llama, uniform widths" in capsys.readouterr().out
    fields, _ = _read(tmp_path / "p.gguf")
    assert fields["llama.feed_forward_length"] == json.loads((tmp_path / "p" / "config.json").read_text())[
        "intermediate_size"]
