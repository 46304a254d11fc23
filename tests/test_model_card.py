"""Every saved model directory carries a Hugging Face model card (README.md) made from its record: valid
front matter, the right load instructions, the record's numbers, the saved config's widths, and a plot."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from conftest import save_tiny_llama, tiny_model, tiny_samples
from llm_bip import api
from llm_bip.cli import main
from llm_bip.config import PruneConfig
from llm_bip.model_card import CARD_FILE, PLOT_FILE, write_model_card
from llm_bip.saving import PER_BLOCK_FORMAT, read_record, update_record

pytestmark = pytest.mark.usefixtures("one_thread")
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory, tokenizer):
    return save_tiny_llama(tmp_path_factory.mktemp("models") / "dense", tokenizer)


def _prune(dense_dir, texts, out, *extra, evaluate=True) -> int:
    ev = ["--eval", str(texts / "eval.txt"), "--eval-seq-len", "32", "--eval-max-windows", "3"] if evaluate else \
        ["--eval", "none"]
    return main(["prune", "--model", str(dense_dir), "--calibration", str(texts / "calib.txt"), "--num-samples", "4",
                 "--seq-len", "32", *ev, "--output", str(out), "--quiet", *extra])


# ---------------------------------------------------------------------------------------- reading a card


def front_matter(card: str) -> dict:
    assert card.startswith("---\n"), "the card must open with YAML front matter"
    head = card[4:card.index("\n---\n", 4)]
    try:
        import yaml
    except ImportError:  # a minimal reader for the flat keys and one list the card writes
        data: dict = {}
        key = None
        for line in head.splitlines():
            if line.startswith("- ") and key:
                data.setdefault(key, []).append(line[2:].strip())
            else:
                key, _, value = line.partition(":")
                value = value.strip()
                if value:
                    data[key] = json.loads(value) if value.startswith('"') else value
        return data
    data = yaml.safe_load(head)
    assert isinstance(data, dict)
    return data


def section(card: str, title: str) -> str:
    start = card.index(f"\n## {title}\n")
    end = card.find("\n## ", start + 1)
    return card[start:end if end >= 0 else len(card)]


def table_rows(text: str) -> list[list[str]]:
    """Body rows of the first markdown table in `text` (header and separator dropped)."""
    rows = [line for line in text.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[2:]]


def number(cell: str) -> int:
    return int(cell.replace(",", ""))


def check_card(out: Path, source: str) -> tuple[str, dict]:
    """The checks every card passes; returns the card and the record."""
    card = (out / CARD_FILE).read_text(encoding="utf-8")
    record = read_record(out)
    config = json.loads((out / "config.json").read_text())
    meta = front_matter(card)
    assert meta["base_model"] == source
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert meta["tags"] == ["llm-bip", "pruned", "structured-pruning"]
    assert "license" not in meta  # neither the source config nor the record names one
    assert "2412.06419" in card
    # Load instructions: trust_remote_code exactly for the per-block format (the one with remote code).
    custom = record["saved_format"] == PER_BLOCK_FORMAT
    assert custom == (out / "modeling_llm_bip.py").is_file() == ("auto_map" in config)
    assert ("trust_remote_code=True" in section(card, "How to load")) == custom
    assert "AutoModelForCausalLM.from_pretrained(" in card
    assert "GGUF" not in card  # no .gguf export in the directory: nothing promised
    # Parameter counts are the record's.
    rows = {r[0]: r[1:] for r in table_rows(section(card, "Parameters"))}
    for state in ("before", "after"):
        counts = record[f"parameters_{state}"]
        assert [number(c) for c in rows[state]] == [counts["total"], counts["non_embedding"]]
    # The widths table is the saved config's.
    widths = table_rows(section(card, "Per-layer widths"))
    expected = config.get("layer_widths") or [config] * config["num_hidden_layers"]
    assert len(widths) == config["num_hidden_layers"]
    for i, (row, w) in enumerate(zip(widths, expected, strict=True)):
        assert int(row[0]) == i
        assert [int(c) for c in row[-3:]] == [w["num_attention_heads"], w["num_key_value_heads"],
                                               w["intermediate_size"]]
    # The card and its plot are in the manifest (what --overwrite may replace).
    assert CARD_FILE in record["files"]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in card and PLOT_FILE not in record["files"]
    else:
        assert (out / PLOT_FILE).read_bytes().startswith(PNG) and PLOT_FILE in record["files"]
        assert f"]({PLOT_FILE})" in card
    return card, record


# ----------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("kind, options", [
    ("uniform", ["--ratio", "0.3"]),
    ("non-uniform", ["--ratio", "0.3", "--allocation", "block-adaptive", "--layers", "0,1"]),  # block 2 stays whole
])
def test_cli_prune_writes_a_card(kind, options, dense_dir, texts, tmp_path):
    out = tmp_path / "pruned"
    assert _prune(dense_dir, texts, out, *options) == 0
    card, record = check_card(out, str(dense_dir))
    assert (record["saved_format"] == PER_BLOCK_FORMAT) == (kind == "non-uniform")
    assert record["command"] in card
    # Perplexities are measured after saving: the card was rewritten with them, and is still ours.
    rows = table_rows(section(card, "Perplexity"))
    assert len(rows) == 1
    dense, pruned = record["perplexity"]["dense"]["eval@32"], record["perplexity"]["pruned"]["eval@32"]
    assert rows[0][1:] == ["32", str(dense["windows"]), f"{dense['perplexity']:.2f}", f"{pruned['perplexity']:.2f}"]
    assert record["checksums"][CARD_FILE].startswith("sha256:")
    # What the card says loads it.
    flag = {"trust_remote_code": True} if "trust_remote_code=True" in card else {}
    model = AutoModelForCausalLM.from_pretrained(out, **flag)
    assert sum(p.numel() for p in model.parameters()) == record["parameters_after"]["total"]


def test_streamed_prune_writes_the_same_card(dense_dir, texts, tmp_path):
    cards = {}
    for name, extra in (("memory", []), ("streamed", ["--streaming"])):
        out = tmp_path / name
        assert _prune(dense_dir, texts, out, "--ratio", "0.4", "--head-ratio", "0.5", *extra) == 0
        card, record = check_card(out, str(dense_dir))
        assert record.get("streamed", False) == (name == "streamed")
        # The command lines differ (output, --streaming), and so do the perplexities measured: float32 weights
        # are evaluated in bf16 autocast in memory but as stored when streamed. Same texts and windows.
        ppl = section(card, "Perplexity")
        rows = table_rows(ppl)
        assert len(rows) == 1 and rows[0][1] == "32" and float(rows[0][3]) > 0 and float(rows[0][4]) > 0
        cards[name] = (card.replace(record["command"], "COMMAND").replace(ppl, ""), [r[:3] for r in rows])
    assert cards["memory"] == cards["streamed"]


def test_api_save_depth_pruning_and_a_license(tmp_path):
    lm = tiny_model("llama")  # 3 blocks, no tokenizer
    result = api.prune(lm, PruneConfig(ratio=0.5, remove_blocks=1), tiny_samples(), progress=False,
                       calibration={"source": "tiny", "num_samples": 6, "seq_len": 12, "seed": 0})
    out = api.save(lm, tmp_path / "m", dict(result.report, license="apache-2.0"))
    card = (out / CARD_FILE).read_text(encoding="utf-8")
    record = read_record(out)
    meta = front_matter(card)
    assert meta["base_model"] == "tiny-llama" and meta["license"] == "apache-2.0"
    assert "No tokenizer was saved" in card and "AutoTokenizer.from_pretrained" not in card
    assert "`tiny` × 6 samples × 12 tokens" in card
    removed = record["removed_blocks"]
    assert len(removed) == 1 and f"removed blocks: 1 (source layers {removed[0]})" in card
    kept = [i for i in range(3) if i not in removed]
    rows = table_rows(section(card, "Per-layer widths"))
    if kept != [0, 1]:  # a column of source layers once the saved indices differ from them
        assert [int(r[1]) for r in rows] == kept
    assert len(rows) == 2
    assert "No perplexity was measured" in card
    # A GGUF export is mentioned once there is one (llm-bip's exporter records it), never before.
    assert "GGUF" not in card
    (out / "model-Q8_0.gguf").write_bytes(b"GGUF")
    update_record(out, {"files": [*record["files"], "model-Q8_0.gguf"]})
    assert "`model-Q8_0.gguf`" in (out / CARD_FILE).read_text(encoding="utf-8")


def test_overwrite_replaces_our_card_but_never_an_edited_one(dense_dir, texts, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert _prune(dense_dir, texts, out, evaluate=False) == 0
    assert _prune(dense_dir, texts, out, "--ratio", "0.5", "--overwrite", evaluate=False) == 0
    card, record = check_card(out, str(dense_dir))
    assert record["config"]["ratio"] == 0.5 and "ratio: 0.5" in card
    # Someone edits the card (say, before pushing it to the hub): llm-bip no longer rewrites or replaces it.
    edited = card + "\nMy own notes.\n"
    (out / CARD_FILE).write_text(edited, encoding="utf-8")
    update_record(out, {"note": "added later"})
    assert (out / CARD_FILE).read_text(encoding="utf-8") == edited
    capsys.readouterr()
    assert _prune(dense_dir, texts, out, "--overwrite", evaluate=False) == 2
    assert "README.md" in capsys.readouterr().err
    assert (out / CARD_FILE).read_text(encoding="utf-8") == edited


def test_a_readme_llm_bip_did_not_write_is_left_alone(tmp_path):
    (tmp_path / CARD_FILE).write_text("the user's own README\n")
    record = {"layer_widths": [{"num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 8}]}
    assert write_model_card(tmp_path, record) == []
    assert (tmp_path / CARD_FILE).read_text() == "the user's own README\n"
    assert not (tmp_path / PLOT_FILE).exists() and "checksums" not in record


def test_without_matplotlib_the_card_says_there_is_no_plot(tmp_path, monkeypatch):
    for name in ("matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # importing them now raises ImportError
    lm = tiny_model("qwen2")
    result = api.prune(lm, PruneConfig(ratio=0.3), tiny_samples(), progress=False)
    out = api.save(lm, tmp_path / "m", result.report)
    card = (out / CARD_FILE).read_text(encoding="utf-8")
    assert not (out / PLOT_FILE).exists() and PLOT_FILE not in read_record(out)["files"]
    assert "matplotlib is not installed" in card and "![" not in card


def test_recover_into_a_new_directory_writes_its_own_card(dense_dir, texts, tmp_path):
    pruned, recovered = tmp_path / "pruned", tmp_path / "recovered"
    assert _prune(dense_dir, texts, pruned, "--ratio", "0.3", evaluate=False) == 0
    assert main(["recover", "--model", str(pruned), "--data", str(texts / "calib.txt"), "--output", str(recovered),
                 "--max-steps", "2", "--batch-size", "4", "--micro-batch-size", "2", "--cutoff-len", "32",
                 "--val-set-size", "4", "--warmup-steps", "1", "--eval", str(texts / "eval.txt"),
                 "--eval-seq-len", "32", "--eval-max-windows", "2", "--quiet"]) == 0
    card, record = check_card(recovered, str(dense_dir))  # base_model: still the dense model
    assert (pruned / CARD_FILE).is_file()  # the input's card is untouched
    recovery = section(card, "Recovery fine-tuning")
    assert "LoRA" in recovery and "steps: 2" in recovery
    after = record["recovery_perplexity"]["after"]["eval@32"]["perplexity"]
    assert re.search(rf"\| {after:.2f} \|", recovery)
    assert record["command"] in card and record["recovery_command"] in card
