"""Fidelity of importance scores on SmolLM2-135M: the Spearman rank correlation of each method's scores
with (a) the true block-output change and (b) the true LM-loss change, from removing single heads and
single FFN channels (a sample), one at a time, in the dense model.

    python benchmarks/fidelity.py --out benchmarks/results/fidelity.json --layers 3 11 20 27

Block-output change: ||y - y_without|| over the calibration tokens (what LLM-BIP claims to measure).
Loss change: mean next-token loss on held-out WikiText-2 windows with the structure zeroed, minus dense.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from llm_bip import api
from llm_bip.activations import capture_block_inputs, run_block
from llm_bip.data import load_text, tokenize
from llm_bip.pipeline import geometry

WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
METHODS = {
    "llm-bip (L=none)": ("llm-bip", {"lipschitz": "none"}),
    "llm-bip (L=jvp)": ("llm-bip", {"lipschitz": "jvp"}),
    "llm-bip (L=exact)": ("llm-bip", {"lipschitz": "exact"}),
    "flap": ("flap", {}),
    "wanda-sp": ("wanda-sp", {}),
    "taylor": ("taylor", {}),
    "magnitude": ("magnitude", {}),
}


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


@torch.no_grad()
def loss(model, windows: torch.Tensor) -> float:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(windows, use_cache=False).logits.float()
    return float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results/fidelity.json")
    parser.add_argument("--layers", type=int, nargs="+", default=[3, 11, 20, 27])
    parser.add_argument("--channels", type=int, default=48, help="channels sampled per layer")
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--loss-windows", type=int, default=16)
    args = parser.parse_args()
    lm = api.load()
    samples, info = api.calibrate(lm, "wikipedia", args.num_samples, args.seq_len)
    windows = tokenize(lm.tokenizer, load_text(str(WIKITEXT)))[: args.loss_windows * 128].view(-1, 128)
    tables = {}
    for name, (method, options) in METHODS.items():
        tables[name] = api.score(lm, samples, method, info, progress=False, **options)
        print("scored", name, flush=True)

    base_loss = loss(lm.model, windows)
    blocks = lm.adapter.blocks(lm.model)
    generator = torch.Generator().manual_seed(0)
    truth: dict[str, list[float]] = {"output": [], "loss": []}
    picks: list[tuple[int, str, int]] = []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inputs = capture_block_inputs(lm.model, lm.adapter, samples, 8)
    for layer, block in enumerate(blocks):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            dense = run_block(block, inputs)
        if layer in args.layers:
            g = geometry(lm, layer)
            parts = lm.adapter.parts(block)
            channels = torch.randperm(g.channels, generator=generator)[: args.channels].tolist()
            for kind, index in [("head", h) for h in range(g.num_heads)] + [("channel", c) for c in channels]:
                linear = parts.o_proj if kind == "head" else parts.down_proj
                cols = slice(index * g.head_dim, (index + 1) * g.head_dim) if kind == "head" else slice(index, index + 1)
                saved = linear.weight[:, cols].clone()
                with torch.no_grad():
                    linear.weight[:, cols] = 0
                    with torch.autocast("cpu", dtype=torch.bfloat16):
                        removed = run_block(block, inputs)
                    truth["output"].append(float(torch.sqrt(sum(((a.float() - b.float()) ** 2).sum()
                                                                for a, b in zip(dense.hidden, removed.hidden, strict=True)))))
                    truth["loss"].append(loss(lm.model, windows) - base_loss)
                    linear.weight[:, cols] = saved
                picks.append((layer, kind, index))
            print("measured layer", layer, flush=True)
        inputs = dense

    results = {"command": "python benchmarks/fidelity.py " + " ".join(f"--{k.replace('_', '-')} {v}" if not isinstance(v, list)
                                                                       else f"--{k} {' '.join(map(str, v))}" for k, v in vars(args).items()),
               "structures": len(picks), "correlation": {}}
    for name, table in tables.items():
        predicted = torch.tensor([float((table.scores[lay].heads if k == "head" else table.scores[lay].channels)[i]) for lay, k, i in picks])
        row = {}
        for target in ("output", "loss"):
            true = torch.tensor(truth[target])
            row[target] = {"all": spearman(predicted, true)}
            for kind in ("head", "channel"):
                mask = torch.tensor([k == kind for _, k, _ in picks])
                row[target][kind + "s_within_layer_mean"] = float(torch.tensor([
                    spearman(predicted[mask & (torch.tensor([lay == layer for lay, _, _ in picks]))],
                             true[mask & (torch.tensor([lay == layer for lay, _, _ in picks]))])
                    for layer in args.layers]).mean())
        results["correlation"][name] = row
        print(name, json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
