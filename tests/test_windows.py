"""Windows of text: perplexity's and calibration's, bare for most families and BOS-first for Gemma."""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch

from conftest import VOCAB, tiny_model
from llm_bip import api
from llm_bip.data import (
    calibration_held_out,
    calibration_samples,
    calibration_starts,
    held_out_windows,
    text_windows,
)
from llm_bip.errors import LlmBipError
from llm_bip.evaluation.perplexity import compute_context, window_losses

BOS = 7


def test_windows_with_bos_hold_the_text_in_order_after_the_bos():
    ids = torch.arange(100, 150)
    bare = text_windows(ids, 10)
    assert bare.shape == (5, 10) and torch.equal(bare.flatten(), ids)
    with_bos = text_windows(ids, 10, bos_id=BOS)
    assert with_bos.shape == (5, 10)  # 50 tokens // 9 per window
    assert torch.equal(with_bos[:, 0], torch.full((5,), BOS))
    assert torch.equal(with_bos[:, 1:].flatten(), ids[:45])
    assert text_windows(ids, 10, max_windows=2, bos_id=BOS).shape == (2, 10)
    with pytest.raises(LlmBipError, match="fewer than one window"):
        text_windows(ids[:8], 10, bos_id=BOS)


def test_calibration_samples_with_bos_are_the_bare_samples_one_shorter():
    class Tokenizer:
        def __call__(self, text, **_kwargs):
            return {"input_ids": [int(t) for t in text.split()]}

    text = " ".join(str(i) for i in range(1000, 1400))
    bare = calibration_samples(Tokenizer(), text, 4, 16, seed=3)
    first = calibration_samples(Tokenizer(), text, 4, 16, seed=3, bos_id=BOS)
    assert first.shape == bare.shape == (4, 16)
    assert torch.equal(first[:, 0], torch.full((4,), BOS))
    assert (first[:, 2:] - first[:, 1:-1] == 1).all()  # contiguous text after the BOS


def _evaluate(family: str, tokenizer) -> tuple[dict, torch.nn.Module]:
    lm = dataclasses.replace(tiny_model(family), tokenizer=tokenizer)
    ids = torch.randint(8, VOCAB, (60,), generator=torch.Generator().manual_seed(0))
    result = api.evaluate(lm, ["text"], [10], progress=False, tokenized={"text": ids})["text@10"]
    return result, lm.model, ids


@pytest.mark.usefixtures("one_thread")
def test_gemma_is_measured_on_bos_first_windows_and_llama_on_bare_ones():
    result, model, ids = _evaluate("gemma3_text", SimpleNamespace(bos_token_id=BOS))
    assert result["bos_per_window"] is True and result["windows"] == 6  # 60 // 9
    windows = text_windows(ids, 10, bos_id=BOS)
    with torch.no_grad(), compute_context(model, result["dtype"]):  # the dtype it says it computed in
        hidden = model.base_model(windows, use_cache=False).last_hidden_state
        expected = math.exp(window_losses(model, hidden, windows).mean().item())
    assert result["perplexity"] == pytest.approx(expected, rel=1e-4)

    bare, _, _ = _evaluate("llama", SimpleNamespace(bos_token_id=BOS))
    assert "bos_per_window" not in bare and bare["windows"] == 6  # 60 // 10


def test_gemma_without_a_bos_token_is_refused_with_what_to_do():
    with pytest.raises(LlmBipError, match="BOS token"):
        _evaluate("gemma2", SimpleNamespace(bos_token_id=None))


def test_held_out_windows_share_no_token_with_the_calibration_samples():
    ids = torch.arange(10_000)
    samples = calibration_samples(_Tokens(ids), "text", 40, 64, seed=3)
    taken = calibration_starts(ids.numel(), 40, 64, 3)
    held = held_out_windows(ids, 64, 16, taken, 64)
    assert torch.equal(calibration_held_out(ids, 16, 40, 64, 3), held)  # what the auto speed route judges on
    assert held.shape == (16, 64)
    assert not set(held.flatten().tolist()) & set(samples.flatten().tolist())
    assert held[:, 0].tolist() == sorted(held[:, 0].tolist()) and held[-1, 0] > 5_000  # spread over the text
    with_bos = held_out_windows(ids, 64, 16, taken, 64, bos_id=-1)
    assert with_bos.shape == (16, 64) and (with_bos[:, 0] == -1).all()
    with pytest.raises(LlmBipError, match="no 64-token window outside the calibration samples"):
        held_out_windows(torch.arange(200), 64, 4, [0, 60, 120], 64)


class _Tokens:
    """A tokenizer whose text is already its ids (calibration_samples tokenizes through it)."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def __call__(self, _text, **_kwargs):
        return {"input_ids": self.ids.tolist()}
