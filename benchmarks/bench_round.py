"""Does rounding the kept FFN width to a multiple pay on this device? (the speed issue: "widths rounded to
what kernels like, when the timing shows it pays")

    python benchmarks/bench_round.py --out benchmarks/results/round_cpu.json
    python benchmarks/bench_round.py --device cuda --out benchmarks/results/round_cuda.json

Width pruning leaves FFN widths such as 1126 (SmolLM2 at 20%); `--round-to N` rounds each kept width
to a multiple of N. Rounding pays only if kernels are faster at the multiple than at the widths around
it, i.e. if time against width has steps. So for each model shape and each width the default allocation
keeps (bench_speed.py's width plans: SmolLM2 at 20/30/50%, TinyLlama at 20/50%), this times the block's
FFN (the family's own MLP module, random bf16 weights) at every width from the multiple of 128 below to the one above, in steps of 8, as a prefill of 128 tokens at
batch 1 and 8 and as one decoding step at batch 1. Every width is timed once per round, in a new random
order each round, and each width's time is the median over rounds of its time divided by the round's
mean (so a slow phase of the host divides out), times the median round's mean.

The summary says, for each multiple N in 8..128 and each mode: the measured time at the width rounded
down to N and up to N, against the straight line through the sweep (time per channel, least squares).
A multiple whose widths sit clearly below the line (more than the sweep's own scatter) is a width
kernels like; if none does, rounding buys no speed here and costs channels (or, rounded up, buys none).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from llm_bip.speed.timing import synchronize

SHAPES = {  # hidden size, dense FFN width, the default's kept widths at 20/30/50% (bench_speed.py's plans)
    "smollm2": (576, 1536, {"0.2": 1126, "0.3": 921, "0.5": 512}),
    "tinyllama": (2048, 5632, {"0.2": 4198, "0.5": 2048}),
}
MODES = {"prefill_b1": (1, 128), "prefill_b8": (8, 128), "decode_b1": (1, 1)}
MULTIPLES = (8, 16, 32, 64, 128)


def sweep_widths(width: int) -> list[int]:
    low = max(8, (width // 128) * 128)
    return sorted(set(range(low, low + 129, 8)) | {width})


@torch.no_grad()
def time_once(mlp: torch.nn.Module, x: torch.Tensor, device: torch.device, repeats: int) -> float:
    """Median milliseconds of `repeats` calls (after one warm-up)."""
    mlp(x)
    samples = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        mlp(x)
        synchronize(device)
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


def line_fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x in xs)
    return slope, my - slope * mx


def summarize(times: dict[int, float], width: int) -> dict:
    """The straight line through time against width, each multiple's residual, and the sweep's scatter."""
    slope, intercept = line_fit(sorted(times.items()))
    residual = {w: t - (slope * w + intercept) for w, t in times.items()}
    scatter = statistics.pstdev(residual.values())
    multiples = {}
    for n in MULTIPLES:
        on = [residual[w] for w in times if w % n == 0]
        off = [residual[w] for w in times if w % n]
        down, up = (width // n) * n, -(-width // n) * n
        multiples[str(n)] = {
            "mean_residual_ms_on_multiples": statistics.fmean(on) if on else None,
            "mean_residual_ms_off_multiples": statistics.fmean(off) if off else None,
            "rounded_down": down, "rounded_up": up,
            "ms_rounded_down": times.get(down), "ms_rounded_up": times.get(up)}
    return {"ms_per_channel": slope, "ms_at_zero": intercept, "scatter_ms": scatter, "ms_at_width": times[width],
            "multiples": multiples}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=11, help="calls per width per round (their median)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    device = torch.device(args.device)
    result = {"command": "python benchmarks/bench_round.py " + " ".join(sys.argv[1:]), "device": str(device),
              "torch": torch.__version__, "threads": torch.get_num_threads(), "shapes": {}}
    rng = random.Random(0)
    for shape in args.shapes:
        hidden, dense, kept = SHAPES[shape]
        for ratio, width in kept.items():
            widths = sweep_widths(width)
            mlps = {}
            for w in widths:
                torch.manual_seed(0)
                config = LlamaConfig(hidden_size=hidden, intermediate_size=w, hidden_act="silu")
                mlps[w] = LlamaMLP(config).to(device=device, dtype=torch.bfloat16).eval()
            inputs = {mode: torch.randn(b, t, hidden, generator=torch.Generator().manual_seed(0)).to(
                device=device, dtype=torch.bfloat16) for mode, (b, t) in MODES.items()}
            out = {}
            for mode, x in inputs.items():
                per_round: dict[int, list[float]] = {w: [] for w in widths}
                means = []
                for _ in range(args.rounds):
                    order = widths[:]
                    rng.shuffle(order)
                    measured = {w: time_once(mlps[w], x, device, args.repeats) for w in order}
                    mean = statistics.fmean(measured.values())
                    means.append(mean)
                    for w, t in measured.items():
                        per_round[w].append(t / mean)
                overall = statistics.median(means)
                times = {w: statistics.median(v) * overall for w, v in per_round.items()}
                out[mode] = {"ms": {str(w): t for w, t in times.items()}, **summarize(times, width)}
                print(f"{shape} {ratio} width {width} {mode}: {times[width]:.3f} ms, "
                      f"scatter {out[mode]['scatter_ms']:.3f} ms", flush=True)
            result["shapes"].setdefault(shape, {"hidden": hidden, "dense_width": dense, "widths": {}})
            result["shapes"][shape]["widths"][ratio] = {"width": width, **out}
            Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
