"""Refit-aware selection (optimal brain surgeon): its costs are the true block-output changes after the
refit, its weights are the ridge refit of what it keeps, and it prunes every family."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import FAMILIES, tiny_model
from llm_bip import api
from llm_bip.compensation import output_errors, solve_refit
from llm_bip.config import PruneConfig
from llm_bip.scoring.obs import obs_remove

pytestmark = pytest.mark.usefixtures("one_thread")


def _inputs(tokens=3000, width=120, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, width, generator=generator) * torch.rand(width, generator=generator) * 3
    return x + torch.randn(width, generator=generator) * 0.5


@pytest.mark.parametrize("unit", [1, 8])
def test_surgeon_weights_are_the_ridge_refit_of_what_it_keeps(unit):
    x = _inputs()
    w = torch.randn(32, x.shape[1], generator=torch.Generator().manual_seed(1))
    kept_units, _, new, bias = obs_remove(w, x.T @ x, len(x), x.mean(0), unit, 5, 0.01, steps=3)
    keep = (torch.tensor(kept_units)[:, None] * unit + torch.arange(unit)).reshape(-1)
    g, mu = (x.T @ x / len(x)).double(), x.mean(0).double()
    expected, expected_bias = solve_refit(w.double() @ g[:, keep], g[keep][:, keep], w[:, keep], mu[keep],
                                          w.double() @ mu, 0.01)
    assert torch.allclose(new, expected, atol=1e-4) and torch.allclose(bias, expected_bias, atol=1e-4)


def test_first_cost_is_the_error_of_removing_that_channel_with_the_rest_refit():
    x = _inputs(width=40)
    w = torch.randn(16, x.shape[1], generator=torch.Generator().manual_seed(2))
    kept, costs, new, bias = obs_remove(w, x.T @ x, len(x), x.mean(0), 1, 1, damping=0.0)
    removed = int(torch.isfinite(costs).nonzero()[0])
    plain, refit = output_errors(w, x.T @ x, len(x), x.mean(0), torch.tensor(kept), new, bias)
    assert abs(float(costs[removed]) - refit) < 1e-3 * refit
    # and it was the cheapest: no other single channel's refit error is lower
    for other in range(0, x.shape[1], 7):
        keep = torch.tensor([k for k in range(x.shape[1]) if k != other])
        g, mu = (x.T @ x / len(x)).double(), x.mean(0).double()
        alt, alt_bias = solve_refit(w.double() @ g[:, keep], g[keep][:, keep], w[:, keep], mu[keep], w.double() @ mu, 0.0)
        assert output_errors(w, x.T @ x, len(x), x.mean(0), keep, alt, alt_bias)[1] >= refit * (1 - 1e-6)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("gqa_mode", ["kv-groups", "query-heads"])
def test_refit_aware_selection_prunes_every_family(family, gqa_mode):
    lm = tiny_model(family)
    ids = torch.randint(0, 128, (24, 32), generator=torch.Generator().manual_seed(0))  # 768 tokens
    config = PruneConfig(ratio=0.35, head_ratio=0.5, gqa_mode=gqa_mode, selection="refit-aware")
    scored = copy.deepcopy(lm)
    result = api.prune(lm, config, ids, progress=False)
    api.prune(scored, PruneConfig(ratio=0.35, head_ratio=0.5, gqa_mode=gqa_mode), ids, progress=False)
    widths = [lm.adapter.widths(b) for b in lm.adapter.blocks(lm.model)]
    assert widths == [scored.adapter.widths(b) for b in scored.adapter.blocks(scored.model)]  # same allocation
    with torch.no_grad():
        logits = lm.model(ids).logits
    assert torch.isfinite(logits).all()
    assert all(v.startswith(("refit", "plain cut")) for b in result.report["compensation"]["blocks"] for v in b.values())


def test_refit_aware_needs_the_refit():
    from llm_bip.errors import LlmBipError

    with pytest.raises(LlmBipError, match="needs --compensation refit"):
        PruneConfig(selection="refit-aware", compensation="bias").validate()
