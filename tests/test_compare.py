"""`llm-bip compare` on a tiny model: a complete table in three formats, the plots, and bad input
refused before any long work."""

from __future__ import annotations

import argparse
import csv
import json

import pytest
import torch

from conftest import VOCAB, tiny_model, tiny_samples
from llm_bip.compare import (
    RECIPES,
    CompareConfig,
    add_compare_parser,
    check_runnable,
    cmd_compare,
    compare,
    main_compare,
    parse_method,
)
from llm_bip.errors import LlmBipError

pytestmark = pytest.mark.usefixtures("one_thread")


def test_compare_writes_complete_table_and_plots(tmp_path):
    lm = tiny_model("llama")
    dense_logits = lm.model(tiny_samples()).logits.detach()
    eval_ids = {"text-a": torch.randint(0, VOCAB, (300,), generator=torch.Generator().manual_seed(1)),
                "text-b": torch.randint(0, VOCAB, (300,), generator=torch.Generator().manual_seed(2))}
    config = CompareConfig(methods=tuple(RECIPES), ratios=(0.1, 0.3), eval_seq_lens=(8, 16), eval_max_windows=4,
                           batch_size=3)
    result = compare(lm, tiny_samples(), config, eval_ids, tmp_path, {"source": "random"}, progress=False)

    keys = [f"{t}@{n}" for t in eval_ids for n in (8, 16)]
    assert len(result.rows) == len(RECIPES) * 2
    assert {(r["method"], r["ratio"]) for r in result.rows} == {(m, q) for m in RECIPES for q in (0.1, 0.3)}
    for row in [result.dense, *result.rows]:
        assert not row.get("error"), row
        assert sorted(row["perplexity"]) == sorted(keys)
        assert all(v > 1 for v in row["perplexity"].values())
    for row in result.rows:  # the ratio is met: within a channel per block of the target
        assert row["removed_non_embedding"] == pytest.approx(row["ratio"], abs=0.03)

    with open(tmp_path / "compare.csv") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == 1 + len(result.rows)
    for row in table:
        assert all(row[f"ppl {k}"] for k in keys)
        assert row["removed_non_embedding"] != "" and row["parameters"] != ""
    data = json.loads((tmp_path / "compare.json").read_text())
    assert len(data["rows"]) == len(result.rows) and len(data["costs"]) == len(RECIPES)
    markdown = (tmp_path / "compare.md").read_text()
    assert all(f"| {m} |" in markdown for m in RECIPES) and "## Cost of each method" in markdown
    for cost in result.costs:
        assert cost["score_seconds"] >= 0 and cost["peak_rss_mib"] > 0 and cost["memory_measure"]

    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == sorted(["cost.png", *[f"ppl_{k.replace('@', '_')}.png" for k in keys]])
    assert all((tmp_path / p).stat().st_size > 1000 for p in pngs)
    # The dense model is left as it was: every run cut a copy.
    assert torch.equal(lm.model(tiny_samples()).logits, dense_logits)


def test_recipes_share_scores_and_follow_their_sources():
    config = CompareConfig(methods=("llm-bip", "llm-bip+bias", "flap", "wanda-sp", "taylor"), ratios=(0.2,))
    recipes = {r.name: r for r in config.recipes()}
    assert recipes["wanda-sp"].sequential and recipes["flap"].allocation == "flap"
    assert recipes["flap"].config(0.2, 30, "non-embedding", "kv-groups", 0).compensation == "bias"
    taylor = recipes["taylor"].config(0.2, 30, "non-embedding", "kv-groups", 0)
    assert taylor.prunable_layers == tuple(range(4, 28))  # LLM-Pruner's 4..28 on a 30-layer model
    assert recipes["llm-bip+bias"].config(0.2, 30, "total", "kv-groups", 0).compensation == "bias"


def test_method_overrides():
    recipe = parse_method("llm-bip:allocation=global-adaptive,compensation=refit,lipschitz=none,layers=1-3")
    config = recipe.config(0.2, 4, "non-embedding", "kv-groups", 0)
    assert (config.allocation, config.compensation, config.lipschitz) == ("global-adaptive", "refit", "none")
    assert config.prunable_layers == (1, 2)
    assert recipe.name == "llm-bip:allocation=global-adaptive,compensation=refit,lipschitz=none,layers=1-3"
    with pytest.raises(LlmBipError, match="key=value"):
        parse_method("flap:colour=blue")
    with pytest.raises(LlmBipError, match="unknown allocation"):
        parse_method("flap:allocation=best")
    with pytest.raises(LlmBipError, match="head-ratio needs a float"):
        parse_method("random:head-ratio=lots")


@pytest.mark.parametrize(("argv", "message"), [
    (["--methods", "llm-bip", "sparsegpt"], "unknown method 'sparsegpt': choose from llm-bip"),
    (["--ratios", "0.2", "1.0"], "ratio 1.0 is outside [0, 1)"),
    (["--ratios", "-0.1"], "outside [0, 1)"),
    (["--eval", "/no/such/file.txt"], "neither a file"),
])
def test_bad_input_fails_before_loading_the_model(tmp_path, capsys, monkeypatch, argv, message):
    def no_loading(*_a, **_k):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr("llm_bip.api.load", no_loading)
    assert main_compare([*argv, "--output", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err


def test_existing_output_needs_overwrite(tmp_path, capsys):
    (tmp_path / "compare.json").write_text("{}")
    assert main_compare(["--output", str(tmp_path)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_unrunnable_method_refused_up_front(monkeypatch):
    lm = tiny_model("llama")
    config = CompareConfig(methods=("random", "taylor"), ratios=(0.2,))
    check_runnable(lm, config.recipes(), config, (6, 12))  # fits
    monkeypatch.setattr("llm_bip.scoring.taylor.available_memory_bytes", lambda: 10_000)
    with pytest.raises(LlmBipError, match="taylor's gradient pass needs"):
        check_runnable(lm, config.recipes(), config, (6, 12))
    too_much = CompareConfig(methods=("taylor",), ratios=(0.95,))
    monkeypatch.undo()
    with pytest.raises(LlmBipError, match="method 'taylor' at ratio 0.95"):
        check_runnable(lm, too_much.recipes(), too_much, (6, 12))


def test_subcommand_registers_on_the_main_parser():
    parser = argparse.ArgumentParser(prog="llm-bip")
    add_compare_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["compare", "--methods", "flap", "taylor", "--ratios", "0.2", "--output", "x"])
    assert args.func is cmd_compare and args.methods == ["flap", "taylor"] and args.ratios == [0.2]
    assert args.eval_seq_len == [128, 2048]
