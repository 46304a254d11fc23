"""Does `--speed-route auto` choose the same route when its trial prunes use fewer calibration samples?

    python benchmarks/bench_route_samples.py --model smollm2-135m --target-speedup 1.3 --speed-mode decode \
        --route-samples 256 64 --out benchmarks/results/route_samples_smollm2_13.json

The auto route prunes a copy of the model by each of width, mixed and depth and keeps the one with the lowest
perplexity on held-out calibration text; those three trial prunes are most of its time. For each value of
`--route-samples` this runs `api.plan_for_speed` as `llm-bip prune --target-speedup` does (the default
calibration, 256 x 256 tokens of the Wikipedia source; the device's cached timing table), and writes every
candidate's held-out perplexity, the chosen route, and the seconds the choice took. The final prune of the
chosen route (from all the samples) is the same whichever value chose it, so it is not run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from llm_bip import api
from llm_bip.config import PruneConfig
from llm_bip.speed.planner import SpeedTarget


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--target-speedup", type=float, default=1.3)
    parser.add_argument("--speed-mode", default="decode")
    parser.add_argument("--route-samples", type=int, nargs="+", default=[256, 64])
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    loaded = api.load(args.model)
    samples, calibration = api.calibrate(loaded)
    target = SpeedTarget(args.target_speedup, mode=args.speed_mode).validate()
    result = {"command": "python benchmarks/bench_route_samples.py " + " ".join(sys.argv[1:]),
              "model": args.model, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "calibration": calibration, "target": dataclasses.asdict(target), "runs": []}
    for n in args.route_samples:
        started = time.perf_counter()
        config, record = api.plan_for_speed(loaded, PruneConfig(), dataclasses.replace(target, route_samples=n),
                                            samples=samples, calibration=calibration, dtype=args.dtype)
        choice = record["route_choice"]
        result["runs"].append({"route_samples": n, "chosen": record["route"], "ratio": config.ratio,
                               "remove_blocks": config.remove_blocks, "seconds": round(time.perf_counter() - started, 1),
                               "trial_prunes_use": choice["trial_prunes_use"], "candidates": choice["candidates"]})
        print(json.dumps(result["runs"][-1], indent=1), flush=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")  # after each run: a long run keeps what it has


if __name__ == "__main__":
    main()
