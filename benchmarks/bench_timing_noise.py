"""How much does the speed planner's timing table move from one timing to the next? The table timed several
times in a row; per grid point, its block time over the full width's, and the fixed cost over the full width's
block, with their spread across the timings.

    python benchmarks/bench_timing_noise.py --model tinyllama --timings 3 \
        --out benchmarks/results/timing_noise_tinyllama.json

A plan is made from ratios of these points, so their spread from one timing to the next is the plan's own
noise. Run it from another checkout's source (PYTHONPATH=OTHER/src) to measure another timing method on the
same host: the table's API is the same.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from llm_bip.devices import resolve_device
from llm_bip.dtypes import dtype_name
from llm_bip.speed import timing

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_speed import PROMPT, base_config, meta_model, pass_arguments, timed_dtype  # noqa: E402


def relative_points(table: timing.TimingTable) -> dict[str, float]:
    """Each point's block time over the full width's, and the fixed cost in full-width blocks."""
    full = dict(table.points)[table.full_widths]
    ratios = {f"{w.num_heads} heads x {w.channels}": ms / full for w, ms in sorted(
        table.points, key=lambda p: (-p[0].num_heads, p[0].channels))}
    return {**ratios, "fixed / full block": table.fixed_ms / full}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    pass_arguments(parser)
    parser.add_argument("--timings", type=int, default=3)
    args = parser.parse_args()
    device = resolve_device(args.device)
    dtype = timed_dtype(args.dtype, device)
    config, (_, costs) = base_config(args.model), meta_model(args.model)
    commit = subprocess.run(["git", "-C", str(Path(timing.__file__).parent), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    result = {"command": "python benchmarks/bench_timing_noise.py " + " ".join(sys.argv[1:]), "model": args.model,
              "timing_source": timing.__file__, "timing_commit": commit, "timing_format": timing.TIMING_FORMAT,
              "device": str(device), "dtype": dtype_name(dtype), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "modes": {}}
    for mode in args.modes:
        runs = []
        for _ in range(args.timings):
            started = time.perf_counter()
            table = timing.measure(config, config.model_type, costs[0].widths, config.head_dim, dtype, device, mode, 1,
                                   PROMPT, progress=False)
            runs.append({"seconds": time.perf_counter() - started, "full_block_ms": dict(table.points)[
                table.full_widths], "relative": relative_points(table)})
        points = runs[0]["relative"]
        spread = {k: statistics.pstdev([r["relative"][k] for r in runs]) / statistics.mean(
            [r["relative"][k] for r in runs]) for k in points}
        moving = [k for k in points if spread[k] > 0]
        result["modes"][mode] = {"timings": runs, "relative_sd": spread,
                                 "largest_relative_sd": max(spread[k] for k in moving),
                                 "median_relative_sd": statistics.median(spread[k] for k in moving)}
        print(f"{mode}: {statistics.mean(r['seconds'] for r in runs):.0f} s a timing; spread of the points across "
              f"timings: median {result['modes'][mode]['median_relative_sd']:.1%}, largest "
              f"{result['modes'][mode]['largest_relative_sd']:.1%}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
