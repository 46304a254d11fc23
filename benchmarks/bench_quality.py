"""Quality levers of the default recipe, measured (the quality issue): perplexity of variants of the default
at several ratios, on WikiText-2 and on two texts neither calibrated nor tuned on (Lee news, newsgroups).

    python benchmarks/bench_quality.py --model smollm2-135m --ratios 0.2 0.3 0.5 \\
        --variants default refit-aware --out benchmarks/results/quality_smollm2.json
    python benchmarks/bench_quality.py --model /tmp/llm-bip-bench/qwen-gguf/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf \\
        --ratios 0.2 --variants default none --texts wikitext --windows-128 50 --lengths 128 --out ...

A variant is a name from VARIANTS (PruneConfig changes, and calibration changes), or name:key=value,...
with PruneConfig fields (numbers and None parsed) or calibration keys (num_samples, seq_len, source, and
calibration_seed: the seed that draws the samples, as `seed` is PruneConfig's own). Results are written
after every run, so a long run keeps what it has. Everything runs in one process: the dense model is
loaded once and copied per run.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from pathlib import Path

import torch

from llm_bip import api
from llm_bip.config import PruneConfig
from llm_bip.data import load_text, tokenize
from llm_bip.params import count_parameters

ROOT = Path(__file__).resolve().parents[1]
TEXTS = {"wikitext": str(ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"), "lee": "lee",
         "newsgroups": "newsgroups"}
# The calibration of the "default" variant: 64 samples, as before the default became 128 (variant
# calibration-128), so that earlier result files keep their meaning.
CALIBRATION = {"source": "wikipedia", "num_samples": 64, "seq_len": 256, "seed": 0}

VARIANTS: dict[str, tuple[dict, dict]] = {  # name: (PruneConfig changes, calibration changes)
    "default": ({}, {}),
    "none": ({"compensation": "none"}, {}),
    "bias": ({"compensation": "bias"}, {}),
    "parallel": ({"calibration_mode": "parallel"}, {}),
    "refit-aware": ({"selection": "refit-aware"}, {}),
    "intercept-always": ({"refit_intercept": "always"}, {}),
    "intercept-never": ({"refit_intercept": "never"}, {}),
    # Some heads as well as channels: one query head in every KV group (3 of SmolLM2's 9).
    "heads": ({"gqa_mode": "query-heads", "head_ratio": 0.34}, {}),
    "calibration-128": ({}, {"num_samples": 128}),
    "calibration-512": ({}, {"num_samples": 32, "seq_len": 512}),
    # Depth pruning: `depth_share` of the ratio's parameters come from whole blocks (the rest from widths).
    "depth": ({"depth_share": 1.0}, {}),
    "mixed": ({"depth_share": 0.5}, {}),
    # Iterative pruning: half the ratio, then the rest from the pruned model (re-scored, refit again).
    "iterative": ({"iterative_steps": 2}, {}),
}


def parse_variant(spec: str) -> tuple[str, dict, dict]:
    name, _, rest = spec.partition(":")
    if name not in VARIANTS:  # a mistyped name would otherwise run the default under the typo's label
        raise SystemExit(f"variant {spec!r}: unknown name {name!r}; use one of {', '.join(VARIANTS)}")
    config, calibration = dict(VARIANTS[name][0]), dict(VARIANTS[name][1])
    fields = {f.name for f in dataclasses.fields(PruneConfig)} | {"iterative_steps"}  # the last is main()'s own
    calibration_keys = set(CALIBRATION) - {"seed"}  # the samples' seed is `calibration_seed`
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        key, parsed = key.replace("-", "_"), None if value == "None" else _number(value)
        if key in fields:
            config[key] = parsed
        elif key == "calibration_seed":
            calibration["seed"] = parsed
        elif key in calibration_keys:
            calibration[key] = parsed
        else:  # a typo would otherwise be dropped, and the run recorded as if it had applied
            valid = sorted(fields | calibration_keys | {"calibration_seed"})
            raise SystemExit(f"variant {spec!r}: unknown key {key!r}; use one of {', '.join(valid)}")
    return spec, config, calibration


def _number(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def with_depth(changes: dict, ratio: float, lm) -> dict:
    """PruneConfig changes with `depth_share` turned into a number of whole blocks to remove: that share of
    the ratio's non-embedding parameters, in blocks (every block of these models has the same size)."""
    changes = dict(changes)
    share = changes.pop("depth_share", None)
    if share:
        blocks = lm.adapter.blocks(lm.model)
        per_block = sum(p.numel() for p in blocks[0].parameters())
        non_embedding = sum(p.numel() for p in blocks.parameters())
        changes["remove_blocks"] = max(1, round(share * ratio * non_embedding / per_block))
    return changes


def evaluate(lm, texts: dict, lengths: list[int], windows: dict, skip: set | frozenset = frozenset(),
             dtype: str = "bfloat16") -> dict:
    """Perplexity per text@length; `windows[(text, length)]` or `windows[length]` windows (from the start)."""
    out = {}
    for name, ids in texts.items():
        for n in lengths:
            if f"{name}@{n}" in skip:
                continue
            count = windows.get((name, n), windows[n])
            r = api.evaluate(lm, [name], [n], max_windows=count, progress=False, tokenized={name: ids}, dtype=dtype)
            out[f"{name}@{n}"] = r[f"{name}@{n}"]["perplexity"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.3, 0.5])
    parser.add_argument("--variants", nargs="+", default=["default"])
    parser.add_argument("--texts", nargs="+", default=list(TEXTS), choices=list(TEXTS))
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 2048])
    parser.add_argument("--windows-128", type=int, default=150)
    parser.add_argument("--windows-2048", type=int, default=40)
    parser.add_argument("--other-windows-2048", type=int,
                        help="windows at 2048 of the texts other than WikiText-2 (default: --windows-2048)")
    parser.add_argument("--weights-dtype", default="auto",
                        help="the model's weights (auto: the checkpoint's, bf16 for a GGUF file); float32 where the "
                             "CPU has no bf16 matrix units (benchmarks/bench_bf16_matmul.py)")
    parser.add_argument("--compute-dtype", default="bfloat16", help="what the prune's passes and evaluation compute "
                                                                     "in (float32 with float32 weights on such a CPU)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.is_file() else {"runs": {}}
    result.update(model=args.model, texts=args.texts, calibration_default=CALIBRATION, weights_dtype=args.weights_dtype,
                  compute_dtype=args.compute_dtype,
                  command="python benchmarks/bench_quality.py " + " ".join(__import__("sys").argv[1:]))
    dense = api.load(args.model, weights_dtype=args.weights_dtype)
    dense_counts = count_parameters(dense.model, dense.adapter)
    texts = {name: tokenize(dense.tokenizer, load_text(TEXTS[name], split="test")) for name in args.texts}
    windows: dict = {128: args.windows_128, 2048: args.windows_2048}
    windows.update({n: args.windows_128 for n in args.lengths if n not in windows})
    if args.other_windows_2048:
        windows.update({(name, 2048): args.other_windows_2048 for name in texts if name != "wikitext"})
    result["windows"] = {f"{k[0]}@{k[1]}" if isinstance(k, tuple) else str(k): v for k, v in windows.items()}
    result.setdefault("dense", {})
    missing = evaluate(dense, texts, args.lengths, windows, skip=set(result["dense"]), dtype=args.compute_dtype)
    if missing:
        result["dense"].update(missing)
        out.write_text(json.dumps(result, indent=1))
    print("dense", result["dense"], flush=True)
    samples_cache: dict[tuple, tuple] = {}
    for spec in args.variants:
        name, changes, calibration = parse_variant(spec)
        cal = {**CALIBRATION, **calibration}
        key = tuple(sorted(cal.items()))
        if key not in samples_cache:
            samples_cache[key] = api.calibrate(dense, cal["source"], cal["num_samples"], cal["seq_len"], cal["seed"])
        samples, info = samples_cache[key]
        for ratio in args.ratios:
            run_key = f"{name}@{ratio:g}"
            if run_key in result["runs"]:
                continue
            lm = copy.deepcopy(dense)
            steps = changes.get("iterative_steps", 1)
            options = {k: v for k, v in changes.items() if k != "iterative_steps"}
            start = time.perf_counter()
            for step in range(1, steps + 1):
                # Step k removes up to k/steps of the dense model's parameters: a ratio of what is left.
                done, goal = ratio * (step - 1) / steps, ratio * step / steps
                config = dataclasses.replace(PruneConfig(ratio=(goal - done) / (1 - done)),
                                             **with_depth(options, ratio, dense))
                pruned = api.prune(lm, config, samples, info, progress=False, dtype=args.compute_dtype)
            seconds = time.perf_counter() - start
            blocks = pruned.report["compensation"]["blocks"]
            result["runs"][run_key] = {
                "variant": name, "ratio": ratio, "config": changes, "calibration": cal, "prune_seconds": seconds,
                "removed_non_embedding": 1 - pruned.report["parameters_after"]["non_embedding"]
                / dense_counts["non_embedding"],
                "heads_kept": sum(len(b.keep_heads) for b in pruned.plan.blocks),
                "channels_kept": [len(b.keep_channels) for b in pruned.plan.blocks],
                "timings_seconds": pruned.report["timings_seconds"],
                "compensation_kept": sorted({v.split(":")[0] for b in blocks for v in b.values()}),
                "perplexity": evaluate(lm, texts, args.lengths, windows, dtype=args.compute_dtype),
            }
            print(run_key, result["runs"][run_key]["perplexity"], f"{seconds:.1f}s", flush=True)
            out.write_text(json.dumps(result, indent=1))
            del lm


if __name__ == "__main__":
    main()
