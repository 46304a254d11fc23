"""Render benchmarks/results/ablation.json as the Markdown table of docs/results.md §3.

    python benchmarks/ablation_table.py benchmarks/results/ablation.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def heads_summary(run: dict) -> str:
    heads = run.get("heads_kept") or []
    channels = run.get("channels_kept") or []
    if not heads:
        return ""
    return f"heads {min(heads)}–{max(heads)}, channels {min(channels)}–{max(channels)}"


def main(path: str) -> None:
    runs = json.loads(Path(path).read_text())["runs"]
    ratios = sorted({r["ratio"] for r in runs if r["variant"] != "dense"})
    variants: dict[str, dict[float, dict]] = {}
    for run in runs:
        variants.setdefault(run["variant"], {})[run["ratio"]] = run
    print("| variant | options | " + " | ".join(f"{r:.0%}" for r in ratios) + " | widths kept (20%) |")
    print("|---|---|" + "---|" * len(ratios) + "---|")
    for name, by_ratio in variants.items():
        if name == "dense":
            continue
        options = next(iter(by_ratio.values()))["options"]
        cells = [f"{by_ratio[r]['perplexity']['128']:,.1f}" if r in by_ratio else "–" for r in ratios]
        shown = ", ".join(f"{k}={v}" for k, v in options.items()) or "(default)"
        print(f"| {name} | {shown} | " + " | ".join(cells) + f" | {heads_summary(by_ratio.get(0.2, {}))} |")
    dense = variants.get("dense", {}).get(0.0)
    if dense:
        print(f"\nDense: {dense['perplexity']['128']:.2f}.")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/ablation.json")
