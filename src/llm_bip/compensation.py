"""Training-free repair of the block output that the cut changed (METHOD.md, "Recovery").

- bias compensation (FLAP): the removed inputs' mean contribution W[:, removed] · mean(x[removed])
  goes into the output bias of o_proj / down_proj, so the block output keeps its mean;
- least-squares refit: o_proj / down_proj weights re-solved on the kept inputs to reproduce the dense
  block output, in closed form from the calibration Gram matrix (ridge-damped).
"""

from __future__ import annotations

import torch
from torch import nn

from llm_bip.adapters import FamilyAdapter


@torch.no_grad()
def add_output_bias(adapter: FamilyAdapter, linear: nn.Linear, delta: torch.Tensor) -> None:
    adapter.zero_bias_like(linear)
    linear.bias += delta.to(linear.bias.dtype).to(linear.bias.device)


def bias_shift(weight: torch.Tensor, mean: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """W[:, removed] · mean(x[removed]): the average output that the removed inputs contributed."""
    removed = torch.ones(weight.shape[1], dtype=torch.bool)
    removed[keep] = False
    return weight.float()[:, removed] @ mean.float()[removed]


def refit_weight(
    weight: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor, mean: torch.Tensor | None = None,
    damping: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Least-squares W' on kept inputs S minimising sum_t ||W x_t - W' x_{S,t} (- b)||^2.

    Normal equations: W' G_SS = W G_{:,S}. With `mean` an intercept b is solved jointly through the
    augmented Gram [[G, s], [s^T, n]] (scaled to a per-token mean), so the bias is refit as well.
    Ridge damping: `damping` times the mean diagonal of G_SS, which keeps the solve stable.
    """
    w = weight.double()
    g = gram.double()
    keep = keep.long()
    if mean is not None:
        # Work with E[x x^T] and E[x]: append a constant-1 input whose weight is the bias.
        dim = g.shape[0]
        aug = torch.empty(dim + 1, dim + 1, dtype=torch.float64)
        aug[:dim, :dim] = g
        aug[:dim, dim] = aug[dim, :dim] = mean.double()
        aug[dim, dim] = 1.0
        g = aug
        w = torch.cat([w, torch.zeros(w.shape[0], 1, dtype=torch.float64)], dim=1)
        keep = torch.cat([keep, torch.tensor([dim])])
    g_ss = g[keep][:, keep]
    diag = torch.diagonal(g_ss)
    ridge = damping * diag.mean().clamp_min(1e-12)
    rhs = w @ g[:, keep]  # [out, |S|]
    system = g_ss + ridge * torch.eye(len(keep), dtype=torch.float64)
    solution = torch.linalg.solve(system, rhs.T).T  # W' = rhs · (G_SS + λI)^-1 (symmetric)
    if mean is not None:
        return solution[:, :-1].float(), solution[:, -1].float()
    return solution.float(), None
