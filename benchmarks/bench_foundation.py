"""Foundation benchmark on SmolLM2-135M: perplexity of dense / 20% / 50% LLM-BIP prunes at lengths 128
and 2048, scoring time against one plain forward pass over the same calibration tokens, peak memory
of scoring against the model's size, and prefill / decode speed of the pruned models over dense.

    python benchmarks/bench_foundation.py --out benchmarks/results/foundation.json

Scoring runs in a subprocess of its own so its peak RSS is not mixed with evaluation's.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from llm_bip import api
from llm_bip.compare import PeakMemory
from llm_bip.pipeline import PruneConfig

WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


def scoring_child(num_samples: int, seq_len: int) -> dict:
    """Runs in a fresh process: load, then time (and measure the peak memory of) one plain forward
    pass over the calibration tokens and LLM-BIP scoring over the same tokens, each above what the
    process held before it (the loaded model and the samples)."""
    lm = api.load()
    samples, info = api.calibrate(lm, "wikipedia", num_samples, seq_len)
    model_mb = model_mb_of(lm.model)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        lm.model(samples[:1], use_cache=False)  # warm-up
    with PeakMemory() as forward_memory, torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        start = time.perf_counter()
        for i in range(0, num_samples, 8):
            lm.model(samples[i : i + 8], use_cache=False)
        forward = time.perf_counter() - start
    with PeakMemory() as scoring_memory:
        start = time.perf_counter()
        api.score(lm, samples, "llm-bip", info, progress=False)
        scoring = time.perf_counter() - start
    config = lm.model.config
    return {
        "calibration_tokens": num_samples * seq_len, "forward_seconds": forward, "scoring_seconds": scoring,
        "scoring_over_forward": scoring / forward, "model_mb": model_mb,
        "forward_extra_mb": forward_memory.added / 2**20, "scoring_extra_mb": scoring_memory.added / 2**20,
        "memory_measured_by": scoring_memory.how,
        # What the block loop must hold: one block's inputs and outputs for every calibration token
        # (bf16), one batch's FFN intermediate (fp32 in the hooks), and one block's weights.
        "one_block_activations_mb": (2 * num_samples * seq_len * config.hidden_size * 2
                                     + 8 * seq_len * config.intermediate_size * 4) / 2**20,
        "one_block_weights_mb": model_mb_of(lm.adapter.blocks(lm.model)[0]),
    }


def model_mb_of(module: torch.nn.Module) -> float:
    return sum(p.numel() * p.element_size() for p in module.parameters()) / 2**20


@torch.no_grad()
def speed(model, batch: int, prompt: int = 128, new_tokens: int = 32, repeats: int = 3) -> dict:
    """Prefill tokens/s and decode tokens/s (greedy, KV cache) in bf16."""
    model = model.to(torch.bfloat16)
    ids = torch.randint(100, 10000, (batch, prompt), generator=torch.Generator().manual_seed(0))
    model.generation_config.pad_token_id = model.generation_config.eos_token_id
    best_prefill = best_decode = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        model(ids, use_cache=False)
        best_prefill = min(best_prefill, time.perf_counter() - start)
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        total = time.perf_counter() - start
        best_decode = min(best_decode, max(total - best_prefill, 1e-6))
    return {"prefill_tok_s": batch * prompt / best_prefill, "decode_tok_s": batch * new_tokens / best_decode}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results/foundation.json")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.5])
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--windows-128", type=int, default=300)
    parser.add_argument("--windows-2048", type=int, default=40)
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--no-ppl", action="store_true", help="skip perplexity (compare's table has it)")
    parser.add_argument("--allocation", default="uniform", help="PruneConfig's allocation of the prunes")
    parser.add_argument("--round-to", type=int, default=64,
                        help="also prune with kept widths rounded to this multiple (0: skip)")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(scoring_child(args.num_samples, args.seq_len)))
        return
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    child = subprocess.run([sys.executable, __file__, "--child", "--num-samples", str(args.num_samples),
                            "--seq-len", str(args.seq_len)], capture_output=True, text=True, check=True)
    results: dict = {"command": " ".join(sys.argv), "scoring": json.loads(child.stdout.strip().splitlines()[-1])}
    print(json.dumps(results["scoring"], indent=1), flush=True)

    dense = api.load()
    samples, info = api.calibrate(dense, "wikipedia", args.num_samples, args.seq_len)
    models = {"dense": dense}
    variants = [(ratio, 1) for ratio in args.ratios]
    variants += [(ratio, args.round_to) for ratio in args.ratios if args.round_to > 1]
    for ratio, round_to in variants:
        lm = copy.deepcopy(dense)
        result = api.prune(lm, PruneConfig(ratio=ratio, round_to=round_to, allocation=args.allocation), samples, info, progress=False)
        name = f"llm-bip {ratio:.0%}" + (f" round{round_to}" if round_to > 1 else "")
        models[name] = lm
        results.setdefault("prune", {})[name] = {
            "config": result.report["config"], "parameters_after": result.report["parameters_after"],
            "removed_fraction": result.report["removed_fraction"], "seconds": result.report["timings_seconds"],
        }
    for name, lm in ({} if args.no_ppl else models).items():
        ppl = {}
        for seq_len, windows in ((128, args.windows_128), (2048, args.windows_2048)):
            r = api.evaluate(lm, [str(WIKITEXT)], [seq_len], max_windows=windows, batch_size=1, progress=False)
            ppl[str(seq_len)] = r[f"wiki.test@{seq_len}"]["perplexity"]
        results.setdefault("perplexity", {})[name] = ppl
        print(name, ppl, flush=True)
    for batch in (1, 8):
        base = None
        for name, lm in models.items():
            s = speed(copy.deepcopy(lm.model), batch)
            base = base or s
            s["prefill_speedup"] = s["prefill_tok_s"] / base["prefill_tok_s"]
            s["decode_speedup"] = s["decode_tok_s"] / base["decode_tok_s"]
            results.setdefault("speed", {}).setdefault(f"batch{batch}", {})[name] = s
            print(batch, name, s, flush=True)
    results["config"] = vars(args)
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
