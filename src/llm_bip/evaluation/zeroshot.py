"""Zero-shot accuracy through lm-evaluation-harness, used as a library, on a model in memory.

Tasks are the seven of the LLM-Pruner comparison, by their lm-eval names: boolq, piqa, hellaswag, winogrande,
arc_easy, arc_challenge, openbookqa. Without `task_data_dir` lm-eval's own task definitions load their
datasets from the Hugging Face hub. With it, the task YAMLs shipped in `llm_bip/evaluation/tasks/` (the same
prompts, choices, targets, metrics and versions as lm-eval's, under `llm_bip_<task>` names) read local JSON
lines files instead: `<task_data_dir>/<task>/<split>.jsonl` with the hub dataset's fields, `split` being the
one lm-eval scores (test for the ARC tasks and OpenBookQA, validation for the others). The report always
uses the standard task names.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import math
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn
from transformers import PreTrainedTokenizerBase

from llm_bip.errors import LlmBipError

log = logging.getLogger(__name__)

TASK_FILES_DIR = Path(__file__).parent / "tasks"
LOCAL_PREFIX = "llm_bip_"
DATA_FILES_PLACEHOLDER = "__LLM_BIP_DATA_FILES__"
ALIASES = {"arc-e": "arc_easy", "arc_e": "arc_easy", "arc-c": "arc_challenge", "arc_c": "arc_challenge"}
ALIASES |= {"obqa": "openbookqa", "openbook_qa": "openbookqa"}


def _check_binary_label(doc: dict[str, Any]) -> str | None:
    return None if doc["label"] in (0, 1) else f"label must be 0 or 1, got {doc['label']!r}"


def _check_hellaswag(doc: dict[str, Any]) -> str | None:
    endings = doc["endings"]
    if not isinstance(endings, list) or len(endings) < 2 or not all(isinstance(e, str) for e in endings):
        return "endings must be a list of at least two strings"
    if str(doc["label"]) not in {str(i) for i in range(len(endings))}:
        return f"label must index endings (0..{len(endings) - 1}), got {doc['label']!r}"
    return None


def _check_winogrande(doc: dict[str, Any]) -> str | None:
    if "_" not in str(doc["sentence"]):
        return "sentence must contain the blank '_'"
    if str(doc["answer"]) not in ("1", "2"):
        return f"answer must be '1' or '2', got {doc['answer']!r}"
    return None


def _check_choices(key: Callable[[dict[str, Any]], str]) -> Callable[[dict[str, Any]], str | None]:
    def check(doc: dict[str, Any]) -> str | None:
        choices = doc["choices"]
        if not isinstance(choices, dict) or not {"text", "label"} <= set(choices):
            return 'choices must be an object {"text": [...], "label": [...]}'
        if len(choices["text"]) != len(choices["label"]) or len(choices["text"]) < 2:
            return "choices.text and choices.label must be lists of the same length (at least 2)"
        if key(doc) not in choices["label"]:
            return f"answerKey {doc['answerKey']!r} is not one of choices.label {choices['label']}"
        return None

    return check


@dataclass(frozen=True)
class TaskSpec:
    """Where a task's local copy lives and what each record needs."""

    split: str
    fields: tuple[str, ...]
    check: Callable[[dict[str, Any]], str | None]

    def relative_path(self, task: str) -> str:
        return f"{task}/{self.split}.jsonl"


TASKS: dict[str, TaskSpec] = {
    "boolq": TaskSpec("validation", ("question", "passage", "label"), _check_binary_label),
    "piqa": TaskSpec("validation", ("goal", "sol1", "sol2", "label"), _check_binary_label),
    "hellaswag": TaskSpec(
        "validation", ("activity_label", "ctx_a", "ctx_b", "endings", "label"), _check_hellaswag
    ),
    "winogrande": TaskSpec("validation", ("sentence", "option1", "option2", "answer"), _check_winogrande),
    "arc_easy": TaskSpec(
        "test", ("question", "choices", "answerKey"), _check_choices(lambda d: d["answerKey"])
    ),
    "arc_challenge": TaskSpec(
        "test", ("question", "choices", "answerKey"), _check_choices(lambda d: d["answerKey"])
    ),
    "openbookqa": TaskSpec(
        "test",
        ("question_stem", "choices", "answerKey"),
        _check_choices(lambda d: str(d["answerKey"]).lstrip()),
    ),
}
DEFAULT_TASKS: tuple[str, ...] = tuple(TASKS)


def resolve_task_names(tasks: str | Iterable[str]) -> list[str]:
    """Standard lm-eval names for `tasks` (a list, or one comma-separated string), in the given order."""
    if isinstance(tasks, str):
        tasks = tasks.split(",")
    names: list[str] = []
    for raw in tasks:
        name = raw.strip().lower()
        if not name:
            continue
        name = ALIASES.get(name, name.removeprefix(LOCAL_PREFIX))
        if name not in TASKS:
            raise LlmBipError(f"unknown zero-shot task '{raw.strip()}'; known tasks: {', '.join(TASKS)}")
        if name not in names:
            names.append(name)
    if not names:
        raise LlmBipError(f"no zero-shot task given; known tasks: {', '.join(TASKS)}")
    return names


def task_data_file(task_data_dir: str | Path, task: str) -> Path:
    """The local data file of `task` (`.jsonl`, or a `.json` list); a clear error when it is missing."""
    spec = TASKS[task]
    base = Path(task_data_dir).expanduser()
    if not base.is_dir():
        raise LlmBipError(f"task data directory not found: {base}")
    expected = base / spec.relative_path(task)
    for candidate in (expected, expected.with_suffix(".json")):
        if candidate.is_file():
            return candidate
    raise LlmBipError(
        f"no local data for task {task}: expected {expected} (JSON lines with fields {', '.join(spec.fields)})"
    )


def check_task_file(task: str, path: Path) -> int:
    """Validate every record of a local task file; returns the number of records."""
    spec = TASKS[task]
    records = _read_records(path)
    if not records:
        raise LlmBipError(f"{path}: no records for task {task}")
    for number, doc in records:
        if not isinstance(doc, dict):
            raise LlmBipError(f"{path}: record {number} is not a JSON object")
        missing = [f for f in spec.fields if f not in doc]
        if missing:
            raise LlmBipError(
                f"{path}: record {number} lacks field(s) {', '.join(missing)}; task {task} needs "
                f"{', '.join(spec.fields)} (found {', '.join(sorted(doc)) or 'none'})"
            )
        problem = spec.check(doc)
        if problem:
            raise LlmBipError(f"{path}: record {number}: {problem}")
    return len(records)


def _read_records(path: Path) -> list[tuple[int, Any]]:
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise LlmBipError(f"{path} is not UTF-8 text") from None
    if path.suffix == ".json":
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as e:
            raise LlmBipError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(value, list):
            raise LlmBipError(f"{path}: expected a JSON list of records")
        return list(enumerate(value, 1))
    records = []
    for lineno, line in enumerate(raw.splitlines(), 1):
        if line.strip():
            try:
                records.append((lineno, json.loads(line)))
            except json.JSONDecodeError as e:
                raise LlmBipError(f"{path}: line {lineno} is not valid JSON ({e.msg})") from None
    return records


def write_local_tasks(dest: Path, files: dict[str, Path]) -> None:
    """Write the shipped task YAMLs for `files` into `dest`, each pointing at its local data file."""
    for helper in TASK_FILES_DIR.glob("*.py"):
        shutil.copy(helper, dest / helper.name)
    for task, path in files.items():
        yaml_text = (TASK_FILES_DIR / f"{LOCAL_PREFIX}{task}.yaml").read_text(encoding="utf-8")
        # A JSON object is valid YAML flow syntax, and JSON string escaping keeps any path intact.
        data_files = json.dumps({TASKS[task].split: str(path.resolve())})
        (dest / f"{LOCAL_PREFIX}{task}.yaml").write_text(
            yaml_text.replace(DATA_FILES_PLACEHOLDER, data_files), encoding="utf-8"
        )


def harness_version() -> str:
    return importlib.metadata.version("lm_eval")


def evaluate_zero_shot(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    tasks: str | Iterable[str] = DEFAULT_TASKS,
    task_data_dir: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Zero-shot acc / acc_norm of `model` on `tasks` through lm-eval.

    Returns {"harness": "lm-evaluation-harness", "harness_version", "num_fewshot": 0, "limit", "batch_size",
    "task_data_dir", "tasks": {name: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "version", "n",
    "n_total", "data"}}}; acc_norm is None for tasks lm-eval scores by acc only (boolq, winogrande).
    `limit` caps the examples per task (for quick checks; not comparable with full runs).
    """
    names = resolve_task_names(tasks)
    if limit is not None and limit < 1:
        raise LlmBipError(f"limit must be at least 1, got {limit}")
    files: dict[str, Path] = {}
    if task_data_dir is not None:
        files = {task: task_data_file(task_data_dir, task) for task in names}
        for task, path in files.items():
            check_task_file(task, path)

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model.eval()
    with tempfile.TemporaryDirectory(prefix="llm_bip_tasks_") as tmp:
        if files:
            write_local_tasks(Path(tmp), files)
            # Only the local variants are indexed: skips scanning lm-eval's thousands of task files.
            manager = TaskManager(include_path=tmp, include_defaults=False)
            keys = {task: LOCAL_PREFIX + task for task in names}
        else:
            manager = TaskManager()
            keys = {task: task for task in names}
        try:
            loaded = manager.load(list(keys.values()))
        except Exception as e:
            where = (
                "its local file" if files else "the Hugging Face hub (offline? pass a task data directory)"
            )
            raise LlmBipError(
                f"lm-eval could not load the task data from {where}: {type(e).__name__}: {e}"
            ) from e
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=[loaded["tasks"][key] for key in keys.values()],
            task_manager=manager,
            limit=limit,
            log_samples=False,
        )
    if out is None:
        raise LlmBipError("lm-eval returned no results (not the main process?)")

    report: dict[str, Any] = {
        "harness": "lm-evaluation-harness",
        "harness_version": harness_version(),
        "num_fewshot": 0,
        "limit": limit,
        "batch_size": batch_size,
        "task_data_dir": str(Path(task_data_dir).resolve()) if task_data_dir is not None else None,
        "tasks": {},
    }
    for task, key in keys.items():
        metrics = out["results"][key]
        counts = out["n-samples"][key]
        report["tasks"][task] = {
            "acc": _number(metrics.get("acc,none")),
            "acc_stderr": _number(metrics.get("acc_stderr,none")),
            "acc_norm": _number(metrics.get("acc_norm,none")),
            "acc_norm_stderr": _number(metrics.get("acc_norm_stderr,none")),
            "version": out["versions"][key],
            "n": counts["effective"],
            "n_total": counts["original"],
            "data": str(files[task].resolve()) if files else "hub",
        }
    return report


def _number(value: Any) -> float | None:
    # lm-eval writes "N/A" for a standard error it cannot compute (one example).
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return None
