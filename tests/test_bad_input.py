"""Every bad input gets a one-line LlmBipError that says what to do, and nothing is written."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from conftest import tiny_model, tiny_samples
from llm_bip.adapters import adapter_for
from llm_bip.cli import main
from llm_bip.data import calibration_samples, load_text
from llm_bip.errors import LlmBipError
from llm_bip.loading import load_model
from llm_bip.pipeline import PruneConfig, prune, score
from llm_bip.plan import BlockPlan, PruningPlan
from llm_bip.score_table import ScoreTable
from llm_bip.scoring import make_scorer
from llm_bip.surgery import apply_plan


def test_unsupported_architecture_lists_supported():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(LlmBipError, match="unsupported architecture 'gpt2'.*llama.*mistral.*qwen2.*qwen3"):
        adapter_for(model)


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_ratio_outside_range(ratio):
    with pytest.raises(LlmBipError, match=r"outside \[0, 1\)"):
        PruneConfig(ratio=ratio).validate()


def test_ratio_the_model_cannot_meet():
    lm = tiny_model("llama")
    with pytest.raises(LlmBipError, match="cannot remove .* lower the ratio"):
        prune(lm, PruneConfig(ratio=0.99), tiny_samples(), progress=False)


def test_plan_that_gqa_cannot_hold():
    lm = tiny_model("llama")  # 6 query heads in 2 KV groups of 3
    blocks = [BlockPlan(i, list(range(6)), [0, 1], list(range(96))) for i in range(3)]
    blocks[1] = BlockPlan(1, [0, 1, 3], [0, 1], list(range(96)))  # 2 heads in group 0, 1 in group 1
    with pytest.raises(LlmBipError, match="GQA"):
        apply_plan(copy.deepcopy(lm.model), lm.adapter, PruningPlan(blocks))
    blocks[1] = BlockPlan(1, [0, 1, 2, 3], [0], list(range(96)))  # head 3 outlives its KV group
    with pytest.raises(LlmBipError, match="GQA"):
        apply_plan(copy.deepcopy(lm.model), lm.adapter, PruningPlan(blocks))


def test_missing_empty_and_corrupt_model_paths(tmp_path):
    with pytest.raises(LlmBipError, match="does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LlmBipError, match="empty"):
        load_model(tmp_path / "empty")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF this is not a gguf file")
    with pytest.raises(LlmBipError, match="cannot read GGUF"):
        load_model(bad)
    (tmp_path / "zero.gguf").write_bytes(b"")
    with pytest.raises(LlmBipError, match="empty"):
        load_model(tmp_path / "zero.gguf")


def test_corrupt_checkpoint(tmp_path):
    lm = tiny_model("llama")
    lm.model.save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(LlmBipError, match="corrupt"):
        load_model(tmp_path / "m")


def test_empty_and_short_calibration_text(tmp_path, tokenizer):
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(LlmBipError, match="empty"):
        calibration_samples(tokenizer, load_text(tmp_path / "empty.txt"), 4, 128)
    with pytest.raises(LlmBipError, match="fewer than one sample"):
        calibration_samples(tokenizer, "just a few words", 4, 128)
    (tmp_path / "bad.jsonl").write_text('{"content": "x"}\n')
    with pytest.raises(LlmBipError, match="'text'"):
        load_text(tmp_path / "bad.jsonl")
    with pytest.raises(LlmBipError, match="neither a file nor a known name"):
        load_text("no-such-corpus")


def test_nan_activations():
    lm = tiny_model("llama")
    with torch.no_grad():
        lm.adapter.parts(lm.adapter.blocks(lm.model)[1]).gate_proj.weight[0, 0] = float("nan")
    with pytest.raises(LlmBipError, match="NaN/Inf"):
        prune(lm, PruneConfig(ratio=0.2), tiny_samples(), progress=False)


def test_scores_file_from_another_model(tmp_path):
    table = score(tiny_model("llama", seed=0), make_scorer("llm-bip"), tiny_samples(), progress=False)
    table.save(tmp_path / "s.safetensors")
    other = tiny_model("llama", seed=1)
    with pytest.raises(LlmBipError, match="another model"):
        prune(other, PruneConfig(ratio=0.2), tiny_samples(), scores=ScoreTable.load(tmp_path / "s.safetensors"),
              progress=False)
    (tmp_path / "junk.safetensors").write_text("junk")
    with pytest.raises(LlmBipError, match="not an llm-bip scores file"):
        ScoreTable.load(tmp_path / "junk.safetensors")


def test_cli_bad_input_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["prune", "--model", str(tmp_path / "missing"), "--output", str(out), "--eval", "none"]) == 2
    assert main(["prune", "--ratio", "1.2", "--output", str(out), "--eval", "none"]) == 2
    assert main(["prune", "--method", "nope", "--output", str(out), "--eval", "none"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "outside [0, 1)" in err and "unknown method" in err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []
