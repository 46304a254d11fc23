"""The CLI end to end on a tiny model directory with a real tokenizer and real text."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from llm_bip.cli import main


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
                         num_key_value_heads=2, head_dim=8, vocab_size=len(tokenizer), tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(config)
    path = tmp_path_factory.mktemp("tiny") / "model"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_prune_saves_loadable_model_and_report(tiny_dir, texts, tmp_path, capsys):
    out = tmp_path / "pruned"
    code = main(["prune", "--model", str(tiny_dir), "--ratio", "0.3", "--allocation", "block-adaptive",
                 "--calibration", str(texts / "calib.txt"), "--num-samples", "4", "--seq-len", "32",
                 "--eval", str(texts / "eval.txt"), "--eval-max-windows", "4", "--output", str(out),
                 "--report", str(tmp_path / "report.json"), "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "dense" in printed and "pruned" in printed and "saved to" in printed
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["perplexity"]["pruned"]["eval@128"]["perplexity"] > 0
    assert 0.29 < report["removed_fraction"]["non_embedding"] < 0.31
    model = AutoModelForCausalLM.from_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) == report["parameters_after"]["total"]
    assert main(["info", "--model", str(out)]) == 0
    assert "pruned with llm-bip" in capsys.readouterr().out
    # An existing output is refused unless --overwrite.
    assert main(["prune", "--model", str(tiny_dir), "--output", str(out), "--eval", "none", "--quiet"]) == 2


def test_score_then_plan_then_prune_with_plan(tiny_dir, texts, tmp_path, capsys):
    scores, plan = tmp_path / "s.safetensors", tmp_path / "plan.json"
    common = ["--model", str(tiny_dir)]
    assert main(["score", *common, "--calibration", str(texts / "calib.txt"), "--num-samples", "4",
                 "--seq-len", "32", "--output", str(scores), "--quiet"]) == 0
    for ratio, again in (("0.2", []), ("0.5", ["--overwrite"])):  # replacing our own plan needs --overwrite
        assert main(["plan", *common, "--scores", str(scores), "--ratio", ratio, "--output", str(plan), *again]) == 0
    assert "removes" in capsys.readouterr().out
    out = tmp_path / "from-plan"
    assert main(["prune", *common, "--plan", str(plan), "--calibration", str(texts / "calib.txt"), "--seq-len", "32",
                 "--num-samples", "2", "--eval", "none", "--output", str(out), "--quiet"]) == 0
    record = json.loads((out / "pruning_record.json").read_text())
    assert 0.49 < record["removed_fraction"]["non_embedding"] < 0.51


def test_eval_command(tiny_dir, texts, tmp_path):
    assert main(["eval", "--model", str(tiny_dir), "--eval", str(texts / "eval.txt"), "--seq-len", "64",
                 "--max-windows", "2", "--report", str(tmp_path / "e.json"), "--quiet"]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["models"]["model"]["perplexity"]["eval@64"]["windows"] == 2


def test_eval_unknown_task_fails_before_loading(tmp_path, capsys):
    assert main(["eval", "--model", str(tmp_path / "not-loaded"), "--tasks", "no_such_task", "--quiet"]) == 2
    assert "no_such_task" in capsys.readouterr().err


def test_recover_then_saved_model_loads(tiny_dir, texts, tmp_path, capsys):
    out = tmp_path / "recovered"
    args = ["recover", "--model", str(tiny_dir), "--data", str(texts / "calib.txt"), "--output", str(out),
            "--max-steps", "2", "--batch-size", "4", "--micro-batch-size", "2", "--cutoff-len", "32",
            "--val-set-size", "4", "--warmup-steps", "1", "--eval", str(texts / "eval.txt"), "--eval-seq-len", "32",
            "--eval-max-windows", "2", "--lora-r", "4", "--lora-alpha", "8", "--lora-dropout", "0",
            "--max-time", "3600", "--schedule-to-time", "--quiet"]
    assert main(args) == 0
    assert "recovered with LoRA for 2 steps" in capsys.readouterr().out
    record = json.loads((out / "pruning_record.json").read_text())
    assert record["recovery"]["steps"] == 2 and record["recovery_perplexity"]["after"]
    # The LoRA flags reach the run, and the record says what was trained.
    config = record["recovery"]["config"]
    assert (config["lora_r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8, 0.0)
    # Two steps end the run before its pace is measured: the record says the schedule was not fitted.
    assert (config["max_time_s"], config["schedule_to_time"]) == (3600.0, True)
    assert record["recovery"]["time_fit"] == [] and record["recovery"]["stopped"] == "max_steps"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in name for name, _ in model.named_parameters())


def test_recover_recipe_sets_the_settings_and_flags_change_them(tiny_dir, texts, tmp_path):
    out = tmp_path / "recovered"
    args = ["recover", "--model", str(tiny_dir), "--data", str(texts / "calib.txt"), "--output", str(out),
            "--recipe", "time-budget", "--max-steps", "2", "--max-time", "3600", "--cutoff-len", "32",
            "--val-set-size", "4", "--lora-r", "4", "--quiet"]
    assert main(args) == 0
    record = json.loads((out / "pruning_record.json").read_text())
    config = record["recovery"]["config"]
    # The recipe's values where no flag was given ...
    assert (config["lora_alpha"], config["lora_dropout"], config["learning_rate"], config["num_epochs"]) == (64, 0.0,
                                                                                                          1e-3, 1)
    assert (config["batch_size"], config["micro_batch_size"], config["schedule_to_time"]) == (2, 1, True)
    # ... and the flags' where they were.
    assert (config["lora_r"], config["cutoff_len"], config["max_time_s"], config["val_set_size"]) == (4, 32, 3600.0, 4)
    assert record["recovery_recipe"] == "time-budget"


@pytest.mark.parametrize(("extra", "message"), [
    (["--recipe", "no-such"], "--recipe no-such: unknown; known: llm-pruner, time-budget"),
    (["--recipe", "time-budget", "--full-finetune"], "cannot apply with --full-finetune"),
    (["--recipe", "time-budget", "--lora-config", "c.json"], "--recipe and --lora-config both give"),
])
def test_recover_recipe_that_cannot_apply_is_refused_before_loading(extra, message, tmp_path, capsys):
    args = ["recover", "--model", str(tmp_path / "not-loaded"), "--data", "x.txt", "--output", str(tmp_path / "o"),
            "--quiet", *extra]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
