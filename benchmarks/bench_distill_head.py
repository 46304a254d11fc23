"""The loss head of one distillation step against the LM loss's: SmolLM2's output layer over one step's positions.

    python benchmarks/bench_distill_head.py --out benchmarks/results/distill_head_cpu.json

A step of the 1,024-token recipe trains on about 2,048 positions. From their final hidden states (random, float32,
requiring grad) to the gradient reaching them: the output layer (bf16 autocast, SmolLM2's 49,152 x 576, random)
and then (a) the LM loss (cross-entropy), (b) `distill.distill_sums` with a teacher cache's top-64 rows at alpha 0.5
and 1, (c) the same with the teacher's full log-probabilities (a teacher on the fly, its forward pass not counted).
Each is timed 5 times after a warm-up; the fastest is kept. The decoder's forward and backward passes, the same
for every objective, are not in it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from llm_bip.recovery.config import DistillConfig
from llm_bip.recovery.distill import distill_sums, teacher_topk

POSITIONS, HIDDEN, VOCAB, TOP_K, REPEATS = 2048, 576, 49152, 64, 5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    weight = torch.randn(VOCAB, HIDDEN, dtype=torch.bfloat16) * 0.05
    hidden = torch.randn(POSITIONS, HIDDEN, requires_grad=True)
    targets = torch.randint(0, VOCAB, (POSITIONS,))
    teacher_logits = torch.randn(POSITIONS, VOCAB) * 3
    teacher, top = F.log_softmax(teacher_logits, -1), teacher_topk(teacher_logits, TOP_K, 1.0)

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16)

    def logits_of(h: torch.Tensor) -> torch.Tensor:
        return (h.to(torch.bfloat16) @ weight.T).float()

    def lm() -> None:
        with autocast():
            logits = logits_of(hidden * 1.0)
        F.cross_entropy(logits, targets, reduction="sum").backward()

    def distill(rows, alpha: float):
        def run() -> None:
            distill_sums(logits_of, hidden * 1.0, targets, rows, DistillConfig(alpha=alpha, top_k=TOP_K),
                         normalizer=float(POSITIONS), forward_context=autocast)
        return run

    cases = {"lm loss": lm,
             "distill, top-64 cache, alpha 0.5": distill(lambda s, e: top.rows(s, e), 0.5),
             "distill, top-64 cache, alpha 1": distill(lambda s, e: top.rows(s, e), 1.0),
             "distill, full teacher, alpha 0.5": distill(lambda s, e: teacher[s:e], 0.5)}
    seconds = {}
    for name, run in cases.items():
        times = []
        for _ in range(REPEATS + 1):
            started = time.perf_counter()
            run()
            times.append(time.perf_counter() - started)
            hidden.grad = None
        seconds[name] = min(times[1:])
        print(f"{name:36s} {seconds[name]:.3f} s ({seconds[name] / seconds['lm loss']:.2f}x the LM loss)", flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "command": f"python benchmarks/bench_distill_head.py --out {args.out}", "commit": commit,
        "positions": POSITIONS, "vocab": VOCAB, "hidden": HIDDEN, "top_k": TOP_K, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "seconds": seconds,
        "ratio_to_lm": {k: v / seconds["lm loss"] for k, v in seconds.items()}}, indent=1))


if __name__ == "__main__":
    main()
