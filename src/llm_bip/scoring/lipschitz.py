"""Estimates of L, the local Lipschitz constant of the FFN branch F∘N2 on the calibration data.

A head's removal changes the residual stream by u; the block output then changes by
u + F(N2(h)) - F(N2(h - u)), whose norm is at most (1 + L)·||u||. Where a norm follows the FFN
(Gemma's post-FFN norm N3) the branch is N3∘F∘N2.
"""

from __future__ import annotations

import torch
from torch import nn


def ffn_branch(norm: nn.Module, mlp: nn.Module, out_norm: nn.Module | None = None):
    def branch(h: torch.Tensor) -> torch.Tensor:
        f = mlp(norm(h.to(norm.weight.dtype)))
        return (f if out_norm is None else out_norm(f)).float()

    return branch


@torch.no_grad()
def jvp_power_iteration(norm: nn.Module, mlp: nn.Module, residual: torch.Tensor, iterations: int = 8,
                        seed: int = 0, out_norm: nn.Module | None = None) -> torch.Tensor:
    """Per-token spectral norm of the Jacobian of F∘N2 at each sampled residual vector, by power
    iteration with forward-mode JVPs (J v) and reverse-mode VJPs (J^T w). The FFN acts token by token,
    so a batch of tokens is a batch of independent Jacobians.

    Runs under no_grad: torch.func differentiates through its own levels regardless, while outer
    grad mode would make every iterate carry an autograd graph back to the (trainable) weights, so
    memory would grow with each iteration."""
    branch = ffn_branch(norm, mlp, out_norm)
    h = residual.float()
    generator = torch.Generator().manual_seed(seed)
    v = torch.randn(h.shape, generator=generator)
    v = v / v.norm(dim=-1, keepdim=True)
    sigma = torch.zeros(h.shape[0])
    _, vjp_fn = torch.func.vjp(branch, h)
    for _ in range(iterations):
        _, jv = torch.func.jvp(branch, (h,), (v,))
        sigma = jv.norm(dim=-1)
        (jtjv,) = vjp_fn(jv)
        v = jtjv / jtjv.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return sigma


def exact_output_change(norm: nn.Module, mlp: nn.Module, residual: torch.Tensor, removed: torch.Tensor,
                        out_norm: nn.Module | None = None) -> torch.Tensor:
    """||Δy_t|| when the attention output contribution `removed` (u_t) is taken out of the residual h_t."""
    branch = ffn_branch(norm, mlp, out_norm)
    h = residual.float()
    delta = removed + branch(h) - branch(h - removed)
    return delta.norm(dim=-1)
