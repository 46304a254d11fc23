"""Does a speed plan keep its promise when the whole model is timed carefully? The planner's shapes for a target,
timed as whole models against dense with the timing table's own method, over many paired rounds.

    python benchmarks/bench_plan_check.py --model tinyllama --target-speedup 1.2 --rounds 15 \
        --out benchmarks/results/plan_check_tinyllama_12.json

bench_speed.py times each plan once per round (one prefill pass, one generate call) and takes the median of
the rounds' ratios to dense: on this project's shared CPU host that moves by 5-10% between runs. Here, per
target pass (prefill and decode at batch 1, 128 tokens): the tables are timed and the plans made as `prune
--target-speedup` makes them (bench_speed.targeted: the plan's own widths timed; prune's margin unless
`--speed-margin` is given), then dense, a second dense copy and each route's plan are built (random weights,
the family's stock class, in the dtype prune's `auto` computes in on the device unless `--dtype` is given) and
timed with `timing.time_pass` (the fastest of one pass per round, decode the fastest of 8 steps) in `--rounds`
rounds, the order rotated; the figure is the median over rounds of dense's time over the plan's in the same round.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from llm_bip.devices import resolve_device
from llm_bip.dtypes import dtype_name
from llm_bip.speed.timing import time_pass

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_speed import build, pass_arguments, shapes_for, targeted, timed_dtype  # noqa: E402

PROMPT = 128


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    pass_arguments(parser)
    parser.add_argument("--target-speedup", type=float, default=1.2)
    parser.add_argument("--speed-margin", type=float, help="the planner's margin (default: prune's)")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    device = resolve_device(args.device)
    dtype = timed_dtype(args.dtype, device)
    started = time.perf_counter()
    result = {"command": "python benchmarks/bench_plan_check.py " + " ".join(sys.argv[1:]), "model": args.model,
              "device": str(device), "dtype": dtype_name(dtype), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "modes": {}}
    for mode in args.modes:
        plans = targeted(args.model, args.target_speedup, [mode], device, dtype, args.speed_margin)
        dense, again = shapes_for(args.model, [])
        everything = [dense, *plans, {**again, "plan": "dense, a second copy"}]
        models = [build(args.model, plan, device, dtype) for plan in everything]
        times: list[list[float]] = [[] for _ in everything]
        for r in range(args.rounds):
            order = list(range(len(everything)))
            order = order[r % len(order):] + order[:r % len(order)]
            for i in order:
                times[i].append(time_pass(models[i], mode, 1, PROMPT, 1, device, warm_up=r == 0))
        del models
        rows = []
        for plan, mine in zip(everything, times, strict=True):
            ratios = [d / t for d, t in zip(times[0], mine, strict=True)]
            rows.append({**plan, "ms": mine, "measured_speedup": statistics.median(ratios),
                         "measured_quartiles": statistics.quantiles(ratios, n=4)})
            print(f"{mode:8s} {plan['plan']:28s} predicted {plan.get('planned_speedup', 1.0):.3f}  measured "
                  f"{rows[-1]['measured_speedup']:.3f} (quartiles {rows[-1]['measured_quartiles'][0]:.3f}-"
                  f"{rows[-1]['measured_quartiles'][2]:.3f})", flush=True)
        result["modes"][mode] = rows
    result["seconds"] = time.perf_counter() - started
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
