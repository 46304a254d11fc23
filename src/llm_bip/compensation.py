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


def solve_refit(
    cross: torch.Tensor, gram: torch.Tensor, prior: torch.Tensor, mean: torch.Tensor | None, target_mean: torch.Tensor | None,
    damping: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Ridge least squares for W' (and an intercept b) minimising E_t ||t_t - W' x_t - b||^2.

    Inputs are per-token expectations over the kept inputs x: `cross` = E[t x^T] [out, in], `gram` =
    E[x x^T], `mean` = E[x], `target_mean` = E[t]; `prior` is the weight the ridge pulls towards (the
    original W_S), so nothing moves where the data says nothing. The ridge is scaled per input by its
    own energy (damping · G_ii): massive-activation channels, whose energy is orders of magnitude above
    the rest, neither dominate nor starve the damping of the others.
    Normal equations: W' (G + D) = E[t x^T] + W_prior D, with D = damping · diag(G).
    """
    g, c, w0 = gram.double(), cross.double(), prior.double()
    if mean is not None:
        dim = g.shape[0]
        aug = torch.empty(dim + 1, dim + 1, dtype=torch.float64)
        aug[:dim, :dim] = g
        aug[:dim, dim] = aug[dim, :dim] = mean.double()
        aug[dim, dim] = 1.0
        g = aug
        c = torch.cat([c, target_mean.double()[:, None]], dim=1)
        w0 = torch.cat([w0, torch.zeros(w0.shape[0], 1, dtype=torch.float64)], dim=1)
    d = damping * torch.diagonal(g).clamp_min(1e-12)
    solution = torch.linalg.solve(g + torch.diag(d), (c + w0 * d).T).T  # G + D is symmetric
    if mean is not None:
        return solution[:, :-1].float(), solution[:, -1].float()
    return solution.float(), None


def refit_weight(
    weight: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor, mean: torch.Tensor | None = None,
    damping: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Refit on the kept inputs S to reproduce the layer's own dense output W x (t = W x):
    E[t x_S^T] = W G_{:,S} and E[t] = W E[x], from the full input Gram `gram` = E[x x^T]."""
    w, g = weight.double(), gram.double()
    keep = keep.long()
    cross = w @ g[:, keep]
    target_mean = w @ mean.double() if mean is not None else None
    return solve_refit(cross, g[keep][:, keep], w[:, keep], mean[keep] if mean is not None else None, target_mean, damping)
