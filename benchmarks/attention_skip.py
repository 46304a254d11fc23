"""Whole attention sub-layers as a unit (the speed issue's third kind): skip a block's attention, keep its FFN.

    python benchmarks/attention_skip.py --counts 3 6 9 --out benchmarks/results/attention_skip_smollm2.json

The same criterion as for whole blocks: how much a block's output changes when its attention is
skipped, relative to the output, sum_t ||y_skip - y||^2 / sum_t ||y||^2 over the calibration tokens
(Wikipedia text from gensim, 64 x 256, the default prune's until 2026-11-30), measured on the dense model's activations
in one pass (each block also runs once more with its attention returning zeros). The lowest-scoring
attention sub-layers go (block 0 never: the KV cache counts the sequence from layer 0). Perplexity on
WikiText-2 (128 and 2048) and Lee, and the speed of the SmolLM2 shape with those attention sub-layers
removed (random weights, bf16, prefill batch 1 and 8, decoding batch 1, as bench_speed.py), against dense.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quality import CALIBRATION, TEXTS, evaluate  # noqa: E402
from bench_speed import base_config  # noqa: E402
from llm_bip import api  # noqa: E402
from llm_bip.data import load_text, tokenize  # noqa: E402


class _Skipped(torch.nn.Module):
    """An attention sub-layer that is not there: it adds nothing to the residual stream."""

    def forward(self, hidden_states, *args, **kwargs):
        return torch.zeros_like(hidden_states), None


@torch.no_grad()
def attention_scores(lm, samples: torch.Tensor, batch_size: int = 8) -> list[float]:
    blocks = lm.adapter.blocks(lm.model)
    sums = [[0.0, 0.0] for _ in blocks]
    state = {"skip": False}

    def zero_attention(_module, _args, out):
        return (torch.zeros_like(out[0]), *out[1:]) if state["skip"] else out

    def compare(layer):
        def hook(module, args, kwargs, out):
            if state["skip"]:
                return out
            y = (out[0] if isinstance(out, tuple) else out).float()
            state["skip"] = True
            try:
                skipped = module(*args, **kwargs)
            finally:
                state["skip"] = False
            y_skip = (skipped[0] if isinstance(skipped, tuple) else skipped).float()
            sums[layer][0] += float(((y_skip - y) ** 2).sum())
            sums[layer][1] += float((y * y).sum())
            return out
        return hook

    handles = [b.self_attn.register_forward_hook(zero_attention) for b in blocks]
    handles += [b.register_forward_hook(compare(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            for start in range(0, len(samples), batch_size):
                lm.model(samples[start:start + batch_size], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [change / output for change, output in sums]


def skip(model, layers: list[int]) -> None:
    for i in layers:
        model.model.layers[i].self_attn = _Skipped()


@torch.no_grad()
def speed(model, repeats: int = 3) -> dict:
    model = model.to(torch.bfloat16).eval()
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, None
    out = {}
    for batch in (1, 8):
        ids = torch.randint(100, 10000, (batch, 128), generator=torch.Generator().manual_seed(0))
        model(ids, use_cache=False)
        best = min(_timed(lambda ids=ids: model(ids, use_cache=False)) for _ in range(repeats))
        out[f"prefill_b{batch}_tok_s"] = batch * 128 / best
        if batch == 1:
            model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
            total = min(_timed(lambda ids=ids: model.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False))
                        for _ in range(repeats))
            out["decode_b1_tok_s"] = 32 / max(total - best, 1e-6)
    return out


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, nargs="+", default=[3, 6, 9])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dense = api.load("smollm2-135m")
    samples, _ = api.calibrate(dense, CALIBRATION["source"], CALIBRATION["num_samples"], CALIBRATION["seq_len"],
                               CALIBRATION["seed"])
    scores = attention_scores(dense, samples)
    order = sorted(range(1, len(scores)), key=lambda i: (scores[i], i))
    texts = {name: tokenize(dense.tokenizer, load_text(TEXTS[name], split="test")) for name in ("wikitext", "lee")}
    windows = {128: 150, 2048: 40}
    result = {"command": "python benchmarks/attention_skip.py " + " ".join(sys.argv[1:]), "scores": scores,
              "dense": evaluate(dense, texts, [128, 2048], windows), "runs": []}
    attention_params = sum(p.numel() for p in dense.model.model.layers[0].self_attn.parameters())
    non_embedding = sum(p.numel() for p in dense.model.model.layers.parameters())
    torch.manual_seed(0)
    shape = AutoModelForCausalLM.from_config(base_config("smollm2"))
    dense_speed = speed(copy.deepcopy(shape))
    for count in args.counts:
        layers = sorted(order[:count])
        lm = copy.deepcopy(dense)
        skip(lm.model, layers)
        fast = copy.deepcopy(shape)
        skip(fast, layers)
        measured = speed(fast)
        run = {"count": count, "layers": layers, "removed_non_embedding": count * attention_params / non_embedding,
               "perplexity": evaluate(lm, texts, [128, 2048], windows), **measured,
               **{k.replace("tok_s", "speedup"): measured[k] / dense_speed[k] for k in measured}}
        result["runs"].append(run)
        print(count, layers, run["perplexity"], {k: round(v, 3) for k, v in run.items() if k.endswith("speedup")},
              flush=True)
        Path(args.out).write_text(json.dumps({**result, "dense_speed": dense_speed}, indent=1))


if __name__ == "__main__":
    main()
