"""Perplexity against measured speed-up for width, depth and mixed plans of SmolLM2 (the speed issue's plot).

    python benchmarks/plot_speed_quality.py --speed benchmarks/results/speed_smollm2_quiet.json \\
        --quality benchmarks/results/quality_smollm2_levers.json \\
        benchmarks/results/quality_smollm2.json --out docs/speed_quality_smollm2.png

Perplexity comes from real prunes (bench_quality.py: variants default = width, depth, mixed), speed-ups
from bench_speed.py on the same shapes (speed does not depend on the weights' values).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROUTES = {"width": "default", "depth": "depth", "mixed": "mixed"}  # speed plan route -> quality variant
PANELS = (("decode_b1", "decode, batch 1"), ("prefill_b1", "prefill, batch 1"), ("prefill_b8", "prefill, batch 8"))


def speedup(plan: dict, measure: str) -> float:
    """The paired speed-up (median of per-round ratios to dense) where the run has it, else the plain one."""
    return plan.get(f"{measure}_paired_speedup", plan[f"{measure}_speedup"])


def points(speed: dict, quality: dict, text: str) -> dict[str, list[tuple[float, dict, float]]]:
    """Per route: (ratio, speed plan, perplexity) for every ratio both files have."""
    out: dict[str, list] = {}
    for plan in speed["plans"]:
        route = plan.get("route")
        run = quality["runs"].get(f"{ROUTES[route]}@{plan['ratio']:g}") if route in ROUTES else None
        if run and text in run["perplexity"]:
            out.setdefault(route, []).append((plan["ratio"], plan, run["perplexity"][text]))
    return {route: sorted(rows, key=lambda r: r[0]) for route, rows in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--speed", required=True)
    parser.add_argument("--quality", required=True, nargs="+", help="bench_quality.py results (the first that has a run wins)")
    parser.add_argument("--text", default="wikitext@2048")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    speed = json.loads(Path(args.speed).read_text())
    files = [json.loads(Path(f).read_text()) for f in args.quality]
    quality = {"dense": files[0]["dense"], "runs": {}}
    for data in reversed(files):
        quality["runs"].update(data["runs"])
    dense_ppl = quality["dense"][args.text]
    rows = points(speed, quality, args.text)
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.8), sharey=True)
    for ax, (key, title) in zip(axes, PANELS, strict=True):
        ax.scatter([1.0], [dense_ppl], color="black", zorder=3, label="dense")
        for route, series in rows.items():
            xs, ys = [speedup(p, key) for _, p, _ in series], [ppl for *_, ppl in series]
            ax.plot(xs, ys, marker="o", label=route)
            for (ratio, _, _), x, y in zip(series, xs, ys, strict=True):
                ax.annotate(f"{ratio:.0%}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_title(title)
        ax.set_xlabel("measured speed-up over dense")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel(f"perplexity ({args.text})")
    axes[0].legend()
    fig.suptitle(f"SmolLM2-135M: quality against speed ({speed['device']}, {speed['dtype']})", fontsize=10)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
