"""How many sampled tokens and power iterations the JVP estimate of L needs, on SmolLM2-135M:
L (the RMS over tokens of the per-token spectral norm of the FFN branch's Jacobian) and its time
per block, for a few layers, against 512 tokens x 16 iterations.

    python benchmarks/lipschitz_sample.py --out benchmarks/results/lipschitz_sample.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from llm_bip import api
from llm_bip.activations import capture_block_inputs
from llm_bip.scoring.lipschitz import jvp_power_iteration
from llm_bip.stats import StatsRequest, collect_block_stats

SETTINGS = [(512, 16), (512, 8), (256, 8), (512, 4), (128, 8)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results/lipschitz_sample.json")
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 7, 12, 17, 22, 27])
    args = parser.parse_args()
    lm = api.load()
    samples, info = api.calibrate(lm, "wikipedia", 64, 256)
    rows: dict[str, dict] = {f"{n} tokens x {it}": {"L": [], "seconds": []} for n, it in SETTINGS}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        inputs = capture_block_inputs(lm.model, lm.adapter, samples, 8)
        for layer, block in enumerate(lm.adapter.blocks(lm.model)):
            if layer > max(args.layers):
                break
            parts = lm.adapter.parts(block)
            stats, inputs = collect_block_stats(block, parts, inputs, StatsRequest(residual_sample=512), layer)
            if layer not in args.layers:
                continue
            for tokens, iterations in SETTINGS:
                start = time.perf_counter()
                sigma = jvp_power_iteration(parts.post_attention_norm, parts.mlp, stats.residual_sample[:tokens],
                                            iterations, layer)
                row = rows[f"{tokens} tokens x {iterations}"]
                row["seconds"].append(round(time.perf_counter() - start, 4))
                row["L"].append(round(float(sigma.pow(2).mean().sqrt()), 4))
    reference = rows[f"{SETTINGS[0][0]} tokens x {SETTINGS[0][1]}"]["L"]
    for row in rows.values():
        row["max_relative_error"] = round(max(abs(a - b) / b for a, b in zip(row["L"], reference, strict=True)), 4)
        row["mean_seconds_per_block"] = round(sum(row["seconds"]) / len(row["seconds"]), 4)
        print(row, flush=True)
    Path(args.out).write_text(json.dumps({"command": "python benchmarks/lipschitz_sample.py", "layers": args.layers,
                                          "calibration": info, "settings": rows}, indent=1))


if __name__ == "__main__":
    main()
