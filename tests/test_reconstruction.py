"""Block reconstruction (`--reconstruct`): each cut block trained towards the dense block's outputs, kept only
where its held-out error falls."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import FAMILIES, tiny_model, tiny_samples
from llm_bip.cli import main as cli_main
from llm_bip.errors import LlmBipError
from llm_bip.pipeline import PruneConfig, prune
from llm_bip.reconstruction import Reconstruction, split_batches

pytestmark = pytest.mark.usefixtures("one_thread")


def _logits(lm, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return lm.model(ids).logits.float()


def _pruned(family: str, ids: torch.Tensor, **options):
    lm = tiny_model(family)
    result = prune(lm, PruneConfig(ratio=0.3, **options), ids, batch_size=2, progress=False)
    return lm, result


@pytest.mark.parametrize("family", FAMILIES)
def test_reconstruction_lowers_every_blocks_held_out_error_at_the_same_widths(family):
    # Two samples, each repeated: the held-out batch is text the block trains on, so a small rate must lower its
    # error (without a refit, so there is error to lower).
    ids = tiny_samples(n=2, length=12).repeat(8, 1)
    plain, plain_result = _pruned(family, ids, compensation="none")
    rebuilt, result = _pruned(family, ids, compensation="none", reconstruct=True, reconstruct_lr=1e-4,
                              reconstruct_epochs=4)

    # The widths are the plain prune's; the first block's choice too (later blocks choose on the stream that the
    # reconstructed blocks before them pass on, as the pruned model will).
    assert [b.widths for b in result.plan.blocks] == [b.widths for b in plain_result.plan.blocks]
    assert result.plan.blocks[0] == plain_result.plan.blocks[0]
    entries = [b["reconstruction"] for b in result.report["compensation"]["blocks"]]
    assert len(entries) == len(rebuilt.adapter.blocks(rebuilt.model))
    for e in entries:
        assert e["trained_weights_kept"]
        assert e["held_out_error_after"] < 0.8 * e["held_out_error_before"]
        assert e["steps"] == 4 * 7  # 8 batches of 2, one held out
    summary = result.report["reconstruction"]
    assert (summary["blocks_trained"], summary["blocks_kept"]) == (len(entries), len(entries))
    assert result.report["config"]["reconstruct"] is True
    # The same parameters in the same shapes as the plain prune's: only values moved.
    assert {k: v.shape for k, v in rebuilt.model.state_dict().items()} == {
        k: v.shape for k, v in plain.model.state_dict().items()}
    assert not torch.equal(_logits(rebuilt, ids), _logits(plain, ids))


def test_a_block_whose_held_out_error_grows_keeps_its_weights():
    ids = tiny_samples(n=16, length=12)
    plain, _ = _pruned("llama", ids)
    wrecked, result = _pruned("llama", ids, reconstruct=True, reconstruct_lr=0.9, reconstruct_epochs=8)
    entries = [b["reconstruction"] for b in result.report["compensation"]["blocks"]]
    assert not any(e["trained_weights_kept"] for e in entries)
    assert all(not e["held_out_error_after"] < e["held_out_error_before"] for e in entries)
    assert torch.equal(_logits(wrecked, ids), _logits(plain, ids))


def test_bf16_weights_stay_bf16_and_train_in_float32():
    ids = tiny_samples(n=2, length=12).repeat(4, 1)
    options = {"ratio": 0.3, "compensation": "none"}
    plain, rebuilt = tiny_model("llama"), tiny_model("llama")
    for lm in (plain, rebuilt):
        lm.model.to(torch.bfloat16)
    prune(plain, PruneConfig(**options), ids, batch_size=2, progress=False)
    result = prune(rebuilt, PruneConfig(**options, reconstruct=True, reconstruct_lr=1e-4, reconstruct_epochs=4), ids,
                   batch_size=2, progress=False)
    assert {p.dtype for p in rebuilt.model.parameters()} == {torch.bfloat16}
    entries = [b["reconstruction"] for b in result.report["compensation"]["blocks"]]
    assert all(e["trained_weights_kept"] and e["steps"] == 4 * 3 for e in entries)
    assert not torch.equal(_logits(rebuilt, ids), _logits(plain, ids))


def test_held_out_batches_and_their_limits():
    assert split_batches(2) == ([0], [1])
    assert split_batches(32) == ([0, 1], list(range(2, 32)))
    with pytest.raises(LlmBipError, match="holds one calibration batch out"):
        split_batches(1)
    with pytest.raises(LlmBipError, match="holds one calibration batch out"):
        prune(tiny_model("llama"), PruneConfig(ratio=0.3, reconstruct=True), tiny_samples(n=2), batch_size=8,
              progress=False)


@pytest.mark.parametrize("options, message", [
    ({"reconstruct_lr": 0.0}, "learning rate"),
    ({"reconstruct_epochs": 0}, "epochs"),
    ({"reconstruct": True, "ratio": None, "remove_blocks": 1}, "whole blocks only"),
])
def test_config_refuses_what_cannot_apply(options, message):
    with pytest.raises(LlmBipError, match=message):
        PruneConfig(**options).validate()
    assert Reconstruction().lr == PruneConfig().reconstruct_lr


@pytest.mark.parametrize(("extra", "message"), [
    (["--reconstruct-lr", "1e-3"], "--reconstruct-lr cannot apply without --reconstruct"),
    (["--reconstruct-epochs", "2"], "--reconstruct-epochs cannot apply without --reconstruct"),
    (["--reconstruct", "--remove-blocks", "2"], "--reconstruct cannot apply: --remove-blocks without --ratio"),
    (["--reconstruct", "--reconstruct-lr", "-1"], "reconstruction learning rate -1.0"),
])
def test_cli_refuses_reconstruction_settings_that_cannot_apply_before_loading(extra, message, tmp_path, capsys):
    args = ["prune", "--model", str(tmp_path / "not-loaded"), "--output", str(tmp_path / "out"), "--quiet", *extra]
    assert cli_main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_streamed_reconstruction_writes_what_the_in_memory_one_writes_and_loads_with_its_logits(family, tokenizer,
                                                                                                 tmp_path):
    from transformers import AutoModelForCausalLM

    from conftest import TINY_CONFIGS
    from llm_bip import api
    from test_streaming import SAMPLES, assert_same_outputs, write_model

    source = write_model(tmp_path / "dense", TINY_CONFIGS[family](), tokenizer)
    # Without a refit and on repeated samples, so that the trained weights are kept (and must be written).
    samples = SAMPLES[:2].repeat(4, 1)
    config = PruneConfig(ratio=0.3, compensation="none", reconstruct=True, reconstruct_lr=1e-4, reconstruct_epochs=4)
    lm = api.load(source)
    _, in_memory = api.prune_to_disk(lm, config, samples, tmp_path / "mem", batch_size=2, progress=False)
    _, streamed = api.prune_to_disk(api.load(source, streaming=True), config, samples, tmp_path / "str",
                                    batch_size=2, progress=False)
    assert_same_outputs(in_memory, streamed)
    record = json.loads((in_memory / "pruning_record.json").read_text())
    summary = record["reconstruction"]
    assert summary["blocks_trained"] == TINY_CONFIGS[family]().num_hidden_layers and summary["blocks_kept"] >= 1
    loaded = AutoModelForCausalLM.from_pretrained(in_memory)
    with torch.no_grad():
        assert torch.equal(loaded(samples[:2]).logits, lm.model(samples[:2]).logits)
