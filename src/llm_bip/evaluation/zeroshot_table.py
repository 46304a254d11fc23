"""A Markdown table of perplexity and zero-shot accuracy per model (dense / pruned / pruned + recovery)."""

from __future__ import annotations

from typing import Any

from llm_bip.evaluation.zeroshot import DEFAULT_TASKS

TASK_TITLES = {
    "boolq": "BoolQ",
    "piqa": "PIQA",
    "hellaswag": "HellaSwag",
    "winogrande": "WinoGrande",
    "arc_easy": "ARC-e",
    "arc_challenge": "ARC-c",
    "openbookqa": "OBQA",
}
# "auto" shows acc_norm where the harness reports it (it removes the bias towards short answers), else acc;
# the note under the table names the metric of every column, so tables stay comparable.
METRIC_CHOICES = ("auto", "acc", "acc_norm")


def task_metric(task_result: dict[str, Any], metric: str = "auto") -> tuple[str, float | None]:
    """(metric name, value) of one task's result; "auto" takes acc_norm when present, else acc."""
    if metric == "acc":
        return "acc", task_result.get("acc")
    if metric == "acc_norm" or task_result.get("acc_norm") is not None:
        return "acc_norm", task_result.get("acc_norm")
    return "acc", task_result.get("acc")


def zero_shot_markdown(rows: dict[str, dict[str, Any]], metric: str = "auto") -> str:
    """Render rows such as {"dense": {"perplexity": {"wikitext2": 12.3}, "zero_shot": <report>}, ...}.

    `zero_shot` is the dict `evaluate_zero_shot` returns (or just its "tasks" part). Perplexity columns come
    first (in order of first appearance), then the tasks any row has, in the usual order, then the average
    accuracy over the tasks (left blank for a row that lacks some of them). Accuracies are percentages;
    a note under the table says which metric each task column shows.
    """
    if metric not in METRIC_CHOICES:
        raise ValueError(f"metric must be one of {METRIC_CHOICES}, got {metric!r}")
    ppl_cols: list[str] = []
    task_results: dict[str, dict[str, Any]] = {}
    for name, row in rows.items():
        for col in row.get("perplexity") or {}:
            if col not in ppl_cols:
                ppl_cols.append(col)
        zero_shot = row.get("zero_shot") or {}
        task_results[name] = zero_shot.get("tasks", zero_shot)
    present = {task for results in task_results.values() for task in results}
    task_cols = [t for t in DEFAULT_TASKS if t in present] + sorted(present - set(DEFAULT_TASKS))

    header = ["Model"] + [f"PPL {c}" for c in ppl_cols] + [TASK_TITLES.get(t, t) for t in task_cols]
    if task_cols:
        header.append("Average")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    used_metric: dict[str, str] = {}
    for name, row in rows.items():
        ppl = row.get("perplexity") or {}
        cells = [name] + [_fmt(ppl.get(c), 2) for c in ppl_cols]
        values = []
        for task in task_cols:
            result = task_results[name].get(task)
            value = None
            if result is not None:
                used, value = task_metric(result, metric)
                used_metric.setdefault(task, used)
            cells.append(_fmt(None if value is None else 100 * value, 2))
            values.append(value)
        if task_cols:
            complete = all(v is not None for v in values)
            cells.append(_fmt(100 * sum(values) / len(values) if complete else None, 2))
        lines.append("| " + " | ".join(cells) + " |")
    if used_metric:
        notes = ", ".join(f"{TASK_TITLES.get(t, t)} {used_metric[t]}" for t in task_cols if t in used_metric)
        lines += ["", f"Zero-shot accuracy in %, metric per task: {notes}."]
    return "\n".join(lines) + "\n"


def _fmt(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"
