"""Recovery at equal wall time and text (the quality issue): LoRA on the LM loss against distillation from
the dense model, after the default prune of SmolLM2.

    python benchmarks/bench_distill.py --ratio 0.2 --runs lora-lm full-kd --minutes 30 \
        --out benchmarks/results/distill_smollm2.json

Every run trains the same pruned model on the same text (the Wikipedia articles of the default
calibration source, 256-token examples, one epoch at most unless `--epochs` says more) for at most
`--minutes` of wall time, through `llm-bip recover` itself, in its own process; then WikiText-2 (@128,
150 windows; @2048, 40), Lee and 20 Newsgroups (@128, 150 windows; @2048, 10) are measured as
bench_quality.py measures them. Runs:

    lora-lm   LoRA (r 8, lr 2e-4) on the language-model loss: the recipe of docs/results.md §5
    lora-lm-1e-3  the same LoRA at lr 1e-3 (a short run's usual LoRA rate; 2e-4 is LLM-Pruner's for 2 epochs)
    lora-lm-nodrop  lora-lm-1e-3 without the adapters' dropout (0.05 there), which costs a third of a CPU step
    lora-lm-r32  lora-lm-nodrop at rank 32 (alpha 64: the same alpha / r scale as r 8, alpha 16)
    lora-lm-r32-anneal  lora-lm-r32 with its schedule ending where lora-lm-r32 stopped for time (its steps in
              `--out`, less 5), so the rate decays to zero by the time limit (planned over the epoch's 300
              steps, it is still at about a fifth of its peak when time runs out)
    lora-lm-r32-fit  lora-lm-r32 with `--schedule-to-time`: recover ends the schedule at the time limit, as
              the measured pace of its own steps predicts (fitted after its first steps and again as it goes),
              with no earlier run to learn the step count from
    lora-lm-r32-fit-1024  lora-lm-r32-fit on 1,024-token sequences (batch 2, held-out set 16): the same
              tokens per step and held out, but positions up to 1,024 trained, for the @2048 measures
    lora-lm-r32-fit-2048  the same on 2,048-token sequences (batch 1, held-out set 8): every position that
              the @2048 measures read is trained
    lora-kd-mix-r32-fit-1024  lora-lm-r32-fit-1024 on half KL to the dense model (teacher on the fly),
              half LM loss (--distill-alpha 0.5): distillation in the best LM recipe measured
    lora-kdcache-mix-r32-fit-1024  the same from a teacher cache (`--teacher-cache` in --work: the teacher's
              top-64 log-probabilities computed once before training, outside --minutes, which its report
              times as build_time_s; give --minutes less that, for an equal budget)
    lora-kd   the same LoRA, trained on KL to the dense model's next-token distribution (teacher on the fly)
    full-kd   every weight trained (AdamW, lr 5e-5) on the same KL
    full-lm   every weight trained (AdamW, lr 1e-4) on the language-model loss

Runs whose result is already in `--out` are skipped, so the file fills run by run. `--prune-options`
starts every run from another prune (flags appended to `llm-bip prune`, which take precedence), e.g.

    python benchmarks/bench_distill.py --ratio 0.2 --runs lora-lm-1e-3 --minutes 30 \
        --prune-options "--num-samples 128 --allocation sensitivity" \
        --out benchmarks/results/distill_smollm2_sensitivity.json

On a CPU without bf16 matrix units (benchmarks/bench_bf16_matmul.py), run it all in float32: `--prune-options
"... --weights-dtype float32 --dtype float32"` keeps the pruned model in float32, and `--compute-dtype
float32` has training and evaluation compute in it.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quality import TEXTS, evaluate  # noqa: E402
from llm_bip import api  # noqa: E402
from llm_bip.data import load_text, tokenize  # noqa: E402
from llm_bip.loading import default_model_gguf  # noqa: E402
from llm_bip.saving import read_record  # noqa: E402

COMMON = ["--batch-size", "8", "--micro-batch-size", "4", "--cutoff-len", "256", "--val-set-size", "64",
          "--warmup-steps", "10", "--save-steps", "1000", "--quiet"]
# lora-lm-nodrop at rank 32, the base of every r32 run.
R32 = ["--lr", "1e-3", "--lora-dropout", "0", "--lora-r", "32", "--lora-alpha", "64"]
# lora-lm-r32-fit with the same tokens per step and per held-out set, in 1,024-token sequences instead of 256.
FIT_1024 = [*R32, "--schedule-to-time", "--cutoff-len", "1024", "--batch-size", "2", "--micro-batch-size", "1",
            "--val-set-size", "16"]
KD_MIX = ["--teacher", "{teacher}", "--distill-alpha", "0.5"]  # half KL to the dense model, half LM loss
RUNS = {
    "lora-lm": ["--lr", "2e-4"],
    "lora-lm-1e-3": ["--lr", "1e-3"],
    "lora-lm-nodrop": ["--lr", "1e-3", "--lora-dropout", "0"],
    "lora-lm-r32": R32,
    "lora-lm-r32-anneal": [*R32, "--max-steps", "{steps}"],
    "lora-lm-r32-fit": [*R32, "--schedule-to-time"],
    "lora-lm-r32-fit-1024": FIT_1024,
    # Whole 2,048-token sequences, one a step (the same tokens per step again; held-out set 8).
    "lora-lm-r32-fit-2048": [*R32, "--schedule-to-time", "--cutoff-len", "2048", "--batch-size", "1",
                             "--micro-batch-size", "1", "--val-set-size", "8"],
    "lora-kd-mix-r32-fit-1024": [*FIT_1024, *KD_MIX],
    "lora-kdcache-mix-r32-fit-1024": [*FIT_1024, *KD_MIX, "--teacher-cache", "{work}/teacher-cache-1024"],
    "lora-kd": ["--lr", "2e-4", "--teacher", "{teacher}"],
    "full-kd": ["--lr", "5e-5", "--full-finetune", "--teacher", "{teacher}"],
    "full-lm": ["--lr", "1e-4", "--full-finetune"],
}
WINDOWS = {128: 150, 2048: 40, ("lee", 2048): 10, ("newsgroups", 2048): 10}


def llm_bip(*args: str) -> None:
    subprocess.run([str(Path(sys.executable).parent / "llm-bip"), *args], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--work", help="folder for the pruned and trained models (default: a new temporary one)")
    parser.add_argument("--prune-options", default="",
                        help="more `llm-bip prune` flags for the model every run starts from (they win over the "
                             "defaults here)")
    parser.add_argument("--compute-dtype", default="bfloat16", choices=["bfloat16", "float32"],
                        help="what training and evaluation compute in (recover's --dtype)")
    parser.add_argument("--epochs", type=int, default=1,
                        help="passes over the text at most; with a fitted schedule (the -fit runs) a run whose epoch "
                             "ends before its time limit goes on into the next one")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="llm-bip-distill-"))
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.is_file() else {"runs": {}}
    prune_options = shlex.split(args.prune_options)
    if result.get("prune_options", []) != prune_options and (result["runs"] or "pruned" in result):
        raise SystemExit(f"{out} holds runs from a prune with options {result.get('prune_options', [])}: give "
                         "another --out")
    if result["runs"] and result.get("epochs", 1) != args.epochs:
        raise SystemExit(f"{out} holds runs of {result.get('epochs', 1)} epoch(s) at most: give another --out")
    result.update(ratio=args.ratio, minutes=args.minutes, epochs=args.epochs, prune_options=prune_options,
                  windows={str(k): v for k, v in WINDOWS.items()},
                  torch_threads=torch.get_num_threads(), compute_dtype=args.compute_dtype,
                  command="python benchmarks/bench_distill.py " + shlex.join(sys.argv[1:]))

    pruned = work / f"pruned-{args.ratio}"
    if not pruned.is_dir():
        # 64 calibration samples: the default when this benchmark's first runs were measured, pinned so that
        # every run in one results file starts from the same pruned model.
        llm_bip("prune", "--ratio", str(args.ratio), "--num-samples", "64", "--output", str(pruned), "--eval", "none",
                "--quiet", *prune_options)
    text = work / "wikipedia.txt"
    text.write_text(load_text("wikipedia"))
    teacher = str(default_model_gguf())

    lm = api.load(str(pruned))
    texts = {name: tokenize(lm.tokenizer, load_text(TEXTS[name], split="test")) for name in ("wikitext", "lee",
                                                                                             "newsgroups")}
    if "pruned" not in result:
        result["pruned"] = evaluate(lm, texts, [128, 2048], WINDOWS, dtype=args.compute_dtype)
        out.write_text(json.dumps(result, indent=1))
    print("pruned", result["pruned"], flush=True)

    for name in args.runs:
        if name in result["runs"]:
            continue
        trained = work / name
        done = result["runs"].get("lora-lm-r32", {}).get("steps")
        if "{steps}" in RUNS[name] and not done:
            raise SystemExit(f"{name} ends its schedule where lora-lm-r32 stopped: run lora-lm-r32 first")
        options = [a.format(teacher=teacher, steps=(done or 0) - 5, work=work) for a in RUNS[name]]
        started = time.perf_counter()
        llm_bip("recover", "--model", str(pruned), "--data", str(text), "--output", str(trained), "--overwrite",
                "--max-time", str(int(args.minutes * 60)), "--dtype", args.compute_dtype, "--epochs", str(args.epochs),
                *COMMON, *options)
        seconds = time.perf_counter() - started
        recovery = (read_record(trained) or {}).get("recovery", {})
        lm = api.load(str(trained))
        result["runs"][name] = {
            "options": options, "wall_seconds": seconds, "steps": recovery.get("steps"),
            "total_steps": recovery.get("total_steps"), "stopped": recovery.get("stopped"),
            "time_fit": recovery.get("time_fit"),
            "tokens_trained": recovery.get("tokens_trained"), "train_seconds": recovery.get("train_time_s"),
            "trainable_params": recovery.get("trainable_params"),
            "teacher_cache": recovery.get("objective", {}).get("teacher_cache"),
            "perplexity": evaluate(lm, texts, [128, 2048], WINDOWS, dtype=args.compute_dtype),
        }
        out.write_text(json.dumps(result, indent=1))
        print(name, result["runs"][name], flush=True)


if __name__ == "__main__":
    main()
