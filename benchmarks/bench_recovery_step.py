"""What one recovery step costs, per trainer: LoRA with and without the adapters' dropout, at two ranks, and
full fine-tuning, on the same model and micro-batch (the quality issue: why a LoRA step was slower than a
full fine-tuning step in bench_distill.py's float32 runs).

    python benchmarks/bench_recovery_step.py --model /tmp/d20f/pruned-0.2 --dtype float32 \
        --out benchmarks/results/recovery_step_fp32.json

Each setting wraps its own fresh copy of the model with `recover`'s own trainer (`LoraTrainer` or
`FullTrainer`) and times forward, backward (the LM loss as `recover` computes it) and the AdamW step on
micro-batches of random tokens. The settings are timed in turns, `--rounds` times in a new random order, and
the median of each setting's rounds is reported, with its ratio to full fine-tuning's median.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from llm_bip import api
from llm_bip.recovery.config import LoraRecoveryConfig
from llm_bip.recovery.full import FullTrainer
from llm_bip.recovery.lora import LoraTrainer
from llm_bip.recovery.loss import summed_loss

SETTINGS = {  # name: LoRA config changes, or None for full fine-tuning
    "full": None,
    "lora r8 dropout 0.05 (default)": {},
    "lora r8 dropout 0": {"lora_dropout": 0.0},
    "lora r32 dropout 0": {"lora_dropout": 0.0, "lora_r": 32, "lora_alpha": 64},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a model directory or GGUF file")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="the weights' dtype and the compute dtype (as recover --dtype with such weights)")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    base = api.load(args.model, weights_dtype=args.dtype).model
    base.config.use_cache = False
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, base.config.vocab_size, (args.micro_batch, args.seq_len), generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    runners = {}
    for name, changes in SETTINGS.items():
        model = copy.deepcopy(base)
        runner = FullTrainer(model) if changes is None else LoraTrainer(model, LoraRecoveryConfig(**changes))
        runner.setup()
        runner.model.train()
        optimizer = torch.optim.AdamW(runner.trainable.values(), lr=1e-6)
        runners[name] = (runner, optimizer)

    def step(name: str) -> float:
        runner, optimizer = runners[name]
        started = time.perf_counter()
        summed_loss(runner.model, batch).backward()
        runner.after_backward()
        optimizer.step()
        runner.after_step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - started

    for name in runners:  # warm-up: first calls allocate and pick kernels
        step(name)
    times: dict[str, list[float]] = {name: [] for name in runners}
    order = list(runners)
    for _ in range(args.rounds):
        random.shuffle(order)
        for name in order:
            times[name].append(step(name))
    medians = {name: statistics.median(t) for name, t in times.items()}
    result = {
        "command": "python benchmarks/bench_recovery_step.py " + " ".join(sys.argv[1:]),
        "model": args.model, "dtype": args.dtype, "micro_batch": args.micro_batch, "seq_len": args.seq_len,
        "torch_threads": torch.get_num_threads(),
        "trainable_params": {name: sum(p.numel() for p in r.trainable.values()) for name, (r, _) in runners.items()},
        "seconds": times, "median_s": medians,
        "ratio_to_full": {name: m / medians["full"] for name, m in medians.items()},
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    for name, m in medians.items():
        print(f"{name:32s} {m:7.3f} s  {m / medians['full']:.2f}x full")


if __name__ == "__main__":
    main()
