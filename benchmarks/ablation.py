"""Ablation runner: prune SmolLM2-135M with several PruneConfig variants and measure WikiText-2
perplexity, all against one calibration set (Wikipedia text from gensim; never the evaluation text).

    python benchmarks/ablation.py --out benchmarks/results/ablation.json \\
        --variant "base:" --variant "seq-refit:calibration_mode=sequential,compensation=refit" \\
        --ratios 0.2 0.5 --windows-128 100 --windows-2048 0

A variant is `name:key=value,...` over PruneConfig fields (tuples as 4-28 for prunable_layers).
Results are appended as each run finishes, so a long grid can be watched and resumed.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from pathlib import Path

from llm_bip import api
from llm_bip.pipeline import PruneConfig

WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
FIELDS = {f.name: f.type for f in dataclasses.fields(PruneConfig)}


def parse_variant(text: str) -> tuple[str, dict]:
    name, _, body = text.partition(":")
    options: dict = {}
    for item in filter(None, body.split(",")):
        key, _, value = item.partition("=")
        if key not in FIELDS:
            raise SystemExit(f"unknown PruneConfig field {key}")
        if key == "prunable_layers":
            start, end = value.split("-")
            options[key] = tuple(range(int(start), int(end)))
        elif value in ("None", "none") and key in ("head_ratio",):
            options[key] = None
        else:
            default = getattr(PruneConfig(), key)
            options[key] = type(default)(value) if default is not None else float(value)
    return name, options


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--variant", action="append", required=True)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2])
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--calibration", default="wikipedia")
    parser.add_argument("--windows-128", type=int, default=100)
    parser.add_argument("--windows-2048", type=int, default=0)
    parser.add_argument("--dense", action="store_true", help="also evaluate the dense model")
    args = parser.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(out.read_text()) if out.exists() else {"runs": []}
    results["command"] = "python " + " ".join(__import__("sys").argv)
    done = {(r["variant"], r["ratio"]) for r in results["runs"]}
    dense = api.load()
    samples, info = api.calibrate(dense, args.calibration, args.num_samples, args.seq_len)
    lengths = [(128, args.windows_128)] + ([(2048, args.windows_2048)] if args.windows_2048 else [])

    def measure(lm) -> dict:
        ppl = {}
        for seq_len, windows in lengths:
            r = api.evaluate(lm, [str(WIKITEXT)], [seq_len], max_windows=windows, batch_size=1, progress=False)
            ppl[str(seq_len)] = round(r[f"wiki.test@{seq_len}"]["perplexity"], 3)
        return ppl

    if args.dense and ("dense", 0.0) not in done:
        results["runs"].append({"variant": "dense", "ratio": 0.0, "options": {}, "perplexity": measure(dense)})
    for text in args.variant:
        name, options = parse_variant(text)
        for ratio in args.ratios:
            if (name, ratio) in done:
                continue
            lm = copy.deepcopy(dense)
            config = PruneConfig(ratio=ratio, **options)
            start = time.perf_counter()
            result = api.prune(lm, config, samples, info, progress=False)
            seconds = time.perf_counter() - start
            run = {
                "variant": name, "ratio": ratio, "options": {k: v for k, v in options.items()},
                "removed_non_embedding": round(result.report["removed_fraction"]["non_embedding"], 4),
                "prune_seconds": round(seconds, 1), "perplexity": measure(lm),
                "heads_kept": [len(b.keep_heads) for b in result.plan.blocks],
                "channels_kept": [len(b.keep_channels) for b in result.plan.blocks],
            }
            results["runs"].append(run)
            out.write_text(json.dumps(results, indent=1, default=list))
            print(f"{name:<28} {ratio:.2f} {run['perplexity']} {seconds:.0f}s", flush=True)
    results["calibration"] = info
    out.write_text(json.dumps(results, indent=1, default=list))


if __name__ == "__main__":
    main()
