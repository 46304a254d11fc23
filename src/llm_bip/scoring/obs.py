"""Selection that knows about the refit: remove the inputs of o_proj / down_proj whose loss the refit of
the others can best make up for (optimal brain surgeon, structured).

The refit minimises tr(ΔW (G + D) ΔWᵀ) over the kept columns, ΔW = W − W', with G the inputs' Gram
matrix (augmented with their mean and a constant 1 for the intercept) and D the ridge. For that
quadratic the block-output change of removing a unit U of columns (one channel, one head's head_dim
columns, one KV group's) with every other column refit is, in closed form,

    cost(U) = tr( W_U (H⁻¹_UU)⁻¹ W_Uᵀ ),   H = G + D

(for one channel ||W[:, k]||² / [H⁻¹]_kk), and removing it updates the rest by
W ← W − W_U (H⁻¹_UU)⁻¹ H⁻¹_U,: and H⁻¹ ← H⁻¹ − H⁻¹_:,U (H⁻¹_UU)⁻¹ H⁻¹_U,: . Units go greedily, a few at a
time, cheapest first. sqrt(cost) is LLM-BIP's metric, a structure's influence on its block's output,
measured after compensation instead of before.
"""

from __future__ import annotations

import math

import torch


def obs_remove(
    weight: torch.Tensor, gram_sum: torch.Tensor, tokens: int, mean: torch.Tensor | None, unit: int, remove: int,
    damping: float, steps: int = 32,
) -> tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Greedily remove `remove` units of `unit` consecutive input columns of `weight` [out, in].

    `gram_sum` is Σ_t x xᵀ over `tokens` tokens; with `mean` an intercept is part of the refit (its
    constant input is never removed). Returns the kept units (sorted), each unit's cost at the moment it
    was removed (the squared block-output change per token; +inf for kept units), and the refit: the
    kept columns' new weights and the intercept (None without `mean`) -- the ridge refit of the kept
    columns, which the surgeon's updates arrive at."""
    out_dim, in_dim = weight.shape
    units = in_dim // unit
    device = weight.device
    h = torch.empty(in_dim + (mean is not None), in_dim + (mean is not None), dtype=torch.float64, device=device)
    h[:in_dim, :in_dim] = gram_sum.to(device, torch.float64) / tokens
    if mean is not None:
        h[:in_dim, in_dim] = h[in_dim, :in_dim] = mean.to(device, torch.float64)
        h[in_dim, in_dim] = 1.0
    h.diagonal().add_(damping * h.diagonal().clamp_min(1e-12))
    torch.linalg.cholesky(h, out=h)
    hinv = torch.cholesky_inverse(h)
    del h
    w = weight.detach().to(torch.float64)
    if mean is not None:
        w = torch.cat([w, torch.zeros(out_dim, 1, dtype=torch.float64, device=device)], dim=1)
    alive = torch.ones(units, dtype=torch.bool, device=device)
    costs = torch.full((units,), math.inf, dtype=torch.float64)
    per_step = max(1, math.ceil(remove / steps))
    removed = 0
    while removed < remove:
        cost = _unit_costs(w, hinv, unit, units)
        cost[~alive] = math.inf
        take = min(per_step, remove - removed)
        chosen = torch.topk(cost, take, largest=False).indices
        columns = (chosen[:, None] * unit + torch.arange(unit, device=device)).reshape(-1)
        block_inv = torch.linalg.inv(hinv[columns][:, columns])  # (H⁻¹_UU)⁻¹ for the chosen units together
        w -= (w[:, columns] @ block_inv) @ hinv[columns]
        hinv -= hinv[:, columns] @ block_inv @ hinv[columns]
        w[:, columns] = 0  # exact zeros (the update makes them ~0)
        hinv[columns] = 0
        hinv[:, columns] = 0
        costs[chosen.cpu()] = cost[chosen].cpu()
        alive[chosen] = False
        removed += take
    kept = alive.nonzero().flatten().tolist()
    columns = (torch.tensor(kept, device=device)[:, None] * unit + torch.arange(unit, device=device)).reshape(-1)
    bias = w[:, in_dim].float() if mean is not None else None
    return kept, costs, w[:, columns].float(), bias


def _unit_costs(w: torch.Tensor, hinv: torch.Tensor, unit: int, units: int) -> torch.Tensor:
    if unit == 1:
        diag = torch.diagonal(hinv)[: units]
        return (w[:, :units] ** 2).sum(0) / diag.clamp_min(1e-30)
    width = units * unit
    blocks = hinv[:width, :width].reshape(units, unit, units, unit).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    wu = w[:, :width].reshape(w.shape[0], units, unit).permute(1, 0, 2)  # [units, out, unit]
    alive = torch.diagonal(blocks, dim1=1, dim2=2).sum(1) > 0
    cost = torch.full((units,), math.inf, dtype=torch.float64, device=w.device)
    if alive.any():
        solved = torch.linalg.solve(blocks[alive], wu[alive].transpose(1, 2))  # (H⁻¹_UU)⁻¹ W_Uᵀ
        cost[alive] = (wu[alive].transpose(1, 2) * solved).sum((1, 2))
    return cost
