"""A probe of the quality issue's allocation lever: does a search over each block's channel count, judged end to
end, beat the sensitivity allocation it starts from? (EvoPress-style: a (1 + 8) evolution of the per-block
channels removed, moving `--step` channels from one block to another, the total kept fixed.)

    python benchmarks/allocation_search.py --ratio 0.2 --generations 40 --fit-samples 16 \\
        --out benchmarks/results/allocation_search_smollm2_20.json

A candidate is judged as the sensitivity trials are (sensitivity.py): on calibration samples other than the
trials' first 8, each block's lowest-scoring channels (LLM-BIP scores on the dense model) have their down_proj
columns zeroed, and the mean KL of the next-token distribution from the dense model's is its fitness. Each
generation's 8 offspring are ranked on 8 samples, the best two judged on `--fit-samples`, and the best replaces
the parent if it is better there. The searched allocation is then pruned by the tool itself (sensitivity
allocation's options, sequential refit; its widths replaced by the searched ones) and measured as
bench_quality.py measures. A probe, not a feature: it uses the sensitivity module's private helpers.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import time
from pathlib import Path

import torch

from llm_bip import api, pipeline
from llm_bip.config import PruneConfig
from llm_bip.data import load_text, tokenize
from llm_bip.params import count_parameters
from llm_bip.pipeline import catch_inputs, costs_of
from llm_bip.scoring import make_scorer
from llm_bip.sensitivity import _kl, _log_probs, _run
from llm_bip.widths import BlockWidths

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quality import TEXTS, evaluate  # noqa: E402

TRIAL_SAMPLES = 8  # the sensitivity trials' samples: the search judges on others
OFFSPRING = 8
CAP = 0.75  # of a block's channels, as the sensitivity allocation's cap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--generations", type=int, default=40)
    parser.add_argument("--fit-samples", type=int, default=16)
    parser.add_argument("--step", type=int, default=16, help="channels one move takes from a block to another")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    random.seed(0)
    dense = api.load("smollm2-135m")
    samples, info = api.calibrate(dense, "wikipedia", 256, 256, 0)
    config = PruneConfig(ratio=args.ratio, allocation="sensitivity")
    costs = costs_of(dense)
    counts = count_parameters(dense.model, dense.adapter)
    goal = pipeline.width_target(costs, [], pipeline.target_parameters(counts, config), counts, config)
    started = time.perf_counter()
    with torch.no_grad():
        measured = pipeline.measure_sensitivity(dense, costs, goal, config, samples, [], 8, False)
        start_widths = pipeline.plan_widths(costs, goal, config, None, [], measured)
    print("sensitivity", time.perf_counter() - started, [w.channels for w in start_widths], flush=True)
    adapter, blocks = dense.adapter, dense.adapter.blocks(dense.model)
    layers = list(range(len(blocks)))
    channels = costs[0].widths.channels
    fit = samples[TRIAL_SAMPLES : TRIAL_SAMPLES + args.fit_samples]
    quick = samples[TRIAL_SAMPLES + args.fit_samples : TRIAL_SAMPLES + args.fit_samples + 8]
    with torch.no_grad():
        # Per block, its channels from the lowest LLM-BIP score up, on the dense model's activations (the
        # Lipschitz factor is one number per block: it orders nothing within one).
        table = pipeline.score(dense, make_scorer("llm-bip", lipschitz="none"), fit, 8, progress=False)
        order = [torch.argsort(block_scores.channels) for block_scores in table.scores]
        fit_inputs, quick_inputs = catch_inputs(dense, fit, 8), catch_inputs(dense, quick, 8)
        dense_fit = _log_probs(dense, _run(blocks, fit_inputs, layers).hidden)
        dense_quick = _log_probs(dense, _run(blocks, quick_inputs, layers).hidden)
    saved = [adapter.parts(b).down_proj.weight.detach().clone() for b in blocks]

    @torch.no_grad()
    def fitness(removed: list[int], inputs, reference) -> float:
        for i, block in enumerate(blocks):
            weight = adapter.parts(block).down_proj.weight
            weight.copy_(saved[i])
            weight[:, order[i][: removed[i]]] = 0
        try:
            return _kl(reference, _log_probs(dense, _run(blocks, inputs, layers).hidden))
        finally:
            for i, block in enumerate(blocks):
                adapter.parts(block).down_proj.weight.copy_(saved[i])

    start = [channels - w.channels for w in start_widths]  # channels each block loses
    parent = start
    cap = int(CAP * channels)
    searching = time.perf_counter()
    parent_fitness = fitness(parent, fit_inputs, dense_fit)
    history = [parent_fitness]
    for generation in range(args.generations):
        offspring = []
        for _ in range(OFFSPRING):
            child = list(parent)
            for _ in range(1 + min(int(random.expovariate(0.7)), 4)):
                for _ in range(20):  # a move that keeps both blocks within [0, cap]
                    i, j = random.sample(layers, 2)
                    if child[i] + args.step <= cap and child[j] - args.step >= 0:
                        child[i] += args.step
                        child[j] -= args.step
                        break
            offspring.append(child)
        ranked = sorted((fitness(child, quick_inputs, dense_quick), n) for n, child in enumerate(offspring))
        best = min((fitness(offspring[n], fit_inputs, dense_fit), n) for _, n in ranked[:2])
        if best[0] < parent_fitness:
            parent_fitness, parent = best[0], offspring[best[1]]
        history.append(parent_fitness)
        print(generation, round(parent_fitness, 5), flush=True)
    search_seconds = time.perf_counter() - searching
    print("search s", search_seconds, parent, flush=True)
    searched = [BlockWidths(w.num_heads, w.num_kv_heads, channels - r) for w, r in zip(start_widths, parent, strict=True)]
    pipeline.plan_widths = lambda *a, **k: searched  # the tool prunes to the searched widths
    texts = {n: tokenize(dense.tokenizer, load_text(TEXTS[n], split="test")) for n in ["wikitext", "lee", "newsgroups"]}
    model = copy.deepcopy(dense)
    api.prune(model, config, samples, info, progress=False, dtype="bfloat16")
    windows = {128: 150, 2048: 40, ("lee", 2048): 10, ("newsgroups", 2048): 10}
    perplexity = evaluate(model, texts, [128, 2048], windows)
    print(perplexity, flush=True)
    result = {"ratio": args.ratio, "generations": args.generations, "fit_samples": args.fit_samples, "step": args.step,
              "start_channels_removed": start, "searched_channels_removed": parent,
              "kl_history": history, "search_seconds": search_seconds, "perplexity": perplexity,
              "command": "python benchmarks/allocation_search.py " + " ".join(sys.argv[1:])}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
