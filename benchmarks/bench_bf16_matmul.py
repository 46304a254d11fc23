"""Does this CPU multiply bf16 matrices natively? One FFN-shaped product timed in float32 and in bfloat16.

    python benchmarks/bench_bf16_matmul.py --out benchmarks/results/bf16_matmul_<host>.json

bf16 is fast on CPUs with AMX or AVX512-BF16 and slow without them; `--dtype auto` (and a GGUF file's
weights) choose float32 on the latter by these flags (llm_bip.dtypes), which are recorded beside the times.
The README's dtype note quotes this measurement.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from llm_bip.dtypes import cpu_bf16_flags


def time_product(dtype: torch.dtype, tokens: int, hidden: int, width: int, repeats: int) -> float:
    """Median milliseconds of an x [tokens, hidden] by W^T [hidden, width] product."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, hidden, generator=generator).to(dtype)
    w = torch.randn(width, hidden, generator=generator).to(dtype)
    for _ in range(3):
        x @ w.T
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        x @ w.T
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2] * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=576, help="SmolLM2-135M's hidden size")
    parser.add_argument("--width", type=int, default=1536, help="SmolLM2-135M's FFN width")
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    result = {
        "shape": [args.tokens, args.hidden, args.width],
        "threads": torch.get_num_threads(),
        "cpu_bf16_flags": list(cpu_bf16_flags()),
        "ms": {name: time_product(dtype, args.tokens, args.hidden, args.width, args.repeats)
               for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16))},
    }
    result["bf16_over_fp32"] = result["ms"]["bfloat16"] / result["ms"]["float32"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
