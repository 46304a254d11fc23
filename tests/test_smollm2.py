"""The real model: SmolLM2-135M-Instruct (LLaMA architecture, 9 query / 3 KV heads)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from llm_bip import api
from llm_bip.pipeline import PruneConfig

pytestmark = pytest.mark.real_model


def test_dense_perplexity_is_the_reference(smollm2, wikitext_test):
    result = api.evaluate(smollm2, [str(wikitext_test)], [128], max_windows=30, progress=False)
    assert 35 < result["wiki.test@128"]["perplexity"] < 75  # ~52 on 150 windows; far off means a bug


def test_llm_bip_20_percent_loads_back_and_beats_random(smollm2, wikitext_test, tmp_path):
    samples, info = api.calibrate(smollm2, "wikipedia", num_samples=16, seq_len=128)
    ppl = {}
    for method in ("llm-bip", "random"):
        lm = copy.deepcopy(smollm2)
        result = api.prune(lm, PruneConfig(method=method, ratio=0.2, compensation="bias"), samples, info, progress=False)
        assert abs(result.report["removed_fraction"]["non_embedding"] - 0.2) < 0.002
        ppl[method] = api.evaluate(lm, [str(wikitext_test)], [128], max_windows=20, progress=False)["wiki.test@128"]["perplexity"]
        if method == "llm-bip":
            out = api.save(lm, tmp_path / "pruned", record=result.report)
            ids = samples[:2]
            loaded = AutoModelForCausalLM.from_pretrained(out).eval()
            with torch.no_grad():
                assert torch.allclose(loaded(ids).logits, lm.model(ids).logits, atol=1e-4)
    assert ppl["llm-bip"] < ppl["random"], ppl


def test_default_refit_with_tiny_calibration_stays_safe(smollm2, wikitext_test):
    """4 x 64 calibration tokens once took the default refit to perplexity 66 million (no compensation: 89):
    fewer tokens than inputs cannot determine a refit, so the plain cut is kept and the run says so."""
    samples, info = api.calibrate(smollm2, "wikipedia", num_samples=4, seq_len=64)
    ppl = {}
    for compensation in ("refit", "none"):
        lm = copy.deepcopy(smollm2)
        result = api.prune(lm, PruneConfig(ratio=0.2, compensation=compensation), samples, info, progress=False)
        ppl[compensation] = api.evaluate(lm, [str(wikitext_test)], [128], max_windows=20,
                                         progress=False)["wiki.test@128"]["perplexity"]
        if compensation == "refit":
            assert all(b["down_proj"].startswith("plain cut: 256 tokens") for b in result.report["compensation"]["blocks"])
    assert ppl["refit"] <= 1.02 * ppl["none"], ppl
