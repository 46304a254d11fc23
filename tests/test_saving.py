"""Save → load gives the same logits: stock configs for uniform results, per-block widths otherwise."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import FAMILIES, tiny_model, tiny_samples
from llm_bip.pipeline import PruneConfig, prune
from llm_bip.saving import save_pruned


def _prune_and_save(family, tmp_path, tokenizer=None, **config):
    lm = tiny_model(family)
    lm.tokenizer = tokenizer
    ids = tiny_samples()
    result = prune(lm, PruneConfig(**config), ids, progress=False)
    out = save_pruned(lm.model, lm.tokenizer, lm.adapter, tmp_path / "pruned", result.report)
    with torch.no_grad():
        expected = lm.model(ids).logits
    return out, ids, expected


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "llama-mha"])
def test_uniform_saves_with_stock_config(family, tmp_path):
    out, ids, expected = _prune_and_save(family, tmp_path, ratio=0.3, compensation="none")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == TINY_TYPE[family]
    assert "auto_map" not in config and not (out / "modeling_llm_bip.py").exists()
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, expected, atol=1e-5)


def test_uniform_that_stock_config_rejects_saves_per_block_widths(tmp_path):
    """4 heads of 8 in hidden 32 pruned to 3 heads: LlamaConfig refuses hidden % heads != 0."""
    out, ids, expected = _prune_and_save("llama-mha", tmp_path, ratio=0.3, compensation="none", head_ratio=None)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llm_bip_llama" and config["head_dim"] == 8
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, expected, atol=1e-5)


TINY_TYPE = {"llama": "llama", "llama-mha": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3",
             "phi3": "phi3", "gemma2": "gemma2", "gemma3_text": "gemma3_text"}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("compensation", ["bias", "refit"])
def test_non_uniform_and_compensated_round_trip(family, compensation, tmp_path):
    out, ids, expected = _prune_and_save(family, tmp_path, ratio=0.3, allocation="block-adaptive",
                                         compensation=compensation)
    model = AutoModelForCausalLM.from_pretrained(out).eval()  # llm_bip is imported: no flag needed
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, expected, atol=1e-5)
    record = json.loads((out / "pruning_record.json").read_text())
    assert record["config"]["allocation"] == "block-adaptive"
    assert len(record["layer_widths"]) == len(model.model.layers)
    assert record["parameters_after"]["total"] < record["parameters_before"]["total"]


_REMOTE = """
import sys, torch
from transformers import AutoModelForCausalLM
assert "llm_bip" not in sys.modules
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code={flag}).eval()
assert "llm_bip" not in sys.modules
ids = torch.load(sys.argv[2])
torch.save(model(ids).logits.detach(), sys.argv[3])
"""


def test_non_uniform_loads_from_the_directory_alone_with_trust_remote_code(tmp_path):
    out, ids, expected = _prune_and_save("llama", tmp_path, ratio=0.4, allocation="block-adaptive")
    assert (out / "modeling_llm_bip.py").exists()
    torch.save(ids, tmp_path / "ids.pt")
    subprocess.run([sys.executable, "-c", _REMOTE.format(flag=True), str(out), str(tmp_path / "ids.pt"),
                    str(tmp_path / "logits.pt")], check=True, cwd=tmp_path)
    assert torch.allclose(torch.load(tmp_path / "logits.pt"), expected, atol=1e-5)


def test_uniform_loads_without_llm_bip(tmp_path):
    out, ids, expected = _prune_and_save("qwen2", tmp_path, ratio=0.3, compensation="none")
    torch.save(ids, tmp_path / "ids.pt")
    subprocess.run([sys.executable, "-c", _REMOTE.format(flag=False), str(out), str(tmp_path / "ids.pt"),
                    str(tmp_path / "logits.pt")], check=True, cwd=tmp_path)
    assert torch.allclose(torch.load(tmp_path / "logits.pt"), expected, atol=1e-5)


def test_save_is_atomic(tmp_path, monkeypatch):
    lm = tiny_model("llama")
    prune(lm, PruneConfig(ratio=0.3), tiny_samples(), progress=False)

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(type(lm.model), "save_pretrained", boom)
    with pytest.raises(RuntimeError):
        save_pruned(lm.model, None, lm.adapter, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # neither the output nor a temporary directory is left


def test_tokenizer_goes_along(tmp_path, tokenizer):
    lm = tiny_model("llama")
    lm.tokenizer = tokenizer
    prune(lm, PruneConfig(ratio=0.3), tiny_samples(), progress=False)
    out = save_pruned(lm.model, tokenizer, lm.adapter, tmp_path / "out")
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out)("hello world").input_ids == tokenizer("hello world").input_ids


@pytest.mark.parametrize("family", ["qwen2", "mistral", "qwen3"])
def test_default_refit_of_a_uniform_prune_saves_in_the_stock_format(family, tmp_path):
    """Families whose stock config has no place for an output bias get a refit without an intercept,
    so a uniform prune with the default recipe still loads as the stock class."""
    lm = tiny_model(family)
    ids = torch.randint(0, 128, (24, 32), generator=torch.Generator().manual_seed(0))  # enough tokens to refit
    result = prune(lm, PruneConfig(ratio=0.3), ids, progress=False)
    assert any(v.startswith("refit") for b in result.report["compensation"]["blocks"] for v in b.values())
    out = save_pruned(lm.model, None, lm.adapter, tmp_path / "pruned", result.report)
    record = json.loads((out / "pruning_record.json").read_text())
    assert record["saved_format"] == "stock"
    assert json.loads((out / "config.json").read_text())["model_type"] == TINY_TYPE[family]
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, lm.model(ids).logits, atol=1e-5)
