"""The README's main command with the `auto` dtypes against bf16 throughout, timed in one run.

    python benchmarks/bench_dtype_auto.py --out benchmarks/results/dtype_auto_<host>.json \\
        -- --num-samples 64 --eval-max-windows 50

Each setup runs `llm-bip prune --ratio 0.2` on the default model (SmolLM2-135M from its GGUF, evaluated
before and after on the Lee corpus at 128 tokens) in its own process, one after the other; arguments after
`--` go to every run. The record of each run gives the dtypes it resolved, the seconds of its prune and
of the whole command, and its perplexities. On a CPU with bf16 units both setups compute in bf16; on one
without, `auto` computes in float32 (llm_bip.dtypes).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from llm_bip.dtypes import cpu_bf16_flags

SETUPS = {
    "auto": [],
    "bfloat16": ["--weights-dtype", "bfloat16", "--dtype", "bfloat16"],
}


def run(setup: list[str], extra: list[str], work: Path) -> dict:
    out = work / "pruned"
    command = [sys.executable, "-m", "llm_bip.cli", "prune", "--ratio", "0.2", "--quiet", "--output", str(out),
               *setup, *extra]
    started = time.perf_counter()
    subprocess.run(command, check=True)
    wall = time.perf_counter() - started
    record = json.loads((out / "pruning_record.json").read_text())
    ppl = record["perplexity"]
    return {
        "command": " ".join(command[2:]), "wall_seconds": wall, "timings_seconds": record["timings_seconds"],
        "weights_dtype": record["weights_dtype"], "compute_dtype": record["compute_dtype"],
        "saved_dtype": record["saved_dtype"], "saved_bytes": sum(f.stat().st_size for f in out.iterdir()),
        "perplexity": {stage: {key: r["perplexity"] for key, r in results.items()} for stage, results in ppl.items()},
        "eval_seconds": {stage: sum(r["seconds"] for r in results.values()) for stage, results in ppl.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("extra", nargs="*", help="options for every run (after --)")
    args = parser.parse_args()
    result = {"cpu_bf16_flags": list(cpu_bf16_flags()), "torch_threads": torch.get_num_threads(),
              "command": " ".join(["python", *sys.argv]), "runs": {}}
    for name in args.setups:
        with tempfile.TemporaryDirectory() as work:
            result["runs"][name] = run(SETUPS[name], args.extra, Path(work))
        print(name, json.dumps(result["runs"][name], indent=1))
    if {"auto", "bfloat16"} <= set(result["runs"]):
        auto, bf16 = result["runs"]["auto"], result["runs"]["bfloat16"]
        result["bfloat16_over_auto"] = {"command": bf16["timings_seconds"]["command"] / auto["timings_seconds"]["command"],
                                        "prune": bf16["timings_seconds"]["prune"] / auto["timings_seconds"]["prune"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result.get("bfloat16_over_auto"), indent=1))


if __name__ == "__main__":
    main()
