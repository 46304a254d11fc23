"""Markdown table of a bench_quality.py result file: perplexity per variant and ratio on every text.

    python benchmarks/quality_table.py benchmarks/results/quality_smollm2_levers.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def table(result: dict) -> str:
    keys = list(result["dense"])
    head = "| variant | ratio | removed | prune s | " + " | ".join(keys) + " |"
    lines = [head, "|" + "---|" * (4 + len(keys)),
             "| dense | – | – | – | " + " | ".join(f"{result['dense'][k]:.2f}" for k in keys) + " |"]
    runs = sorted(result["runs"].values(), key=lambda r: (r["ratio"], r["variant"] != "default", r["variant"]))
    for run in runs:
        ppl = run["perplexity"]
        lines.append(f"| {run['variant']} | {run['ratio']:.0%} | {run['removed_non_embedding']:.2%} | "
                     f"{run['prune_seconds']:.0f} | " + " | ".join(f"{ppl[k]:.2f}" if k in ppl else "–" for k in keys)
                     + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(json.loads(Path(sys.argv[1]).read_text())))
