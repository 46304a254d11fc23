"""The comparison's outputs: compare.json, compare.csv, compare.md, perplexity plots and a cost plot."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from llm_bip.compare.recipes import CompareConfig


@dataclass
class CompareResult:
    rows: list[dict]
    costs: list[dict]
    dense: dict
    files: dict[str, str] = field(default_factory=dict)


def _fmt(x, digits: int = 2) -> str:
    if isinstance(x, float):
        return "–" if math.isnan(x) else f"{x:,.{digits}f}"
    return str(x)


def write_outputs(result: CompareResult, out: Path, config: CompareConfig, header: dict) -> dict[str, str]:
    """compare.json, compare.csv, compare.md, one perplexity plot per (text, length) and a cost plot."""
    from llm_bip.plots import cost_plot, perplexity_plot, safe_name

    keys = list(result.dense["perplexity"])
    all_rows = [result.dense, *result.rows]
    files: dict[str, str] = {}

    columns = ["method", "ratio", "removed_non_embedding", "removed_total", "parameters", *[f"ppl {k}" for k in keys],
               "prune_seconds", "error"]
    with open(out / "compare.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for r in all_rows:
            writer.writerow([r["method"], r["ratio"], r.get("removed_non_embedding", ""), r.get("removed_total", ""),
                             r.get("parameters", ""), *[r["perplexity"].get(k, "") for k in keys],
                             r.get("prune_seconds", ""), r.get("error", "")])
    files["csv"] = str(out / "compare.csv")

    lines = [
        f"# Comparison on {header['model']}", "",
        f"Calibration: {json.dumps(header['calibration'])}. Ratio = fraction of {config.ratio_of} parameters; "
        f"perplexity in {config.dtype}, windows per length: "
        f"{', '.join(f'{n}: {config.windows(n) or chr(0x2014)}' for n in config.eval_seq_lens)}.", "",
        "| method | ratio | removed (non-emb.) | removed (total) | parameters | "
        + " | ".join(f"ppl {k}" for k in keys) + " | prune s |",
        "|---|---|---|---|---|" + "---|" * len(keys) + "---|",
    ]
    for r in all_rows:
        ppl = [_fmt(r["perplexity"].get(k, math.nan)) for k in keys]
        removed = [f"{r[k]:.1%}" if k in r else "–" for k in ("removed_non_embedding", "removed_total")]
        note = f" ({r['error']})" if r.get("error") else ""
        lines.append(f"| {r['method']}{note} | {r['ratio']:g} | {removed[0]} | {removed[1]} | "
                     f"{r.get('parameters', 0):,} | " + " | ".join(ppl) + f" | {_fmt(r.get('prune_seconds', math.nan))} |")
    lines += ["", "## Cost of each method", "",
              "| method | scoring s | peak memory above loaded model (MiB) | peak RSS (MiB) | scored | measured by |",
              "|---|---|---|---|---|---|"]
    for c in result.costs:
        lines.append(f"| {c['method']} | {_fmt(c['score_seconds'])} | {_fmt(c['peak_memory_mib'], 0)} | "
                     f"{_fmt(c['peak_rss_mib'], 0)} | {c['scored']} | {c['memory_measure']} |")
    (out / "compare.md").write_text("\n".join(lines) + "\n")
    files["markdown"] = str(out / "compare.md")

    for key in keys:
        path = out / f"ppl_{safe_name(key)}.png"
        perplexity_plot(result.rows, key, result.dense["perplexity"].get(key), path, f"{header['model']}: {key}")
        files[f"plot {key}"] = str(path)
    files["plot cost"] = str(cost_plot(result.costs, out / "cost.png"))
    # Last, with the list of what was written: a later --overwrite replaces only these files.
    files["json"] = str(out / "compare.json")
    data = {**header, "config": asdict(config), "dense": result.dense, "rows": result.rows, "costs": result.costs,
            "files": sorted(Path(p).name for p in files.values())}
    (out / "compare.json").write_text(json.dumps(data, indent=1, default=str))
    return files
