"""Figures of a comparison: perplexity against pruning ratio per method, and what each method costs.

Matplotlib with the Agg backend, so plots are written on machines without a display.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib.ticker import FuncFormatter  # noqa: E402


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "plot"


def perplexity_plot(rows: list[dict], key: str, dense: float | None, path: Path, title: str) -> Path:
    """One line per method: perplexity at `key` ("source@seq_len") against the ratio, log y scale."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for method in methods:
        points = sorted(
            (r["ratio"], r["perplexity"].get(key)) for r in rows
            if r["method"] == method and _finite(r["perplexity"].get(key))
        )
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method)
    if _finite(dense):
        ax.axhline(dense, color="grey", linestyle="--", linewidth=1, label=f"dense ({dense:.1f})")
    ax.set_yscale("log")
    # Plain numbers on the log axis (the default writes 1.3 × 10^2 when a plot spans less than a decade).
    plain = FuncFormatter(lambda v, _pos: f"{v:,.4g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.set_xlabel("pruning ratio (fraction of parameters removed)")
    ax.set_ylabel(f"perplexity ({key})")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def cost_plot(costs: list[dict], path: Path) -> Path:
    """Scoring time and peak memory above the loaded model, one bar per method."""
    names = [c["method"] for c in costs]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.6, 4.0))
    left.bar(names, [c["score_seconds"] for c in costs], color="tab:blue")
    left.set_ylabel("scoring time (s)")
    right.bar(names, [c["peak_memory_mib"] for c in costs], color="tab:orange")
    right.set_ylabel("peak memory above the loaded model (MiB)")
    for ax in (left, right):
        ax.tick_params(axis="x", rotation=30, labelsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle("cost of each method")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _finite(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)
