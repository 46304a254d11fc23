"""What `--round-to auto` chooses on this device, and whether the whole model is then faster (the speed
issue: "widths rounded to what kernels like, when the timing shows it pays").

    python benchmarks/bench_round_auto.py --out benchmarks/results/round_auto_cpu.json

For SmolLM2's and TinyLlama's shapes at the default width plans (bench_speed.py's `width 20%` and
`width 50%`), and for each pass a user can round for (prefill of 128 tokens at batch 1 and 8, decoding
at batch 1), this runs the rule `prune --round-to auto` runs (llm_bip.speed.rounding: the device times
the family's FFN sub-layer at the planned width and the multiples of 8 up to 3% below it) and records
the width it keeps. Every distinct width chosen is then built as a whole model (random bf16 weights,
the stock class) and timed against the planned width and dense in one interleaved run
(bench_speed.interleaved: paired ratios, median over rounds), so the figure is what the rounding buys
the model, not only the FFN.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_speed import base_config, interleaved, shapes_for  # noqa: E402
from llm_bip.adapters import adapter_for  # noqa: E402
from llm_bip.speed.rounding import RoundingSpec, device_timer, round_widths  # noqa: E402
from llm_bip.widths import BlockWidths  # noqa: E402

PASSES = {"prefill_b1": RoundingSpec("prefill", 1, 128), "prefill_b8": RoundingSpec("prefill", 8, 128),
          "decode_b1": RoundingSpec("decode", 1, 128)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["smollm2", "tinyllama"])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.5])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the whole-model timing")
    parser.add_argument("--out", default="benchmarks/results/round_auto_cpu.json")
    args = parser.parse_args()
    device = torch.device("cpu")
    results: dict = {"command": " ".join(sys.argv), "device": "cpu", "threads": torch.get_num_threads(), "models": {}}
    for name in args.models:
        config = base_config(name)
        with torch.device("meta"):
            adapter = adapter_for(AutoModelForCausalLM.from_config(config))
        full = BlockWidths(config.num_attention_heads, config.num_key_value_heads, config.intermediate_size)
        plans = [p for p in shapes_for(name, args.ratios) if p.get("route") == "width"]
        entry: dict = {"plans": {}}
        timed = [shapes_for(name, [])[0]]  # dense
        for plan in plans:
            widths = BlockWidths.from_json(plan["widths"])
            chosen = {}
            for label, spec in PASSES.items():
                started = time.perf_counter()
                timer = device_timer(config, adapter, full, torch.bfloat16, device, spec)
                rounded, record = round_widths([widths], [full], timer)
                chosen[label] = {"width": rounded[0].channels, "ffn_ms": record["ffn_ms"],
                                 "ffn_speedup": record["ffn_speedup"], "seconds": time.perf_counter() - started}
                print(name, plan["plan"], label, widths.channels, "->", rounded[0].channels, flush=True)
            entry["plans"][plan["plan"]] = {"planned_width": widths.channels, "chosen": chosen}
            timed.append(plan)
            for width in sorted({c["width"] for c in chosen.values()} - {widths.channels}):
                timed.append(dict(plan, plan=f"{plan['plan']} rounded to {width}",
                                  widths=BlockWidths(widths.num_heads, widths.num_kv_heads, width).to_json()))
        if len(timed) > 1 + len(plans):  # something was rounded: time the whole models
            measured = interleaved(name, timed, device, torch.bfloat16, args.rounds)
            entry["whole_model"] = [{k: v for k, v in m.items() if k != "rounds"} for m in measured]
        results["models"][name] = entry
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
