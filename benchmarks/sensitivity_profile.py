"""How much each block matters to the whole model, against what the block itself sees (the quality issue).

For each block alone: the lowest-scoring fraction f of its FFN channels (||W_down[:, k]||^2 · E[a_k^2] over the
calibration tokens) is removed and down_proj refit on the rest (ridge 0.01, from the dense model's Gram matrix
over 128 × 256 Wikipedia tokens); then the change of the mean next-token loss on 16 other Wikipedia samples of
256 tokens (seed 777), and the block's own output error with and without the refit (from the Gram matrix).
Dense model, one block at a time, bf16 forward passes.

    python benchmarks/sensitivity_profile.py smollm2-135m benchmarks/results/sensitivity_profile_smollm2.json \\
        0.1,0.2,0.3,0.45,0.6,0.75,0.9
"""

from __future__ import annotations

import json
import math
import sys

import torch

from llm_bip import api
from llm_bip.compensation import solve_refit
from llm_bip.data import calibration_samples, load_text


def gram_matrices(model, blocks, samples: torch.Tensor) -> list[torch.Tensor]:
    """Each block's down_proj input Gram matrix (float32 sums) over `samples`."""
    grams: list[torch.Tensor | None] = [None] * len(blocks)

    def hook(layer):
        def gather(_module, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            grams[layer] = x.T @ x if grams[layer] is None else grams[layer] + x.T @ x
        return gather

    handles = [b.mlp.down_proj.register_forward_pre_hook(hook(i)) for i, b in enumerate(blocks)]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for i in range(0, len(samples), 16):
            model(samples[i : i + 16])
    for h in handles:
        h.remove()
    return grams


def mean_loss(model, held: torch.Tensor) -> float:
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        losses = [model(held[i : i + 8], labels=held[i : i + 8]).loss.item() for i in range(0, len(held), 8)]
    return sum(losses) / math.ceil(len(held) / 8)


def trial(weight: torch.Tensor, gram: torch.Tensor, fraction: float) -> tuple[torch.Tensor, float, float]:
    """The refit weight with the lowest-scoring `fraction` of columns removed, and the plain and refit errors."""
    w, g = weight.double(), gram.double()
    order = torch.argsort(w.norm(dim=0) ** 2 * torch.diagonal(g))
    removed, keep = order[: round(fraction * w.shape[1])], torch.sort(order[round(fraction * w.shape[1]) :]).values
    # The prune's own ridge refit of the kept columns towards the full output W x (E[t x_k^T] = W G[:, keep]).
    kept = solve_refit(w @ g[:, keep], g[keep][:, keep], w[:, keep], None, None)[0].double()
    plain_error = torch.einsum("ij,jk,ik->", w[:, removed], g[removed][:, removed], w[:, removed]).item()
    change = -w.clone()
    change[:, keep] += kept
    refit_error = torch.einsum("ij,jk,ik->", change, g, change).item()
    new = torch.zeros_like(weight)
    new[:, keep] = kept.to(weight.dtype)
    return new, plain_error, refit_error


def main() -> None:
    model_name, out = sys.argv[1], sys.argv[2]
    fractions = [float(x) for x in sys.argv[3].split(",")] if len(sys.argv) > 3 else [0.27]
    lm = api.load(model_name)
    model = lm.model.eval()
    blocks = lm.adapter.blocks(model)
    samples, _ = api.calibrate(lm, "wikipedia", 128, 256, 0)
    held = calibration_samples(lm.tokenizer, load_text("wikipedia", split="train"), 16, 256, 777)
    grams = gram_matrices(model, blocks, samples)
    base = mean_loss(model, held)
    result = {"command": "python benchmarks/sensitivity_profile.py " + " ".join(sys.argv[1:]), "base": base,
              "blocks": []}
    for layer, block in enumerate(blocks):
        down = block.mlp.down_proj
        original = down.weight.data.clone()
        row: dict = {"layer": layer}
        for f in fractions:
            new, plain_error, refit_error = trial(original, grams[layer], f)
            down.weight.data.copy_(new)
            row[f"{f}"] = {"dloss": mean_loss(model, held) - base, "plain_err": plain_error, "refit_err": refit_error}
            down.weight.data.copy_(original)
        result["blocks"].append(row)
        print(layer, {k: v["dloss"] for k, v in row.items() if k != "layer"}, flush=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
