"""Speed of pruned shapes against dense, measured in one run (the speed issue), and the timing table's prediction.

    python benchmarks/bench_speed.py --model tinyllama --out benchmarks/results/speed_tinyllama.json
    python benchmarks/bench_speed.py --model smollm2 --ratios 0.2 0.3 0.5 --out benchmarks/results/speed_smollm2.json
    python benchmarks/bench_speed.py --model tinyllama --ratios --target-speedup 1.2 --rounds 5 --out ...

Speed does not depend on the weights' values, so every model here is the family's stock class with
random weights at the pruned shape: dense; `width` (the default allocation's uniform widths at the
ratio: FFN channels first); `depth` (whole blocks, the ratio's share of the non-embedding parameters);
`mixed` (half of the ratio from whole blocks, the rest from widths). Each shape runs in a fresh
subprocess (so its peak memory is its own): prefill tokens/s of 128-token prompts at batch 1 and 8,
greedy decoding tokens/s at batch 1 (32 new tokens after a 128-token prompt, KV cache), best of
`--repeats`, in `--dtype` (default: bf16 where the device has bf16 units, else float32, as prune's
`auto`); weights and KV-cache size; peak RSS (CPU) or peak allocated memory (CUDA). Dense
runs first and last, so drift over the run shows. With `--predict`, the speed planner's timing table
(llm_bip.speed.timing, the same one `prune --target-speedup` uses) predicts each shape's speed-up too.
With `--target-speedup`, the shapes that `prune --target-speedup` would plan by each route (width, depth,
mixed) for each of `--target-modes` (batch 1, 128 tokens), from tables timed now and the plans' own widths
timed as prune times them, are timed as well: whether the planner's promise holds on the device, without
pruning a 1B model (the planner decides the shape; which blocks and channels go does not change the time).
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from llm_bip.adapters import adapter_for
from llm_bip.config import PruneConfig
from llm_bip.devices import resolve_device
from llm_bip.dtypes import DTYPES, compute_dtype, dtype_name
from llm_bip.params import block_costs, count_parameters
from llm_bip.pipeline import depth_parameters, plan_widths
from llm_bip.speed.timing import synchronize
from llm_bip.widths import BlockWidths

SHAPES = {  # model_type, then the config's shape
    # TinyLlama-1.1B's shape: 22 blocks, 32 query / 4 KV heads of 64, FFN 5632, vocabulary 32,000 (untied).
    "tinyllama": dict(model_type="llama", hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                      num_attention_heads=32, num_key_value_heads=4, head_dim=64, vocab_size=32000,
                      tie_word_embeddings=False),
    # SmolLM2-135M's: 30 blocks, 9 / 3 heads of 64, FFN 1536, vocabulary 49,152 (tied).
    "smollm2": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152,
                    tie_word_embeddings=True),
    # Qwen2.5(-Coder)-0.5B's: the qwen2 family (q/k/v biases), 24 blocks, 14 / 2 heads of 64, FFN 4864,
    # vocabulary 151,936 (tied). head_dim is given so that fewer heads keep heads of 64.
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, head_dim=64, vocab_size=151936,
                         tie_word_embeddings=True),
}
PROMPT, NEW_TOKENS = 128, 32


def base_config(name: str) -> PretrainedConfig:
    """The shape's config in its family's stock class (its model_type is the timing table's family)."""
    return AutoConfig.for_model(**SHAPES[name], max_position_embeddings=2048, rope_theta=10000.0)


def meta_model(name: str) -> tuple[dict, list]:
    """The shape's parameter counts and per-block costs, from a model without weights."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(base_config(name))
    adapter = adapter_for(model)
    return count_parameters(model, adapter), [block_costs(adapter, b) for b in adapter.blocks(model)]


def shape_after(costs: list, ratio: float | None, blocks: int, base: int) -> tuple[BlockWidths, float]:
    """The kept blocks' (uniform) widths once the last `blocks` blocks are gone and widths take the rest of
    `ratio` of `base` parameters (None: widths as they are), and the share of the blocks' parameters removed."""
    num_blocks = len(costs)
    removed = list(range(num_blocks - blocks, num_blocks))
    widths = costs[0].widths
    if ratio is not None:
        rest = round(ratio * base) - depth_parameters(costs, removed)
        widths = plan_widths(costs, max(rest, 0), PruneConfig(ratio=ratio), None, removed)[0]
    return widths, 1 - costs[0].total(widths) * (num_blocks - blocks) / sum(c.total(c.widths) for c in costs)


def shapes_for(name: str, ratios: list[float]) -> list[dict]:
    """Per plan: its name, blocks kept and the (uniform) widths of the kept blocks."""
    _, costs = meta_model(name)
    non_embedding = sum(c.total(c.widths) for c in costs)
    num_blocks = len(costs)
    plans = [{"plan": "dense", "ratio": 0.0, "blocks": num_blocks, "widths": costs[0].widths.to_json()}]
    for ratio in ratios:
        for route, share in (("width", 0.0), ("depth", 1.0), ("mixed", 0.5)):
            blocks = round(share * ratio * non_embedding / depth_parameters(costs, [0]))
            widths, removed_share = shape_after(costs, ratio, blocks, non_embedding)
            plans.append({"plan": f"{route} {ratio:.0%}", "route": route, "ratio": ratio, "blocks": num_blocks - blocks,
                          "widths": widths.to_json(), "removed_non_embedding": removed_share})
    plans.append(dict(plans[0], plan="dense (again)"))
    return plans


def targeted(name: str, speedup: float, modes: list[str], device: torch.device, dtype: torch.dtype,
             margin: float | None = None) -> list[dict]:
    """Per target mode and route: the shape the speed planner plans for `speedup` on this device (a timing
    table timed now) with `margin` (None: prune's default), with its predicted speed-up."""
    from llm_bip.speed.planner import DEFAULT_MARGIN, PLANNED_ROUTES, SpeedTarget, plan_speed_refined
    from llm_bip.speed.timing import refine, timing_table

    margin = DEFAULT_MARGIN if margin is None else margin

    config = base_config(name)
    counts, costs = meta_model(name)
    plans = []
    for mode in modes:
        table = timing_table(config, config.model_type, costs[0].widths, config.head_dim, dtype, device, mode, 1,
                             PROMPT, path=Path(tempfile.mkdtemp()) / "table.json")
        grid_seconds = table.details.get("seconds")
        for route in PLANNED_ROUTES:
            # as `prune --target-speedup` plans with its cached table: the plan's own widths timed, planned again
            started = time.perf_counter()
            planned, earlier = plan_speed_refined(
                costs, counts, PruneConfig(), table, SpeedTarget(speedup, mode, 1, PROMPT, route, margin=margin),
                functools.partial(refine, table, config, head_dim=config.head_dim, dtype=dtype, device=device,
                                  progress=False))
            # The ratio counts against the planner's base (the model's non-embedding parameters).
            widths, removed_share = shape_after(costs, planned.ratio, planned.remove_blocks, counts["non_embedding"])
            plans.append({"plan": f"{route} for {speedup:g}x {mode}", "route": route, "target": speedup,
                          "target_mode": mode, "margin": margin, "ratio": planned.ratio,
                          "blocks": len(costs) - planned.remove_blocks,
                          "widths": widths.to_json(), "removed_non_embedding": removed_share,
                          "planned_speedup": planned.predicted_speedup, "timing_seconds": grid_seconds,
                          "plans_before_timing_own_widths": [
                              {"ratio": e.ratio, "blocks": len(costs) - e.remove_blocks,
                               "widths": e.kept_widths[0].to_json(), "predicted_speedup": e.predicted_speedup}
                              for e in earlier],
                          "own_widths_seconds": time.perf_counter() - started})
    return plans


def saved_plan(name: str, folder: str) -> dict:
    """The shape of a pruned model saved by llm-bip in the stock format (uniform widths), as a plan."""
    config = json.loads((Path(folder) / "config.json").read_text())
    if config.get("layer_widths"):
        raise SystemExit(f"{folder} has per-block widths: only stock-format (uniform) prunes can be timed here")
    if config["hidden_size"] != SHAPES[name]["hidden_size"]:
        raise SystemExit(f"{folder} is not a pruned {name} (hidden size {config['hidden_size']})")
    widths = BlockWidths(config["num_attention_heads"], config["num_key_value_heads"], config["intermediate_size"])
    return {"plan": Path(folder).name, "route": "saved", "blocks": config["num_hidden_layers"],
            "widths": widths.to_json()}


def shaped(name: str, plan: dict) -> PretrainedConfig:
    config = base_config(name)
    widths = BlockWidths.from_json(plan["widths"])
    config.num_hidden_layers = plan["blocks"]
    config.num_attention_heads, config.num_key_value_heads = widths.num_heads, widths.num_kv_heads
    config.intermediate_size = widths.channels
    return config


def build(name: str, plan: dict, device: torch.device, dtype: torch.dtype):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(shaped(name, plan), dtype=dtype).to(device).eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model


def kv_bytes_per_token(model, plan: dict) -> int:
    """The KV cache's bytes per token in the model's dtype: K and V of every kept KV head in every block."""
    element = next(model.parameters()).element_size()
    return 2 * plan["blocks"] * BlockWidths.from_json(plan["widths"]).num_kv_heads * model.config.head_dim * element


def sizes(model, plan: dict) -> dict:
    return {"parameters": sum(p.numel() for p in model.parameters()),
            "weights_mib": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20,
            "kv_cache_mib_per_1k_tokens": kv_bytes_per_token(model, plan) * 1000 / 2**20}


@torch.no_grad()
def time_model(model, device: torch.device, repeats: int) -> dict:
    """Prefill tokens/s at batch 1 and 8 and decoding tokens/s at batch 1, best of `repeats` after a warm-up."""
    out = {}
    for batch in (1, 8):
        ids = torch.randint(100, 10000, (batch, PROMPT), generator=torch.Generator().manual_seed(0)).to(device)
        model(ids, use_cache=False)  # warm-up
        best = float("inf")
        for _ in range(repeats):
            synchronize(device)
            start = time.perf_counter()
            model(ids, use_cache=False)
            synchronize(device)
            best = min(best, time.perf_counter() - start)
        out[f"prefill_b{batch}_tok_s"] = batch * PROMPT / best
        if batch == 1:
            prefill = best
            model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)  # warm-up
            best_decode = float("inf")
            for _ in range(repeats):
                synchronize(device)
                start = time.perf_counter()
                model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
                synchronize(device)
                best_decode = min(best_decode, max(time.perf_counter() - start - prefill, 1e-6))
            out["decode_b1_tok_s"] = NEW_TOKENS / best_decode
    return out


def interleaved(name: str, plans: list[dict], device: torch.device, dtype: torch.dtype, rounds: int) -> list[dict]:
    """Every plan built once in this process and timed once per round, the order rotated each round, so
    drift of the machine falls on every plan alike; the best of the rounds per plan and measure. The
    round-by-round numbers are kept (dense's show the drift)."""
    models = [build(name, plan, device, dtype) for plan in plans]
    best: list[dict] = [{} for _ in plans]
    per_round: list[list[dict]] = [[] for _ in plans]
    for r in range(rounds):
        order = list(range(len(plans)))
        order = order[r % len(order):] + order[:r % len(order)]
        for i in order:
            measured = time_model(models[i], device, repeats=1)
            per_round[i].append(measured)
            for key, value in measured.items():
                best[i][key] = max(best[i].get(key, 0.0), value)
        print(f"round {r + 1}/{rounds}: dense prefill b1 {per_round[0][-1]['prefill_b1_tok_s']:.0f} tok/s", flush=True)
    out = []
    for plan, model, b, rounds_seen in zip(plans, models, best, per_round, strict=True):
        # Paired ratios: each round's speed over dense's in the same round, so a slow phase of the host
        # divides out; their median is the figure to quote, the best-of-rounds ratio a cross-check.
        paired = {key.replace("tok_s", "paired_speedup"):
                  statistics.median(mine[key] / dense[key] for mine, dense in zip(rounds_seen, per_round[0], strict=True))
                  for key in rounds_seen[0]}
        out.append({**plan, **b, **paired, "rounds": rounds_seen, **sizes(model, plan)})
    return out


@torch.no_grad()
def measure_one(name: str, plan: dict, device: torch.device, dtype: torch.dtype, repeats: int) -> dict:
    """Runs in its own process: build the shape, time it, report its memory."""
    torch.manual_seed(0)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = build(name, plan, device, dtype)
    out = time_model(model, device, repeats)
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) * 1024)
    return {**out, **sizes(model, plan),
            "kv_cache_mib_b1": kv_bytes_per_token(model, plan) * (PROMPT + NEW_TOKENS) / 2**20,
            "peak_memory_mib": peak / 2**20, "peak_memory_kind": "cuda allocated" if device.type == "cuda"
            else "RSS high-water above the process before the model"}


def predict(name: str, plans: list[dict], device: torch.device, dtype: torch.dtype) -> dict:
    """The speed planner's predicted speed-up of each plan, from this device's timing tables."""
    from llm_bip.speed.timing import timing_table

    config = base_config(name)
    full = BlockWidths.from_json(plans[0]["widths"])
    out = {}
    for mode, batch in (("prefill", 1), ("decode", 1)):
        # A table timed now (not one cached from another session), so it sees the host as the plans did.
        table = timing_table(config, config.model_type, full, config.head_dim, dtype, device, mode, batch, PROMPT,
                             path=Path(tempfile.mkdtemp()) / "table.json")
        dense = table.model_ms([full] * plans[0]["blocks"])
        for plan in plans:
            ms = table.model_ms([BlockWidths.from_json(plan["widths"])] * plan["blocks"])
            out.setdefault(plan["plan"], {})[f"{mode}_b{batch}_predicted_speedup"] = dense / ms
        out.setdefault("timing_seconds", {})[mode] = table.details.get("seconds")
    return out


def dtype_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                        help="the models' dtype (default auto: what prune's --dtype auto computes in on the device, "
                             "bfloat16 where it has bf16 units, else float32)")


def timed_dtype(requested: str, device: torch.device) -> torch.dtype:
    """The dtype the shapes are built and timed in: what prune computes float32 weights in when asked for it."""
    return DTYPES[compute_dtype(requested, torch.float32, device)]


def pass_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the benchmarks that time one shape's target passes (bench_plan_check, bench_timing_noise)."""
    parser.add_argument("--model", choices=list(SHAPES), default="tinyllama")
    parser.add_argument("--modes", nargs="+", default=["prefill", "decode"], choices=["prefill", "decode"])
    parser.add_argument("--device", default="cpu")
    dtype_argument(parser)
    parser.add_argument("--out", required=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=list(SHAPES), default="tinyllama")
    parser.add_argument("--ratios", type=float, nargs="*", default=[0.2, 0.5])
    parser.add_argument("--pruned", nargs="+", default=[], metavar="DIR",
                        help="also time the shapes of these saved prunes of the model (e.g. a --target-speedup prune)")
    parser.add_argument("--target-speedup", type=float,
                        help="also time the shapes the speed planner plans for this speed-up by each route")
    parser.add_argument("--target-modes", nargs="+", default=["prefill", "decode"], choices=["prefill", "decode"])
    parser.add_argument("--device", default="cpu")
    dtype_argument(parser)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--predict", action="store_true", help="also predict each speed-up from the timing table")
    parser.add_argument("--rounds", type=int, default=0,
                        help="interleaved mode: every shape in this process, timed once per round, best of the "
                             "rounds (robust to drift; no per-plan peak memory)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one plan (JSON) and print the result
    args = parser.parse_args()
    device = resolve_device(args.device)
    dtype = timed_dtype(args.dtype, device)
    if args.one:
        print(json.dumps(measure_one(args.model, json.loads(args.one), device, dtype, args.repeats)))
        return
    plans = shapes_for(args.model, args.ratios)
    plans[-1:-1] = [saved_plan(args.model, folder) for folder in args.pruned]  # before "dense (again)"
    if args.target_speedup:
        plans[-1:-1] = targeted(args.model, args.target_speedup, args.target_modes, device, dtype)
    started = time.perf_counter()
    result = {"model": args.model, "shape": SHAPES[args.model], "device": args.device, "dtype": dtype_name(dtype),
              "prompt": PROMPT, "new_tokens": NEW_TOKENS, "repeats": args.repeats, "torch": torch.__version__,
              "command": "python benchmarks/bench_speed.py " + " ".join(sys.argv[1:]), "plans": []}
    if args.rounds:
        result["mode"] = f"interleaved, {args.rounds} rounds"
        result["plans"] = interleaved(args.model, plans, device, dtype, args.rounds)
    for plan in plans if not args.rounds else []:
        command = [sys.executable, __file__, "--model", args.model, "--device", args.device, "--dtype", args.dtype,
                   "--repeats", str(args.repeats), "--out", args.out, "--one", json.dumps(plan)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        measured = json.loads(done.stdout.strip().splitlines()[-1])
        result["plans"].append({**plan, **measured})
        print(plan["plan"], {k: round(v, 2) for k, v in measured.items() if isinstance(v, float)}, flush=True)
    dense = result["plans"][0]
    for plan in result["plans"]:
        for key in ("prefill_b1_tok_s", "prefill_b8_tok_s", "decode_b1_tok_s"):
            plan[key.replace("tok_s", "speedup")] = plan[key] / dense[key]
    if args.predict:
        predicted = predict(args.model, plans, device, dtype)
        result["timing_seconds"] = predicted.pop("timing_seconds")
        for plan in result["plans"]:
            plan.update(predicted.get(plan["plan"], {}))
    result["seconds"] = time.perf_counter() - started
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    for plan in result["plans"]:
        print(f"{plan['plan']:<14} params {plan['parameters']:>13,}  prefill b1 {plan['prefill_b1_speedup']:.2f}x  "
              f"b8 {plan['prefill_b8_speedup']:.2f}x  decode b1 {plan['decode_b1_speedup']:.2f}x"
              + (f"  paired median {plan['prefill_b1_paired_speedup']:.2f}x / {plan['prefill_b8_paired_speedup']:.2f}x"
                 f" / {plan['decode_b1_paired_speedup']:.2f}x" if args.rounds else "")
              + (f"  (predicted {plan.get('prefill_b1_predicted_speedup', 0):.2f}x / "
                 f"{plan.get('decode_b1_predicted_speedup', 0):.2f}x)" if args.predict else ""))


if __name__ == "__main__":
    main()
